"""What every search backend does around its trials: set up, open the parent run, publish the fronts.

Backend-neutral: the task, teacher, space and scoring context (:func:`prepare_search`), the
MLflow parent run with the config, profiles and session (:func:`start_parent_run`,
:func:`log_session`), and the fronts written, logged and tagged at the end (:func:`publish_fronts`).
The backends (:mod:`~autocompress.search.optuna_backend`, :mod:`~autocompress.search.ray_backend`)
build on this module and :mod:`~autocompress.search.record`, never on each other.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from autocompress.config import Experiment
from autocompress.errors import AutocompressError
from autocompress.hw_profiles import describe_host
from autocompress.hw_profiles.predictor import check_host
from autocompress.hw_profiles.profile import resolve_profile_path
from autocompress.preflight import preflight
from autocompress.runtimes import get_runtime
from autocompress.search.objectives import HOST, TrialContext, make_context, measure
from autocompress.search.quality import ACCURACY, METRIC, QualityMetric, format_value
from autocompress.search.record import (
    EXPERIMENT_ATTR,
    STUDY_TAG,
    TEACHER_PREFIX,
    TRIAL_TAG,
    front_size_metric,
    front_tag,
    hypervolume_metric,
)
from autocompress.search.report import (
    Row,
    TrialRecord,
    compute_fronts,
    format_table,
    front_hypervolume,
    make_rows,
    plot_front,
    write_csv,
)
from autocompress.search.tracking import QueuedTracker, Tracker, flatten
from autocompress.spaces import SearchSpace, build_space
from autocompress.tasks import Task, load_task
from autocompress.teacher import Teacher, get_teacher

if TYPE_CHECKING:
    import optuna


class SearchInterrupted(AutocompressError):
    """The user stopped the search (Ctrl-C); finished trials are kept."""


@dataclass
class SearchResult:
    """What a search produced: where it is stored and the front per profile."""

    study_name: str
    storage: str
    parent_run_id: str
    teacher: dict[str, float]
    fronts: dict[str, list[Row]]
    finished: int
    failed: int
    out_dir: Path
    artifacts: list[Path] = field(default_factory=list)


@dataclass
class SearchSetup:
    """Everything a search backend needs before its first trial (built once per search)."""

    task: Task
    teacher: Teacher
    space: SearchSpace
    ctx: TrialContext
    teacher_metrics: dict[str, float]

    @property
    def metric(self) -> QualityMetric:
        """The task's metric: its name and direction."""
        return QualityMetric.of(self.task)


FRONT_TAG_WAIT_S = 60.0  # how long publishing the fronts waits for queued MLflow records before leaving the tags


def new_search_name(exp: Experiment) -> str:
    """``search.study_name``, else the experiment's name and the start time (sortable)."""
    return exp.search.study_name or f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_study(storage: optuna.storages.BaseStorage, experiment: str) -> str | None:
    """Name of the newest study of ``experiment`` in ``storage``, or None."""
    import optuna

    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.user_attrs.get(EXPERIMENT_ATTR) == experiment
    ]
    return max(names) if names else None  # names end in a sortable timestamp


def open_tracker(exp: Experiment, log: Callable[[str], None] = print) -> QueuedTracker:
    """The MLflow store and experiment the search of ``exp`` records to, written through a queue
    (:class:`~autocompress.search.tracking.QueuedTracker`: an outage never stalls a trial). A server
    that does not answer now is refused in one line, before anything is trained."""
    return QueuedTracker(exp.tracking_uri, exp.tracking.experiment or exp.name, exp.artifact_root, log=log)


