"""Ray Tune backend: a small search on a local Ray instance, recorded and fronted like the Optuna backend."""

from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from autocompress.compress.pipeline import prepare_student
from autocompress.config import ConstraintsConfig, parse_experiment
from autocompress.errors import AutocompressError
from autocompress.evaluators.latency import torch_threads
from autocompress.hw_profiles.measure import MeasureSettings, measure_profile
from autocompress.hw_profiles.target import load_target
from autocompress.search import ray_backend, run_search
from autocompress.search.objectives import measure_cost
from autocompress.search.quality import QualityMetric
from autocompress.search.ray_backend import (
    DURATION,
    EPOCH,
    FAIL_REASON,
    METRICS,
    OBJECTIVES,
    PARTIAL,
    VAL_METRIC,
    DefineByRun,
    MlflowRecorder,
    MultiObjectiveOptunaSearch,
    RecordingASHA,
    candidate_params,
    make_scheduler,
    run_ray_search,
)
from autocompress.search.record import Progress
from autocompress.search.setup import prepare_search
from autocompress.search.tracking import Tracker
from autocompress.spaces import Candidate, SearchSpace
from tests.conftest import tiny_experiment_dict


def _experiment_dict(out_dir, backend: str) -> dict:
    data = tiny_experiment_dict(out_dir, n_trials=4, backend=backend, study_name=f"tiny-{backend}")
    data["search"]["ray"] = {"cpus_per_trial": 1, "asha_grace_period": 1, "asha_reduction_factor": 2}
    data["finetune"]["epochs"] = 2  # one ASHA rung (epoch 1) before the last epoch
    return data


def _dominates(a: dict, b: dict, objectives, profile: str = "host") -> bool:
    """Figures a dominate b: no worse on every objective (accuracy up, others down), better on one."""
    keys = {"metric": "metric", "latency": f"latency_ms.{profile}", "size": "size_bytes"}
    signs = {"metric": 1.0, "latency": -1.0, "size": -1.0}
    diffs = [signs[o] * (a[keys[o]] - b[keys[o]]) for o in objectives]
    return all(d >= 0 for d in diffs) and any(d > 0 for d in diffs)


def _children(client: MlflowClient, parent) -> list:
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )


def _assert_front_is_the_non_dominated_set(front, complete: dict[int, dict], objectives, profile="host") -> None:
    members = {row.trial for row in front}
    assert members and members <= set(complete)
    for n, figures in complete.items():
        dominated = any(_dominates(other, figures, objectives, profile) for m, other in complete.items() if m != n)
        assert dominated == (n not in members), f"trial {n}: on front {n in members}, dominated {dominated}"


@pytest.fixture(scope="module")
def local_ray():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def both_backends(tmp_path_factory, local_ray):
    """The same experiment searched by each backend, into one output directory and MLflow experiment."""
    out = tmp_path_factory.mktemp("backends") / "tiny"
    ray_exp = parse_experiment(_experiment_dict(out, "ray"))
    logs: list[str] = []
    ray_result = run_search(ray_exp, log=logs.append)
    optuna_exp = parse_experiment(_experiment_dict(out, "optuna"))
    optuna_result = run_search(optuna_exp, log=lambda _: None)
    return ray_exp, ray_result, logs, optuna_exp, optuna_result


