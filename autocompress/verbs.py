"""``autocompress front | select | ui``: review a finished search, pick and export a model, browse MLflow.

Registered into the main parser by :func:`add_review_commands`. User-fixable problems raise
:class:`~autocompress.errors.AutocompressError` (``cli.main`` prints one line, exit 2); a budget no
front member meets prints one line naming the closest member and exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from autocompress.errors import AutocompressError

EXIT_BUDGET_NOT_MET = 1
UI_HOST = "127.0.0.1"  # the UI shows every run and artifact: never expose it beyond this machine
UI_START_TIMEOUT_S = 120.0
RUN_ID = re.compile(r"[0-9a-f]{32}")


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the experiment file, as for `search` (e.g. --set output_dir=elsewhere); repeatable",
    )


def _load(path: Path, sets: list[str] | None):
    from autocompress.config import load_experiment, parse_override

    return load_experiment(path, dict(parse_override(text) for text in sets or []))


def _is_experiment_file(text: str) -> bool:
    return Path(text).is_file() or text.endswith((".yaml", ".yml"))


# --- front ------------------------------------------------------------------------------------


def cmd_front(args: argparse.Namespace) -> int:
    from autocompress.search.report import format_table
    from autocompress.search.store import load_experiment_search, load_search, open_client, resolve_tracking_uri

    source = args.source
    if _is_experiment_file(source):
        _, search = load_experiment_search(_load(Path(source), args.set), tracking_uri=args.tracking_uri)
    elif RUN_ID.fullmatch(source):
        uri = resolve_tracking_uri(args.tracking_uri)
        search = load_search(open_client(uri), source, uri)
    else:
        raise AutocompressError(
            f"{source!r}: neither an experiment file nor an MLflow run id (32 hex digits, e.g. from `search` output)"
        )
    profiles = [args.profile] if args.profile else sorted(search.fronts)
    for profile in profiles:
        search.front(profile)  # an unknown profile fails before anything is printed
    print(
        f"search {search.study} (MLflow run {search.run_id}, {search.status.lower()}; experiment "
        f"{search.experiment_name!r} at {search.tracking_uri}): {len(search.records)} complete of "
        f"{search.trial_runs} trial run(s)"
    )
    for profile in profiles:
        front = search.front(profile)
        print(
            f"\nPareto front on profile '{profile}' ({len(front)} of {len(search.records)} complete trials; "
            f"objectives: {', '.join(search.objectives)}; metric {search.metric.label()}):"
        )
        zipped = "compressed_size" in search.objectives
        print(format_table(front, search.teacher, profile, zipped=zipped, metric=search.metric))
    return 0


# --- select -----------------------------------------------------------------------------------


def cmd_select(args: argparse.Namespace) -> int:
    from autocompress.search.select import Budget, BudgetNotMet, describe_selection, select

    budget = Budget(max_latency_ms=args.max_latency_ms, min_metric=args.min_metric, max_metric=args.max_metric)
    exp = _load(args.experiment, args.set)
    try:
        selection = select(
            exp,
            args.profile,
            budget,
            study=args.study,
            out_dir=args.out,
            register=args.register,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except BudgetNotMet as err:
        print(f"autocompress: {err}", file=sys.stderr)
        return EXIT_BUDGET_NOT_MET
    print(describe_selection(selection))
    return 0


# --- ui ---------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server will: connections in TIME_WAIT from an earlier server do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((UI_HOST, port))
        except OSError:
            return False
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ui_command(tracking_uri: str, artifact_root: Path | None, port: int) -> list[str]:
    """The ``mlflow server`` command line serving ``tracking_uri`` on 127.0.0.1:``port`` (one worker)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    if artifact_root is not None:
        cmd += ["--default-artifact-root", artifact_root.as_uri()]
    # One worker: a review UI for one person, on machines that measure latency on the other cores.
    return cmd + ["--host", UI_HOST, "--port", str(port), "--workers", "1"]


