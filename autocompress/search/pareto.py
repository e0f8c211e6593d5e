"""Non-dominated (Pareto) sets over arbitrary metric columns.

Written here rather than taken from Optuna because fronts are computed per hardware profile over
metrics that need not be the study's objectives (Optuna's ``best_trials`` only knows the
objectives it optimised); the O(n^2) comparison is instant for search-sized sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def non_dominated(points: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (n x k) that no other row dominates.

    Row a dominates b when a is at least as good in every column and strictly better in one;
    ``maximize[j]`` says whether column j is better high. Duplicated points are all kept.
    """
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != len(maximize):
        raise ValueError(f"points of shape {pts.shape} do not match {len(maximize)} directions")
    signs = np.where(np.asarray(maximize), -1.0, 1.0)
    costs = pts * signs  # lower is better in every column
    n = len(costs)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        no_worse = np.all(costs <= costs[i], axis=1)
        better = np.any(costs < costs[i], axis=1)
        if np.any(no_worse & better):
            mask[i] = False
    return mask


def hypervolume(costs: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by ``costs`` (n x k, lower is better) and bounded by ``reference``.

    Exact, by slicing along the last axis (O(n^k log n), meant for k <= 3 and search-sized n).
    Hand-written because Optuna's implementation is private API. Points not strictly better than
    the reference in every column contribute nothing.
    """
    pts = np.asarray(costs, dtype=float).reshape(-1, len(reference))
    ref = np.asarray(reference, dtype=float)
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    if pts.shape[1] == 1:
        return float(ref[0] - pts[:, 0].min())
    pts = pts[np.argsort(pts[:, -1])]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if upper > pts[i, -1]:
            volume += hypervolume(pts[: i + 1, :-1], ref[:-1]) * (upper - pts[i, -1])
    return volume