@pytest.mark.slow
def test_ray_search_records_every_trial_in_mlflow_and_fronts_the_complete_ones(both_backends):
    exp, result, logs, _, _ = both_backends
    assert ray.is_initialized()  # joined the test's instance and left it running
    assert result.finished == exp.search.n_trials and result.failed == 0
    assert sum("ETA" in line for line in logs) == exp.search.n_trials
    assert any(line.startswith("ASHA on val_metric (accuracy, maximized): rungs at epoch 1 of 2") for line in logs)

    client = MlflowClient(tracking_uri=exp.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["autocompress.backend"] == "ray"
    assert parent.data.params["search.backend"] == "ray"
    assert parent.data.metrics["teacher.metric"] == pytest.approx(result.teacher["metric"])
    assert parent.data.metrics["trials.finished"] == exp.search.n_trials
    children = _children(client, parent)
    assert sorted(int(c.data.tags["trial"]) for c in children) == list(range(exp.search.n_trials))

    complete: dict[int, dict] = {}
    for child in children:
        state = child.data.tags["state"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_metric")]
        assert any(k.startswith("prune/") for k in child.data.params) and "kd/alpha" in child.data.params
        if state == "COMPLETE":
            assert child.info.status == "FINISHED"
            assert {"metric", "latency_ms.host", "size_bytes", "params", "speedup.host", "duration_s"} <= set(
                child.data.metrics
            )
            assert steps == [1, 2]
            complete[int(child.data.tags["trial"])] = child.data.metrics
        else:  # the only other outcome of a healthy search: ASHA stopped it at its rung
            assert state == "PRUNED" and child.info.status == "FINISHED" and "front.host" in child.data.tags
            assert child.data.tags["stop_reason"].startswith("stopped by ASHA at epoch 1")
            assert steps == [1]
            # what was measured before the stop is kept: the cost and the rung's accuracy
            assert {"latency_ms.host", "size_bytes", "duration_s"} <= set(child.data.metrics)
            assert child.data.metrics["metric"] == client.get_metric_history(child.info.run_id, "val_metric")[0].value
    stopped = exp.search.n_trials - len(complete)
    assert parent.data.metrics["trials.stopped"] == stopped
    assert sum("STOPPED" in line and "ETA" in line for line in logs) == stopped

    front = result.fronts["host"]
    _assert_front_is_the_non_dominated_set(front, complete, exp.objectives)
    tagged = {int(c.data.tags["trial"]) for c in children if c.data.tags.get("front.host") == "True"}
    assert tagged == {row.trial for row in front}
    for row in front:  # the front's figures are the logged ones
        assert row.metric == pytest.approx(complete[row.trial]["metric"])
        assert row.size_bytes == complete[row.trial]["size_bytes"]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "fronts")}
    assert artifacts == {"fronts/front_host.csv", "fronts/front_host.png"}
    assert (exp.out_dir / "ray" / result.study_name).is_dir()


@pytest.mark.slow
def test_ray_and_optuna_fronts_have_the_same_shape(both_backends):
    ray_exp, ray_result, _, optuna_exp, optuna_result = both_backends
    client = MlflowClient(tracking_uri=ray_exp.tracking_uri)
    ray_parent = client.get_run(ray_result.parent_run_id)
    optuna_parent = client.get_run(optuna_result.parent_run_id)
    # the same MLflow experiment, the same objectives
    assert ray_parent.info.experiment_id == optuna_parent.info.experiment_id
    assert ray_parent.data.params["objectives"] == optuna_parent.data.params["objectives"]
    # the same profiles, CSV columns and candidate parameter names
    assert set(ray_result.fronts) == set(optuna_result.fronts) == {"host"}
    headers = []
    for result in (ray_result, optuna_result):
        with open(result.out_dir / "front_host.csv", newline="") as fh:
            headers.append(next(csv.reader(fh)))
    assert headers[0] == headers[1]
    names = {frozenset(row.candidate) for r in (ray_result, optuna_result) for row in r.fronts["host"]}
    assert len(names) == 1
    assert any(n.startswith("prune/") for n in next(iter(names))) and "kd/temperature" in next(iter(names))
    # each backend's front is the non-dominated set of its own complete trials
    for exp, result, parent in ((ray_exp, ray_result, ray_parent), (optuna_exp, optuna_result, optuna_parent)):
        complete = {
            int(c.data.tags["trial"]): c.data.metrics
            for c in _children(client, parent)
            if c.data.tags["state"] == "COMPLETE"
        }
        _assert_front_is_the_non_dominated_set(result.fronts["host"], complete, exp.objectives)


def test_resume_is_refused_before_any_work(tmp_path):
    exp = parse_experiment(_experiment_dict(tmp_path / "r", "ray"))
    with pytest.raises(AutocompressError, match="search.backend: optuna only"):
        run_ray_search(exp, resume=True, log=lambda _: None)
    assert not (tmp_path / "r").exists()


SPACE = SearchSpace(
    {
        "prune": {"features.0": (0.0, 0.5), "features.3": (0.0, 0.5, 0.75)},
        "bits": {"features.0": (32, 8), "classifier.1": (32, 8)},
        "kd": {"temperature": (2.0, 4.0), "alpha": (0.5,)},
    }
)


