"""Machine-state probe: two fixed workloads timed next to every calibration and validation.

A shared or throttled machine does not run at one speed: the same isolated operators can time
differently a few hours apart, small dispatch-bound ones most, large convolutions hardly at all.
A validation run
then mixes the predictor's error with the machine's drift since the profile was measured. The probe
separates the two: a *dispatch* workload (a stack of tiny ``nn.Linear`` layers, batch 1: Python
and framework overhead) and a *compute* workload (one 3x3 convolution, 64 channels at 32x32:
arithmetic throughput), both timed under the same conditions as the profile's entries. The reading
taken at calibration is stored in the profile; validation takes another and reports the change,
so a reader sees how much of a validation's error is the machine. It never changes a prediction:
the profile describes the device as measured.
"""

from __future__ import annotations

import torch
from torch import nn

from autocompress.evaluators.latency import time_callable, torch_threads
from autocompress.hw_profiles.profile import ProbeReading

DRIFT_WARN_PCT = 5.0  # a probe this far from its profile reading is reported as drift


@torch.inference_mode(False)  # ordinary parameters, like every timed model's
def _workloads() -> tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dispatch = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.ReLU())]).eval()
        compute = nn.Conv2d(64, 64, 3, padding=1).eval()
    return dispatch, torch.randn(1, 16, generator=generator), compute, torch.randn(1, 64, 32, 32, generator=generator)


def read_probe(threads: int = 1, measured_at: str = "") -> ProbeReading:
    """Time both probe workloads (run it where the measurements run: same pinning and threads)."""
    dispatch, x_small, compute, x_big = _workloads()
    with torch_threads(threads), torch.inference_mode():
        small = time_callable(lambda: dispatch(x_small), threads=threads)
        big = time_callable(lambda: compute(x_big), threads=threads)
    return ProbeReading(dispatch_us=small.median_ms * 1e3, compute_ms=big.median_ms, measured_at=measured_at)


def drift(reference: ProbeReading, now: ProbeReading) -> tuple[float, float]:
    """(dispatch, compute) change in % of ``now`` against ``reference``; positive = slower now."""
    return (
        (now.dispatch_us / reference.dispatch_us - 1) * 100,
        (now.compute_ms / reference.compute_ms - 1) * 100,
    )


def describe_drift(reference: ProbeReading | None, now: ProbeReading) -> str:
    """One line for reports: the machine now against when the profile was calibrated."""
    if reference is None:
        return (
            f"machine probe: dispatch {now.dispatch_us:.1f} us, compute {now.compute_ms:.3f} ms "
            "(the profile has no probe reading to compare with)"
        )
    d, c = drift(reference, now)
    verdict = (
        "steady"
        if max(abs(d), abs(c)) < DRIFT_WARN_PCT
        else "DRIFTED: part of the error is the machine, not the profile"
    )
    return f"machine vs when the profile was calibrated: dispatch {d:+.1f}%, compute {c:+.1f}% ({verdict})"
