"""The quality objective (objective ``metric``) as the search sees it: the task's metric name and direction.

The task decides what its metric is (accuracy, cosine similarity, MSE ...) and whether higher is
better; every consumer (fronts, hypervolume, early stop, budgets, tables, ``select``) reads the
direction from a :class:`QualityMetric` instead of assuming accuracy. A search stores it on its
MLflow parent run and Optuna study, so a stored search is read back without loading the task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autocompress.tasks.base import Task

METRIC = "metric"  # the objective, trial-record and MLflow key of the task's metric
MAXIMIZE, MINIMIZE = "maximize", "minimize"
# Parent-run params and Optuna study user attributes that carry the metric to readers without the task.
NAME_KEY = "metric.name"
DIRECTION_KEY = "metric.direction"


@dataclass(frozen=True)
class QualityMetric:
    """A task's metric: its name (for display and readable MLflow keys) and whether higher is better."""

    name: str = "accuracy"
    higher_is_better: bool = True

    @classmethod
    def of(cls, task: Task) -> QualityMetric:
        """The metric of ``task``."""
        return cls(task.metric_name, task.higher_is_better)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str = "") -> QualityMetric:
        """The metric stored by :meth:`attrs` (default: accuracy, maximized, for searches stored before)."""
        direction = attrs.get(DIRECTION_KEY, MAXIMIZE)
        if direction not in (MAXIMIZE, MINIMIZE):
            raise ValueError(f"{where}{DIRECTION_KEY}={direction!r}: expected {MAXIMIZE!r} or {MINIMIZE!r}")
        return cls(str(attrs.get(NAME_KEY, "accuracy")), direction == MAXIMIZE)

    def attrs(self) -> dict[str, str]:
        """What a search stores (parent-run params, study user attributes) to read the metric back."""
        return {NAME_KEY: self.name, DIRECTION_KEY: self.direction}

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize`` (Optuna's names)."""
        return MAXIMIZE if self.higher_is_better else MINIMIZE

    @property
    def sign(self) -> float:
        """+1 when higher is better, -1 when lower is: ``sign * value`` is always better high."""
        return 1.0 if self.higher_is_better else -1.0

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def improved(self, value: float, by: float) -> float:
        """``value`` moved ``by`` (>= 0) toward better."""
        return value + self.sign * by

    def gain(self, before: float, after: float) -> float:
        """How much better ``after`` is than ``before`` (negative if worse)."""
        return self.sign * (after - before)

    def best(self, values: Any) -> float:
        """The best of ``values``."""
        return max(values) if self.higher_is_better else min(values)

    def readable(self, figures: Mapping[str, float], prefix: str = "") -> dict[str, float]:
        """``{prefix + name: figures[prefix + "metric"]}``: the metric again under the task's own name,
        for people reading MLflow; empty when that name is ``metric`` or already a key of ``figures``."""
        key = f"{prefix}{self.name}"
        source = f"{prefix}{METRIC}"
        if self.name == METRIC or key in figures or source not in figures:
            return {}
        return {key: figures[source]}

    def label(self) -> str:
        """``accuracy (higher is better)``: for plot axes and headings."""
        return f"{self.name} ({'higher' if self.higher_is_better else 'lower'} is better)"


ACCURACY = QualityMetric()


def format_value(value: float) -> str:
    """A metric value in about ten characters, whatever its scale (``0.9712``, ``1.234e+04``)."""
    if value != value or value == 0 or 1e-3 <= abs(value) < 1e4:  # NaN, zero or a plain range
        return f"{value:.4f}"
    return f"{value:.4g}"
