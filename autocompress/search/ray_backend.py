"""Run an experiment's search on Ray Tune: Optuna as Ray's searcher, ASHA on the intermediate metric.

The space (define-by-run :meth:`SearchSpace.suggest`), the objective function
(:func:`score_candidate`), the trial record (:mod:`~autocompress.search.record`: one nested
MLflow run per trial with the same params, metrics and tags, budgets as Optuna constraint values)
and the fronts (:func:`publish_fronts`) are those of the Optuna backend; only who schedules
trials differs. Trials run as Ray actors, locally (a Ray instance
started for the search) or on an existing cluster (``search.ray.address``).

Division of work:

- Driver: scores the teacher once (:func:`prepare_search`), owns the searcher and ASHA, and writes
  every MLflow run from a Tune callback. Workers on a remote node cannot reach a SQLite store on
  the driver's disk, a single writer never contends for the store's lock, and a trial that ASHA
  stops (its actor is ended mid fine-tune) or whose process dies can only be recorded from the
  driver anyway.
- Workers: rebuild the task and load the teacher's weights, shipped once through Ray's object
  store (no shared file system or teacher cache needed on cluster nodes, and every node scores
  against exactly the weights the driver scored), then score candidates and report to Tune.

A trial ends in one of three states, all recorded: COMPLETE (objectives measured), FAIL (the
objective raised, e.g. divergence or an unsupported layer: reason logged, search goes on) or
PRUNED (stopped by ASHA, or by the time budget, before its final measurement; its cost and last
validation metric are kept, as for the Optuna backend's early-stopped trials).

Resume is not supported on this backend (Optuna's RDB study is what makes the Optuna backend
resumable); a killed Ray search is started again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from autocompress.config import ConstraintsConfig, Experiment, RayConfig
from autocompress.errors import AutocompressError
from autocompress.search.objectives import (
    Cost,
    TrialContext,
    direction,
    make_context,
    metrics_from,
    objective_values,
    score_candidate,
)
from autocompress.search.quality import ACCURACY, QualityMetric, format_value
from autocompress.search.record import (
    BACKEND_TAG,
    COMPLETE,
    DURATION,
    FAIL,
    FAILED_METRIC,
    FINISHED_METRIC,
    PRUNED,
    STOPPED_METRIC,
    USER_INTERRUPT,
    VAL_METRIC,
    Progress,
    TrialRecorder,
    fail_reason,
    front_records,
    meets_budgets,
    record_constraints,
    search_fronts,
)
from autocompress.search.report import TrialRecord
from autocompress.search.samplers import make_sampler
from autocompress.search.setup import (
    SearchInterrupted,
    SearchResult,
    SearchSetup,
    close_tracker,
    log_session,
    new_search_name,
    open_tracker,
    prepare_search,
    publish_fronts,
    start_parent_run,
)
from autocompress.search.tracking import Tracker
from autocompress.spaces import Candidate, SearchSpace
from autocompress.tasks import load_task

# Keys of the results a trial reports to Tune (VAL_METRIC, ASHA's metric, and DURATION are
# named as the trial-run metrics they become).
EPOCH = "epoch"  # ASHA's time attribute: fine-tune epochs done
PARTIAL = "partial"  # epoch report: cost and that epoch's metric, as Metrics.as_dict()
METRICS = "metrics"  # final report: Metrics.as_dict()
OBJECTIVES = "objectives"  # final report: objective values by name (the searcher's metrics)
FAIL_REASON = "fail_reason"  # final report of a trial whose objective raised
RAY_TRIAL_TAG = "ray.trial_id"  # trial-run tag: Tune's id of the trial

# Tune's driver logs a warning per stopped or interrupted trial; the progress lines say it already.
for _name in ("ray.tune", "ray.train"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def run_ray_search(
    exp: Experiment,
    *,
    resume: bool | str = False,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run the search of ``exp`` on Ray Tune until ``n_trials`` trials ended or ``timeout`` passed.

    Uses the Ray instance this process is already connected to, else joins
    ``search.ray.address`` (``auto``, ``ray://...``), else starts a local one (no dashboard) and
    shuts it down afterwards. Tune's files go to ``<output_dir>/ray/<name>``, fronts to
    ``<output_dir>/<name>``. ``resume`` is not supported (Optuna backend only) and raises
    :class:`AutocompressError`.
    """
    if resume:
        raise AutocompressError(
            "--resume works with search.backend: optuna only (its study lives in a database); "
            "a Ray search cannot be resumed: start it again without --resume"
        )
    setup = prepare_search(exp, retrain=retrain, log=log)
    started_ray = connect(exp.search.ray, log)
    try:
        return _search(exp, setup, log)
    finally:
        if started_ray:
            ray.shutdown()


