"""Pareto fronts as rows: a printed table, a CSV and a plot (the task's metric vs latency)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autocompress.search.pareto import hypervolume, non_dominated
from autocompress.search.quality import ACCURACY, METRIC, QualityMetric, format_value
from autocompress.spaces.candidate import Candidate

COLUMNS = {
    METRIC: "metric",
    "latency": "latency_ms",
    "size": "size_bytes",
    "compressed_size": "compressed_size_bytes",
}


@dataclass(frozen=True)
class TrialRecord:
    """A finished, successful trial as plain data, whichever backend ran it.

    ``metrics`` uses the flat names of :meth:`~autocompress.search.objectives.Metrics.as_dict`
    (``metric``, ``latency_ms.<profile>``, ``size_bytes``, ``params``); ``feasible`` says whether
    it met the search's budgets (True without budgets).
    """

    number: int
    params: dict[str, Any]
    metrics: dict[str, float]
    run_id: str | None = None
    feasible: bool = True


def profiles_in(metrics: dict[str, float]) -> list[str]:
    """The latency profiles a metrics dict has figures for, in order."""
    return [k.split(".", 1)[1] for k in metrics if k.startswith("latency_ms.")]


@dataclass(frozen=True)
class Row:
    """One finished trial's figures for one latency profile, compared with the teacher."""

    trial: int
    metric: float  # the task's metric
    latency_ms: float
    size_bytes: float
    params: float
    metric_delta: float  # 100 * (metric - teacher's), signed: "points" for a fraction like accuracy
    speedup: float  # teacher latency / latency
    compression: float  # teacher size / size
    summary: str
    candidate: dict[str, Any]
    compressed_size_bytes: float = float("nan")  # the deployed file zipped (NaN: not recorded)
    int8_layers: float = float("nan")  # layers the runtime really runs on int8 kernels (NaN: not recorded)


def make_rows(records: Sequence[TrialRecord], teacher: dict[str, float], profile: str) -> list[Row]:
    """Rows for ``profile`` from trial records (records without that profile are left out)."""
    rows = []
    t_lat = teacher[f"latency_ms.{profile}"]
    for t in records:
        m = t.metrics
        if f"latency_ms.{profile}" not in m:
            continue
        lat = m[f"latency_ms.{profile}"]
        rows.append(
            Row(
                trial=t.number,
                metric=m[METRIC],
                latency_ms=lat,
                size_bytes=m["size_bytes"],
                params=m["params"],
                metric_delta=100.0 * (m[METRIC] - teacher[METRIC]),
                speedup=t_lat / lat if lat > 0 else float("nan"),
                compression=teacher["size_bytes"] / m["size_bytes"] if m["size_bytes"] else float("nan"),
                summary=Candidate.from_params(t.params).describe(),
                candidate=dict(t.params),
                compressed_size_bytes=m.get("compressed_size_bytes", float("nan")),
                int8_layers=m.get("int8_layers", float("nan")),
            )
        )
    return rows


def pareto_rows(rows: list[Row], objectives: Sequence[str], metric: QualityMetric = ACCURACY) -> list[Row]:
    """The non-dominated rows over ``objectives`` (the metric in its direction, costs low), fastest first."""
    if not rows:
        return []
    points = np.array([[getattr(r, COLUMNS[o]) for o in objectives] for r in rows])
    mask = non_dominated(points, [o == METRIC and metric.higher_is_better for o in objectives])
    return sorted((r for r, keep in zip(rows, mask, strict=True) if keep), key=lambda r: r.latency_ms)


def compute_fronts(
    records: Sequence[TrialRecord],
    teacher: dict[str, float],
    objectives: Sequence[str],
    metric: QualityMetric = ACCURACY,
) -> dict[str, list[Row]]:
    """One Pareto front per latency profile the teacher was scored on."""
    return {p: pareto_rows(make_rows(records, teacher, p), objectives, metric) for p in profiles_in(teacher)}


HV_METRIC_WINDOW = 0.10  # metric reference: 10% of the teacher's |metric| worse than the teacher


def hv_window(teacher_metric: float) -> float:
    """The metric extent of the hypervolume box: 10% of |teacher metric| (0.10 absolute for a teacher at 0)."""
    return HV_METRIC_WINDOW * abs(teacher_metric) or HV_METRIC_WINDOW


