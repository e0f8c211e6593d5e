"""Several processes on one study: `--resume` from two shells at once, and `--workers`, on SQLite and
on a real PostgreSQL server (started here on 127.0.0.1 and stopped by PID, see tests/postgres.py).

Every search ends with exactly ``n_trials`` trials run and counted, none left running, no
candidate or uniform plan run twice (a plan both processes queued runs once; its copy is dropped
unrun or left queued, never lost), trials from each process, and every trial's MLflow run finished
under the study's one parent run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autocompress.config import parse_experiment
from autocompress.search import run_search
from autocompress.search.optuna_backend import WORKER_ATTR, counted
from autocompress.search.record import DUPLICATE_OF
from tests import postgres
from tests.conftest import ROOT, runs_by_trial, tiny_experiment_dict

N_TRIALS = 8
STUDY = "shared"
# The tiny experiment's space widened with distillation settings that cost nothing to train:
# 256 prune/bits plans x 20 temperatures x 9 alphas = 46,080 candidates. Of the 8 trials, 5 are the
# queued uniform plans (prune/bits fixed, distillation sampled) and 3 are sampled: the chance that
# two of them coincide by the sampler's own draws is about (3 + 3 * 5) / 46,080 < 0.04%. A repeat
# is a scheduling bug (two samplers on one stream, a plan queued twice), not chance.
TEMPERATURES = [1.0 + 0.5 * i for i in range(20)]
ALPHAS = [round(0.1 * i, 1) for i in range(1, 10)]


@pytest.fixture(scope="module")
def pg_server():
    """One throw-away PostgreSQL cluster for this module (each test makes its own database)."""
    binaries = postgres.require()
    server = postgres.start_server(binaries)
    try:
        yield server
    finally:
        server.stop()


def _experiment(out: Path, storage: str | None = None, epochs: int = 1, **search) -> dict:
    # Random sampler: its proposals are independent draws, so the chance of a repeat is the one above.
    # Early stop off: a stopped trial would still count, but the counts are clearer without it.
    data = tiny_experiment_dict(
        out, n_trials=N_TRIALS, sampler="random", study_name=STUDY, early_stop={"enabled": False}, **search
    )
    data["space"]["prune"]["ratios"] = [0.0, 0.25, 0.5, 0.75]
    data["space"]["distill"] = {"temperature": TEMPERATURES, "alpha": ALPHAS}
    data["finetune"]["epochs"] = epochs
    if storage is not None:
        data["search"]["storage"] = storage
    return data


def _start(path: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "autocompress", "search", str(path), *args],
            # One thread each: two processes on a small machine, not two thread pools fighting over it.
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, f"{log.name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"


def _describe(trials) -> str:
    return "\n".join(
        f"  #{t.number} {t.state.name} worker={t.user_attrs.get(WORKER_ATTR)} "
        f"fixed={'fixed_params' in t.system_attrs} retry_of={t.user_attrs.get('retry_of')} {t.params}"
        for t in trials
    )


def _plan(trial) -> str:
    return json.dumps(trial.system_attrs.get("fixed_params"), sort_keys=True)


def _check_study(exp, pids: set[int]) -> None:
    """Exactly N_TRIALS trials run, all counted, none repeated; each of ``pids`` ran some; MLflow agrees.

    A uniform plan that two processes both queued is run once: the later copy is dropped unrun
    (failed with ``duplicate_of``, not counted), or left queued when the search ended first.
    """
    study = optuna.load_study(study_name=STUDY, storage=exp.storage_url)
    trials = study.get_trials()
    table = _describe(trials)
    assert not [t for t in trials if t.state == TrialState.RUNNING], f"left running:\n{table}"
    dropped = [t for t in trials if DUPLICATE_OF in t.user_attrs]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    ran = [t for t in trials if t not in dropped and t not in waiting]
    assert sum(counted(t) for t in trials) == N_TRIALS, f"counted trials != {N_TRIALS}:\n{table}"
    assert len(ran) == N_TRIALS, f"extra trials run:\n{table}"
    assert all(t.state == TrialState.COMPLETE for t in ran), f"a trial did not complete:\n{table}"
    # No candidate twice, and no uniform plan twice (its distillation settings are sampled, so two
    # runs of one plan need not have identical params).
    params = [json.dumps(t.params, sort_keys=True) for t in ran]
    assert len(set(params)) == len(params), f"a candidate ran twice:\n{table}"
    plans = [_plan(t) for t in ran if "fixed_params" in t.system_attrs]
    assert len(set(plans)) == len(plans), f"a uniform plan ran twice:\n{table}"
    # What did not run is a copy of a plan that did: nothing queued is lost.
    for t in dropped + waiting:
        assert t.state in (TrialState.FAIL, TrialState.WAITING) and _plan(t) in plans, f"#{t.number} lost:\n{table}"
    ran_by = {int(t.user_attrs[WORKER_ATTR].rpartition(":")[2]) for t in ran}
    assert ran_by <= pids | {os.getpid()}, table
    assert pids <= ran_by, f"not every process ran a trial {pids}:\n{table}"
    runs = runs_by_trial(exp, study)  # the trial runs under the study's parent run
    assert set(runs) == {t.number for t in ran}, f"MLflow trial runs {sorted(runs)}:\n{table}"
    for number, run in runs.items():
        assert run.info.status == "FINISHED", f"trial {number}: MLflow run {run.info.run_id} {run.info.status}"
    if dropped or waiting:
        print(f"{len(dropped)} duplicate plan(s) dropped unrun, {len(waiting)} left queued:\n{table}")


def _two_resumers(tmp_path: Path, storage: str | None) -> None:
    """A first search runs one trial; two `--resume` processes started at the same instant finish it."""
    data = _experiment(tmp_path / "tiny", storage)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    # The study, its parent run and its first (uniform) trial, made here: the resumers then start
    # together, read the same study and race on everything after (uniform plans, seeds, the last trial).
    first = parse_experiment({**data, "search": {**data["search"], "n_trials": 1}})
    assert run_search(first, log=lambda _: None).finished == 1
    exp = parse_experiment(data)
    logs = [tmp_path / "resume-1.log", tmp_path / "resume-2.log"]
    procs = [_start(path, log, "--resume") for log in logs]
    _wait(procs, logs)
    _check_study(exp, {p.pid for p in procs})


@pytest.mark.slow
def test_two_resumed_processes_on_one_sqlite_study_finish_n_trials_without_repeats(tmp_path):
    _two_resumers(tmp_path, storage=None)  # the default: sqlite in output_dir


@pytest.mark.slow
def test_two_resumed_processes_on_one_postgresql_study_finish_n_trials_without_repeats(tmp_path, pg_server):
    _two_resumers(tmp_path, storage=pg_server.create_database("resumers"))


@pytest.mark.slow
def test_parallel_workers_on_postgresql_finish_n_trials_without_repeats(tmp_path, pg_server):
    # Trials long enough that the spawned worker (imports, task, cached teacher) joins in time.
    data = _experiment(tmp_path / "tiny", pg_server.create_database("workers"), epochs=3, workers=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    log = tmp_path / "search.log"
    proc = _start(path, log)
    _wait([proc], [log])
    assert "2 workers on study" in log.read_text()
    exp = parse_experiment(data)
    study = optuna.load_study(study_name=STUDY, storage=exp.storage_url)
    pids = {int(t.user_attrs[WORKER_ATTR].rpartition(":")[2]) for t in study.get_trials()}
    assert proc.pid in pids and len(pids) == 2, _describe(study.get_trials())  # the main process and its worker
    _check_study(exp, pids)


def test_postgresql_storage_url_is_accepted():
    data = _experiment(Path("/tmp/unused"), "postgresql+psycopg2://user@db.example:5432/studies")
    assert parse_experiment(data).storage_url == "postgresql+psycopg2://user@db.example:5432/studies"
    assert parse_experiment({**data, "search": {"storage": "postgresql://u@h/db"}}).storage_url == "postgresql://u@h/db"


def test_missing_postgresql_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(postgres, "find_binaries", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        postgres.require()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="initdb/pg_ctl not on PATH"):
        postgres.require()


def test_finds_the_newest_debian_binaries_off_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # nothing on PATH
    for version in ("9.6", "15", "13"):
        bindir = tmp_path / "postgresql" / version / "bin"
        bindir.mkdir(parents=True)
        for name in ("initdb", "pg_ctl"):
            (bindir / name).write_text("#!/bin/sh\n")
            (bindir / name).chmod(0o755)
    monkeypatch.setattr(postgres, "DEBIAN_BINDIRS", str(tmp_path / "postgresql" / "*" / "bin"))
    newest = tmp_path / "postgresql" / "15" / "bin"
    assert postgres.find_binaries() == (str(newest / "initdb"), str(newest / "pg_ctl"))
