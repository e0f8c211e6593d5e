"""Uniform plans queued as a search's first trials, and a MobileNet search end to end."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autocompress.config import SpaceConfig, parse_experiment
from autocompress.search import run_search
from autocompress.spaces import Candidate, build_space
from autocompress.tasks.digits import DigitsCNN
from tests.conftest import tiny_experiment_dict


def test_uniform_points_are_the_offered_uniform_plans():
    model = DigitsCNN(width=8).eval()
    space = build_space(model, torch.randn(1, 1, 32, 32), SpaceConfig(prune={"ratios": [0.0, 0.5, 0.75]}))
    prune = space.get("prune")
    points = space.uniform_points()
    int8, half, most, int8_half = points
    assert len(points) == 4
    assert all(v == 8 for k, v in int8.items() if k.startswith("bits/")) and not any(
        v for k, v in int8.items() if k.startswith("prune/")
    )
    assert {v for k, v in half.items() if k.startswith("prune/")} == {0.5}
    # a group that does not offer 0.75 (too narrow) takes its largest ratio below it
    assert all(most[f"prune/{k}"] == (0.75 if 0.75 in v else 0.5) for k, v in prune.items())
    assert {v for k, v in most.items() if k.startswith("bits/")} == {32}
    assert {v for k, v in int8_half.items() if k.startswith("bits/")} == {8}
    for point in points:  # every value is one the space offers, and the points are candidates
        assert all(v in space.distributions()[k].choices for k, v in point.items())
        Candidate.from_params(point)
    no_int8 = build_space(model, torch.randn(1, 1, 32, 32), SpaceConfig(quantize={"bits": [32, 4]}))
    assert not any(8 in p.values() for p in no_int8.uniform_points())


def _fixed(trial: optuna.trial.FrozenTrial, point: dict) -> bool:
    return all(trial.params[k] == v for k, v in point.items())


def test_the_first_trials_are_the_uniform_plans_and_resume_does_not_repeat_them(tmp_path):
    data = tiny_experiment_dict(tmp_path / "u", n_trials=2, early_stop={"enabled": False})
    exp = parse_experiment(data)
    result = run_search(exp, log=lambda _: None)
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    from autocompress.search.setup import prepare_search

    points = prepare_search(exp, log=lambda _: None).space.uniform_points()
    assert len(points) >= 3
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # no leftover queued trials
    assert _fixed(trials[0], points[0]) and _fixed(trials[1], points[1])

    data["search"]["n_trials"] = 4
    resumed = run_search(parse_experiment(data), resume=True, log=lambda _: None)
    trials = sorted(
        optuna.load_study(study_name=resumed.study_name, storage=exp.storage_url).get_trials(), key=lambda t: t.number
    )
    assert len(trials) == 4
    assert _fixed(trials[2], points[2])  # the next plan, not the first ones again
    assert sum(_fixed(t, points[0]) for t in trials) == 1


@pytest.mark.slow
def test_a_mobilenet_search_runs_end_to_end(tmp_path):
    data = tiny_experiment_dict(tmp_path / "m", n_trials=3)
    data["task"]["args"] = {"model": "mobilenet", "width": 8, "image_size": 16}
    data["teacher"]["epochs"] = 2
    data["space"]["prune"] = {"ratios": [0.0, 0.5]}
    exp = parse_experiment(data)
    logs: list[str] = []
    result = run_search(exp, log=logs.append)
    assert result.finished == 3 and result.failed == 0 and result.fronts["host"]
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    first = min(study.get_trials(), key=lambda t: t.number)
    bits = {k: v for k, v in first.params.items() if k.startswith("bits/")}
    assert any(".." in k for k in bits) and set(bits.values()) == {8}  # per-region keys, all int8 first
    assert any("uniform plan(s)" in line for line in logs)
