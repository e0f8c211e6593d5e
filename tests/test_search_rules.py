"""Early stopping, budgets and hypervolume: the rules the search controller applies."""

from __future__ import annotations

import numpy as np
import pytest
from optuna._hypervolume import compute_hypervolume

from autocompress.config import ConstraintsConfig, parse_experiment
from autocompress.search.constraints import any_constraint, is_feasible, violations
from autocompress.search.early_stop import Finished, HopelessRule
from autocompress.search.optuna_backend import counted
from autocompress.search.pareto import hypervolume
from autocompress.search.report import Row, front_hypervolume
from autocompress.search.runner import run_search
from tests.conftest import tiny_experiment_dict

FAST = {"latency_ms.host": 1.0, "size_bytes": 100.0}
SLOW = {"latency_ms.host": 3.0, "size_bytes": 300.0}


def _rule(**kw):
    finished = [Finished(costs=FAST, curve=[0.80, 0.90, 0.95], final=0.96)]  # gained 0.16 after epoch 1
    return HopelessRule(finished, ["accuracy", "latency", "size"], **{"margin": 0.01, **kw})


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
    assert HopelessRule(rule.finished, ["accuracy", "latency"], margin=0.01).check(1, 0.5, cheap_size)


def test_rule_compares_latency_on_its_profile():
    finished = [Finished(costs={**FAST, "latency_ms.edge": 5.0}, curve=[0.80, 0.90, 0.95], final=0.96)]
    running = {**SLOW, "latency_ms.edge": 4.0}  # slower here, faster on the edge device
    assert HopelessRule(finished, ["accuracy", "latency"], margin=0.01).check(1, 0.70, running)
    assert HopelessRule(finished, ["accuracy", "latency"], margin=0.01, profile="edge").check(1, 0.70, running) is None


def test_rule_needs_evidence_and_respects_min_epochs_and_min_accuracy():
    assert HopelessRule([], ["accuracy", "latency"]).check(1, 0.0, SLOW) is None  # no finished trial yet
    assert _rule(min_epochs=2).check(1, 0.1, SLOW) is None
    budget = _rule(min_accuracy=0.99)
    assert "min_accuracy" in budget.check(2, 0.90, {"latency_ms.host": 0.1, "size_bytes": 1.0})
    assert budget.check(2, 0.93, {"latency_ms.host": 0.1, "size_bytes": 1.0}) is None  # 0.93+0.06+0.01 >= 0.99


def test_constraints_are_signed_violations():
    c = ConstraintsConfig(max_latency_ms=2.0, min_accuracy=0.9, max_size_mb=1.0)
    m = {"latency_ms.host": 2.5, "latency_ms.edge": 1.5, "accuracy": 0.95, "size_bytes": 0.5e6}
    assert violations(m, c, "host") == pytest.approx(
        {"max_latency_ms": 0.5, "min_accuracy": -0.05, "max_size_mb": -0.5}
    )
    assert not is_feasible(violations(m, c, "host"))
    assert is_feasible(violations({**m, "latency_ms.host": 1.0}, c, "host"))
    # the latency budget reads the primary profile's latency, whichever it is
    assert violations(m, c, "edge")["max_latency_ms"] == pytest.approx(-0.5) and is_feasible(violations(m, c, "edge"))
    assert violations(m, ConstraintsConfig(), "host") == {} and not any_constraint(ConstraintsConfig())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hypervolume_matches_optuna(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        pts = rng.random((12, k))
        ref = np.full(k, 1.1)
        assert hypervolume(pts, ref) == pytest.approx(compute_hypervolume(pts, ref), rel=1e-9)
    assert hypervolume(np.array([[2.0, 0.5]]), [1.0, 1.0]) == 0.0  # outside the reference box


def test_front_hypervolume_is_normalised_by_the_teacher():
    teacher = {"accuracy": 0.9, "latency_ms.host": 2.0, "size_bytes": 100.0}

    def row(acc, lat, size):
        return Row(0, acc, lat, size, 0, 0, 0, 0, "", {})

    # as accurate as the teacher, half its latency: the accuracy extent is 1, latency extent 0.5
    assert front_hypervolume([row(0.9, 1.0, 50)], teacher, ["accuracy", "latency"], "host") == pytest.approx(0.5)
    # 5 points worse (half the 10-point window), a quarter of the latency
    assert front_hypervolume([row(0.85, 0.5, 50)], teacher, ["accuracy", "latency"], "host") == pytest.approx(0.375)
    assert front_hypervolume([row(0.9, 0.5, 25)], teacher, ["accuracy", "latency", "size"], "host") == pytest.approx(
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
    for t in study.trials:
        assert counted(t) and t.user_attrs["feasible"] is False
        # stored where Optuna's samplers read them (FrozenTrial.constraints)
        assert t.constraints and t.constraints["min_accuracy"] == pytest.approx(0.999 - t.values[0])