def prepare_search(
    exp: Experiment,
    *,
    retrain: bool = False,
    log: Callable[[str], None] = print,
    teacher_metrics: dict[str, float] | None = None,
) -> SearchSetup:
    """Load the task, get the teacher, discover the space and score the teacher (backend-neutral).

    ``teacher_metrics`` already measured (by the process that started a parallel search) are
    reused, so every worker compares its trials with the same teacher figures.
    """
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(exp.task.name, exp.task.args)
    log(f"task {task.name}: {len(task.train)} train / {len(task.val)} val / {len(task.test)} test samples")
    if teacher_metrics is None:  # a worker of a parallel search: the starting process has dry-run it
        preflight(exp, task=task, log=lambda line: None)
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, task_ref=exp.task.name, retrain=retrain, log=log)
    space = build_space(teacher.model, task.example_input(1), exp.space)
    log(f"space: {space.describe()}")
    ctx = make_context(exp, teacher.model, task)
    for name, profile in ctx.profiles:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once, here, in the search's own output
            problems = check_host(profile)
        for problem in problems:
            log(f"warning: hardware profile {name!r} {problem}: its latency predictions may not hold here")
    if teacher_metrics is not None:
        return SearchSetup(task, teacher, space, ctx, teacher_metrics)
    teacher_metrics = measure(teacher.model, {}, ctx).as_dict()
    latencies = []
    for name in exp.profile_names:
        where = (
            f"measured, {exp.latency.runtime}, batch {exp.latency.batch_size}, {exp.latency.threads} thread(s)"
            if name == HOST
            else "predicted from its profile"
        )
        latencies.append(f"{teacher_metrics[f'latency_ms.{name}']:.3f} ms on {name} ({where})")
    metric = QualityMetric.of(task)
    log(
        f"teacher: val {metric.name} {format_value(teacher_metrics[METRIC])} ({metric.direction}d), "
        f"latency {'; '.join(latencies)}, size {teacher_metrics['size_bytes'] / 1e3:.1f} kB"
    )
    return SearchSetup(task, teacher, space, ctx, teacher_metrics)


