"""Latency measured on this host: fixed thread count, warm-up, median (and p90) of repeats.

Measurement is the ground truth every latency figure in autocompress comes from; lookup-table
predictions (hardware profiles) are checked against it. :func:`measure_latency` times a model;
:func:`time_callable` times anything, down to single operators of a few microseconds (batched
calls per sample, re-measured when noisy), and :func:`pinned_cpu` keeps the measuring process on
one core. The hardware-profile tools use both.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.inputs import Inputs, call


@dataclass(frozen=True)
class Latency:
    """Batch latency in milliseconds: median and 90th percentile over ``repeats`` runs."""

    median_ms: float
    p90_ms: float
    repeats: int
    threads: int


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous value."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    model: nn.Module,
    example_input: Inputs,
    *,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> Latency:
    """Time ``model`` on ``example_input`` (any :mod:`autocompress.inputs` pytree: a tensor, a tuple, a dict
    of ``input_ids`` ...) in eval/inference mode; the median resists outliers."""
    was_training = model.training
    model.eval()
    times = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            call(model, example_input)
        for _ in range(repeats):
            start = time.perf_counter()
            call(model, example_input)
            times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    times.sort()
    return Latency(median_ms=statistics.median(times), p90_ms=_percentile(times, 0.9), repeats=repeats, threads=threads)


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def time_callable(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 20.0,
    repeats: int = 30,
    min_sample_ms: float = 1.0,
    max_spread: float = 1.3,
    attempts: int = 3,
    threads: int = 1,
) -> Latency:
    """Per-call latency of ``fn()``: warm-up, then the median and p90 of ``repeats`` timed samples.

    Built for operators measured in isolation, which can take microseconds: each sample times as
    many back-to-back calls as fill ``min_sample_ms`` (so timer resolution and the loop cost do not
    dominate), and the per-call time is the sample divided by the call count. Outlier-robust: the
    median ignores stray slow samples, and when the run is noisy (p90/median above ``max_spread``,
    e.g. another process took the CPU) it is measured again, up to ``attempts`` times, keeping the
    quietest run (the lowest median: interference only ever adds time). ``threads`` is only recorded;
    the caller fixes the thread count of whatever ``fn`` runs.
    """
    if repeats < 3:
        raise ValueError(f"repeats={repeats}: need at least 3 samples for a median and p90")
    start = time.perf_counter()
    fn()  # first call: allocations, lazy initialisation
    calls = 1
    while (time.perf_counter() - start) * 1e3 < warmup_ms or calls < 3:
        fn()
        calls += 1
    single_ms = (time.perf_counter() - start) * 1e3 / calls
    number = max(1, int(math.ceil(min_sample_ms / max(single_ms, 1e-6))))
    best: Latency | None = None
    for _ in range(max(1, attempts)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / number)
        times.sort()
        result = Latency(
            median_ms=statistics.median(times), p90_ms=_percentile(times, 0.9), repeats=repeats, threads=threads
        )
        if best is None or result.median_ms < best.median_ms:
            best = result
        if result.p90_ms <= max_spread * result.median_ms:
            break
    assert best is not None
    return best


# How many round-robin passes :func:`time_in_passes` makes by default. On a shared VM the machine's
# speed moves within seconds, and a candidate's repeats fall into one such state, so one pass is not
# enough: more passes reproduce a candidate's latency more closely between two interleaved sets.
# Isolated operators (LUT entries) get LUT_PASSES: there are hundreds.
END_TO_END_PASSES = 5
LUT_PASSES = 3
# A pass this much slower than the callable's median pass is a burst of interference: left out.
BURST = 1.3


def time_in_passes(
    fns: Sequence[Callable[[], object]],
    passes: int = END_TO_END_PASSES,
    *,
    warmup_ms: float = 20.0,
    repeats: int = 30,
    min_sample_ms: float = 1.0,
    threads: int = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Latency]:
    """Each callable's latency over ``passes`` round-robin passes of :func:`time_callable`: the mean
    of its per-pass medians (and p90s), leaving out passes slower than ``BURST`` x its median pass.

    Interleaving spreads every callable's samples over the whole run, so a slow spell of a shared
    machine has to hit the same callable in every pass to skew it. The mean, not the quietest pass:
    a shared VM's speed wanders both ways from pass to pass, and the lowest pass catches a fast
    moment for some candidates and not for others, so the mean reproduces a candidate's latency more
    closely. The timing arguments go to :func:`time_callable`; ``on_step(pass, index)`` is called after
    each timing (for progress output).
    """
    if passes < 1:
        raise ValueError(f"passes={passes}: need at least one pass")
    timed: list[list[Latency]] = [[] for _ in fns]
    for p in range(passes):
        for i, fn in enumerate(fns):
            timed[i].append(
                time_callable(fn, warmup_ms=warmup_ms, repeats=repeats, min_sample_ms=min_sample_ms, threads=threads)
            )
            if on_step is not None:
                on_step(p, i)
    return [_mean_of_passes(runs) for runs in timed]


def _mean_of_passes(runs: list[Latency]) -> Latency:
    typical = statistics.median(r.median_ms for r in runs)
    kept = [r for r in runs if r.median_ms <= BURST * typical]
    return Latency(
        median_ms=statistics.fmean(r.median_ms for r in kept),
        p90_ms=statistics.fmean(r.p90_ms for r in kept),
        repeats=sum(r.repeats for r in kept),
        threads=kept[0].threads,
    )


@contextmanager
def pinned_cpu(cpu: int | None) -> Iterator[None]:
    """Run the block with this process pinned to one CPU (``None``: leave affinity alone).

    Pinning stops the scheduler from migrating the measuring thread between cores mid-sample,
    which is the main source of stray slow samples on a small shared machine. A no-op where
    ``os.sched_setaffinity`` does not exist (macOS, Windows).
    """
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    previous = os.sched_getaffinity(0)
    if cpu not in previous:
        raise ValueError(f"cpu {cpu} is not available to this process (allowed: {sorted(previous)})")
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)
