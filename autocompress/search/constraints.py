"""Budgets as Optuna constraint values: each value <= 0 means that budget is met.

The values are stored on each trial with ``Trial.set_constraint`` (Optuna 5's replacement for a
sampler's ``constraints_func``); NSGA-II and TPE read them and rank infeasible trials by how far
they miss, so infeasible trials still teach the sampler.
"""

from __future__ import annotations

from autocompress.config import ConstraintsConfig
from autocompress.search.quality import METRIC


def violations(metrics: dict[str, float], constraints: ConstraintsConfig, profile: str) -> dict[str, float]:
    """One value per configured budget, keyed by its name, positive by how much it is missed.

    ``max_latency_ms`` applies to the latency on ``profile`` (the experiment's primary profile);
    ``min_metric`` / ``max_metric`` to ``metrics["metric"]``.
    """
    values = {}
    if constraints.max_latency_ms is not None:
        values["max_latency_ms"] = metrics[f"latency_ms.{profile}"] - constraints.max_latency_ms
    # Bounds on the task's metric in its own units, whichever its direction.
    if constraints.min_metric is not None:
        values["min_metric"] = constraints.min_metric - metrics[METRIC]
    if constraints.max_metric is not None:
        values["max_metric"] = metrics[METRIC] - constraints.max_metric
    if constraints.max_size_mb is not None:
        values["max_size_mb"] = metrics["size_bytes"] / 1e6 - constraints.max_size_mb
    return values


def is_feasible(values: dict[str, float]) -> bool:
    """Whether every budget is met."""
    return all(v <= 0 for v in values.values())


def any_constraint(constraints: ConstraintsConfig) -> bool:
    """Whether the experiment sets any budget."""
    return any(v is not None for v in constraints.model_dump().values())
