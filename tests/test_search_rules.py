"""Early stopping, budgets and hypervolume: the rules the search controller applies."""

from __future__ import annotations

import numpy as np
import pytest
from optuna._hypervolume import compute_hypervolume

from autocompress.config import ConstraintsConfig, parse_experiment
from autocompress.search.constraints import any_constraint, is_feasible, violations
from autocompress.search.early_stop import Finished, HopelessRule, resolve_margin
from autocompress.search.optuna_backend import counted
from autocompress.search.pareto import hypervolume
from autocompress.search.quality import QualityMetric
from autocompress.search.report import Row, front_hypervolume
from autocompress.search.runner import run_search
from tests.conftest import tiny_experiment_dict

MSE = QualityMetric("mse", higher_is_better=False)
FAST = {"latency_ms.host": 1.0, "size_bytes": 100.0}
SLOW = {"latency_ms.host": 3.0, "size_bytes": 300.0}


def _rule(**kw):
    finished = [Finished(costs=FAST, curve=[0.80, 0.90, 0.95], final=0.96)]  # gained 0.16 after epoch 1
    return HopelessRule(finished, ["metric", "latency", "size"], **{"margin": 0.01, **kw})


def test_rule_stops_only_dominated_trials_with_their_best_case():
    rule = _rule()
    assert rule.best_gain(1) == pytest.approx(0.16) and rule.best_gain(2) == pytest.approx(0.06)
    # slower and larger, and even +0.16 +0.01 cannot beat 0.96 -> stop
    assert "dominated" in rule.check(1, 0.70, SLOW)
    # same costs but the best case 0.75 + 0.17 = 0.92 < 0.96 -> stop; at 0.80 the best case 0.97 > 0.96 -> go on
    assert rule.check(1, 0.75, SLOW) and rule.check(1, 0.80, SLOW) is None
    # faster than every finished trial: nothing dominates it, whatever its accuracy
    assert rule.check(1, 0.10, {"latency_ms.host": 0.5, "size_bytes": 50.0}) is None
    # cheaper in size only matters when size is an objective
    cheap_size = {"latency_ms.host": 3.0, "size_bytes": 50.0}
    assert rule.check(1, 0.5, cheap_size) is None
    assert HopelessRule(rule.finished, ["metric", "latency"], margin=0.01).check(1, 0.5, cheap_size)


def test_rule_compares_latency_on_its_profile():
    finished = [Finished(costs={**FAST, "latency_ms.edge": 5.0}, curve=[0.80, 0.90, 0.95], final=0.96)]
    running = {**SLOW, "latency_ms.edge": 4.0}  # slower here, faster on the edge device
    assert HopelessRule(finished, ["metric", "latency"], margin=0.01).check(1, 0.70, running)
    assert HopelessRule(finished, ["metric", "latency"], margin=0.01, profile="edge").check(1, 0.70, running) is None


def test_rule_needs_evidence_and_respects_min_epochs_and_min_metric():
    assert HopelessRule([], ["metric", "latency"]).check(1, 0.0, SLOW) is None  # no finished trial yet
    assert _rule(min_epochs=2).check(1, 0.1, SLOW) is None
    budget = _rule(min_metric=0.99)
    assert "min_metric" in budget.check(2, 0.90, {"latency_ms.host": 0.1, "size_bytes": 1.0})
    assert budget.check(2, 0.93, {"latency_ms.host": 0.1, "size_bytes": 1.0}) is None  # 0.93+0.06+0.01 >= 0.99


def test_constraints_are_signed_violations():
    c = ConstraintsConfig(max_latency_ms=2.0, min_accuracy=0.9, max_size_mb=1.0)  # the old name of min_metric
    assert c.min_metric == 0.9
    m = {"latency_ms.host": 2.5, "latency_ms.edge": 1.5, "metric": 0.95, "size_bytes": 0.5e6}
    assert violations(m, c, "host") == pytest.approx({"max_latency_ms": 0.5, "min_metric": -0.05, "max_size_mb": -0.5})
    assert not is_feasible(violations(m, c, "host"))
    assert is_feasible(violations({**m, "latency_ms.host": 1.0}, c, "host"))
    # the latency budget reads the primary profile's latency, whichever it is
    assert violations(m, c, "edge")["max_latency_ms"] == pytest.approx(-0.5) and is_feasible(violations(m, c, "edge"))
    assert violations(m, ConstraintsConfig(), "host") == {} and not any_constraint(ConstraintsConfig())


def test_rule_for_a_lower_is_better_metric_moves_the_best_case_down():
    # MSE fell by 0.4 after epoch 1 in the finished trial: the running trial's best case is value - 0.4 - margin
    finished = [Finished(costs=FAST, curve=[1.5, 1.2, 1.1], final=1.1)]
    rule = HopelessRule(finished, ["metric", "latency", "size"], margin=0.1, metric=MSE)
    assert rule.best_gain(1) == pytest.approx(0.4)
    # best case 2.0 - 0.5 = 1.5, worse than the finished 1.1 at no lower cost -> stop
    reason = rule.check(1, 2.0, SLOW)
    assert "dominated" in reason and "mse" in reason and "1.1000 < best case 1.5000" in reason
    # best case 1.5 - 0.5 = 1.0 beats 1.1 -> go on (an accuracy-style bound would have stopped it)
    assert rule.check(1, 1.5, SLOW) is None
    # a ceiling on the MSE it cannot get under; a floor is no reason to stop (the best case only falls)
    capped = HopelessRule(finished, ["metric", "latency"], margin=0.1, metric=MSE, max_metric=1.0)
    assert "max_metric" in capped.check(1, 1.6, {"latency_ms.host": 0.1, "size_bytes": 1.0})
    assert capped.check(1, 1.4, {"latency_ms.host": 0.1, "size_bytes": 1.0}) is None  # 1.4 - 0.5 <= 1.0
    floored = HopelessRule(finished, ["metric", "latency"], margin=0.1, metric=MSE, min_metric=5.0)
    assert floored.check(1, 1.6, {"latency_ms.host": 0.1, "size_bytes": 1.0}) is None


