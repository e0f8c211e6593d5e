"""End-to-end searches on real (tiny) data: fronts, MLflow records, failures, crash and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autocompress.config import parse_experiment
from autocompress.errors import AutocompressError
from autocompress.search import objectives as objectives_module
from autocompress.search import run_search
from autocompress.search.optuna_backend import counted
from autocompress.search.record import INTERRUPTED
from autocompress.spaces import Candidate
from tests.conftest import AUTOCOMPRESS, cli_env, run_autocompress, runs_by_trial, tiny_experiment_dict


def _dominates(a, b):
    """a, b = (accuracy, latency, size): accuracy up, the rest down."""
    ge = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    return ge and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    exp = parse_experiment(tiny_experiment_dict(out / "tiny"))
    logs: list[str] = []
    result = run_search(exp, log=logs.append)
    return exp, result, logs


def test_search_finishes_all_trials_and_reports_a_non_dominated_front(finished_search):
    exp, result, logs = finished_search
    assert result.finished == exp.search.n_trials and result.failed == 0
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    stopped = study.get_trials(states=(TrialState.PRUNED,))
    assert len(complete) + len(stopped) == exp.search.n_trials and complete
    for t in stopped:  # early-stopped trials say why
        assert t.user_attrs["stop_reason"].startswith("epoch ")
    points = {t.number: (t.values[0], t.values[1], t.values[2]) for t in complete}
    front = result.fronts["host"]
    assert front
    for row in front:
        assert not any(_dominates(p, points[row.trial]) for n, p in points.items() if n != row.trial)
    # every trial that is not on the front is dominated by some trial
    members = {r.trial for r in front}
    for n, p in points.items():
        if n not in members:
            assert any(_dominates(q, p) for m, q in points.items() if m != n)
    # one progress line per trial, then the printed front with the teacher line
    assert sum("trial" in line and "ETA" in line for line in logs) == exp.search.n_trials
    assert any(line.startswith("teacher:") for line in logs)
    table = next(line for line in logs if "Pareto front on profile 'host'" in line)
    assert table
    csv_lines = (result.out_dir / "front_host.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(front) + 1 and csv_lines[0].startswith("trial,accuracy")
    assert (result.out_dir / "front_host.png").stat().st_size > 1000


def test_pruned_candidates_are_smaller_and_rebuild_to_the_logged_figures(finished_search):
    exp, result, _ = finished_search
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    teacher_params = result.teacher["params"]
    pruned_seen = False
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        candidate = Candidate.from_params(trial.params)
        if any(r > 0 for r in candidate.get("prune").values()):
            pruned_seen = True
            assert trial.user_attrs["metrics"]["params"] < teacher_params
    assert pruned_seen

    # Rebuild one front member from teacher + candidate + seed: same size, same output shape.
    from autocompress.tasks import load_task
    from autocompress.teacher import get_teacher

    task = load_task(exp.task.name, exp.task.args)
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed)
    assert teacher.source == "cache"
    row = result.fronts["host"][0]
    ctx = objectives_module.make_context(exp, teacher.model, task)
    model, metrics = objectives_module.score_candidate(Candidate.from_params(row.candidate), ctx)
    assert model(task.example_input(3)).shape == (3, 10)
    assert metrics.params == row.params and metrics.size_bytes == row.size_bytes
    assert metrics.metric == pytest.approx(row.metric, abs=1e-6)
    # `select` rebuilds without measuring the cost first (build_candidate): the same model all the same
    rebuilt = objectives_module.build_candidate(Candidate.from_params(row.candidate), ctx)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_mlflow_holds_parent_and_child_runs(finished_search):
    exp, result, _ = finished_search
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.n_trials"] == str(exp.search.n_trials)
    assert parent.data.metrics["teacher.metric"] == pytest.approx(result.teacher["metric"])
    assert parent.data.metrics["teacher.accuracy"] == parent.data.metrics["teacher.metric"]  # readable name
    assert parent.data.params["metric.name"] == "accuracy" and parent.data.params["metric.direction"] == "maximize"
    assert parent.data.tags["profile.host.threads"] == str(exp.latency.threads)
    assert parent.data.tags["profile.host.cpu"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert len(children) == exp.search.n_trials
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"metric", "accuracy", "latency_ms.host", "size_bytes", "params"} <= set(child.data.metrics)
        assert any(k.startswith("prune/") for k in child.data.params)
        assert child.data.tags["state"] in ("COMPLETE", "PRUNED")
        history = client.get_metric_history(child.info.run_id, "val_metric")
        readable = client.get_metric_history(child.info.run_id, "val_accuracy")  # the task's metric name
        assert [(m.step, m.value) for m in readable] == [(m.step, m.value) for m in history]
        epochs = exp.finetune.epochs if child.data.tags["state"] == "COMPLETE" else len(history)
        assert [m.step for m in history] == list(range(1, epochs + 1)) and history
    tagged = [c for c in children if c.data.tags.get("front.host") == "True"]
    assert len(tagged) == len(result.fronts["host"])
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "fronts")}
    assert artifacts == {"fronts/front_host.csv", "fronts/front_host.png"}


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, monkeypatch):
    # Early stop off: a trial stopped before it reaches the injected failure would shift the count.
    exp = parse_experiment(tiny_experiment_dict(tmp_path / "fail", n_trials=4, early_stop={"enabled": False}))
    real = objectives_module.score_candidate
    calls = {"n": 0}

    def flaky(candidate, ctx, on_epoch=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom: unsupported layer")
        model, metrics = real(candidate, ctx, on_epoch)
        if calls["n"] == 3:
            metrics = type(metrics)(float("nan"), metrics.latency_ms, metrics.latency_p90_ms, 1, 1)
        return model, metrics

    monkeypatch.setattr("autocompress.search.optuna_backend.score_candidate", flaky)
    result = run_search(exp, log=lambda _: None)
    assert result.finished == 4 and result.failed == 2
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    failed = study.get_trials(states=(TrialState.FAIL,))
    reasons = sorted(t.user_attrs["fail_reason"] for t in failed)
    assert reasons[0].startswith("RuntimeError: boom") and "non-finite" in reasons[1]
    runs = runs_by_trial(exp, study)
    for t in failed:
        run = runs[t.number]
        assert run.info.status == "FAILED" and run.data.tags["fail_reason"] == t.user_attrs["fail_reason"]


def test_resume_starts_a_missing_study_and_refuses_a_changed_one(tmp_path):
    data = tiny_experiment_dict(tmp_path / "r", n_trials=1)
    with pytest.raises(AutocompressError, match="no study named 'nope'"):
        run_search(parse_experiment(data), resume="nope", log=lambda _: None)  # a named study must exist
    logs: list[str] = []
    # killed before its study existed (e.g. while the teacher trained): --resume starts it
    result = run_search(parse_experiment(data), resume=True, log=logs.append)
    assert result.finished == 1 and any("no study of experiment 'tiny'" in line for line in logs)
    data["finetune"]["epochs"] = 2
    with pytest.raises(AutocompressError, match="experiment changed"):
        run_search(parse_experiment(data), resume=True, log=lambda _: None)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume_ends_with_exactly_n_trials(tmp_path):
    n_trials = 4
    # Early stop off: the re-run of the killed trial must run to its end, not be stopped as hopeless.
    data = tiny_experiment_dict(tmp_path / "kill", n_trials=n_trials, early_stop={"enabled": False})
    data["finetune"]["epochs"] = 3  # trials long enough to be killed in the middle of one
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = parse_experiment(data)
    proc = subprocess.Popen(
        [*AUTOCOMPRESS, "search", str(path)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def trials(states):
        try:
            summaries = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)
        except Exception:  # noqa: BLE001 - database not created yet
            return []
        if not summaries:
            return []
        study = optuna.load_study(study_name=summaries[0].study_name, storage=exp.storage_url)
        return study.get_trials(states=states)

    try:
        _wait_for(lambda: len(trials((TrialState.COMPLETE,))) >= 1 and trials((TrialState.RUNNING,)), 240, "a trial")
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done_before = {t.number: t.params for t in trials((TrialState.COMPLETE,))}
    killed = trials((TrialState.RUNNING,))
    assert proc.returncode == -signal.SIGKILL and len(killed) == 1

    result = run_search(exp, resume=True, log=lambda _: None)
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    all_trials = study.get_trials()
    assert result.finished == n_trials
    assert sum(counted(t) for t in all_trials) == n_trials
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # finished trials were kept as they were, not re-run
    for number, params in done_before.items():
        assert all_trials[number].state == TrialState.COMPLETE and all_trials[number].params == params
    # the killed trial is flagged, excluded from the count, and re-run once with its parameters
    interrupted = all_trials[killed[0].number]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs[INTERRUPTED]
    retries = [t for t in all_trials if t.user_attrs.get("retry_of") == interrupted.number]
    assert len(retries) == 1 and retries[0].params == interrupted.params and retries[0].state == TrialState.COMPLETE
    assert runs_by_trial(exp, study)[interrupted.number].info.status == "KILLED"


@pytest.mark.slow
def test_parallel_workers_share_the_study_without_lost_or_extra_trials(tmp_path):
    n_trials = 8
    data = tiny_experiment_dict(tmp_path / "par", n_trials=n_trials, workers=2, early_stop={"enabled": False})
    # Trials long enough that the second process (spawned: imports, task, cached teacher) joins in time.
    data["finetune"]["epochs"] = 4
    path = tmp_path / "par.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = parse_experiment(data)
    proc = run_autocompress("search", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 workers on study" in proc.stdout and "[worker 1] [" in proc.stdout
    summary = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)[0]
    study = optuna.load_study(study_name=summary.study_name, storage=exp.storage_url)
    trials = study.get_trials()
    # every trial that ran, ran to an end; exactly n_trials (a trial the two asked for at once steps back)
    ran = [t for t in trials if counted(t)]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ran)
    assert len(ran) == n_trials
    assert len({t.user_attrs["worker"] for t in ran}) == 2  # both processes ran trials
    # distinct candidates: the workers' samplers do not propose the same trials
    assert len({json.dumps(t.params, sort_keys=True) for t in ran}) > len(ran) // 2
    runs = runs_by_trial(exp, study)
    for t in ran:
        assert runs[t.number].info.status == "FINISHED"
