"""Bring a search's MLflow record in line with its Optuna study: the study is the truth, MLflow its replica.

A trial's figures, stop or failure reason and learning curve are stored on the Optuna trial before
it is told (:mod:`~autocompress.search.optuna_backend`), in the same transaction-safe store that
counts trials. Whatever MLflow missed (a process killed between ``tell`` and the run's end, writes
queued when the server was away and never sent, a store deleted or replaced), the run it should
hold is rebuilt from the trial: :func:`replicate_trials` is idempotent and touches only runs that
differ. ``--resume`` runs it before the first new trial and ``autocompress sync`` runs it alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from autocompress.search.quality import QualityMetric
from autocompress.search.record import (
    CURVE_ATTR,
    DUPLICATE_OF,
    FAIL_REASON_ATTR,
    FEASIBLE_ATTR,
    INTERRUPTED,
    METRICS_ATTR,
    PARENT_RUN_ATTR,
    PARTIAL_ATTR,
    STATE_TAG,
    STOP_REASON_ATTR,
    SURPLUS,
    TRIAL_TAG,
    WORKER_DIED,
    RunEnd,
    complete_end,
    epoch_metrics,
    failed_end,
    interrupted_end,
    stopped_end,
    trial_run_tags,
    write_end,
)
from autocompress.search.setup import create_parent_run, teacher_run_metrics
from autocompress.search.tracking import Tracker
from autocompress.spaces import Candidate

if TYPE_CHECKING:
    import optuna

    from autocompress.config import Experiment

TEACHER_ATTR = "teacher_metrics"  # study: the teacher's figures the trials are compared with
STATUS_ATTR = "search_status"  # study: how the last session ended (FINISHED, KILLED), for the parent run


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def expected_end(trial: FrozenTrial, teacher: dict[str, float], metric: QualityMetric) -> RunEnd | None:
    """The run end a finished trial's MLflow run must have; None for a trial without one (running,
    waiting, or a duplicate that was never run)."""
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE and METRICS_ATTR in attrs:
        return complete_end(attrs[METRICS_ATTR], attrs.get(FEASIBLE_ATTR, True), _duration(trial), teacher, metric)
    if trial.state == TrialState.PRUNED:
        return stopped_end(attrs.get(PARTIAL_ATTR, {}), attrs.get(STOP_REASON_ATTR, ""), _duration(trial), metric)
    if trial.state == TrialState.FAIL:
        if DUPLICATE_OF in attrs or attrs.get(SURPLUS):
            return None
        if attrs.get(INTERRUPTED):
            return interrupted_end(attrs.get(FAIL_REASON_ATTR, WORKER_DIED))
        return failed_end(attrs.get(FAIL_REASON_ATTR, "unknown"), _duration(trial))
    return None


def trial_runs(tracker: Tracker, parent_id: str) -> dict[int, Any]:
    """The trial runs under ``parent_id`` by trial number (the newest when a number has several)."""
    runs: dict[int, Any] = {}
    for run in sorted(tracker.child_runs(parent_id), key=lambda r: r.info.start_time or 0):
        number = run.data.tags.get(TRIAL_TAG)
        if number is not None and number.isdigit():
            runs[int(number)] = run
    return runs


def replicate_trials(
    study: optuna.Study,
    tracker: Tracker,
    parent_id: str,
    teacher: dict[str, float],
    metric: QualityMetric,
) -> int:
    """Write every finished trial's run as the study holds it where MLflow differs; returns how many.

    A run that is missing is created with the candidate's params and the learning curve; one that
    exists but is still RUNNING, or in another state, gets the trial's figures and tags and is closed
    with the trial's status.
    """
    runs = trial_runs(tracker, parent_id)
    fixed = 0
    for trial in study.get_trials(deepcopy=False):
        end = expected_end(trial, teacher, metric)
        if end is None:
            continue
        run = runs.get(trial.number)
        if run is not None and run.info.status == end.status and run.data.tags.get(STATE_TAG) == end.tags[STATE_TAG]:
            continue
        if run is None:
            run_id = tracker.start_run(f"trial-{trial.number}", parent_id, tags=trial_run_tags(trial.number))
            tracker.log(run_id, params=Candidate.from_params(trial.params).to_params())
            for epoch, value in enumerate(trial.user_attrs.get(CURVE_ATTR, []), start=1):
                tracker.log(run_id, metrics=epoch_metrics(value, metric), step=epoch)
        else:
            run_id = run.info.run_id
        write_end(tracker, run_id, end)
        fixed += 1
    return fixed


def parent_run(
    study: optuna.Study, exp: Experiment, tracker: Tracker, metric: QualityMetric, log: Callable[[str], None]
) -> str:
    """The study's MLflow parent run; rebuilt from the study when the store lost it (deleted or replaced)."""
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id is not None and tracker.run_exists(parent_id):
        return parent_id
    new_id = create_parent_run(exp, tracker, study.study_name, metric)
    tracker.log(new_id, metrics=teacher_run_metrics(study.user_attrs.get(TEACHER_ATTR, {}), metric))
    study.set_user_attr(PARENT_RUN_ATTR, new_id)
    if parent_id is not None:
        log(
            f"tracking: the study's MLflow run {parent_id} is not in {tracker.tracking_uri} (store lost or "
            f"replaced): rebuilt as run {new_id} from the study"
        )
    return new_id
