"""MLflow record of a search: one parent run per search, one nested run per trial.

Uses ``MlflowClient`` with explicit run ids rather than the fluent ``mlflow.start_run`` API, so
no global "active run" state leaks between searches, resumes and tests.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from autocompress.errors import AutocompressError

# MLflow's first use of a SQLite store runs schema migrations that log at INFO level.
for _name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking"):
    logging.getLogger(_name).setLevel(logging.WARNING)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


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


class Tracker:
    """Writes a search's runs, metrics and artifacts to one MLflow experiment."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
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
            raise AutocompressError(f"tracking: cannot use MLflow store {tracking_uri!r} ({err})") from None

    # --- runs -------------------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        """Create a run (nested under ``parent_id`` if given); returns its id."""
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

    def child_runs(self, parent_id: str) -> list:
        """All nested runs of ``parent_id``."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000
        )