def create_parent_run(exp: Experiment, tracker: Tracker, name: str, metric: QualityMetric) -> str:
    """Create a search's MLflow parent run (now, whatever the tracker queues: its id is stored on the
    study at once) with the config as params and artifact, and the task's metric name and direction
    (``metric.name``, ``metric.direction``: fronts are read back without the task)."""
    parent_id = tracker.create_run(name, tags={STUDY_TAG: name})
    config = exp.model_dump(mode="json")
    tracker.log(parent_id, params={**flatten(config), **metric.attrs()})
    (exp.out_dir / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    tracker.log_artifact(parent_id, exp.out_dir / "experiment.yaml")
    return parent_id


def start_parent_run(exp: Experiment, setup: SearchSetup, tracker: Tracker, name: str) -> str:
    """Create the search's MLflow parent run (:func:`create_parent_run`) with the space and the profiles."""
    parent_id = create_parent_run(exp, tracker, name, setup.metric)
    (exp.out_dir / "space.json").write_text(json.dumps(setup.space.summary(), indent=2))
    tracker.log_artifact(parent_id, exp.out_dir / "space.json")
    log_profiles(exp, setup.ctx, tracker, parent_id)
    return parent_id


def teacher_run_metrics(teacher: dict[str, float], metric: QualityMetric) -> dict[str, float]:
    """The teacher's figures as the parent run's ``teacher.*`` metrics (the metric also under its own name)."""
    return {f"{TEACHER_PREFIX}{k}": v for k, v in {**teacher, **metric.readable(teacher)}.items()}


def log_profiles(exp: Experiment, ctx: TrialContext, tracker: Tracker, parent_id: str) -> None:
    """Record each hardware profile the search scores on: its file, where it was measured, and its
    validation reports (predicted vs measured end-to-end error), so a reviewer can judge the figures."""
    for source, (name, profile) in zip(exp.profiles, ctx.profiles, strict=True):
        tags = {
            f"profile.{name}.cpu": profile.host.cpu,
            f"profile.{name}.runtime": f"{profile.runtime.name} {profile.runtime.version}",
            f"profile.{name}.threads": profile.host.threads,
            f"profile.{name}.measured_at": profile.measured_at,
        }
        metrics = {}
        for v in profile.validation:
            model = v.model.rsplit(".", 1)[-1]
            metrics.update(
                {
                    f"profile.{name}.validation.{model}.median_abs_error_pct": v.median_abs_error_pct,
                    f"profile.{name}.validation.{model}.p90_abs_error_pct": v.p90_abs_error_pct,
                    f"profile.{name}.validation.{model}.max_abs_error_pct": v.max_abs_error_pct,
                }
            )
            if v.drift is not None:
                metrics.update(
                    {
                        f"profile.{name}.validation.{model}.drift_ratio": v.drift.ratio_median,
                        f"profile.{name}.validation.{model}.drift_scaled_median_abs_error_pct": (
                            v.drift.median_abs_error_pct
                        ),
                        f"profile.{name}.validation.{model}.drift_scaled_p90_abs_error_pct": v.drift.p90_abs_error_pct,
                    }
                )
        tracker.log(parent_id, metrics=metrics, tags=tags)
        tracker.log_artifact(parent_id, resolve_profile_path(source), "profiles")


def runtime_description(runtime: str) -> str:
    """What executes candidates on the host, with its version (logged with the search)."""
    return get_runtime(runtime).describe()


def log_session(exp: Experiment, setup: SearchSetup, tracker: Tracker, parent_id: str) -> None:
    """Record this session's teacher figures and host on the parent run (each session, as they may differ)."""
    host = {**describe_host(exp.latency.threads), "runtime": runtime_description(exp.latency.runtime)}
    tracker.log(
        parent_id,
        metrics=teacher_run_metrics(setup.teacher_metrics, setup.metric),
        tags={
            "teacher.source": setup.teacher.source,
            "teacher.path": str(setup.teacher.path),
            **{f"profile.{HOST}.{k}": v for k, v in host.items()},
        },
    )


def publish_fronts(
    records: list[TrialRecord],
    exp: Experiment,
    teacher: dict[str, float],
    tracker: Tracker,
    parent_id: str,
    out_dir: Path,
    log: Callable[[str], None],
    metric: QualityMetric = ACCURACY,
) -> tuple[dict[str, list[Row]], list[Path]]:
    """Compute the front per profile, print it, write CSV + PNG, log them and tag member runs.

    ``records`` are the ones to front (see :func:`~autocompress.search.record.front_records`);
    ``metric`` is the task's (its direction decides which members dominate).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fronts = compute_fronts(records, teacher, exp.objectives, metric)
    artifacts: list[Path] = []
    tagging = tracker.flush(FRONT_TAG_WAIT_S)  # the tags need the trial runs in the store
    if not tagging:
        log("tracking: MLflow is behind; the front.<profile> tags are set by `autocompress sync`")
    for profile, front in fronts.items():
        csv_path, png_path = out_dir / f"front_{profile}.csv", out_dir / f"front_{profile}.png"
        write_csv(front, csv_path, metric)
        plot_front(make_rows(records, teacher, profile), front, teacher, profile, png_path, metric)
        artifacts += [csv_path, png_path]
        for path in (csv_path, png_path):
            tracker.log_artifact(parent_id, path, "fronts")
        # Every trial run gets the tag (stopped, failed and infeasible ones too), so the MLflow UI
        # can filter on front.<profile> = 'True' or 'False' alike. Runs are matched by trial number:
        # a run rebuilt from the study has another id than the one first written.
        members = {str(row.trial) for row in front}
        for run in tracker.child_runs(parent_id) if tagging else []:
            if TRIAL_TAG in run.data.tags:
                tracker.log(run.info.run_id, tags={front_tag(profile): run.data.tags[TRIAL_TAG] in members})
        volume = front_hypervolume(front, teacher, exp.objectives, profile, metric)
        tracker.log(parent_id, metrics={front_size_metric(profile): len(front), hypervolume_metric(profile): volume})
        log(
            f"\nPareto front on profile '{profile}' ({len(front)} of {len(records)} trials; "
            f"objectives: {', '.join(exp.objectives)}; hypervolume {volume:.4f} vs the teacher reference):"
        )
        log(format_table(front, teacher, profile, zipped="compressed_size" in exp.objectives, metric=metric))
    return fronts, artifacts


TRACKING_WAIT_S = 60.0
"""How long the end of a search waits for queued MLflow records before leaving them to ``sync``."""


def close_tracker(tracker: Tracker, exp: Experiment, log: Callable[[str], None]) -> int:
    """Send what is queued (waiting at most :data:`TRACKING_WAIT_S`) and say what was left; returns that count."""
    unsent = tracker.close(TRACKING_WAIT_S)
    if unsent:
        log(
            f"tracking: {unsent} record(s) not sent to MLflow at {exp.tracking_uri} (it does not answer); the "
            "search's own store holds them: `autocompress sync` with this experiment sends them when it is back"
        )
    return unsent
