"""``profile validate``: predicted vs measured end-to-end latency of random candidates of a space.

Candidates are drawn as a search draws them (every parameter uniformly, int8 layers included),
built with the profiling builder, predicted from the profile (timed: the per-candidate cost of a
prediction is part of the report) and measured end to end on this machine exactly as the profile's
calibration was (:func:`~autocompress.hw_profiles.measure.time_end_to_end`: same runtime, threads
and pinned CPU, in a fresh process, the mean over round-robin passes).
The report is the table (printed and CSV), the error summary (median, p90, max of the absolute
percentage error), a predicted-vs-measured scatter plot (PNG) and a JSON summary; the function
returns it all so a caller (the search's MLflow logging) can attach the files.

The machine itself moves: on a shared VM the same calibration candidates, timed the same way, run
at a different speed some minutes after calibration, in either direction. So the profile's own
calibration candidates of the model (up to :data:`REFERENCES`) are re-timed too, spread through
the same passes as the validation candidates; their latency now against their latency at
calibration is the machine's drift on this very model, and the report
gives the error both as measured and with every prediction scaled by that drift
(:class:`~autocompress.hw_profiles.profile.ReferenceDrift`). The raw error is what a reader gets
from the profile today; the scaled one is the predictor's own. All of them, not a few: each ratio
carries the timing noise of two runs, and a median of a few ratios can point the wrong way.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autocompress.evaluators.latency import pinned_cpu
from autocompress.hw_profiles.measure import (
    MeasureSettings,
    calibration_candidates,
    candidate_label,
    now_iso,
    time_end_to_end,
)
from autocompress.hw_profiles.predictor import predict
from autocompress.hw_profiles.probe import DRIFT_WARN_PCT, describe_drift
from autocompress.hw_profiles.profile import (
    ProbeReading,
    Profile,
    ReferenceDrift,
    ValidationRow,
    ValidationSummary,
)
from autocompress.hw_profiles.progress import Progress
from autocompress.hw_profiles.target import Target
from autocompress.spaces.candidate import Candidate

VALIDATION_SEED = 2024  # not the calibration seed: validation candidates are not the fitted ones
REFERENCES = 32  # calibration candidates re-timed beside the validation ones (the same-model drift meter)


@dataclass
class ValidationReport:
    """A validation run: the summary (also storable in the profile), per-candidate prediction times, files."""

    summary: ValidationSummary
    predict_ms: list[float]
    files: list[Path] = field(default_factory=list)

    @property
    def predict_ms_median(self) -> float:
        """Median wall time of one prediction (ms)."""
        return statistics.median(self.predict_ms)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q, method="linear"))


def reference_candidates(profile: Profile, target: Target, k: int = REFERENCES) -> list[tuple[Candidate, float]]:
    """Up to ``k`` of ``target``'s calibration candidates with their latency (ms) as calibrated.

    Empty when the profile holds no calibration of this model under this space (the labels of the
    regenerated candidates must match the stored ones).
    """
    stored = {s.candidate: s.measured_ms for s in profile.calibration if s.model == target.model_name}
    found = []
    for candidate in calibration_candidates(target, len(stored)):
        label = candidate_label(candidate)
        if label in stored:
            found.append((candidate, stored[label]))
        if len(found) == k:
            break
    return found


def _abs_error_pct(predicted_ms: float, measured_ms: float) -> float:
    return abs(predicted_ms - measured_ms) / measured_ms * 100


def _scaled_error(row: ValidationRow, ratio: float) -> float:
    return _abs_error_pct(row.predicted_ms * ratio, row.measured_ms)


def reference_drift(rows: list[ValidationRow], then_ms: list[float], now_ms: list[float]) -> ReferenceDrift:
    """The drift read on re-timed calibration candidates (``then_ms`` at calibration, ``now_ms`` now),
    and ``rows``' error once every prediction is multiplied by the median ratio now/then."""
    if not then_ms or len(then_ms) != len(now_ms):
        raise ValueError(f"need as many reference timings now as at calibration (got {len(now_ms)} and {len(then_ms)})")
    ratios = [now / then for now, then in zip(now_ms, then_ms, strict=True)]
    ratio = statistics.median(ratios)
    errors = [_scaled_error(r, ratio) for r in rows]
    return ReferenceDrift(
        n=len(ratios),
        ratio_median=ratio,
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        median_abs_error_pct=_pct(errors, 50),
        p90_abs_error_pct=_pct(errors, 90),
        max_abs_error_pct=max(errors),
    )


