"""Read a search back from MLflow: its parent run, its trial runs as records, its front per profile.

Only the MLflow store is needed (a local SQLite file or a remote tracking server): the front is
recomputed from the trial runs' params and metrics and the parent run's ``teacher.*`` metrics,
exactly as the search computed it from its study, so a search can be reviewed (and a member
selected) where the Optuna study is not at hand.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress.errors import AutocompressError
from autocompress.search.quality import DIRECTION_KEY, METRIC, QualityMetric
from autocompress.search.record import COMPLETE, PARENT_RUN_ATTR, STATE_TAG, STUDY_TAG, TEACHER_PREFIX, TRIAL_TAG
from autocompress.search.report import Row, TrialRecord, compute_fronts
from autocompress.search.tracking import PARENT_TAG, probe_server
from autocompress.techniques import ParameterError, parse_params

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from autocompress.config import Experiment

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
"""The store a search writes to when its experiment leaves ``tracking.uri`` and ``output_dir`` unset."""
DEFAULT_OBJECTIVES = (METRIC, "latency", "size")
_RECORD_METRICS = (METRIC, "size_bytes", "params")
_LEGACY_METRIC = "accuracy"  # what searches stored before the metric had a name of its own
_PAGE = 1000  # runs per search request; well under any server's limit


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths against the current directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri`` (default :data:`DEFAULT_TRACKING_URI`) with a SQLite path made absolute, so messages and
    child processes (``mlflow server``) see the same file whatever their working directory."""
    uri = uri or DEFAULT_TRACKING_URI
    path = sqlite_path(uri)
    return f"sqlite:///{path.resolve()}" if path is not None else uri


def artifact_root_for(uri: str) -> Path | None:
    """Where a search puts artifacts next to a SQLite store (``<dir of mlflow.db>/mlartifacts``)."""
    path = sqlite_path(uri)
    return path.resolve().parent / "mlartifacts" if path is not None else None


def open_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on an existing store; one-line errors for a missing file or an unreachable server.

    A missing SQLite file is an error rather than a new, empty store: reading a front must not create
    databases as a side effect of a typo.
    """
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise AutocompressError(
            f"no MLflow store at {path} (tracking URI {uri!r}): run a search first, or pass --tracking-uri"
        )
    # MLflow's client retries a refused connection for minutes; one quick probe gives one line instead.
    unreachable = probe_server(uri)
    if unreachable is not None:
        raise AutocompressError(f"cannot reach the MLflow server at {uri} ({unreachable})")
    return MlflowClient(tracking_uri=uri)


def candidate_params(params: dict[str, str], run_id: str = "") -> dict[str, Any]:
    """A trial run's candidate parameters with their search types restored (MLflow stores strings),
    through the technique registry: a parameter no technique claims, or of the wrong type, raises
    :class:`AutocompressError` naming it and the run (rebuilding without it would give another model)."""
    try:
        return parse_params(params)
    except ParameterError as err:
        raise AutocompressError(f"MLflow run {run_id}: {err}" if run_id else str(err)) from None


def _legacy(figures: dict[str, float]) -> dict[str, float]:
    """Figures of a search stored before ``metric``: its accuracy is the metric (maximized)."""
    if METRIC not in figures and _LEGACY_METRIC in figures:
        return {**figures, METRIC: figures[_LEGACY_METRIC]}
    return figures


def _is_figure(key: str) -> bool:
    """Whether ``key`` is one of the measured figures (Metrics.as_dict) rather than a readable alias."""
    if key in (*_RECORD_METRICS, "compressed_size_bytes", "int8_layers"):
        return True
    return key.startswith(("latency_ms.", "latency_p90_ms."))


def trial_records_from_runs(runs: Sequence[Run], legacy: bool = False) -> list[TrialRecord]:
    """Complete trial runs as :class:`TrialRecord` s, by trial number.

    Failed, killed and still-running trials are left out, as are nested runs that are not trials
    (e.g. ``selected-<profile>`` runs, which carry no ``trial`` tag). ``legacy``: the search was
    stored before the metric was named ``metric`` (its trial runs have ``accuracy``).
    """
    records = []
    for run in runs:
        tags = run.data.tags
        if TRIAL_TAG not in tags or tags.get(STATE_TAG) != COMPLETE:
            continue
        metrics = {
            k: v for k, v in (_legacy(run.data.metrics) if legacy else run.data.metrics).items() if _is_figure(k)
        }
        if not set(_RECORD_METRICS) <= metrics.keys():
            continue  # marked complete but its figures never arrived (a crash between the two writes)
        records.append(
            TrialRecord(
                int(tags[TRIAL_TAG]), candidate_params(run.data.params, run.info.run_id), metrics, run.info.run_id
            )
        )
    return sorted(records, key=lambda r: r.number)


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Run]:
    """Every run nested under ``parent_id`` (paged, so a long search is read whole)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=_PAGE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def parse_objectives(value: str | None, run_id: str) -> list[str]:
    """The objectives a search logged (param ``objectives``), with old names normalised (``accuracy`` -> ``metric``)."""
    from autocompress.config import OBJECTIVE_ALIASES

    if value is None:
        return list(DEFAULT_OBJECTIVES)
    try:
        objectives = ast.literal_eval(value)  # logged as str(list) by tracking.flatten
    except (ValueError, SyntaxError):
        objectives = None
    if not isinstance(objectives, list) or not all(isinstance(o, str) for o in objectives):
        raise AutocompressError(f"run {run_id}: param objectives={value!r} is not a list of objective names")
    return [OBJECTIVE_ALIASES.get(o, o) for o in objectives]