def front_hypervolume(
    rows: Sequence[Row],
    teacher: dict[str, float],
    objectives: Sequence[str],
    profile: str,
    metric: QualityMetric = ACCURACY,
) -> float:
    """Hypervolume of ``rows`` in teacher-normalised units, against a reference point set by the teacher.

    Costs: the metric's shortfall against the teacher over :func:`hv_window` (``(teacher - m) / w``
    when higher is better, ``(m - teacher) / w`` when lower is; reference 1: 10% of the teacher's
    |metric| worse than the teacher), latency ``latency / teacher latency`` and size ``size / teacher
    size`` (reference 1: no better than the teacher). A candidate as good as the teacher at no cost
    scores 1; members slower, larger or more than the window worse than the teacher add nothing.
    """
    t_metric, t_lat, t_size = teacher[METRIC], teacher[f"latency_ms.{profile}"], teacher["size_bytes"]
    window = hv_window(t_metric)
    columns = {
        METRIC: lambda r: metric.gain(r.metric, t_metric) / window,
        "latency": lambda r: r.latency_ms / t_lat,
        "size": lambda r: r.size_bytes / t_size,
        "compressed_size": lambda r: r.compressed_size_bytes / teacher["compressed_size_bytes"],
    }
    costs = np.array([[columns[o](r) for o in objectives] for r in rows]).reshape(-1, len(objectives))
    return hypervolume(costs, [1.0] * len(objectives))


def format_table(
    rows: list[Row], teacher: dict[str, float], profile: str, zipped: bool = False, metric: QualityMetric = ACCURACY
) -> str:
    """A fixed-width table of front rows with the teacher as the first line; the metric column is
    titled with the task's metric name, ``Δ pt`` is 100 * (metric - teacher's); ``zipped`` adds the
    deployed file's zipped size (when ``compressed_size`` is an objective)."""
    width = max(10, len(metric.name))
    header = (
        f"{'trial':>6} {metric.name:>{width}} {'Δ pt':>8} {'latency ms':>11} {'speedup':>8} "
        f"{'size kB':>9} {'x smaller':>9}" + (f" {'zip kB':>8}" if zipped else "") + "  candidate"
    )
    lines = [header, "-" * len(header)]

    def zip_cell(value: float) -> str:
        return f" {value / 1e3:8.1f}" if zipped else ""

    lines.append(
        f"{'teacher':>6} {format_value(teacher[METRIC]):>{width}} {0.0:8.2f} {teacher[f'latency_ms.{profile}']:11.3f} "
        f"{1.0:7.2f}x {teacher['size_bytes'] / 1e3:9.1f} {1.0:8.1f}x"
        + zip_cell(teacher.get("compressed_size_bytes", float("nan")))
        + "  uncompressed"
    )
    for r in rows:
        lines.append(
            f"{r.trial:>6} {format_value(r.metric):>{width}} {r.metric_delta:8.2f} {r.latency_ms:11.3f} "
            f"{r.speedup:7.2f}x {r.size_bytes / 1e3:9.1f} {r.compression:8.1f}x"
            + zip_cell(r.compressed_size_bytes)
            + f"  {r.summary}"
            + ("" if math.isnan(r.int8_layers) else f"  [{int(r.int8_layers)} layers run int8]")
        )
    return "\n".join(lines)


CSV_FIELDS = (
    "trial",
    "metric",
    "metric_delta",
    "latency_ms",
    "speedup",
    "size_bytes",
    "compression",
    "compressed_size_bytes",
    "params",
    "summary",
)


def write_csv(rows: list[Row], path: Path, metric: QualityMetric = ACCURACY) -> None:
    """One line per front member: figures first (the metric's columns titled ``<name>`` and
    ``<name>_delta``), then every candidate parameter."""
    keys = sorted({k for r in rows for k in r.candidate})
    name = metric.name if metric.name not in CSV_FIELDS and f"{metric.name}_delta" not in CSV_FIELDS else METRIC
    titles = [{"metric": name, "metric_delta": f"{name}_delta"}.get(f, f) for f in CSV_FIELDS]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(titles + keys)
        for r in rows:
            writer.writerow([getattr(r, f) for f in CSV_FIELDS] + [r.candidate.get(k, "") for k in keys])


def plot_front(
    all_rows: list[Row],
    front: list[Row],
    teacher: dict[str, float],
    profile: str,
    path: Path,
    metric: QualityMetric = ACCURACY,
) -> None:
    """The metric vs latency: every trial, the front as a step line, the teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r.latency_ms for r in all_rows], [r.metric for r in all_rows], s=18, c="0.7", label="trials")
    if front:
        ax.plot(
            [r.latency_ms for r in front],
            [r.metric for r in front],
            "o-",
            c="tab:red",
            ms=5,
            label="Pareto front",
        )
    ax.scatter([teacher[f"latency_ms.{profile}"]], [teacher[METRIC]], marker="*", s=160, c="k", label="teacher")
    ax.set_xlabel(f"latency on {profile} (ms, batch median)")
    ax.set_ylabel(f"validation {metric.label()}")
    ax.set_title(f"{metric.name} vs latency — profile {profile}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