def describe_reference_drift(drift: ReferenceDrift | None) -> str:
    """One line for reports: the same-model drift and the error with predictions scaled by it."""
    if drift is None:
        return "same-model drift: not read (the profile holds no calibration of this model under this space)"
    pct = (drift.ratio_median - 1) * 100
    verdict = "steady" if abs(pct) < DRIFT_WARN_PCT else "DRIFTED: the machine, not the profile, moved by this much"
    return (
        f"same-model drift: {drift.n} calibration candidates run {pct:+.1f}% "
        f"({(drift.ratio_min - 1) * 100:+.1f} to {(drift.ratio_max - 1) * 100:+.1f}%) vs calibration ({verdict}); "
        f"with predictions scaled by it, |error| median {drift.median_abs_error_pct:.2f}%, "
        f"p90 {drift.p90_abs_error_pct:.2f}%, max {drift.max_abs_error_pct:.2f}%"
    )


def summarize(
    rows: list[ValidationRow],
    model: str,
    experiment: str,
    command: str = "",
    probe: ProbeReading | None = None,
    drift: ReferenceDrift | None = None,
) -> ValidationSummary:
    """Median, p90 and max absolute % error of ``rows`` (``probe``, ``drift``: the machine readings taken)."""
    errors = [r.abs_error_pct for r in rows]
    return ValidationSummary(
        model=model,
        experiment=experiment,
        n=len(rows),
        median_abs_error_pct=_pct(errors, 50),
        p90_abs_error_pct=_pct(errors, 90),
        max_abs_error_pct=max(errors),
        measured_at=now_iso(),
        command=command,
        probe=probe,
        drift=drift,
        rows=rows,
    )


def format_table(summary: ValidationSummary, profile: str, predict_ms: float | None = None) -> str:
    """The report as text: one line per candidate, then the error summary."""
    lines = [
        f"{'#':>3}  {'predicted ms':>12}  {'measured ms':>11}  {'|err| %':>7}  {'interp':>6}  {'via':<14}  candidate"
    ]
    for i, r in enumerate(summary.rows):
        lines.append(
            f"{i:>3}  {r.predicted_ms:>12.4f}  {r.measured_ms:>11.4f}  {r.abs_error_pct:>7.2f}  "
            f"{r.interpolated_ops:>6}  {r.source:<14}  {r.candidate[:70]}"
        )
    timing = f"; prediction {predict_ms:.2f} ms per candidate (median)" if predict_ms is not None else ""
    lines.append(
        f"profile {profile} on {summary.model} ({summary.n} candidates): "
        f"|error| median {summary.median_abs_error_pct:.2f}%, "
        f"p90 {summary.p90_abs_error_pct:.2f}%, max {summary.max_abs_error_pct:.2f}%{timing}"
    )
    return "\n".join(lines)


