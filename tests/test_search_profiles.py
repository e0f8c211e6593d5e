"""Searches scored on hardware profiles: every trial gets a latency per profile, one front each."""

from __future__ import annotations

import re

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autocompress.cli import main
from autocompress.config import parse_experiment
from autocompress.errors import ConfigError
from autocompress.evaluators.latency import torch_threads
from autocompress.hw_profiles import load_profile, predict, save_profile
from autocompress.hw_profiles.measure import MeasureSettings, measure_profile
from autocompress.hw_profiles.target import load_target
from autocompress.hw_profiles.validate import validate_profile
from autocompress.search import run_search
from autocompress.search.objectives import build_candidate, make_context
from autocompress.spaces import Candidate
from autocompress.tasks import load_task
from autocompress.teacher import get_teacher
from tests.conftest import tiny_experiment_dict


@pytest.fixture(scope="module")
def eager_profile(tmp_path_factory):
    """A real torch-eager profile of the tiny experiment's space, measured and validated here (seconds)."""
    root = tmp_path_factory.mktemp("profile")
    data = tiny_experiment_dict(root / "unused")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = MeasureSettings(
        runtime="torch-eager", repeats=5, warmup_ms=2.0, min_sample_ms=0.2, calibration=4, profile_id="tiny-eager"
    )
    target = load_target(path)
    with torch_threads(1):
        profile = measure_profile(target, root / "tiny-eager.json", settings, log=lambda _: None)
        report = validate_profile(profile, target, 2, repeats=5, log=lambda _: None)
    save_profile(profile.model_copy(update={"validation": [report.summary]}), root / "tiny-eager.json")
    return root / "tiny-eager.json"


@pytest.fixture(scope="module")
def profile_search(tmp_path_factory, eager_profile):
    out = tmp_path_factory.mktemp("search")
    data = tiny_experiment_dict(out / "tiny", primary_profile="tiny-eager")
    data["profiles"] = [str(eager_profile)]
    exp = parse_experiment(data)
    logs: list[str] = []
    return exp, run_search(exp, log=logs.append), logs


def test_every_trial_is_scored_on_host_and_profile_and_steers_on_the_primary(profile_search, eager_profile):
    exp, result, logs = profile_search
    assert exp.profile_names == ["host", "tiny-eager"] and exp.primary == "tiny-eager"
    assert set(result.fronts) == {"host", "tiny-eager"} and all(result.fronts.values())
    for name in ("host", "tiny-eager"):
        assert (result.out_dir / f"front_{name}.csv").is_file()
        assert any(f"Pareto front on profile '{name}'" in line for line in logs)
    assert any("on tiny-eager (predicted from its profile)" in line for line in logs if line.startswith("teacher:"))
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete
    latency_index = exp.objectives.index("latency")
    for trial in complete:
        metrics = trial.user_attrs["metrics"]
        assert metrics["latency_ms.host"] > 0 and metrics["latency_ms.tiny-eager"] > 0
        # the optimizer saw the primary profile's latency, not the host's
        assert trial.values[latency_index] == pytest.approx(metrics["latency_ms.tiny-eager"])

    # the logged prediction is the profile's prediction for the rebuilt model
    trial = complete[0]
    task = load_task(exp.task.name, exp.task.args)
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, log=lambda _: None)
    compressed = build_candidate(Candidate.from_params(trial.params), make_context(exp, teacher.model, task))
    expected = predict(compressed.model, task.example_input(1), load_profile(eager_profile)).latency_ms
    assert trial.user_attrs["metrics"]["latency_ms.tiny-eager"] == pytest.approx(expected, rel=1e-6)


def test_mlflow_holds_per_profile_metrics_tags_and_the_profile_file(profile_search):
    exp, result, _ = profile_search
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert "teacher.latency_ms.tiny-eager" in parent.data.metrics
    assert parent.data.tags["profile.tiny-eager.runtime"].startswith("torch-eager ")
    assert "front_size.tiny-eager" in parent.data.metrics and "hypervolume.tiny-eager" in parent.data.metrics
    assert [a.path for a in client.list_artifacts(result.parent_run_id, "profiles")] == ["profiles/tiny-eager.json"]
    # the profile's recorded validation, raw and scaled by the same-model drift, is on the parent run
    recorded = load_profile(exp.profiles[0]).validation[0]
    prefix = f"profile.tiny-eager.validation.{recorded.model.rsplit('.', 1)[-1]}"
    assert parent.data.metrics[f"{prefix}.median_abs_error_pct"] == pytest.approx(recorded.median_abs_error_pct)
    assert parent.data.metrics[f"{prefix}.drift_ratio"] == pytest.approx(recorded.drift.ratio_median)
    scaled = parent.data.metrics[f"{prefix}.drift_scaled_median_abs_error_pct"]
    assert scaled == pytest.approx(recorded.drift.median_abs_error_pct)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    complete = [c for c in children if c.data.tags["state"] == "COMPLETE"]
    assert complete
    for child in complete:
        assert {"latency_ms.host", "latency_ms.tiny-eager", "speedup.tiny-eager"} <= set(child.data.metrics)
    for child in children:
        assert child.data.tags["front.tiny-eager"] in ("True", "False")


def test_profiles_only_search_never_measures_the_host(tmp_path, eager_profile, monkeypatch):
    from autocompress.runtimes import Runtime

    def no_measuring(*args, **kwargs):
        raise AssertionError("the host was measured although latency.measure_host is false")

    monkeypatch.setattr(Runtime, "measure", no_measuring)
    data = tiny_experiment_dict(tmp_path / "tiny", n_trials=2)
    data["profiles"] = [str(eager_profile)]
    data["latency"]["measure_host"] = False
    exp = parse_experiment(data)
    assert exp.primary == "tiny-eager"
    result = run_search(exp, log=lambda _: None)
    assert set(result.fronts) == {"tiny-eager"} and result.finished == 2
    assert "latency_ms.host" not in result.teacher


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"profiles": ["no-such-profile"]}, "profiles: no-such-profile: no such profile file, nor a shipped profile"),
        ({"profiles": ["host"]}, "profiles: 'host' is this machine"),
        (
            {"profiles": ["xeon-torch-eager-1t", "elsewhere/xeon-torch-eager-1t.json"]},
            "name a profile twice",
        ),
        ({"latency": {"measure_host": False}}, "latency.measure_host is false and no profiles are named"),
        ({"search": {"primary_profile": "phone"}}, "search.primary_profile 'phone' is not scored; choose one of host"),
    ],
)
def test_profile_settings_are_validated_in_one_line(tmp_path, change, message, capsys):
    data = tiny_experiment_dict(tmp_path / "tiny")
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_experiment(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_select_on_a_profile_re_predicts_and_re_measures_where_the_host_matches(profile_search, tmp_path):
    from autocompress.search.select import Budget, select

    exp, result, _ = profile_search
    front = result.fronts["tiny-eager"]
    budget = max(r.latency_ms for r in front)
    sel = select(exp, "tiny-eager", Budget(max_latency_ms=budget), out_dir=tmp_path / "sel", log=lambda _: None)
    metrics = sel.card["metrics"]
    # the rebuilt model is predicted again from the profile: exactly the searched prediction
    assert metrics["remeasured"]["latency_predicted_ms"] == pytest.approx(sel.row.latency_ms, rel=1e-6)
    # the profile was measured on this machine and runtime, so the model is also timed here, in eager torch
    assert metrics["latency_source"].startswith("re-measured on this host, the machine and runtime profile")
    assert metrics["remeasured"]["latency_ms"] > 0 and metrics["remeasured"]["latency_p90_ms"] is not None