def _experiment_id(tracking_uri: str, name: str | None) -> str | None:
    if name is None:
        return None
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def cmd_ui(args: argparse.Namespace) -> int:
    from autocompress.search.store import artifact_root_for, resolve_tracking_uri, sqlite_path

    name = None
    if args.experiment is not None:
        exp = _load(args.experiment, args.set)
        uri = resolve_tracking_uri(args.tracking_uri or exp.tracking_uri)
        name = exp.tracking.experiment or exp.name
    else:
        uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"this store is an MLflow server already: open {uri} in a browser")
        return 0
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise AutocompressError(f"no MLflow store at {path}: run a search first, or pass --tracking-uri")
    if not 0 < args.port < 65536:
        raise AutocompressError(f"--port {args.port}: not a TCP port (1-65535)")
    if not _port_free(args.port):
        raise AutocompressError(f"--port {args.port}: already in use on {UI_HOST}; pass another --port")

    url = f"http://{UI_HOST}:{args.port}"
    experiment_id = _experiment_id(uri, name)
    # The server's job runner (LLM-judge and trace jobs) is of no use for reviewing searches and
    # would add processes. `mlflow server` does not pass a SIGTERM on to its web workers, so it runs
    # in a process group of its own that _stop signals as a whole (Ctrl-C and `kill` reach us).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(ui_command(uri, artifact_root_for(uri), args.port), env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill <pid>` stops the server too
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while not _answers(f"{url}/health"):
            if proc.poll() is not None:
                raise AutocompressError(f"mlflow server exited with status {proc.returncode} (its messages are above)")
            if time.monotonic() > deadline:
                raise AutocompressError(f"mlflow server did not answer on {url} within {UI_START_TIMEOUT_S:g}s")
            time.sleep(0.5)
        link = f"{url}/#/experiments/{experiment_id}" if experiment_id else url
        print(f"MLflow UI for {uri} at {link}  (Ctrl-C to stop)", flush=True)
        status = proc.wait()
        if status != 0:
            raise AutocompressError(f"mlflow server exited with status {status}")
    except KeyboardInterrupt:
        print("autocompress: MLflow UI stopped", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its whole process group), killing them if they do not exit in time."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    _signal_group(proc, signal.SIGKILL)  # a worker that outlived its parent


# --- registration -----------------------------------------------------------------------------


def add_review_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``front``, ``select`` and ``ui`` to the ``autocompress`` subcommands."""
    p = sub.add_parser(
        "front",
        help="print a search's Pareto front from its MLflow record",
        description="Recompute and print the Pareto front(s) of a search from its MLflow runs alone (trial "
        "params and metrics, the parent run's teacher figures), e.g. from a remote tracking server.",
    )
    p.add_argument(
        "source",
        metavar="RUN_OR_EXPERIMENT",
        help="an MLflow search (parent) run id, or an experiment YAML file (its latest search)",
    )
    p.add_argument("--profile", metavar="P", help="print only this latency profile's front (default: all)")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow store to read (default: the experiment's tracking.uri; for a run id sqlite:///runs/mlflow.db)",
    )
    _set_arg(p)
    p.set_defaults(func=cmd_front)

    p = sub.add_parser(
        "select",
        help="pick the best front member under a budget, rebuild, re-measure and export it",
        description="Pick the best front member of the latest search (or --study) under a latency or metric "
        "budget on one profile, rebuild it from teacher + candidate + seed, re-measure it (val and test metric; "
        "latency on host), export ONNX (int8 for 8-bit layers), the torch model and a JSON model card, and log "
        "them as the nested MLflow run selected-<profile>. Exits 1, naming the closest member, when no member "
        "meets the budget.",
    )
    p.add_argument("experiment", type=Path, help="experiment YAML file of the search")
    p.add_argument("--profile", metavar="P", required=True, help="latency profile the budget applies to (e.g. host)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--max-latency-ms",
        type=float,
        metavar="X",
        help="latency budget in ms on the profile: the member with the best metric no slower than this is chosen",
    )
    budget.add_argument(
        "--min-metric",
        "--min-accuracy",
        dest="min_metric",
        type=float,
        metavar="Y",
        help="the task's metric at least Y, in its units (e.g. accuracy 0.97): the fastest such member is chosen",
    )
    budget.add_argument(
        "--max-metric",
        dest="max_metric",
        type=float,
        metavar="Y",
        help="the task's metric at most Y, in its units (e.g. an MSE of 0.05): the fastest such member is chosen",
    )
    p.add_argument("--study", metavar="S", help="the search's study name (default: the experiment's latest)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the files go (default: <output_dir>/<study>/selected-<profile>)",
    )
    p.add_argument(
        "--register",
        metavar="NAME",
        help="also register the exported model as a new version of this MLflow registered model",
    )
    _set_arg(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on an experiment's store (127.0.0.1 only)",
        description="Serve the MLflow UI for the experiment's tracking store (or --tracking-uri) on 127.0.0.1 "
        "in the foreground until Ctrl-C.",
    )
    p.add_argument(
        "experiment",
        type=Path,
        nargs="?",
        help="experiment YAML file whose store to serve (default: sqlite:///runs/mlflow.db)",
    )
    p.add_argument("--port", type=int, default=5000, metavar="N", help="port on 127.0.0.1 (default: 5000)")
    p.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow store to serve instead of the experiment's tracking.uri"
    )
    _set_arg(p)
    p.set_defaults(func=cmd_ui)
