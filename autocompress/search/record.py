"""What a search's trial is in Optuna and MLflow, for every backend: names, states, records, fronts.

A trial is one MLflow run nested under the search's parent run. Its params are the candidate
(:meth:`~autocompress.spaces.Candidate.to_params`); its metrics are ``val_metric`` per fine-tune
epoch, then the measured figures (:meth:`~autocompress.search.objectives.Metrics.as_dict`: the
task's metric as ``metric``), ``speedup.<profile>`` and ``duration_s``, the metric figures also
under the task's metric name (``val_accuracy``, ``accuracy``) for people browsing MLflow; its tags
say which trial it is (``trial``), how it ended (``state``: COMPLETE, PRUNED or FAIL, with
``feasible``, ``stop_reason`` or ``fail_reason``) and, once the search ends, whether it is on each
front (``front.<profile>``). The parent run's params say which metric and direction the search
optimised (``metric.name``, ``metric.direction``).
Budgets reach Optuna's samplers as constraint values on the Optuna trial (:func:`record_constraints`).

The backends write through :class:`TrialRecorder` and :func:`record_constraints`, and
:mod:`autocompress.search.store` reads MLflow through the same names, so the layout is defined once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autocompress import faults
from autocompress.hw_profiles.progress import duration
from autocompress.search.constraints import any_constraint, is_feasible, violations
from autocompress.search.objectives import HOST
from autocompress.search.quality import ACCURACY, METRIC, QualityMetric, format_value
from autocompress.search.report import Row, TrialRecord, compute_fronts, profiles_in

if TYPE_CHECKING:
    from optuna.trial import BaseTrial

    from autocompress.config import ConstraintsConfig, Experiment
    from autocompress.search.tracking import Tracker
    from autocompress.spaces import Candidate

# --- the parent run -----------------------------------------------------------------------------
STUDY_TAG = "autocompress.study"  # the study (Optuna) or Tune experiment (Ray) name
BACKEND_TAG = "autocompress.backend"  # set by the Ray backend
TEACHER_PREFIX = "teacher."  # metrics: the teacher's figures, as the trials' names
FINISHED_METRIC = "trials.finished"
FAILED_METRIC = "trials.failed"
STOPPED_METRIC = "trials.stopped"


def front_size_metric(profile: str) -> str:
    """The parent run's metric with the size of the front on ``profile``."""
    return f"front_size.{profile}"


def hypervolume_metric(profile: str) -> str:
    """The parent run's metric with the hypervolume of the front on ``profile``."""
    return f"hypervolume.{profile}"


# --- a trial run --------------------------------------------------------------------------------
TRIAL_TAG = "trial"  # the trial number
STATE_TAG = "state"
FEASIBLE_TAG = "feasible"  # on COMPLETE runs: every budget met ("True" without budgets)
STOP_REASON_TAG = "stop_reason"  # on PRUNED runs
FAIL_REASON_TAG = "fail_reason"  # on FAIL runs

# States, named as Optuna's TrialState so a run and its Optuna trial read alike.
RUNNING, COMPLETE, PRUNED, FAIL = "RUNNING", "COMPLETE", "PRUNED", "FAIL"

VAL_METRIC = "val_metric"  # per fine-tune epoch, at step = epoch
DURATION = "duration_s"
MAX_REASON_CHARS = 5000  # MLflow caps tag values; a traceback-sized reason is cut

USER_INTERRUPT = "interrupted by the user"
WORKER_DIED = "interrupted: worker process died"


def front_tag(profile: str) -> str:
    """The trial-run tag saying whether the trial is on the front of ``profile`` (``True``/``False``)."""
    return f"front.{profile}"


def fail_reason(err: BaseException) -> str:
    """A failed trial's reason, from the exception its objective raised."""
    return f"{type(err).__name__}: {err}".strip()