def _searcher() -> MultiObjectiveOptunaSearch:
    import optuna

    return MultiObjectiveOptunaSearch(
        space=DefineByRun(SPACE),
        metric=[f"{OBJECTIVES}/metric", f"{OBJECTIVES}/latency"],
        mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0),
    )


def test_searcher_suggestions_rebuild_candidates_with_the_space_parameter_names():
    searcher = _searcher()
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        params = candidate_params(config)
        assert set(params) == set(SPACE.distributions())  # Tune's "/" nesting undone
        candidate = Candidate.from_params(params)
        assert candidate.get("prune")["features.3"] in SPACE.get("prune")["features.3"]
        assert candidate.to_params() == params


def test_searcher_tells_optuna_complete_pruned_and_failed():
    from optuna.trial import TrialState

    searcher = _searcher()
    for i in range(3):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {f"{OBJECTIVES}/metric": 0.9, f"{OBJECTIVES}/latency": 1.5})
    searcher.on_trial_complete("t1", {EPOCH: 1, VAL_METRIC: 0.4})  # ASHA stop: only an epoch report
    searcher.on_trial_complete("t2", {FAIL_REASON: "RuntimeError: boom"})
    trials = searcher._ot_study.get_trials()  # the in-memory study OptunaSearch keeps
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].values == [0.9, 1.5]


def test_searcher_stores_budget_violations_where_optunas_samplers_read_them():
    import optuna
    from optuna.study._constrained_optimization import _get_feasible_trials

    searcher = MultiObjectiveOptunaSearch(
        space=DefineByRun(SPACE),
        metric=[f"{OBJECTIVES}/metric", f"{OBJECTIVES}/latency"],
        mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0),
        constraints=ConstraintsConfig(max_latency_ms=1.0, min_metric=0.8),
        profile="host",
    )
    for i in range(3):
        searcher.suggest(f"t{i}")
    figures = {"metric": 0.9, "latency_ms.host": 1.5, "size_bytes": 1000.0, "params": 300.0}
    # results as Tune hands them to a searcher: flattened at "/"
    final = {f"{METRICS}/{k}": v for k, v in figures.items()}
    searcher.on_trial_complete("t0", {**final, f"{OBJECTIVES}/metric": 0.9, f"{OBJECTIVES}/latency": 1.5})
    partial = {f"{PARTIAL}/{k}": v for k, v in {**figures, "metric": 0.5, "latency_ms.host": 0.5}.items()}
    searcher.on_trial_complete("t1", {EPOCH: 1, VAL_METRIC: 0.5, **partial})  # stopped: cost + last accuracy
    searcher.on_trial_complete("t2", {FAIL_REASON: "RuntimeError: boom"})
    trials = searcher._ot_study.get_trials()
    # as the Optuna backend stores them (Trial.set_constraint): read back by FrozenTrial.constraints
    assert trials[0].constraints == pytest.approx({"max_latency_ms": 0.5, "min_metric": -0.1})
    assert trials[1].constraints == pytest.approx({"max_latency_ms": -0.5, "min_metric": 0.3})
    assert trials[2].constraints == {}  # nothing was measured
    assert _get_feasible_trials(trials) == [trials[2]]  # what NSGA-II and TPE rank on


def test_scheduler_rungs_lie_before_the_last_epoch(tmp_path):
    logs: list[str] = []
    data = _experiment_dict(tmp_path / "s", "ray")
    data["finetune"]["epochs"] = 1
    assert not isinstance(make_scheduler(parse_experiment(data), logs.append), RecordingASHA)
    assert "no rung before the last" in logs[-1]
    data["finetune"]["epochs"] = 6
    data["search"]["ray"]["asha_grace_period"] = 2
    assert isinstance(make_scheduler(parse_experiment(data), logs.append), RecordingASHA)
    assert logs[-1].startswith("ASHA on val_metric (accuracy, maximized): rungs at epoch 2, 4 of 6")
    # ASHA's mode follows the metric's direction
    scheduler = make_scheduler(parse_experiment(data), logs.append, QualityMetric("mse", higher_is_better=False))
    assert scheduler._metric_op == -1.0 and "(mse, minimized)" in logs[-1]  # Tune's sign for mode="min"
    data["search"]["early_stop"] = {"enabled": False}
    assert not isinstance(make_scheduler(parse_experiment(data), logs.append), RecordingASHA)