def connect(config: RayConfig, log: Callable[[str], None] = print) -> bool:
    """Join ``config.address`` or start a local Ray (unless already connected); True if started here.

    Raises :class:`AutocompressError` if the cluster cannot be reached or is too small for one trial.
    """
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if config.address is None:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=config.address, **kwargs)
        except Exception as err:  # noqa: BLE001 - unreachable address, port in use, bad URL
            where = f"search.ray.address {config.address!r}" if config.address else "local Ray"
            raise AutocompressError(f"{where}: cannot start or join Ray ({err})") from None
        started = True
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus < config.cpus_per_trial:
        if started:
            ray.shutdown()
        raise AutocompressError(
            f"search.ray.cpus_per_trial {config.cpus_per_trial:g} exceeds the {cpus:g} CPU(s) of the Ray cluster"
        )
    where = f"cluster {config.address}" if config.address else "local instance"
    log(f"Ray {ray.__version__}: {where}{' (already connected)' if not started else ''}, {cpus:g} CPU(s)")
    return started


def candidate_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's flat candidate parameters from its Tune config.

    Tune's OptunaSearch nests parameter names at ``/`` (``prune/conv1`` arrives as
    ``{"prune": {"conv1": ...}}``); this undoes it.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in candidate_params(value).items()})
        else:
            flat[key] = value
    return flat


