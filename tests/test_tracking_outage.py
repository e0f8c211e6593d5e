"""A tracking server that goes away mid-search: no trial fails or waits for it, the search says so once,
and everything reaches MLflow when the server is back (the issue's acceptance: stopped after trial 2,
restarted after trial 4). The server is started here on 127.0.0.1 and stopped by its process group."""

from __future__ import annotations

import subprocess

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from autocompress.config import parse_experiment
from autocompress.search.optuna_backend import counted
from tests.conftest import AUTOCOMPRESS, cli_env, runs_by_trial, tiny_experiment_dict
from tests.test_mlflow_server import _free_port, _stop_group, start_server

N_TRIALS = 7


@pytest.mark.slow
def test_a_server_stopped_after_trial_2_and_restarted_after_trial_4_loses_nothing(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    data = tiny_experiment_dict(tmp_path / "outage", n_trials=N_TRIALS, early_stop={"enabled": False})
    data["finetune"]["epochs"] = 2
    data["tracking"]["uri"] = url
    path = tmp_path / "outage.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = parse_experiment(data)
    server = start_server(root, port)
    search = None
    lines: list[str] = []
    try:
        search = subprocess.Popen(
            [*AUTOCOMPRESS, "search", str(path)],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in search.stdout:
            lines.append(line.rstrip())
            if line.startswith(f"[2/{N_TRIALS}]"):
                _stop_group(server)  # the server goes away for good ... for two trials
            elif line.startswith(f"[4/{N_TRIALS}]"):
                server = start_server(root, port)  # ... and comes back on the same store
        err = search.stderr.read()
        search.wait(timeout=600)
        assert search.returncode == 0, err[-3000:]
        out = "\n".join(lines)
        assert sum("does not answer" in line for line in lines) == 1, out
        assert any("answers again" in line for line in lines), out
        assert "not sent to MLflow" not in out
        progress = [line for line in lines if line.startswith("[")]
        assert len(progress) == N_TRIALS and not any("FAILED" in line for line in progress), out

        study = optuna.load_study(study_name=parse_study_name(exp), storage=exp.storage_url)
        trials = study.get_trials()
        assert sum(counted(t) for t in trials) == N_TRIALS
        assert all(t.state == TrialState.COMPLETE for t in trials)  # no FAIL caused by tracking
        runs = runs_by_trial(exp, study)
        assert sorted(runs) == [t.number for t in trials]
        assert all(r.info.status == "FINISHED" and r.data.tags["state"] == "COMPLETE" for r in runs.values())
        for number, run in runs.items():  # the whole record, also of the trials run while it was away
            assert {"metric", "size_bytes", "latency_ms.host"} <= run.data.metrics.keys(), number
            assert "front.host" in run.data.tags, number
        parent = MlflowClient(tracking_uri=url).get_run(study.user_attrs["mlflow_parent_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials.finished"] == N_TRIALS
        print("\n" + "\n".join(line for line in lines if line.startswith(("[", "tracking:"))))
    finally:
        if search is not None and search.poll() is None:
            search.kill()
            search.wait()
        _stop_group(server)


def parse_study_name(exp) -> str:
    """The one study of ``exp``'s storage."""
    (summary,) = optuna.get_all_study_summaries(exp.storage_url, include_best_trial=False)
    return summary.study_name
