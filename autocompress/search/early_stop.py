"""Stopping hopeless trials early in a multi-objective search.

Optuna's pruners compare one intermediate value against other trials' and assume one objective,
so they cannot be used as they are when trials compete on accuracy *and* latency/size. This rule
uses what a compression candidate offers instead: its latency and size are fixed by its
architecture and measured before the fine-tune, so only accuracy is still unknown.

At epoch ``e`` (from ``min_epochs`` on) with validation accuracy ``a_e``, the trial's optimistic
final accuracy is ``a_e + G_e + margin``, where ``G_e`` is the largest gain from epoch ``e`` to
the final score that any finished trial achieved. The trial is stopped when

* a finished trial is no slower and no larger (on the objectives in play) and its final accuracy
  already exceeds that optimistic bound: the trial cannot reach the Pareto front; or
* a ``min_accuracy`` constraint is set and the optimistic bound is below it: it cannot be feasible.

It never stops a trial before some finished trial has shown how much accuracy the last epochs add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class TrialStopped(Exception):
    """Raised from the fine-tune callback; the message is the reason the trial was stopped."""


@dataclass(frozen=True)
class Finished:
    """A finished trial as the rule sees it: costs, validation curve, final accuracy."""

    costs: dict[str, float]
    curve: Sequence[float]
    final: float


@dataclass(frozen=True)
class HopelessRule:
    """Decides whether a running trial can still matter (see the module docstring)."""

    finished: Sequence[Finished]
    objectives: Sequence[str]
    margin: float = 0.05
    min_epochs: int = 1
    min_accuracy: float | None = None
    profile: str = "host"  # whose latency counts (the experiment's primary profile)

    def best_gain(self, epoch: int) -> float | None:
        """Largest observed gain from ``epoch`` to the final score, or None with no evidence yet."""
        gains = [f.final - f.curve[epoch - 1] for f in self.finished if len(f.curve) >= epoch]
        return max(gains) if gains else None

    def check(self, epoch: int, accuracy: float, costs: dict[str, float]) -> str | None:
        """The reason to stop the trial now, or None to let it continue."""
        if epoch < self.min_epochs:
            return None
        gain = self.best_gain(epoch)
        if gain is None:
            return None
        optimistic = accuracy + max(gain, 0.0) + self.margin
        if self.min_accuracy is not None and optimistic < self.min_accuracy:
            return (
                f"epoch {epoch}: accuracy {accuracy:.4f} cannot reach min_accuracy {self.min_accuracy:g} "
                f"(best case {optimistic:.4f})"
            )
        cost_keys = {"latency": f"latency_ms.{self.profile}", "size": "size_bytes"}
        if any(o != "accuracy" and o not in cost_keys for o in self.objectives):
            return None  # a cost known only after the fine-tune (the compressed file) cannot be compared yet
        keys = [cost_keys[o] for o in self.objectives if o in cost_keys]
        for other in self.finished:
            if other.final > optimistic and all(other.costs[k] <= costs[k] for k in keys):
                return (
                    f"epoch {epoch}: dominated: a finished trial is as fast and small with accuracy "
                    f"{other.final:.4f} > best case {optimistic:.4f}"
                )
        return None