def test_recorder_records_complete_stopped_and_failed_trials(tmp_path):
    exp = parse_experiment(_experiment_dict(tmp_path / "rec", "ray"))
    exp.out_dir.mkdir(parents=True)
    tracker = Tracker(exp.tracking_uri, "recorder")
    parent_id = tracker.start_run("search")
    teacher = {"metric": 0.9, "latency_ms.host": 2.0, "size_bytes": 4000.0, "params": 1000.0}
    logs: list[str] = []
    stop_reasons: dict[str, str] = {}
    recorder = MlflowRecorder(
        exp, tracker, parent_id, teacher, Progress(4, 0, teacher, "host", logs.append), stop_reasons
    )
    config = {"prune": {"features.0": 0.5}, "bits": {"features.0": 8}, "kd": {"temperature": 2.0, "alpha": 0.5}}

    def trial(trial_id, last_result=None, error=None):
        return SimpleNamespace(trial_id=trial_id, config=config, last_result=last_result or {}, get_error=lambda: error)

    metrics = {"metric": 0.85, "latency_ms.host": 1.0, "size_bytes": 1000.0, "params": 300.0}
    done = trial("a", {METRICS: metrics, OBJECTIVES: {}, DURATION: 1.5})
    recorder.on_trial_start(0, [], done)
    recorder.on_trial_result(0, [], done, {EPOCH: 1, VAL_METRIC: 0.8})
    recorder.on_trial_complete(0, [], done)
    partial = {**metrics, "metric": 0.3}
    stopped = trial("b", {EPOCH: 1, VAL_METRIC: 0.3, PARTIAL: partial, DURATION: 0.7})
    recorder.on_trial_start(0, [], stopped)
    stop_reasons["b"] = "stopped by ASHA at epoch 1: val accuracy 0.3000 worse than the rung's cutoff"
    recorder.on_trial_complete(0, [], stopped)
    failed = trial("c", {FAIL_REASON: "RuntimeError: boom", DURATION: 0.2})
    recorder.on_trial_start(0, [], failed)
    recorder.on_trial_complete(0, [], failed)
    crashed = trial("d", error="Traceback ...\nray.exceptions.RayActorError: The actor died unexpectedly\n")
    recorder.on_trial_error(0, [], crashed)  # never started: the run is created on the spot
    recorder.on_trial_complete(0, [], trial("e"))  # removed while pending: not a trial of the search

    assert recorder.counts == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 2}
    assert [r.number for r in recorder.records] == [0] and recorder.records[0].params["prune/features.0"] == 0.5
    runs = {r.data.tags["ray.trial_id"]: r for r in tracker.child_runs(parent_id)}
    assert set(runs) == {"a", "b", "c", "d"}
    a, b, c, d = (runs[k] for k in "abcd")
    assert a.info.status == "FINISHED" and a.data.metrics["speedup.host"] == pytest.approx(2.0)
    assert a.data.tags["state"] == "COMPLETE" and a.data.tags["feasible"] == "True"
    assert a.data.params["bits/features.0"] == "8"
    assert b.info.status == "FINISHED" and b.data.tags["state"] == "PRUNED" and "ASHA" in b.data.tags["stop_reason"]
    assert b.data.metrics["metric"] == 0.3 and b.data.metrics["duration_s"] == 0.7
    assert b.data.metrics["accuracy"] == 0.3  # also under the task's metric name
    assert c.info.status == "FAILED" and c.data.tags["fail_reason"] == "RuntimeError: boom"
    assert d.info.status == "FAILED" and d.data.tags["fail_reason"].endswith("The actor died unexpectedly")
    assert [line.split()[3] for line in logs] == ["accuracy", "STOPPED", "FAILED", "FAILED"]


PROFILE = "tiny-eager"


@pytest.fixture(scope="module")
def eager_profile(tmp_path_factory):
    """A torch-eager profile of the tiny space, measured here (seconds). Latencies predicted from it
    are a function of a candidate's architecture alone, so a latency budget splits candidates the
    same way in the test and in every trial."""
    root = tmp_path_factory.mktemp("profile")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment_dict(root / "unused")))
    settings = MeasureSettings(
        runtime="torch-eager", repeats=5, warmup_ms=2.0, min_sample_ms=0.2, calibration=4, profile_id=PROFILE
    )
    with torch_threads(1):
        measure_profile(load_target(path), root / f"{PROFILE}.json", settings, log=lambda _: None)
    return root / f"{PROFILE}.json"


