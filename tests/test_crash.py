"""Crash consistency: a search killed at any point resumes to exactly n_trials, and MLflow ends in line
with the study (no run left RUNNING, no trial missing from the front); the MLflow store is a replica
rebuilt from the study when it is lost; the queued tracker survives a store that stops answering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autocompress import faults
from autocompress.cli import main
from autocompress.config import parse_experiment
from autocompress.errors import AutocompressError
from autocompress.search import run_search
from autocompress.search.optuna_backend import (
    PROCESS_PREFIX,
    WORKER_ATTR,
    _OptunaLoop,
    abandoned,
    counted,
    planned_params,
    process_seed,
    recover_interrupted,
)
from autocompress.search.record import DUPLICATE_OF, INTERRUPTED, SURPLUS
from autocompress.search.store import load_experiment_search, sqlite_path
from autocompress.search.tracking import QueuedTracker, Tracker
from tests.conftest import AUTOCOMPRESS, cli_env, run_autocompress, runs_by_trial, tiny_experiment_dict

DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: never a live process


def _study(tmp_path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")


# --- who owns a RUNNING trial ---------------------------------------------------------------------
def test_a_trial_killed_before_naming_its_worker_is_recovered_when_no_other_process_can_own_it(tmp_path):
    study = _study(tmp_path)
    study.set_user_attr(f"{PROCESS_PREFIX}{os.uname().nodename}:{DEAD_PID}", 0.0)
    orphan = study.ask()  # killed right after ask: no worker attribute
    orphan.suggest_categorical("x", [1, 2, 3])
    assert abandoned(study.trials[0], study)
    assert recover_interrupted(study, lambda _: None) == 1
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[INTERRUPTED]
    assert trials[1].state == TrialState.WAITING and trials[1].user_attrs["retry_of"] == 0
    assert not counted(trials[0])


def test_a_queued_plan_killed_right_after_ask_is_requeued_with_its_plan(tmp_path):
    study = _study(tmp_path)
    study.enqueue_trial({"x": 3})
    study.ask()  # popped the plan, killed before sampling anything
    assert recover_interrupted(study, lambda _: None) == 1
    retry = study.get_trials()[1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == {"x": 3}


def test_a_trial_without_a_worker_waits_while_another_live_process_might_still_name_it(tmp_path):
    study = _study(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        study.set_user_attr(f"{PROCESS_PREFIX}{os.uname().nodename}:{live.pid}", 0.0)
        study.ask()
        trial = study.trials[0]
        assert not abandoned(trial, study)
        assert abandoned(trial, study, now=time.time() + 3600)  # until the grace period is over
    finally:
        live.kill()
        live.wait()
    assert abandoned(study.trials[0], study)  # that process is gone now


def test_a_trial_of_a_live_worker_is_left_alone_and_a_dead_ones_is_recovered(tmp_path):
    study = _study(tmp_path)
    mine, theirs = study.ask(), study.ask()
    mine.set_user_attr(WORKER_ATTR, f"{os.uname().nodename}:{os.getpid()}")
    theirs.set_user_attr(WORKER_ATTR, f"{os.uname().nodename}:{DEAD_PID}")
    assert recover_interrupted(study, lambda _: None) == 1
    assert study.trials[0].state == TrialState.RUNNING and study.trials[1].state == TrialState.FAIL
    other_host = study.ask()
    other_host.set_user_attr(WORKER_ATTR, f"elsewhere.example:{DEAD_PID}")
    assert not abandoned(study.trials[-1], study)  # another host's PID cannot be checked from here


def test_processes_joining_at_the_same_moment_get_different_sampler_seeds(tmp_path):
    study = _study(tmp_path)
    seeds = {process_seed(0, study, f"host:{pid}") for pid in range(100, 140)}
    assert len(seeds) == 40 and all(0 <= s < 2**32 for s in seeds)
    assert process_seed(2**32 - 1, study, "host:1") < 2**32


def _loop(study: optuna.Study, n_trials: int) -> _OptunaLoop:
    loop = _OptunaLoop.__new__(_OptunaLoop)  # only what the drop rule reads: the study and n_trials
    loop.study, loop.exp = study, SimpleNamespace(search=SimpleNamespace(n_trials=n_trials))
    return loop


def test_a_plan_two_processes_both_queued_runs_once(tmp_path):
    study = _study(tmp_path)
    study.enqueue_trial({"x": 1})
    study.enqueue_trial({"x": 1}, skip_if_exists=False)  # the second process's copy (a race)
    loop = _loop(study, 10)
    first = study.ask()
    first.suggest_categorical("x", [1, 2])
    assert loop._dropped(first, loop._queued_plan(first)) is None
    second = study.ask()
    assert loop._dropped(second, loop._queued_plan(second)) == (DUPLICATE_OF, first.number)
    sampled = study.ask()  # proposed by the sampler, not queued: never called a duplicate
    assert loop._dropped(sampled, loop._queued_plan(sampled)) is None


def test_processes_asking_at_once_past_n_trials_leave_the_lowest_numbers_running(tmp_path):
    study = _study(tmp_path)
    study.enqueue_trial({"x": 2})
    loop = _loop(study, 2)
    done = study.ask()
    study.tell(done, 1.0)
    first, second = study.ask(), study.ask()  # two processes asked for the last trial at once
    assert loop._dropped(first, loop._queued_plan(first)) is None  # the lower number runs
    assert loop._dropped(second, loop._queued_plan(second)) == (SURPLUS, True)  # the other steps back
    assert counted(study.get_trials()[0])


# --- the queued tracker --------------------------------------------------------------------------
def test_queued_writes_wait_out_a_store_that_stops_answering_and_arrive_in_order(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    tracker = QueuedTracker(uri, "outage", tmp_path / "art", log=lines.append, retry_every=0.05)
    parent = tracker.create_run("parent")
    down = {"on": True}
    real_log = Tracker.log

    def flaky_log(self, *args, **kwargs):
        if down["on"]:
            raise ConnectionError("Connection refused")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(Tracker, "log", flaky_log)
    started = time.monotonic()
    run = tracker.start_run("trial-0", parent, tags={"trial": 0})
    for step in range(5):
        tracker.log(run, metrics={"val_metric": step / 10}, step=step)
    tracker.end_run(run, "FINISHED")
    assert time.monotonic() - started < 1.0  # the caller never waits for the store
    assert not tracker.flush(timeout=0.3) and tracker.pending >= 5
    down["on"] = False
    assert tracker.flush(timeout=30)
    assert tracker.close() == 0
    client = MlflowClient(tracking_uri=uri)
    stored = client.get_run(tracker.resolve(run))
    history = client.get_metric_history(stored.info.run_id, "val_metric")
    assert [m.step for m in history] == list(range(5)) and stored.info.status == "FINISHED"
    assert sum("does not answer" in line for line in lines) == 1
    assert sum("answers again" in line for line in lines) == 1


def test_closing_with_the_store_still_away_counts_what_was_not_sent(tmp_path, monkeypatch):
    tracker = QueuedTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "away", log=lambda _: None, retry_every=0.05)
    monkeypatch.setattr(Tracker, "create_run", lambda self, *a, **k: (_ for _ in ()).throw(OSError("gone")))
    run = tracker.start_run("trial-0")
    tracker.log(run, metrics={"m": 1.0})
    assert tracker.close(timeout=0.3) == 2


def test_an_unreachable_tracking_server_is_refused_in_one_line_before_any_training(tmp_path, capsys):
    data = tiny_experiment_dict(tmp_path / "nohost", n_trials=1)
    data["tracking"]["uri"] = "http://127.0.0.1:9"
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    assert main(["search", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "http://127.0.0.1:9" in err[0] and "does not answer" in err[0]
    assert time.monotonic() - started < 30
    assert "teacher" not in captured.out  # refused before the teacher was loaded or trained


def test_a_deleted_mlflow_experiment_is_one_line_naming_how_to_restore_it(tmp_path, capsys):
    data = tiny_experiment_dict(tmp_path / "del", n_trials=1)
    client = MlflowClient(tracking_uri=data["tracking"]["uri"])
    client.delete_experiment(client.create_experiment("tiny"))
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "'tiny'" in err[0] and "is deleted" in err[0] and "restore" in err[0]
    assert "teacher" not in captured.out


# --- the MLflow record rebuilt from the study ---------------------------------------------------
@pytest.fixture(scope="module")
def small_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("replica")
    data = tiny_experiment_dict(out / "r", n_trials=3, early_stop={"enabled": False})
    exp = parse_experiment(data)
    result = run_search(exp, log=lambda _: None)
    return data, exp, result


def _store_agrees_with_study(exp, study_name):
    study = optuna.load_study(study_name=study_name, storage=exp.storage_url)
    runs = runs_by_trial(exp, study)
    complete = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    _, stored = load_experiment_search(exp, study_name)
    assert {r.number for r in stored.records} == complete
    assert not [n for n, r in runs.items() if r.info.status == "RUNNING"]
    for t in study.get_trials():
        if counted(t):
            assert runs[t.number].data.tags["state"] == t.state.name
    return study, runs


def _sync(path) -> str:
    # A new process, as a user runs it: this one's MLflow client still holds the deleted file open.
    proc = run_autocompress("sync", str(path), timeout=300)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr[-2000:]
    return proc.stdout


def test_resume_refuses_another_teacher_unless_told(small_search):
    data, exp, result = small_search
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    ours = study.user_attrs["teacher_fingerprint"]
    study.set_user_attr("teacher_fingerprint", "0123456789abcdef")  # as if searched with another teacher
    try:
        with pytest.raises(AutocompressError, match="teacher 0123456789abcdef and this teacher is " + ours):
            run_search(parse_experiment(data), resume=True, log=lambda _: None)
        logs: list[str] = []
        resumed = run_search(parse_experiment(data), resume=True, accept_teacher=True, log=logs.append)
        assert resumed.finished == 3 and any("--accept-teacher" in line for line in logs)
    finally:
        study.set_user_attr("teacher_fingerprint", ours)


def _delete_store(exp) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    sqlite_path(exp.tracking_uri).unlink()
    # This process ran the search: its pooled connections still point at the deleted file.
    engine = SqlAlchemyStore._engine_map.pop(exp.tracking_uri, None)
    if engine is not None:
        engine.dispose()


def test_a_deleted_mlflow_store_is_rebuilt_from_the_study_by_sync(small_search):
    data, exp, result = small_search
    _delete_store(exp)
    path = exp.out_dir.parent / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = _sync(path)
    assert "rebuilt as run" in out and "3 trial run(s) written" in out
    study, runs = _store_agrees_with_study(exp, result.study_name)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs.values())
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials.finished"] == 3
    front = {str(row.trial) for row in result.fronts["host"]}
    assert {n for n, r in runs.items() if r.data.tags.get("front.host") == "True"} == {int(t) for t in front}
    assert "0 trial run(s) written" in _sync(path)  # a second sync finds nothing to write


def test_resume_closes_a_run_cut_off_between_tell_and_its_end(small_search):
    data, exp, result = small_search
    study = optuna.load_study(study_name=result.study_name, storage=exp.storage_url)
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    victim = runs_by_trial(exp, study)[1]
    client.update_run(victim.info.run_id, status="RUNNING")  # as if killed before end_run
    client.set_tag(victim.info.run_id, "state", "RUNNING")
    resumed = run_search(parse_experiment(data), resume=True, log=lambda _: None)
    assert resumed.finished == 3
    _, runs = _store_agrees_with_study(exp, result.study_name)
    assert runs[1].info.status == "FINISHED" and runs[1].data.tags["state"] == "COMPLETE"


@pytest.mark.slow
def test_resume_rebuilds_a_lost_mlflow_store_from_the_study(tmp_path):
    # Subprocesses only: this process never opens the store, so it reads the rebuilt file afterwards.
    data = tiny_experiment_dict(tmp_path / "lost", n_trials=2, early_stop={"enabled": False})
    path = tmp_path / "lost.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = parse_experiment(data)
    first = run_autocompress("search", str(path), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    sqlite_path(exp.tracking_uri).unlink()
    resumed = run_autocompress("search", str(path), "--resume", timeout=300)
    assert resumed.returncode == 0 and "rebuilt as run" in resumed.stdout, resumed.stderr[-2000:]
    summary = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)[0]
    study, runs = _store_agrees_with_study(exp, summary.study_name)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())


# --- SIGKILL at every point, then --resume --------------------------------------------------------
def _kill_run(tmp_path, point: str, nth: int, n_trials: int = 3):
    data = tiny_experiment_dict(tmp_path / point, n_trials=n_trials, early_stop={"enabled": False})
    if point == "teacher_epoch":
        data["teacher"]["epochs"] = 4 + nth  # a teacher no other test cached, so it really trains
    path = tmp_path / f"{point}.yaml"
    path.write_text(yaml.safe_dump(data))
    at = f"{point}@{nth}"  # trial points: @1 the first trial (nothing finished yet), @2 the second
    killed = run_autocompress("search", str(path), **{faults.ENV: at})
    exp = parse_experiment(data)
    before = _finished_before(exp)
    resumed = run_autocompress("search", str(path), "--resume")
    return exp, killed, resumed, before


def _finished_before(exp) -> dict[int, dict]:
    """The counted trials on disk right after the kill, with their parameters (none if no study yet)."""
    try:
        summaries = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)
    except Exception:  # noqa: BLE001 - killed before the study database existed
        return {}
    if not summaries:
        return {}
    study = optuna.load_study(study_name=summaries[0].study_name, storage=exp.storage_url)
    return {t.number: t.params for t in study.get_trials() if counted(t)}


KILLS = [(point, nth) for point in faults.POINTS for nth in ((1,) if point == "before_finish" else (1, 2))]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "nth"), KILLS, ids=[f"{p}@{n}" for p, n in KILLS])
def test_sigkill_at_each_point_then_resume_loses_nothing(tmp_path, point, nth):
    exp, killed, resumed, before = _kill_run(tmp_path, point, nth)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    summaries = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)
    assert len(summaries) == 1  # resumed the one study (or, killed before it existed, started it)
    study = optuna.load_study(study_name=summaries[0].study_name, storage=exp.storage_url)
    trials = study.get_trials()
    kept = {t.number: t.params for t in trials if counted(t)}
    lost = [n for n, params in before.items() if kept.get(n) != params]  # finished before the kill, gone after
    assert not lost and len(kept) == exp.search.n_trials  # no trial lost, none counted twice
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    interrupted = [t for t in trials if t.user_attrs.get(INTERRUPTED)]
    for t in interrupted:  # each interrupted trial redone exactly once, with the parameters it had or was queued with
        redo = [r for r in trials if r.user_attrs.get("retry_of") == t.number and DUPLICATE_OF not in r.user_attrs]
        planned = planned_params(t)
        assert len(redo) == 1 and all(redo[0].params[k] == v for k, v in planned.items())
    _, runs = _store_agrees_with_study(exp, study.study_name)
    for t in interrupted:
        if t.number in runs:  # killed before its run was written: nothing to close
            assert runs[t.number].info.status == "KILLED" and runs[t.number].data.tags["fail_reason"]
    client = MlflowClient(tracking_uri=exp.tracking_uri)
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "FINISHED"
    print(
        f"\nfault {point}@{nth}: finished before the kill {len(before)}, trials lost {len(lost)}, "
        f"interrupted {len(interrupted)}, counted {len(kept)}/{exp.search.n_trials}, "
        f"runs RUNNING {sum(r.info.status == 'RUNNING' for r in runs.values())}, "
        f"tracebacks {('Traceback' in killed.stderr) + ('Traceback' in resumed.stderr)}"
    )


@pytest.mark.slow
def test_sigterm_stops_a_search_cleanly_and_resume_finishes_it(tmp_path):
    data = tiny_experiment_dict(tmp_path / "term", n_trials=3, early_stop={"enabled": False})
    data["finetune"]["epochs"] = 3
    path = tmp_path / "term.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = parse_experiment(data)
    proc = subprocess.Popen(
        [*AUTOCOMPRESS, "search", str(path)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # like a background job: SIGINT may be ignored, SIGTERM must work
    )
    for line in proc.stdout:
        if line.startswith("[1/3]"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    resumed = run_autocompress("search", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)[0]
    _store_agrees_with_study(exp, summary.study_name)