def test_default_margin_is_five_percent_of_the_teacher_metric():
    assert resolve_margin(None, 0.96) == pytest.approx(0.048)
    assert resolve_margin(None, -20.0) == pytest.approx(1.0)  # |metric|: the margin is never negative
    assert resolve_margin(0.3, 0.96) == 0.3  # explicit: in metric units, as set


def test_metric_bounds_in_metric_units_either_way():
    c = ConstraintsConfig(max_metric=0.5)  # e.g. an MSE ceiling: no [0, 1] range is assumed for the metric
    assert violations({"metric": 0.7, "size_bytes": 1.0}, c, "host") == pytest.approx({"max_metric": 0.2})
    assert is_feasible(violations({"metric": 0.4, "size_bytes": 1.0}, c, "host"))
    both = ConstraintsConfig(min_metric=-3.0, max_metric=250.0)
    assert violations({"metric": 300.0}, both, "host") == pytest.approx({"min_metric": -303.0, "max_metric": 50.0})


def test_front_hypervolume_for_a_lower_is_better_metric():
    teacher = {"metric": 2.0, "latency_ms.host": 2.0, "size_bytes": 100.0}  # MSE 2: the window is 0.2

    def row(mse, lat):
        return Row(0, mse, lat, 50, 0, 0, 0, 0, "", {})

    objectives = ["metric", "latency"]
    assert front_hypervolume([row(2.0, 1.0)], teacher, objectives, "host", MSE) == pytest.approx(0.5)
    # 0.1 higher MSE: half the window lost
    assert front_hypervolume([row(2.1, 1.0)], teacher, objectives, "host", MSE) == pytest.approx(0.25)
    # a lower MSE than the teacher's is better than the reference: more volume, never less
    assert front_hypervolume([row(1.9, 1.0)], teacher, objectives, "host", MSE) == pytest.approx(0.75)
    assert front_hypervolume([row(2.3, 1.0)], teacher, objectives, "host", MSE) == 0.0  # beyond the window
    # read as higher-is-better, the same rows would score the other way round
    assert front_hypervolume([row(1.9, 1.0)], teacher, objectives, "host") == pytest.approx(0.25)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hypervolume_matches_optuna(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        pts = rng.random((12, k))
        ref = np.full(k, 1.1)
        assert hypervolume(pts, ref) == pytest.approx(compute_hypervolume(pts, ref), rel=1e-9)
    assert hypervolume(np.array([[2.0, 0.5]]), [1.0, 1.0]) == 0.0  # outside the reference box


def test_front_hypervolume_is_normalised_by_the_teacher():
    teacher = {"metric": 0.9, "latency_ms.host": 2.0, "size_bytes": 100.0}

    def row(acc, lat, size):
        return Row(0, acc, lat, size, 0, 0, 0, 0, "", {})

    # as accurate as the teacher, half its latency: the accuracy extent is 1, latency extent 0.5
    assert front_hypervolume([row(0.9, 1.0, 50)], teacher, ["metric", "latency"], "host") == pytest.approx(0.5)
    # 4.5 points worse (half the window of 10% of 0.9), a quarter of the latency
    assert front_hypervolume([row(0.855, 0.5, 50)], teacher, ["metric", "latency"], "host") == pytest.approx(0.375)
    assert front_hypervolume([row(0.9, 0.5, 25)], teacher, ["metric", "latency", "size"], "host") == pytest.approx(
        0.75 * 0.75
    )


def test_budgets_mark_trials_and_reach_the_sampler(tmp_path):
    data = tiny_experiment_dict(tmp_path / "budget", n_trials=3)
    data["search"]["constraints"] = {"min_accuracy": 0.999}  # no candidate reaches it
    data["search"]["early_stop"] = {"enabled": False}
    logs: list[str] = []
    result = run_search(parse_experiment(data), log=logs.append)
    assert result.finished == 3
    assert sum("INFEASIBLE" in line for line in logs) == 3
    assert any("no trial met search.constraints" in line for line in logs)
    assert result.fronts["host"]  # nothing is lost when the goal is missed: the front of all trials is kept
    import optuna

    study = optuna.load_study(study_name=result.study_name, storage=parse_experiment(data).storage_url)
    # the metric's direction is the task's, and stored with the study for readers without the task
    assert study.user_attrs["metric.name"] == "accuracy" and study.user_attrs["metric.direction"] == "maximize"
    assert study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    for t in study.trials:
        assert counted(t) and t.user_attrs["feasible"] is False
        # stored where Optuna's samplers read them (FrozenTrial.constraints)
        assert t.constraints and t.constraints["min_metric"] == pytest.approx(0.999 - t.values[0])


def test_study_directions_and_the_progress_line_follow_the_metric():
    from autocompress.search.objectives import directions
    from autocompress.search.record import Progress

    assert directions(["metric", "latency", "size"], MSE) == ["minimize", "minimize", "minimize"]
    assert directions(["metric", "latency"], QualityMetric()) == ["maximize", "minimize"]
    lines: list[str] = []
    teacher = {"metric": 0.25, "latency_ms.host": 2.0, "size_bytes": 1000.0}
    Progress(2, 0, teacher, "host", lines.append, MSE).trial(0, {**teacher, "metric": 0.3, "latency_ms.host": 1.0}, 1)
    assert "mse 0.3000 (+5.00 pt)" in lines[0] and "acc" not in lines[0]