class DefineByRun:
    """The experiment's space as OptunaSearch's define-by-run function (a class, so it pickles
    with the searcher's state)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)  # OptunaSearch collects the suggested values itself


def _unflatten(result: dict, key: str) -> dict[str, float]:
    """The ``key`` part of a result Tune flattened at ``/`` (``metrics/metric`` -> ``metric``)."""
    prefix = f"{key}/"
    return {k[len(prefix) :]: float(v) for k, v in result.items() if k.startswith(prefix)}


class MultiObjectiveOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna PRUNED (stopped) or FAIL for trials that end without objectives,
    and stores budgets where Optuna's samplers read them.

    OptunaSearch reads the objectives from a trial's last result; for a stopped or failed trial
    that is an epoch report or a failure report, and in the multi-objective case it would tell
    COMPLETE with missing values (refused by Optuna, leaving the trial RUNNING in the study).
    With budgets, a complete trial's violations (and a stopped trial's, from the cost and last
    metric measured) go on its Optuna trial through :func:`record_constraints` before it is
    told, exactly as on the Optuna backend, so NSGA-II and TPE rank infeasible trials by them.
    """

    def __init__(
        self,
        *args: Any,
        constraints: ConstraintsConfig | None = None,
        profile: str = "host",
        uniform_points: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        # The uniform plans run after any points_to_evaluate given (flat names: the define-by-run
        # space suggests flat names, and the points are enqueued on the searcher's Optuna study).
        kwargs["points_to_evaluate"] = [*(kwargs.get("points_to_evaluate") or []), *(uniform_points or [])] or None
        super().__init__(*args, **kwargs)
        self.constraints, self.profile = constraints, profile

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        told = trial_id in self._completed_trials or trial_id not in self._ot_trials
        if result is not None and self.constraints is not None and not told:
            measured = _unflatten(result, METRICS) or ({} if FAIL_REASON in result else _unflatten(result, PARTIAL))
            if measured:
                record_constraints(self._ot_trials[trial_id], measured, self.constraints, self.profile)
        if result is not None and any(result.get(m) is None for m in metrics):
            error = error or FAIL_REASON in result
            result = None  # -> FAIL if error, else PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


class RecordingASHA(ASHAScheduler):
    """ASHA that remembers why it stopped a trial (Tune's callbacks only learn that it ended)."""

    def __init__(self, *, metric_name: str = "accuracy", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric_name = metric_name
        self.stopped: dict[str, str] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and VAL_METRIC in result:
            self.stopped[trial.trial_id] = (
                f"stopped by ASHA at epoch {result[EPOCH]}: val {self.metric_name} "
                f"{format_value(result[VAL_METRIC])} worse than the rung's cutoff"
            )
        return action


def make_scheduler(
    exp: Experiment, log: Callable[[str], None] = print, metric: QualityMetric = ACCURACY
) -> TrialScheduler:
    """ASHA on the per-epoch validation metric (``mode`` by its direction), with rungs strictly
    before the last fine-tune epoch.

    A rung at the last epoch would save only the final measurement, and a trial with a worse
    metric can still be on the front through its latency or size. With no room for a rung
    (``epochs - 1 < asha_grace_period``) or ``search.early_stop.enabled: false``, every trial
    runs to the end (FIFO).
    """
    cfg = exp.search.ray
    last_rung = exp.finetune.epochs - 1
    if not exp.search.early_stop.enabled or last_rung < cfg.asha_grace_period:
        why = (
            "search.early_stop.enabled is false"
            if not exp.search.early_stop.enabled
            else f"{exp.finetune.epochs} fine-tune epoch(s) leave no rung before the last "
            f"(search.ray.asha_grace_period {cfg.asha_grace_period})"
        )
        log(f"ASHA off: {why}")
        return FIFOScheduler()
    rungs, t = [], cfg.asha_grace_period
    while t <= last_rung:
        rungs.append(t)
        t *= cfg.asha_reduction_factor
    log(
        f"ASHA on {VAL_METRIC} ({metric.name}, {metric.direction}d): rungs at epoch "
        f"{', '.join(map(str, rungs))} of {exp.finetune.epochs}, "
        f"reduction factor {cfg.asha_reduction_factor}"
    )
    return RecordingASHA(
        metric_name=metric.name,
        time_attr=EPOCH,
        metric=VAL_METRIC,
        mode="max" if metric.higher_is_better else "min",
        max_t=last_rung,
        grace_period=cfg.asha_grace_period,
        reduction_factor=cfg.asha_reduction_factor,
        stop_last_trials=False,  # past the last rung a trial always runs to its measurement
    )


# --- worker side ------------------------------------------------------------------------------

_WORKER_CONTEXT: dict[str, TrialContext] = {}


def _worker_context(exp: Experiment, teacher_state: dict[str, Any], token: str) -> TrialContext:
    """The scoring context, built once per actor and search (actors are reused across trials)."""
    if token not in _WORKER_CONTEXT:
        task = load_task(exp.task.name, exp.task.args)
        teacher = task.build_model()
        teacher.load_state_dict(teacher_state)
        teacher.eval()
        _WORKER_CONTEXT.clear()  # never hold the teacher of an earlier search
        _WORKER_CONTEXT[token] = make_context(exp, teacher, task)
    return _WORKER_CONTEXT[token]


def trainable(config: dict[str, Any], *, exp: Experiment, teacher_state: dict[str, Any], token: str) -> None:
    """One trial on a Ray worker: build and score the candidate, reporting each epoch for ASHA.

    Reports ``{epoch, val_metric, partial, duration_s}`` per fine-tune epoch, then either
    ``{metrics, objectives, duration_s}`` or, if scoring raised, ``{fail_reason, duration_s}``
    (failures are data).
    """
    started = time.monotonic()

    def on_epoch(epoch: int, value: float | None, cost: Cost) -> None:
        if value is not None:  # ASHA may end the trial in this call
            partial = metrics_from(value, cost).as_dict()
            tune.report({EPOCH: epoch, VAL_METRIC: value, PARTIAL: partial, DURATION: time.monotonic() - started})

    try:
        ctx = _worker_context(exp, teacher_state, token)
        candidate = Candidate.from_params(candidate_params(config))
        _, metrics = score_candidate(candidate, ctx, on_epoch=on_epoch)
        values = objective_values(metrics, exp.objectives, exp.primary)
    except Exception as err:  # noqa: BLE001 - failures are data: report the reason, the search goes on
        tune.report({FAIL_REASON: fail_reason(err), DURATION: time.monotonic() - started})
        return
    tune.report(
        {
            METRICS: metrics.as_dict(),
            OBJECTIVES: dict(zip(exp.objectives, values, strict=True)),
            DURATION: time.monotonic() - started,
        }
    )


# --- driver side ------------------------------------------------------------------------------


class MlflowRecorder(tune.Callback):
    """Records each Tune trial as a nested MLflow run of the search and prints its progress line.

    The runs are written by :class:`~autocompress.search.record.TrialRecorder`, as on the Optuna
    backend; this callback maps Tune's events onto it (numbers in start order, the candidate
    from the trial's config, the state from its last result) and keeps the complete trials'
    records for the fronts.
    """

    def __init__(
        self,
        exp: Experiment,
        tracker: Tracker,
        parent_id: str,
        teacher: dict[str, float],
        progress: Progress,
        stop_reasons: dict[str, str],
        metric: QualityMetric = ACCURACY,
    ) -> None:
        self.exp, self.teacher, self.metric = exp, teacher, metric
        self.recorder = TrialRecorder(tracker, parent_id, teacher, exp.search.constraints, progress, metric)
        self.stop_reasons = stop_reasons  # the scheduler's, filled before a stopped trial completes
        self.records: list[TrialRecord] = []
        self.counts = {COMPLETE: 0, FAIL: 0, PRUNED: 0}
        self.numbers: dict[str, int] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.open_runs: dict[str, str] = {}
        self.front_size = 0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its RunConfig (callbacks included) for Tuner.restore, which this backend
        # does not use; the MLflow client and the log function are live handles, not state.
        return {k: v for k, v in self.__dict__.items() if k != "recorder"}

    # --- Tune hooks ----------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if EPOCH in result and VAL_METRIC in result:
            self.recorder.epoch(self._run(trial), int(result[EPOCH]), result[VAL_METRIC])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.open_runs:
            return  # never started (removed while pending when the search ended)
        result = trial.last_result or {}
        if METRICS in result:
            self._complete(trial, result)
        elif FAIL_REASON in result:
            self._fail(trial, result[FAIL_REASON], result.get(DURATION))
        else:
            reason = self.stop_reasons.get(trial.trial_id) or (
                f"stopped at epoch {result.get(EPOCH, 0)} of {self.exp.finetune.epochs} before its final "
                "measurement: the search ended (time budget)"
            )
            self._stop(trial, reason, result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # The trainable reports its own exceptions; an error here is the worker process dying
        # (out of memory, killed node) or Tune failing to run it.
        text = trial.get_error() or "the trial's Ray actor failed"
        lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
        self._fail(trial, f"ray: {lines[-1] if lines else text}", None)

    # --- records -------------------------------------------------------------------------------
    def _run(self, trial: Any) -> str:
        """The trial's MLflow run, created (with its number and params) the first time it is seen."""
        if trial.trial_id in self.open_runs:
            return self.open_runs[trial.trial_id]
        number = self.numbers[trial.trial_id] = len(self.numbers)
        candidate = Candidate.from_params(candidate_params(trial.config))
        self.params[trial.trial_id] = candidate.to_params()
        run_id = self.recorder.start(number, candidate, tags={RAY_TRIAL_TAG: trial.trial_id})
        self.open_runs[trial.trial_id] = run_id
        return run_id

    def front_records(self, log: Callable[[str], None] | None = None) -> list[TrialRecord]:
        """The records fronts are computed from (see :func:`~autocompress.search.record.front_records`)."""
        return front_records(self.records, self.exp.search.constraints, log)

    def _complete(self, trial: Any, result: dict) -> None:
        run_id = self.open_runs.pop(trial.trial_id)
        number = self.numbers[trial.trial_id]
        flat = {k: float(v) for k, v in result[METRICS].items()}
        feasible = meets_budgets(flat, self.exp.search.constraints, self.exp.primary)
        self.records.append(TrialRecord(number, self.params[trial.trial_id], flat, run_id, feasible))
        self.counts[COMPLETE] += 1
        self.front_size = len(search_fronts(self.records, self.exp, self.teacher, self.metric)[self.exp.primary])
        self.recorder.complete(run_id, number, flat, feasible, result[DURATION], self.front_size)

    def _fail(self, trial: Any, reason: str, duration: float | None) -> None:
        run_id = self.open_runs.pop(trial.trial_id, None) or self._pop_new_run(trial)
        self.counts[FAIL] += 1
        self.recorder.failed(run_id, self.numbers[trial.trial_id], reason, duration, self.front_size)

    def _stop(self, trial: Any, reason: str, result: dict) -> None:
        # Kept for the record, as the Optuna backend does: the cost and the last epoch's metric.
        run_id = self.open_runs.pop(trial.trial_id)
        partial = {k: float(v) for k, v in result.get(PARTIAL, {}).items()}
        self.counts[PRUNED] += 1
        number = self.numbers[trial.trial_id]
        self.recorder.stopped(run_id, number, partial, reason, result.get(DURATION), self.front_size)

    def _pop_new_run(self, trial: Any) -> str:
        self._run(trial)
        return self.open_runs.pop(trial.trial_id)

    def close_open_runs(self, reason: str) -> int:
        """End the runs of trials Tune never reported back on (interrupt); returns how many."""
        for run_id in self.open_runs.values():
            self.recorder.interrupted(run_id, reason)
        closed = len(self.open_runs)
        self.open_runs.clear()
        return closed


@contextlib.contextmanager
def _tune_settings() -> Iterator[None]:
    """Environment switches Tune's driver reads while it runs, restored afterwards.

    Strict metric checking wants every result to carry the searcher's and the scheduler's
    metrics, but epoch reports carry only ``val_metric`` and the final report only the
    measurements. Tune's own Ctrl-C handler would end the run quietly; the backend records the
    interrupt like the Optuna backend instead.
    """
    switches = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_DISABLE_SIGINT_HANDLER": "1"}
    saved = {k: os.environ.get(k) for k in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _search(exp: Experiment, setup: SearchSetup, log: Callable[[str], None]) -> SearchResult:
    name = new_search_name(exp)
    storage = exp.out_dir / "ray"
    if (storage / name).exists():
        raise AutocompressError(f"Ray experiment {name!r} already exists in {storage}: set another search.study_name")
    tracker = open_tracker(exp, log)
    parent_id = start_parent_run(exp, setup, tracker, name)
    tracker.log(parent_id, tags={BACKEND_TAG: "ray"})
    log_session(exp, setup, tracker, parent_id)
    log(f"Ray Tune experiment {name!r} in {storage / name}; MLflow run {parent_id} at {exp.tracking_uri}")

    scheduler = make_scheduler(exp, log, setup.metric)
    searcher = MultiObjectiveOptunaSearch(
        space=DefineByRun(setup.space),
        metric=[f"{OBJECTIVES}/{o}" for o in exp.objectives],  # Tune flattens nested results at "/"
        mode=["max" if direction(o, setup.metric) == "maximize" else "min" for o in exp.objectives],
        sampler=make_sampler(exp.search, exp.search_seed),
        study_name=name,
        constraints=exp.search.constraints,
        profile=exp.primary,
        uniform_points=setup.space.uniform_points()[: exp.search.n_trials],
    )
    progress = Progress(exp.search.n_trials, 0, setup.teacher_metrics, exp.primary, log, setup.metric)
    recorder = MlflowRecorder(
        exp, tracker, parent_id, setup.teacher_metrics, progress, getattr(scheduler, "stopped", {}), setup.metric
    )
    cfg = exp.search.ray
    teacher_state = {k: v.detach().clone() for k, v in setup.teacher.model.state_dict().items()}
    runnable = tune.with_resources(
        # put in Ray's object store once, fetched by each actor (not pickled per trial)
        tune.with_parameters(trainable, exp=exp, teacher_state=teacher_state, token=uuid.uuid4().hex),
        {"cpu": cfg.cpus_per_trial},
    )
    tuner = tune.Tuner(
        runnable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=exp.search.n_trials,
            max_concurrent_trials=cfg.max_concurrent_trials,
            time_budget_s=exp.search.timeout,
            reuse_actors=True,  # keep each actor's task and teacher between trials
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=0,
            callbacks=[recorder],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    status = "FINISHED"
    try:
        with _tune_settings():
            tuner.fit()
        stranded = recorder.close_open_runs("the search ended before the trial reported back")
        if stranded:
            log(f"{stranded} trial(s) ended without a result (closed as KILLED)")
    except KeyboardInterrupt:
        status = "KILLED"
        recorder.close_open_runs(USER_INTERRUPT)
        ended = sum(recorder.counts.values())
        raise SearchInterrupted(
            f"interrupted: {ended} finished trial(s) kept in MLflow run {parent_id}; "
            "a Ray search cannot be resumed (use search.backend: optuna for resumable searches)"
        ) from None
    finally:
        result = _finish(exp, name, storage, recorder, tracker, parent_id, setup.teacher_metrics, status, log)
    return result


def _finish(
    exp: Experiment,
    name: str,
    storage: Path,
    recorder: MlflowRecorder,
    tracker: Tracker,
    parent_id: str,
    teacher: dict[str, float],
    status: str,
    log: Callable[[str], None],
) -> SearchResult:
    """Publish the fronts (also after an interrupt: nothing is lost) and close the parent run."""
    out_dir = exp.out_dir / name
    fronts, artifacts = publish_fronts(
        recorder.front_records(log), exp, teacher, tracker, parent_id, out_dir, log, recorder.metric
    )
    counts = recorder.counts
    finished = sum(counts.values())
    tracker.log(
        parent_id,
        metrics={FINISHED_METRIC: finished, FAILED_METRIC: counts[FAIL], STOPPED_METRIC: counts[PRUNED]},
    )
    tracker.end_run(parent_id, status)
    close_tracker(tracker, exp, log)
    if exp.search.timeout is not None and finished < exp.search.n_trials and status == "FINISHED":
        log(f"timeout of {exp.search.timeout:g}s reached after {finished} finished trials")
    log(f"\n{finished} finished trial(s) ({counts[FAIL]} failed, {counts[PRUNED]} stopped early). Fronts: {out_dir}")
    return SearchResult(
        study_name=name,
        storage=str(storage / name),
        parent_run_id=parent_id,
        teacher=teacher,
        fronts=fronts,
        finished=finished,
        failed=counts[FAIL],
        out_dir=out_dir,
        artifacts=artifacts,
    )