def plot(summary: ValidationSummary, profile: str, path: Path) -> Path:
    """Scatter of predicted vs measured latency with the y = x line and a +-10% band (and, when the
    same-model drift was read, the predictions scaled by it as hollow circles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r.measured_ms for r in summary.rows]
    predicted = [r.predicted_ms for r in summary.rows]
    drift = summary.drift
    scaled = [p * drift.ratio_median for p in predicted] if drift is not None else []
    low, high = min(measured + predicted + scaled) * 0.9, max(measured + predicted + scaled) * 1.1
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.fill_between([low, high], [low * 0.9, high * 0.9], [low * 1.1, high * 1.1], color="0.9", label="±10%")
    ax.plot([low, high], [low, high], color="0.4", lw=1, label="predicted = measured")
    interp = [r.interpolated_ops > 0 for r in summary.rows]
    ax.scatter(
        [m for m, i in zip(measured, interp, strict=True) if not i],
        [p for p, i in zip(predicted, interp, strict=True) if not i],
        s=18,
        label="all operators measured",
    )
    if any(interp):
        ax.scatter(
            [m for m, i in zip(measured, interp, strict=True) if i],
            [p for p, i in zip(predicted, interp, strict=True) if i],
            s=18,
            marker="x",
            label="some operators interpolated",
        )
    title = (
        f"{profile}: {summary.model.rsplit('.', 1)[-1]}\n|err| median {summary.median_abs_error_pct:.1f}%, "
        f"p90 {summary.p90_abs_error_pct:.1f}%, max {summary.max_abs_error_pct:.1f}% (n={summary.n})"
    )
    if drift is not None:
        ax.scatter(
            measured,
            scaled,
            s=18,
            facecolors="none",
            edgecolors="tab:red",
            label=f"predicted x {drift.ratio_median:.3f} (same-model drift)",
        )
        title += f"\nscaled by the drift: median {drift.median_abs_error_pct:.1f}%, p90 {drift.p90_abs_error_pct:.1f}%"
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_files(report: ValidationReport, profile: str, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.csv``, ``<stem>.png`` and ``<stem>.json`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, json_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "png", "json"))
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["candidate", "predicted_ms", "measured_ms", "abs_error_pct", "drift_scaled_abs_error_pct"]
            + ["interpolated_ops", "source", "predict_ms"]
        )
        drift = report.summary.drift
        for row, ms in zip(report.summary.rows, report.predict_ms, strict=True):
            scaled = "" if drift is None else f"{_scaled_error(row, drift.ratio_median):.3f}"
            writer.writerow(
                [row.candidate, f"{row.predicted_ms:.5f}", f"{row.measured_ms:.5f}", f"{row.abs_error_pct:.3f}", scaled]
                + [row.interpolated_ops, row.source, f"{ms:.3f}"]
            )
    plot(report.summary, profile, png_path)
    payload = {
        "profile": profile,
        **report.summary.model_dump(mode="json", exclude={"rows"}),
        "predict_ms_median": report.predict_ms_median,
    }
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    return [csv_path, png_path, json_path]


def validate_profile(
    profile: Profile,
    target: Target,
    n: int = 30,
    *,
    seed: int = VALIDATION_SEED,
    cpu: int | None = None,
    repeats: int = 30,
    out_dir: Path | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> ValidationReport:
    """Predict and measure ``n`` random candidates of ``target``'s space on ``profile``'s runtime.

    Measures with the profile's thread count (pinned to ``cpu`` at one thread), together with up to
    :data:`REFERENCES` of the profile's calibration candidates (the same-model drift). With ``out_dir``,
    writes the CSV, PNG and JSON there (see :func:`write_files`) and lists them in the report.
    """
    if n < 1:
        raise ValueError(f"n={n}: validate at least one candidate")
    threads = profile.host.threads
    rng = random.Random(seed)
    predictions, predict_ms, built = [], [], []
    progress = Progress("validate", n, "candidates")
    with pinned_cpu(cpu if threads == 1 else None):
        for i in range(n):
            candidate = target.builder.sample(rng)
            model, bits = target.builder.build(candidate)
            start = time.perf_counter()
            predictions.append((candidate, predict(model, target.example_input, profile, bits)))
            predict_ms.append((time.perf_counter() - start) * 1e3)
            built.append((model, bits))
            progress.update(i + 1, note="predicting")
    progress.close()
    settings = MeasureSettings(
        runtime=profile.runtime.name,
        threads=threads,
        repeats=repeats,
        warmup_ms=profile.measurement.warmup_ms,
        min_sample_ms=profile.measurement.min_sample_ms,
        cpu=cpu,
    )
    references = reference_candidates(profile, target)
    everything = built + [target.builder.build(candidate) for candidate, _ in references]
    # References spread through each pass, so neither group always runs at one end of it.
    order = sorted(
        range(len(everything)),
        key=lambda i: (i + 0.5) / n if i < n else (i - n + 0.5) / len(references),
    )
    in_order, probe = time_end_to_end(
        [everything[i] for i in order], target.example_input, settings, "validate: timing"
    )
    timed = [0.0] * len(everything)
    for position, i in enumerate(order):
        timed[i] = in_order[position]
    measured, now_ms = timed[:n], timed[n:]
    rows = []
    for (candidate, prediction), ms in zip(predictions, measured, strict=True):
        rows.append(
            ValidationRow(
                candidate=candidate_label(candidate),
                predicted_ms=prediction.latency_ms,
                measured_ms=ms,
                abs_error_pct=_abs_error_pct(prediction.latency_ms, ms),
                interpolated_ops=len(prediction.interpolated),
                source=prediction.source,
            )
        )
    drift = reference_drift(rows, [ms for _, ms in references], now_ms) if references else None
    summary = summarize(rows, target.model_name, target.experiment.name, command, probe, drift)
    report = ValidationReport(summary=summary, predict_ms=predict_ms)
    if out_dir is not None:
        stem = f"validation_{profile.id}_{target.model_name.rsplit('.', 1)[-1]}"
        report.files = write_files(report, profile.id, out_dir, stem)
    log(format_table(summary, profile.id, report.predict_ms_median))
    log(describe_drift(profile.probe, probe))
    log(describe_reference_drift(drift))
    return report
