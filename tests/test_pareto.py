"""Non-dominated sets against a brute-force definition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from autocompress.search.pareto import non_dominated


def _dominates(a, b, maximize):
    better_or_equal = all((x >= y) if m else (x <= y) for x, y, m in zip(a, b, maximize, strict=True))
    strictly = any((x > y) if m else (x < y) for x, y, m in zip(a, b, maximize, strict=True))
    return better_or_equal and strictly


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(40, 3)).astype(float)  # ties on purpose
    maximize = [True, False, False]
    mask = non_dominated(points, maximize)
    for i, p in enumerate(points):
        dominated = any(_dominates(q, p, maximize) for j, q in enumerate(points) if j != i)
        assert mask[i] == (not dominated)
    front = points[mask]
    for a, b in itertools.permutations(front, 2):
        assert not _dominates(a, b, maximize)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="directions"):
        non_dominated(np.zeros((3, 2)), [True])