def speedups(metrics: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """``speedup.<profile>``: the teacher's latency over the trial's, for each profile it was scored on."""
    return {f"speedup.{p}": teacher[f"latency_ms.{p}"] / metrics[f"latency_ms.{p}"] for p in profiles_in(metrics)}


# --- an Optuna trial ----------------------------------------------------------------------------
# Study attributes
EXPERIMENT_ATTR = "experiment"  # the experiment's name, to find its latest study
PARENT_RUN_ATTR = "mlflow_parent_run_id"
# Trial attributes
METRICS_ATTR = "metrics"  # COMPLETE: Metrics.as_dict()
PARTIAL_ATTR = "partial_metrics"  # PRUNED: the costs and last metric measured before the stop
CURVE_ATTR = "val_curve"  # validation metric per epoch
FEASIBLE_ATTR = "feasible"
STOP_REASON_ATTR = STOP_REASON_TAG
FAIL_REASON_ATTR = FAIL_REASON_TAG
INTERRUPTED = "interrupted"  # a FAIL that is the search's interruption, not the candidate's fault
DUPLICATE_OF = "duplicate_of"  # a queued plan two processes both queued: dropped, the earlier trial runs it
SURPLUS = "surplus"  # started past n_trials by processes asking at once: dropped unrun (its plan queued again)


def meets_budgets(metrics: dict[str, float], constraints: ConstraintsConfig, profile: str) -> bool:
    """Whether a trial's figures meet every budget (latency on ``profile``, the primary); True without budgets."""
    return is_feasible(violations(metrics, constraints, profile))


def record_constraints(
    trial: BaseTrial, metrics: dict[str, float], constraints: ConstraintsConfig, profile: str
) -> bool:
    """Store the trial's budget violations where Optuna's samplers read them; True if every budget is met.

    ``trial.set_constraint`` (Optuna 5) keeps one value per budget in the trial's system
    attributes (``FrozenTrial.constraints``), which NSGA-II and TPE rank trials by. Call it before
    the trial is told: a finished trial cannot be written to.
    """
    limits = violations(metrics, constraints, profile)
    for key, value in limits.items():
        trial.set_constraint(key, value)
    return is_feasible(limits)


# --- fronts -------------------------------------------------------------------------------------
def front_records(
    records: Sequence[TrialRecord], constraints: ConstraintsConfig, log: Callable[[str], None] | None = None
) -> list[TrialRecord]:
    """The records fronts are computed from: the feasible ones when budgets are set and any is met.

    If no record meets the budgets the fronts of all records are kept (nothing is lost when the
    goal is missed), with a warning through ``log``.
    """
    if not any_constraint(constraints):
        return list(records)
    feasible = [r for r in records if r.feasible]
    if feasible:
        return feasible
    if log is not None:
        log("no trial met search.constraints yet: the fronts below include infeasible trials")
    return list(records)


def search_fronts(
    records: Sequence[TrialRecord], exp: Experiment, teacher: dict[str, float], metric: QualityMetric = ACCURACY
) -> dict[str, list[Row]]:
    """The fronts per profile of a running search (by :func:`front_records`), for its progress line."""
    return compute_fronts(front_records(records, exp.search.constraints), teacher, exp.objectives, metric)


# --- progress line ------------------------------------------------------------------------------
class Progress:
    """One line per finished trial: figures, front size, elapsed time and ETA."""

    def __init__(
        self,
        total: int,
        done: int,
        teacher: dict[str, float],
        profile: str,
        log: Callable[[str], None],
        metric: QualityMetric = ACCURACY,
    ) -> None:
        self.total, self.done, self.teacher, self.profile, self.log = total, done, teacher, profile, log
        self.metric = metric
        self.start = time.monotonic()
        self.session_trials = 0

    def trial(
        self,
        number: int,
        metrics: dict[str, float] | None,
        front_size: int,
        reason: str = "",
        feasible: bool | None = None,
        stopped: bool = False,
        done: int | None = None,
    ) -> None:
        """Report one finished trial; ``done`` is the study's finished count when other workers add to it.

        ``feasible`` None (no budgets) prints no verdict.
        """
        self.done = self.done + 1 if done is None else done
        self.session_trials += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.session_trials * max(0, self.total - self.done)
        head = f"[{self.done:>{len(str(self.total))}}/{self.total}] trial {number:<4}"
        if metrics is None or stopped:
            body = f"{'STOPPED' if stopped else 'FAILED'}  {reason[:100]}"
        else:
            t = self.teacher
            lat = metrics[f"latency_ms.{self.profile}"]
            where = "" if self.profile == HOST else f" on {self.profile}"
            body = (
                f"{self.metric.name} {format_value(metrics[METRIC])} "
                f"({100 * (metrics[METRIC] - t[METRIC]):+.2f} pt)  "
                f"latency{where} {lat:.3f} ms ({t[f'latency_ms.{self.profile}'] / lat:.2f}x)  "
                f"size {metrics['size_bytes'] / 1e3:.1f} kB"
            )
            if feasible is not None:
                body += "  feasible" if feasible else "  INFEASIBLE"
        self.log(f"{head} {body} | front {front_size} | {duration(elapsed)} elapsed, ETA {duration(eta)}")


# --- trial runs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunEnd:
    """What a trial's MLflow run holds once the trial is over: its last metrics and tags, and the run status."""

    metrics: dict[str, float]
    tags: dict[str, Any]
    status: str  # FINISHED, FAILED or KILLED


def complete_end(
    metrics: dict[str, float], feasible: bool, duration: float | None, teacher: dict[str, float], metric: QualityMetric
) -> RunEnd:
    """A trial that measured its objectives: figures, speedups, COMPLETE and ``feasible``."""
    figures = {**metrics, **metric.readable(metrics), **speedups(metrics, teacher)}
    if duration is not None:
        figures[DURATION] = duration
    return RunEnd(figures, {STATE_TAG: COMPLETE, FEASIBLE_TAG: feasible}, "FINISHED")


def stopped_end(partial: dict[str, float], reason: str, duration: float | None, metric: QualityMetric) -> RunEnd:
    """A trial stopped before its final measurement, keeping its cost and last metric (a stop is a
    decision of the search, not an error: FINISHED)."""
    figures = {**partial, **metric.readable(partial)}
    if duration is not None:
        figures[DURATION] = duration
    return RunEnd(figures, {STATE_TAG: PRUNED, STOP_REASON_TAG: reason[:MAX_REASON_CHARS]}, "FINISHED")


def failed_end(reason: str, duration: float | None) -> RunEnd:
    """A trial whose objective raised, with its reason."""
    figures = {} if duration is None else {DURATION: duration}
    return RunEnd(figures, {STATE_TAG: FAIL, FAIL_REASON_TAG: reason[:MAX_REASON_CHARS]}, "FAILED")


def interrupted_end(reason: str) -> RunEnd:
    """A trial the search itself cut short (Ctrl-C, a dead worker): FAIL / KILLED with the reason."""
    return RunEnd({}, {STATE_TAG: FAIL, FAIL_REASON_TAG: reason[:MAX_REASON_CHARS]}, "KILLED")


def record_interrupted(tracker: Tracker, run_id: str, reason: str) -> None:
    """Close the run of a trial the search itself cut short (see :func:`interrupted_end`)."""
    write_end(tracker, run_id, interrupted_end(reason))


def write_end(tracker: Tracker, run_id: str, end: RunEnd) -> None:
    """Log ``end``'s metrics and tags on ``run_id`` and close it with its status."""
    tracker.log(run_id, metrics=end.metrics, tags=end.tags)
    faults.point("after_tell")  # the trial is told; its run not closed yet
    tracker.end_run(run_id, end.status)
    faults.point("after_end_run")


def trial_run_tags(number: int, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tags a trial's run starts with (its number, RUNNING)."""
    return {TRIAL_TAG: number, STATE_TAG: RUNNING, **(tags or {})}


def epoch_metrics(value: float, metric: QualityMetric) -> dict[str, float]:
    """One fine-tune epoch's validation figure (also as ``val_<metric name>``)."""
    figures = {VAL_METRIC: value}
    return {**figures, **metric.readable(figures, "val_")}


class TrialRecorder:
    """Writes a search's trial runs to MLflow and prints each finished trial's progress line.

    Both backends call it at the same moments (start, each epoch, the end), so a trial reads the
    same in MLflow and on screen whichever backend ran it. ``front_size`` and ``done`` come from
    the caller, which knows its trials (a study shared by workers, or Tune's callbacks).
    """

    def __init__(
        self,
        tracker: Tracker,
        parent_id: str,
        teacher: dict[str, float],
        constraints: ConstraintsConfig,
        progress: Progress | None,
        metric: QualityMetric = ACCURACY,
    ) -> None:
        self.tracker, self.parent_id, self.teacher, self.progress = tracker, parent_id, teacher, progress
        self.budgets = any_constraint(constraints)
        self.metric = metric

    def start(self, number: int, candidate: Candidate, tags: dict[str, Any] | None = None) -> str:
        """Create trial ``number``'s run (RUNNING, params = the candidate); returns its id."""
        run_id = self.tracker.start_run(f"trial-{number}", self.parent_id, tags=trial_run_tags(number, tags))
        self.tracker.log(run_id, params=candidate.to_params())
        return run_id

    def epoch(self, run_id: str, epoch: int, value: float) -> None:
        """Log one fine-tune epoch's validation metric (also as ``val_<metric name>``)."""
        self.tracker.log(run_id, metrics=epoch_metrics(value, self.metric), step=epoch)

    def complete(
        self,
        run_id: str,
        number: int,
        metrics: dict[str, float],
        feasible: bool,
        duration: float,
        front_size: int,
        done: int | None = None,
    ) -> None:
        """Record a trial that measured its objectives: figures, speedups, COMPLETE and ``feasible``."""
        write_end(self.tracker, run_id, complete_end(metrics, feasible, duration, self.teacher, self.metric))
        self._line(number, metrics, front_size, feasible=feasible if self.budgets else None, done=done)

    def stopped(
        self,
        run_id: str,
        number: int,
        partial: dict[str, float],
        reason: str,
        duration: float | None,
        front_size: int,
        done: int | None = None,
    ) -> None:
        """Record a trial stopped before its final measurement, keeping its cost and last metric."""
        write_end(self.tracker, run_id, stopped_end(partial, reason, duration, self.metric))
        self._line(number, partial or None, front_size, reason, stopped=True, done=done)

    def failed(
        self,
        run_id: str,
        number: int,
        reason: str,
        duration: float | None,
        front_size: int,
        done: int | None = None,
    ) -> None:
        """Record a trial whose objective raised (or whose worker died) with its reason."""
        write_end(self.tracker, run_id, failed_end(reason, duration))
        self._line(number, None, front_size, reason, done=done)

    def interrupted(self, run_id: str, reason: str) -> None:
        """Close the run of a trial the search itself cut short (see :func:`record_interrupted`)."""
        record_interrupted(self.tracker, run_id, reason)

    def _line(self, number: int, metrics: dict[str, float] | None, front_size: int, reason: str = "", **kw) -> None:
        if self.progress is not None:
            self.progress.trial(number, metrics, front_size, reason, **kw)
