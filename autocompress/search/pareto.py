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
