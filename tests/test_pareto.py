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


def _rows(points):
    from autocompress.search.report import Row

    return [Row(n, m, lat, size, 0.0, 0.0, 1.0, 1.0, f"c{n}", {}) for n, (m, lat, size) in enumerate(points)]


def test_front_of_a_lower_is_better_metric_keeps_the_low_values():
    from autocompress.search.quality import QualityMetric
    from autocompress.search.report import pareto_rows

    # (mse, latency, size): trial 1 has the lowest MSE, trial 2 is the fastest
    rows = _rows([(0.5, 2.0, 10.0), (0.2, 2.0, 10.0), (0.9, 1.0, 10.0), (0.95, 1.5, 10.0)])
    mse = QualityMetric("mse", higher_is_better=False)
    assert [r.trial for r in pareto_rows(rows, ["metric", "latency", "size"], mse)] == [2, 1]
    # read as higher-is-better the same points give another front (0.95 at 1.5 ms beats 0.5 and 0.2 at 2 ms)
    assert [r.trial for r in pareto_rows(rows, ["metric", "latency", "size"])] == [2, 3]


def test_table_and_csv_are_titled_with_the_metric_name(tmp_path):
    from autocompress.search.quality import QualityMetric
    from autocompress.search.report import TrialRecord, format_table, make_rows, write_csv

    teacher = {"metric": 0.25, "latency_ms.host": 2.0, "size_bytes": 1000.0}
    figures = {"metric": 0.3, "latency_ms.host": 1.0, "size_bytes": 500.0, "params": 10.0}
    rows = make_rows([TrialRecord(0, {"prune/g": 0.5}, figures)], teacher, "host")
    cosine = QualityMetric("cosine_distance", higher_is_better=False)
    table = format_table(rows, teacher, "host", metric=cosine)
    header, _, teacher_line, row_line = table.splitlines()
    assert header.split()[:3] == ["trial", "cosine_distance", "Δ"] and "accuracy" not in table
    assert "0.2500" in teacher_line and row_line.split()[1:3] == ["0.3000", "5.00"]  # Δ: 100 * (0.3 - 0.25)
    assert format_table(rows, teacher, "host").split()[1] == "accuracy"  # the default metric
    write_csv(rows, tmp_path / "front.csv", cosine)
    assert (tmp_path / "front.csv").read_text().startswith("trial,cosine_distance,cosine_distance_delta,latency_ms")