@pytest.mark.slow
def test_ray_budgets_mark_trials_reach_the_searchers_study_and_front_the_feasible_ones(
    tmp_path, local_ray, eager_profile, monkeypatch
):
    data = _experiment_dict(tmp_path / "budget", "ray")
    data["profiles"] = [str(eager_profile)]
    data["latency"]["measure_host"] = False  # latency predicted on the profile: exact, not timed
    data["finetune"]["epochs"] = 1
    data["search"].update(n_trials=3, early_stop={"enabled": False})  # every trial runs to its measurement
    exp = parse_experiment(data)
    assert exp.primary == PROFILE

    # Two candidates the search is made to try first, far apart in latency: the uncompressed one and
    # the smallest; the budget lies between their predicted latencies, so one is infeasible.
    setup = prepare_search(exp, log=lambda _: None)
    dists = setup.space.distributions()
    uncompressed = {k: d.choices[0] if k.startswith("kd/") else min(d.choices) for k, d in dists.items()}
    uncompressed.update({k: 32 for k in dists if k.startswith("bits/")})
    smallest = {k: d.choices[0] if k.startswith("kd/") else max(d.choices) for k, d in dists.items()}
    smallest.update({k: 8 for k in dists if k.startswith("bits/")})

    ctx = setup.ctx

    def latency(params: dict) -> float:
        def batches():
            return ctx.task.loader("train", ctx.pipeline.batch_size, shuffle=True)

        student = prepare_student(
            ctx.teacher, Candidate.from_params(params), ctx.task.example_input(1), ctx.pipeline, batches
        )
        return measure_cost(student.model, student.bits, ctx).latency_ms[PROFILE]

    slow, fast = latency(uncompressed), latency(smallest)
    assert slow != fast
    budget = (slow + fast) / 2
    data["search"]["constraints"] = {"max_latency_ms": budget}
    exp = parse_experiment(data)

    searchers: list[MultiObjectiveOptunaSearch] = []

    class Seeded(MultiObjectiveOptunaSearch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, points_to_evaluate=[uncompressed, smallest], **kwargs)
            searchers.append(self)

    monkeypatch.setattr(ray_backend, "MultiObjectiveOptunaSearch", Seeded)
    logs: list[str] = []
    result = run_search(exp, log=logs.append)
    assert result.finished == 3 and result.failed == 0

    client = MlflowClient(tracking_uri=exp.tracking_uri)
    children = _children(client, client.get_run(result.parent_run_id))
    assert len(children) == 3 and {c.data.tags["state"] for c in children} == {"COMPLETE"}
    (searcher,) = searchers
    feasible: dict[int, dict] = {}
    verdicts: dict[int, bool] = {}
    for child in children:
        number, figures = int(child.data.tags["trial"]), child.data.metrics
        meets = figures[f"latency_ms.{PROFILE}"] <= budget
        verdicts[number] = meets
        assert child.data.tags["feasible"] == str(meets)  # as the Optuna backend tags it
        if meets:
            feasible[number] = figures
        # the searcher's Optuna trial carries the budget's value where NSGA-II and TPE read it
        ot_trial = searcher._ot_study.trials[searcher._ot_trials[child.data.tags["ray.trial_id"]].number]
        assert ot_trial.constraints == pytest.approx({"max_latency_ms": figures[f"latency_ms.{PROFILE}"] - budget})
    assert set(verdicts.values()) == {True, False}  # the budget splits the trials

    # the progress line says so, as on the Optuna backend
    lines = {int(line.split()[2]): line for line in logs if "ETA" in line}
    for number, meets in verdicts.items():
        assert lines[number].split(" | ")[0].endswith("  feasible" if meets else "  INFEASIBLE")
    assert not any("no trial met search.constraints" in line for line in logs)

    # the fronts are those of the feasible trials
    front = result.fronts[PROFILE]
    _assert_front_is_the_non_dominated_set(front, feasible, exp.objectives, PROFILE)
    tagged = {int(c.data.tags["trial"]) for c in children if c.data.tags.get(f"front.{PROFILE}") == "True"}
    assert tagged == {row.trial for row in front}
