"""MLflow record of a search: one parent run per search, one nested run per trial.

Uses ``MlflowClient`` with explicit run ids rather than the fluent ``mlflow.start_run`` API, so
no global "active run" state leaks between searches, resumes and tests.

:class:`Tracker` writes as it is called (reviews, ``select``, ``sync``). A search writes through
:class:`QueuedTracker`: MLflow is a replica of the search's study, so a slow or unreachable
server must never fail or stall a trial. Its writes go to a local queue that one thread sends in
order; while the server does not answer the queue waits (the search says so once), and it is sent
when the server is back. A process that dies with records queued loses nothing the study does not
hold: ``--resume`` and ``autocompress sync`` rebuild the MLflow record from the study
(:mod:`autocompress.search.replicate`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocompress.errors import AutocompressError

# MLflow's first use of a SQLite store runs schema migrations that log at INFO level.
for _name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking"):
    logging.getLogger(_name).setLevel(logging.WARNING)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000
PROBE_TIMEOUT_S = 5.0
"""How long reaching a tracking server may take before a search refuses to start (or a queued
writer decides the server is away)."""

# MLflow's REST client retries a dead server for minutes by default (7 retries, backoff 2, 120 s
# timeout); a search's writer has its own queue and retry, so each request gives up quickly.
_SEARCH_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
# MLflow answers these for a request that can never succeed: retrying it would block the queue.
_PERMANENT_ERRORS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict/list -> ``{"a.b": "value"}`` strings, as MLflow params want them."""
    flat: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
    else:
        flat[prefix.rstrip(".")] = str(data)[:MAX_PARAM_LENGTH]
    return flat


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the MLflow server at ``uri`` cannot be reached within ``timeout`` seconds, or None if it
    answers (any HTTP answer counts: a server without ``/health`` is still a server). Non-HTTP
    stores (SQLite) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))
    return None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (MLflow's and SQLAlchemy's run to many), at most 300 characters."""
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class Tracker:
    """Writes a search's runs, metrics and artifacts to one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        unreachable = probe_server(tracking_uri)
        if unreachable is not None:
            raise AutocompressError(
                f"tracking.uri {tracking_uri!r}: the MLflow server does not answer ({unreachable}); "
                "start it, or point tracking.uri at a SQLite file"
            )
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiment = self.client.get_experiment_by_name(experiment_name)
            if experiment is None:
                location = None
                if artifact_root is not None and tracking_uri.startswith("sqlite:"):
                    location = (Path(artifact_root) / experiment_name).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
            else:
                self.experiment_id = experiment.experiment_id
        except Exception as err:  # noqa: BLE001 - any store failure is reported in one line
            reason = first_line(err)
            raise AutocompressError(f"tracking: cannot use MLflow store {tracking_uri!r} ({reason})") from None
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise AutocompressError(
                f"tracking: MLflow experiment {experiment_name!r} (id {experiment.experiment_id}) is deleted in "
                f"{tracking_uri}: restore it (mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}) or set tracking.experiment to another name"
            )

    # --- runs -------------------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        """Create a run (nested under ``parent_id`` if given); returns its id."""
        return self.create_run(name, parent_id, tags)

    def create_run(self, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        """Create a run now, whatever the tracker queues (a run whose id must be stored at once)."""
        # The REST store only takes string tag values (the SQLite store converts them itself).
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id is not None:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log(
        self,
        run_id: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """Log params, metrics (at ``step``) and tags in one batch."""
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Close a run as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status (e.g. back to RUNNING when its search is resumed)."""
        self.client.update_run(run_id, status=status)

    def run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a live (not deleted) run of this store."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write is in the store (nothing is queued here); True when it is."""
        return True

    def close(self, timeout: float | None = None) -> int:
        """Stop writing; returns how many writes could not be sent (none here)."""
        return 0

    def child_runs(self, parent_id: str) -> list:
        """All nested runs of ``parent_id``."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000
        )


class QueuedTracker(Tracker):
    """A :class:`Tracker` whose writes never wait for the server (see the module docstring).

    ``start_run`` returns a handle at once (``pending-...``); the writer thread creates the run and
    every later write naming the handle goes to that run. Reads (``child_runs``, ``status``) wait for
    the queue first. ``log`` receives one line when the server stops answering and one when the
    backlog is sent.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        artifact_root: Path | None = None,
        log: Callable[[str], None] = print,
        retry_every: float = 5.0,
    ) -> None:
        for key, value in _SEARCH_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        super().__init__(tracking_uri, experiment_name, artifact_root)
        self._log, self._retry_every = log, retry_every
        self._queue: deque[tuple[str, tuple]] = deque()
        self._ids: dict[str, str] = {}
        self._cond = threading.Condition()
        self._busy = False  # the writer holds an operation it has popped
        self._closed = False
        self.behind_since: float | None = None
        self.sent_while_behind = 0
        self._thread = threading.Thread(target=self._drain, name="autocompress-tracking", daemon=True)
        self._thread.start()

    # --- writes: queued ---------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        handle = f"pending-{uuid.uuid4().hex}"
        self._put("start", (handle, name, parent_id, tags))
        return handle

    def log(self, run_id, params=None, metrics=None, tags=None, step: int = 0) -> None:
        self._put("log", (run_id, params, metrics, tags, step))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._put("artifact", (run_id, path, artifact_path))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._put("end", (run_id, status))

    def set_status(self, run_id: str, status: str) -> None:
        self._put("status", (run_id, status))

    # --- reads: after the queue -------------------------------------------------------------
    def resolve(self, run_id: str) -> str:
        """The store's id of ``run_id`` (a handle from :meth:`start_run` once its run exists)."""
        return self._ids.get(run_id, run_id)

    def status(self, run_id: str) -> str:
        self.flush()
        return super().status(self.resolve(run_id))

    def child_runs(self, parent_id: str) -> list:
        self.flush()
        return super().child_runs(self.resolve(parent_id))

    @property
    def pending(self) -> int:
        """Writes not in the store yet."""
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> int:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return len(self._queue) + self._busy

    # --- the writer -------------------------------------------------------------------------
    def _put(self, op: str, args: tuple) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue.append((op, args))
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                op, args = self._queue.popleft()
                self._busy = True
            try:
                self._send(op, args)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, op: str, args: tuple) -> None:
        """Send one write, waiting out an outage (retrying every ``retry_every`` s) unless closed."""
        from mlflow.exceptions import MlflowException

        while True:
            try:
                self._apply(op, args)
            except MlflowException as err:
                if err.error_code in _PERMANENT_ERRORS:
                    self._log(f"tracking: MLflow refused a {op} ({first_line(err)}); skipped")
                    return
                reason = first_line(err)
            except Exception as err:  # noqa: BLE001 - a store that is away fails in many ways
                reason = first_line(err)
            else:
                if self.behind_since is not None:
                    self.sent_while_behind += 1
                    if not self._queue:
                        waited = time.monotonic() - self.behind_since
                        self._log(
                            f"tracking: MLflow at {self.tracking_uri} answers again; {self.sent_while_behind} "
                            f"queued record(s) sent after {waited:.0f} s"
                        )
                        self.behind_since, self.sent_while_behind = None, 0
                return
            if self.behind_since is None:
                self.behind_since = time.monotonic()
                self._log(
                    f"tracking: MLflow at {self.tracking_uri} does not answer ({reason}); the search goes on, "
                    "its records wait here and are sent when the server is back (the study keeps them all)"
                )
            with self._cond:
                if not self._closed:
                    self._cond.wait(self._retry_every)
                if self._closed:
                    self._queue.appendleft((op, args))  # counted as not sent by close()
                    return

    def _apply(self, op: str, args: tuple) -> None:
        if op == "start":
            handle, name, parent_id, tags = args
            if handle not in self._ids:  # a retry after the create itself succeeded is not repeated
                self._ids[handle] = self.create_run(name, self.resolve(parent_id) if parent_id else None, tags)
        elif op == "log":
            run_id, params, metrics, tags, step = args
            Tracker.log(self, self.resolve(run_id), params, metrics, tags, step)
        elif op == "artifact":
            run_id, path, artifact_path = args
            Tracker.log_artifact(self, self.resolve(run_id), path, artifact_path)
        elif op == "end":
            run_id, status = args
            Tracker.end_run(self, self.resolve(run_id), status)
        elif op == "status":
            run_id, status = args
            Tracker.set_status(self, self.resolve(run_id), status)
