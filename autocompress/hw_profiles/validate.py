"""``profile validate``: predicted vs measured end-to-end latency of random candidates of a space.

Candidates are drawn as a search draws them (every parameter uniformly, int8 layers included),
built with the profiling builder, predicted from the profile (timed: the per-candidate cost of a
prediction is part of the report) and measured end to end on this machine exactly as the profile's
calibration was (:func:`~autocompress.hw_profiles.measure.time_end_to_end`: same runtime, threads
and pinned CPU, in a fresh process, round-robin passes keeping each one's quietest median).
The report is the table (printed and CSV), the error summary (median, p90, max of the absolute
percentage error), a predicted-vs-measured scatter plot (PNG) and a JSON summary; the function
returns it all so a caller (the search's MLflow logging) can attach the files.
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
from autocompress.hw_profiles.measure import MeasureSettings, candidate_label, now_iso, time_end_to_end
from autocompress.hw_profiles.predictor import predict
from autocompress.hw_profiles.probe import describe_drift
from autocompress.hw_profiles.profile import ProbeReading, Profile, ValidationRow, ValidationSummary
from autocompress.hw_profiles.progress import Progress
from autocompress.hw_profiles.target import Target

VALIDATION_SEED = 2024  # not the calibration seed: validation candidates are not the fitted ones


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


def summarize(
    rows: list[ValidationRow], model: str, experiment: str, command: str = "", probe: ProbeReading | None = None
) -> ValidationSummary:
    """Median, p90 and max absolute % error of ``rows`` (``probe``: the machine-state reading taken)."""
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
    """Scatter of predicted vs measured latency with the y = x line and a +-10% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r.measured_ms for r in summary.rows]
    predicted = [r.predicted_ms for r in summary.rows]
    low, high = min(measured + predicted) * 0.9, max(measured + predicted) * 1.1
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
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(
        f"{profile}: {summary.model.rsplit('.', 1)[-1]}\n|err| median {summary.median_abs_error_pct:.1f}%, "
        f"p90 {summary.p90_abs_error_pct:.1f}%, max {summary.max_abs_error_pct:.1f}% (n={summary.n})",
        fontsize=10,
    )
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
            ["candidate", "predicted_ms", "measured_ms", "abs_error_pct", "interpolated_ops", "source", "predict_ms"]
        )
        for row, ms in zip(report.summary.rows, report.predict_ms, strict=True):
            writer.writerow(
                [row.candidate, f"{row.predicted_ms:.5f}", f"{row.measured_ms:.5f}", f"{row.abs_error_pct:.3f}"]
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

    Measures with the profile's thread count (pinned to ``cpu`` at one thread). With ``out_dir``,
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
    measured, probe = time_end_to_end(built, target.example_input, settings, "validate: timing")
    rows = []
    for (candidate, prediction), ms in zip(predictions, measured, strict=True):
        rows.append(
            ValidationRow(
                candidate=candidate_label(candidate),
                predicted_ms=prediction.latency_ms,
                measured_ms=ms,
                abs_error_pct=abs(prediction.latency_ms - ms) / ms * 100,
                interpolated_ops=len(prediction.interpolated),
                source=prediction.source,
            )
        )
    summary = summarize(rows, target.model_name, target.experiment.name, command, probe)
    report = ValidationReport(summary=summary, predict_ms=predict_ms)
    if out_dir is not None:
        stem = f"validation_{profile.id}_{target.model_name.rsplit('.', 1)[-1]}"
        report.files = write_files(report, profile.id, out_dir, stem)
    log(format_table(summary, profile.id, report.predict_ms_median))
    log(describe_drift(profile.probe, probe))
    return report