@dataclass(frozen=True)
class StoredSearch:
    """A search as MLflow holds it: the parent run, its complete trials, and the fronts recomputed from them."""

    run_id: str
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    study: str
    status: str
    artifact_uri: str
    params: dict[str, str]
    teacher: dict[str, float]
    objectives: list[str]
    records: list[TrialRecord]
    trial_runs: int
    fronts: dict[str, list[Row]] = field(default_factory=dict)
    metric: QualityMetric = field(default_factory=QualityMetric)  # the task's metric name and direction

    def front(self, profile: str) -> list[Row]:
        """The front on ``profile``; an unknown profile raises naming the ones the search has."""
        if profile not in self.fronts:
            known = ", ".join(sorted(self.fronts)) or "none"
            raise AutocompressError(
                f"profile {profile!r}: search run {self.run_id} has no latency figures for it (profiles: {known})"
            )
        return self.fronts[profile]

    def record(self, trial: int) -> TrialRecord:
        """The complete trial numbered ``trial``."""
        for r in self.records:
            if r.number == trial:
                return r
        raise AutocompressError(f"search run {self.run_id} has no complete trial {trial}")


def _get_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise AutocompressError(f"no MLflow run {run_id!r} in {uri}") from None
        raise AutocompressError(f"MLflow run {run_id!r} in {uri}: {err.message.splitlines()[0]}") from None


def load_search(client: MlflowClient, run_id: str, uri: str) -> StoredSearch:
    """Read the search whose parent run is ``run_id`` and recompute its fronts from its trial runs."""
    run = _get_run(client, run_id, uri)
    tags = run.data.tags
    if PARENT_TAG in tags:
        raise AutocompressError(
            f"run {run_id} is a nested run of search run {tags[PARENT_TAG]}: pass the search's (parent) run id"
        )
    if STUDY_TAG not in tags:
        raise AutocompressError(f"run {run_id} is not an autocompress search run (it has no {STUDY_TAG!r} tag)")
    # The metric and its direction as the search stored them (a search stored before they were is
    # an accuracy search); the task is not loaded to review a search.
    try:
        metric = QualityMetric.from_attrs(run.data.params, f"run {run_id}: param ")
    except ValueError as err:
        raise AutocompressError(str(err)) from None
    legacy = DIRECTION_KEY not in run.data.params
    teacher = {k[len(TEACHER_PREFIX) :]: v for k, v in run.data.metrics.items() if k.startswith(TEACHER_PREFIX)}
    if legacy:
        teacher = _legacy(teacher)
    elif not _is_figure(metric.name):
        teacher.pop(metric.name, None)  # the metric again under its own name, for people browsing MLflow
    if METRIC not in teacher or "size_bytes" not in teacher:
        raise AutocompressError(
            f"run {run_id} has no teacher.* metrics: its search stopped before the teacher was scored"
        )
    objectives = parse_objectives(run.data.params.get("objectives"), run_id)
    runs = child_runs(client, run.info.experiment_id, run_id)
    records = trial_records_from_runs(runs, legacy)
    experiment = client.get_experiment(run.info.experiment_id)
    return StoredSearch(
        run_id=run_id,
        tracking_uri=uri,
        experiment_id=run.info.experiment_id,
        experiment_name=experiment.name,
        study=tags[STUDY_TAG],
        status=run.info.status,
        artifact_uri=run.info.artifact_uri,
        params=dict(run.data.params),
        teacher=teacher,
        objectives=objectives,
        records=records,
        trial_runs=sum(TRIAL_TAG in r.data.tags for r in runs),
        fronts=compute_fronts(records, teacher, objectives, metric),
        metric=metric,
    )


def _study_parent_run(exp: Experiment, study: str | None) -> str | None:
    """The parent run id the Optuna study recorded (``study`` or the experiment's latest), if that study exists."""
    import optuna

    from autocompress.search.setup import latest_study

    path = sqlite_path(exp.storage_url)
    if path is not None and not path.is_file():
        return None  # no study database here (e.g. the search ran elsewhere): MLflow alone must do
    try:
        storage = optuna.storages.RDBStorage(exp.storage_url)
    except Exception:  # noqa: BLE001 - unreachable or foreign storage: fall back to MLflow
        return None
    name = study or latest_study(storage, exp.name)
    if name is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get(PARENT_RUN_ATTR)
    except KeyError:
        return None


def find_parent_run(exp: Experiment, client: MlflowClient, uri: str, study: str | None = None) -> str:
    """The parent run of the experiment's latest search (or of ``study``).

    First the Optuna study's ``mlflow_parent_run_id``; without the study database, the newest run of
    the experiment's MLflow experiment that is tagged as a search (with ``study``, the one tagged so).
    """
    parent = _study_parent_run(exp, study)
    if parent is not None:
        return parent
    name = exp.tracking.experiment or exp.name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise AutocompressError(f"no MLflow experiment {name!r} in {uri}: run `autocompress search` first")
    flt = f"tags.`{STUDY_TAG}` = '{study}'" if study else f"tags.`{STUDY_TAG}` LIKE '%'"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=50
    )
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    if not parents:
        what = f"study {study!r}" if study else "search"
        raise AutocompressError(f"no {what} of experiment {name!r} in {uri}: run `autocompress search` first")
    return parents[0].info.run_id


def load_experiment_search(
    exp: Experiment, study: str | None = None, tracking_uri: str | None = None
) -> tuple[MlflowClient, StoredSearch]:
    """Open the experiment's MLflow store (or ``tracking_uri``) and read its latest search (or ``study``)."""
    uri = resolve_tracking_uri(tracking_uri or exp.tracking_uri)
    client = open_client(uri)
    return client, load_search(client, find_parent_run(exp, client, uri, study), uri)
