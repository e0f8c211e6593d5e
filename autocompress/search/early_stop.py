"""Stopping hopeless trials early in a multi-objective search.

Optuna's pruners compare one intermediate value against other trials' and assume one objective,
so they cannot be used as they are when trials compete on the metric *and* latency/size. This rule
uses what a compression candidate offers instead: its latency and size are fixed by its
architecture and measured before the fine-tune, so only the task's metric is still unknown.

At epoch ``e`` (from ``min_epochs`` on) with validation metric ``m_e``, the trial's optimistic
final metric is ``m_e`` moved toward better by ``G_e + margin`` (``m_e + G_e + margin`` when higher
is better, ``m_e - G_e - margin`` when lower is), where ``G_e`` is the largest improvement from epoch
``e`` to the final score that any finished trial achieved. The trial is stopped when

* a finished trial is no slower and no larger (on the objectives in play) and its final metric is
  already better than that optimistic bound: the trial cannot reach the Pareto front; or
* a bound on the metric's good side is set (``min_metric`` when higher is better, ``max_metric``
  when lower is) and the optimistic bound misses it: the trial cannot be feasible.

It never stops a trial before some finished trial has shown how much the last epochs add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from autocompress.search.quality import ACCURACY, METRIC, QualityMetric, format_value

DEFAULT_MARGIN_FRACTION = 0.05  # the default margin: 5% of the teacher's |metric| (0.05 for accuracy ~1)


class TrialStopped(Exception):
    """Raised from the fine-tune callback; the message is the reason the trial was stopped."""


def resolve_margin(margin: float | None, teacher_metric: float) -> float:
    """``search.early_stop.margin`` in metric units: as set, or by default 5% of the teacher's |metric|."""
    return DEFAULT_MARGIN_FRACTION * abs(teacher_metric) if margin is None else margin


@dataclass(frozen=True)
class Finished:
    """A finished trial as the rule sees it: costs, validation curve, final metric."""

    costs: dict[str, float]
    curve: Sequence[float]
    final: float


@dataclass(frozen=True)
class HopelessRule:
    """Decides whether a running trial can still matter (see the module docstring)."""

    finished: Sequence[Finished]
    objectives: Sequence[str]
    margin: float = 0.05  # metric units (see resolve_margin)
    min_epochs: int = 1
    min_metric: float | None = None
    profile: str = "host"  # whose latency counts (the experiment's primary profile)
    metric: QualityMetric = field(default=ACCURACY)
    max_metric: float | None = None

    def best_gain(self, epoch: int) -> float | None:
        """Largest observed improvement from ``epoch`` to the final score, or None with no evidence yet."""
        gains = [self.metric.gain(f.curve[epoch - 1], f.final) for f in self.finished if len(f.curve) >= epoch]
        return max(gains) if gains else None

    def check(self, epoch: int, value: float, costs: dict[str, float]) -> str | None:
        """The reason to stop the trial now (``value``: its validation metric), or None to let it continue."""
        if epoch < self.min_epochs:
            return None
        gain = self.best_gain(epoch)
        if gain is None:
            return None
        m = self.metric
        optimistic = m.improved(value, max(gain, 0.0) + self.margin)
        now, best = format_value(value), format_value(optimistic)
        # Only the bound on the good side can be ruled out from a best case.
        if m.higher_is_better and self.min_metric is not None and optimistic < self.min_metric:
            return f"epoch {epoch}: {m.name} {now} cannot reach min_metric {self.min_metric:g} (best case {best})"
        if not m.higher_is_better and self.max_metric is not None and optimistic > self.max_metric:
            return f"epoch {epoch}: {m.name} {now} cannot reach max_metric {self.max_metric:g} (best case {best})"
        cost_keys = {"latency": f"latency_ms.{self.profile}", "size": "size_bytes"}
        if any(o != METRIC and o not in cost_keys for o in self.objectives):
            return None  # a cost known only after the fine-tune (the compressed file) cannot be compared yet
        keys = [cost_keys[o] for o in self.objectives if o in cost_keys]
        for other in self.finished:
            if m.better(other.final, optimistic) and all(other.costs[k] <= costs[k] for k in keys):
                return (
                    f"epoch {epoch}: dominated: a finished trial is as fast and small with {m.name} "
                    f"{format_value(other.final)} {'>' if m.higher_is_better else '<'} best case {best}"
                )
        return None
