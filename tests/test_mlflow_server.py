"""A real MLflow tracking server: a search logs to it over HTTP and its REST API shows the whole record;
`front` reads the search back from it; `autocompress ui` serves a store on 127.0.0.1 until stopped.

Every server is started here, bound to 127.0.0.1, and stopped by PID (its process group) in a finally.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from autocompress.cli import main
from autocompress.config import parse_experiment
from autocompress.search import run_search
from autocompress.search.report import format_table
from autocompress.search.tracking import Tracker
from tests.conftest import ROOT, tiny_experiment_dict

MLFLOW = Path(sys.executable).parent / "mlflow"
# The server's job runner (LLM-judge jobs) is not under test and only adds processes on 2 cores.
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
LISTEN = "0A"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _get(url: str, **params) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params)}", timeout=30) as response:
        return json.load(response)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


def _wait_until_answering(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if _status(url) == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {timeout}s: {log.read_text()[-2000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group led by ``proc`` (server and workers), SIGKILL whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (a worker that outlived the leader)
    except ProcessLookupError:
        pass
    proc.wait()


def _listen_addresses(port: int) -> set[tuple[str, str]]:
    """(file, local address hex) of every listening TCP socket on ``port``, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == LISTEN:
                found.add((table, address))
    return found


def start_server(root: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on the SQLite store and artifact folder under ``root``, on 127.0.0.1:``port``,
    answering; in its own process group (stop it with :func:`_stop_group`). A second start on the same
    ``root`` serves the same store (a server restarted after an outage)."""
    log_path = root / "server.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'db'}",
                "--artifacts-destination",
                str(root / "art"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=SERVER_ENV,
            start_new_session=True,  # its own process group, so the finally stops workers too
        )
    try:
        _wait_until_answering(f"http://127.0.0.1:{port}/health", proc, 120, log_path)
    except BaseException:
        _stop_group(proc)
        raise
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a SQLite store with proxied artifacts, on a free 127.0.0.1 port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = start_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}", root
    finally:
        _stop_group(proc)


@pytest.fixture(scope="module")
def logged(server):
    """A tiny search whose tracking.uri is the server."""
    url, root = server
    # Early stop off: every trial then completes, so each run's full record can be checked.
    data = tiny_experiment_dict(root / "tiny", early_stop={"enabled": False})
    data["tracking"]["uri"] = url
    exp = parse_experiment(data)
    result = run_search(exp, log=lambda _: None)
    assert result.finished == exp.search.n_trials
    return url, exp, result


@pytest.mark.slow
def test_server_listens_on_loopback_only(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    addresses = _listen_addresses(port)
    assert addresses and all(table == "/proc/net/tcp" and addr == LOOPBACK_HEX for table, addr in addresses)


@pytest.mark.slow
def test_search_record_is_readable_through_the_rest_api(logged):
    url, exp, result = logged
    api = f"{url}/api/2.0/mlflow"
    front = result.fronts["host"]

    experiment = _get(f"{api}/experiments/get-by-name", experiment_name=exp.name)["experiment"]
    eid = experiment["experiment_id"]
    parents = _post(
        f"{api}/runs/search", {"experiment_ids": [eid], "filter": f"tags.`autocompress.study` = '{result.study_name}'"}
    )["runs"]
    assert [r["info"]["run_id"] for r in parents] == [result.parent_run_id]
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["teacher.accuracy"] == pytest.approx(result.teacher["metric"])
    assert metrics["front_size.host"] == len(front) and metrics["trials.finished"] == exp.search.n_trials
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["search.n_trials"] == str(exp.search.n_trials) and params["task.name"] == "digits"

    nested = f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    children = _post(f"{api}/runs/search", {"experiment_ids": [eid], "filter": nested, "max_results": 100})["runs"]
    assert len(children) == exp.search.n_trials
    on_front = set()
    for child in children:
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        child_metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        child_params = {p["key"] for p in child["data"]["params"]}
        assert child["info"]["status"] == "FINISHED" and tags["state"] == "COMPLETE"
        assert {"accuracy", "latency_ms.host", "size_bytes", "params"} <= set(child_metrics)
        assert any(k.startswith("prune/") for k in child_params) and "kd/alpha" in child_params
        history = _get(f"{api}/metrics/get-history", run_id=child["info"]["run_id"], metric_key="val_accuracy")
        assert [m["step"] for m in history["metrics"]] == list(range(1, exp.finetune.epochs + 1))
        if tags.get("front.host") == "True":
            on_front.add(int(tags["trial"]))
            row = next(r for r in front if r.trial == int(tags["trial"]))
            assert child_metrics["accuracy"] == row.metric and child_metrics["latency_ms.host"] == row.latency_ms
    assert on_front == {r.trial for r in front}

    listed = _get(f"{api}/artifacts/list", run_id=result.parent_run_id, path="fronts")["files"]
    assert {f["path"] for f in listed} == {"fronts/front_host.csv", "fronts/front_host.png"}
    assert all(int(f["file_size"]) > 0 for f in listed)
    query = urllib.parse.urlencode({"path": "fronts/front_host.csv", "run_uuid": result.parent_run_id})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=30) as response:
        rows = list(csv.DictReader(io.StringIO(response.read().decode())))
    assert [int(r["trial"]) for r in rows] == [r.trial for r in front]


@pytest.mark.slow
def test_front_reads_the_search_back_from_the_server(logged, capsys):
    url, _, result = logged
    assert main(["front", result.parent_run_id, "--tracking-uri", url]) == 0
    out = capsys.readouterr().out
    assert format_table(result.fronts["host"], result.teacher, "host") in out
    # An unreachable server is one line, at once (MLflow's client alone would retry for minutes).
    started = time.monotonic()
    assert main(["front", result.parent_run_id, "--tracking-uri", f"http://127.0.0.1:{_free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the MLflow server" in err
    assert time.monotonic() - started < 20


def _read_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The first stdout line of ``proc`` starting with ``prefix``, read by a thread.

    Not select() on the text stream: when several lines arrive in one chunk, readline() leaves
    the rest in Python's buffer where select() never sees it, and the wanted line would wait for
    output that never comes.
    """
    found: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        for line in proc.stdout:
            if line.startswith(prefix):
                found.put(line.strip())
                return
        found.put(None)  # the stream closed first

    threading.Thread(target=reader, daemon=True).start()
    try:
        line = found.get(timeout=timeout)
    except queue.Empty:
        line = None
    if line is None:
        raise AssertionError(f"no line starting {prefix!r} (exit status {proc.poll()})")
    return line


@pytest.mark.slow
def test_ui_serves_the_experiment_store_on_localhost_until_stopped(tmp_path):
    data = tiny_experiment_dict(tmp_path / "tiny")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = parse_experiment(data)
    experiment_id = Tracker(exp.tracking_uri, exp.name, exp.artifact_root).experiment_id  # the store, no search
    port = _free_port()
    log_path = tmp_path / "ui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autocompress", "ui", str(path), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**SERVER_ENV, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
    try:
        try:
            line = _read_line(proc, "MLflow UI for", 120)
        except AssertionError as err:
            raise AssertionError(f"{err}; its stderr:\n{log_path.read_text()[-3000:]}") from None
        url = f"http://127.0.0.1:{port}"
        assert line.endswith(f"at {url}/#/experiments/{experiment_id}  (Ctrl-C to stop)")
        assert _status(f"{url}/") == 200
        experiment = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name", experiment_name=exp.name)["experiment"]
        assert experiment["experiment_id"] == experiment_id  # it serves this experiment's store
        addresses = _listen_addresses(port)
        assert addresses and all(addr == LOOPBACK_HEX for _, addr in addresses)

        os.kill(proc.pid, signal.SIGTERM)  # the command itself, not its group: it must stop its server
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 20
        # Listening sockets, not bind(): the closed connections of the requests above linger in TIME_WAIT.
        while _listen_addresses(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listen_addresses(port), "the MLflow server outlived `autocompress ui`"
    finally:
        _stop_group(proc)


def test_ui_refuses_a_missing_store_and_a_busy_port(tmp_path, capsys):
    data = tiny_experiment_dict(tmp_path / "tiny")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["ui", str(path), "--port", str(_free_port())]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    exp = parse_experiment(data)
    Tracker(exp.tracking_uri, exp.name, exp.artifact_root)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", str(path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}: already in use" in err
