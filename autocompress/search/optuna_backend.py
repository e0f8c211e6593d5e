"""Run an experiment's search on Optuna: open or resume the study, score trials, report fronts.

Each trial is scored by :func:`~autocompress.search.objectives.score_candidate`; a trial that
raises (divergence, out of memory, an unsupported layer) is recorded as failed with its reason
and the search goes on. The study lives in an RDB (SQLite by default), so finished trials
survive a crash; ``resume`` continues the latest study of the experiment to ``n_trials``.

Crash consistency: everything a trial's record needs (figures, curve, stop or failure reason) is
stored on the Optuna trial before it is told, so the study alone says what happened and MLflow is
rebuilt from it (:mod:`~autocompress.search.replicate`). A trial left RUNNING by a process that
died, at whatever instant (even between ``ask`` and its first attribute), is failed as
interrupted, excluded from the count and re-queued once with its parameters
(:func:`recover_interrupted`). Each process seeds its sampler differently and a plan two processes
both queued runs once (:data:`~autocompress.search.record.DUPLICATE_OF`), so processes joining one
study do not repeat each other's candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import zlib
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from autocompress import faults
from autocompress.config import Experiment
from autocompress.errors import AutocompressError
from autocompress.search.early_stop import Finished, HopelessRule, TrialStopped, resolve_margin
from autocompress.search.objectives import Cost, directions, metrics_from, objective_values, score_candidate
from autocompress.search.quality import ACCURACY, METRIC, QualityMetric
from autocompress.search.record import (
    CURVE_ATTR,
    DUPLICATE_OF,
    EXPERIMENT_ATTR,
    FAIL_REASON_ATTR,
    FAILED_METRIC,
    FEASIBLE_ATTR,
    FINISHED_METRIC,
    INTERRUPTED,
    METRICS_ATTR,
    PARENT_RUN_ATTR,
    PARTIAL_ATTR,
    STOP_REASON_ATTR,
    SURPLUS,
    USER_INTERRUPT,
    WORKER_DIED,
    Progress,
    TrialRecorder,
    fail_reason,
    front_records,
    record_constraints,
    search_fronts,
)
from autocompress.search.replicate import STATUS_ATTR, TEACHER_ATTR, parent_run, replicate_trials
from autocompress.search.report import TrialRecord
from autocompress.search.samplers import make_sampler
from autocompress.search.setup import (
    SearchInterrupted,
    SearchResult,
    SearchSetup,
    close_tracker,
    latest_study,
    log_session,
    new_search_name,
    open_tracker,
    prepare_search,
    publish_fronts,
    start_parent_run,
)
from autocompress.search.tracking import Tracker, first_line
from autocompress.spaces import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Optuna attributes of this backend's scheduling (the trial record's own are in search.record).
FINGERPRINT_ATTR = "fingerprint"  # study: what makes its trials comparable
TEACHER_FINGERPRINT_ATTR = "teacher_fingerprint"  # study: the weights of the teacher its trials distil from
WORKER_ATTR = "worker"  # trial: host:pid of the process running it
RETRY_OF_ATTR = "retry_of"  # trial: the interrupted trial it redoes
PROCESS_PREFIX = "process:"  # study: one attribute per process that ran trials of it (host:pid -> start)
ORPHAN_GRACE_S = 600.0
"""A RUNNING trial without a worker attribute is abandoned once this old, when a process that might
still write it (on another host, or a live one here) exists; with none, at once."""


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_seed(base: int, study: optuna.Study, salt: str = "") -> int:
    """The sampler seed of a process joining ``study``: ``base`` plus the trials so far, plus a hash
    of ``salt`` (its host and PID). Processes that join at the same moment see the same trials, so
    without the salt they would propose the same candidates."""
    return (base + len(study.trials) + (zlib.crc32(salt.encode()) if salt else 0)) % 2**32


def register_process(study: optuna.Study) -> None:
    """Note this process on the study, so a resumer can tell whether a trial without a worker may still be written."""
    study.set_user_attr(f"{PROCESS_PREFIX}{_worker_id()}", time.time())


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user's counts: it is not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_aside(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the search itself set the trial aside: interrupted (redone by a retry), or a duplicate
    plan or a surplus trial dropped unrun. Such a trial is no candidate's result."""
    attrs = trial.user_attrs
    return bool(attrs.get(INTERRUPTED) or DUPLICATE_OF in attrs or attrs.get(SURPLUS))


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward ``n_trials``: complete, stopped early, or failed for a reason of its own
    (not :func:`set_aside`)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not set_aside(trial)


def _trial_counts(trials: list[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """``(finished, failed)``: the trials that count toward ``n_trials``, and those of them that failed."""
    finished = sum(counted(t) for t in trials)
    return finished, sum(t.state == TrialState.FAIL and counted(t) for t in trials)


def finished_count(study: optuna.Study) -> int:
    """Trials of ``study`` that count toward ``n_trials`` (see :func:`counted`), whichever worker ran them."""
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def fingerprint(exp: Experiment, space: SearchSpace) -> str:
    """Hash of everything that makes trials comparable; a resumed study must match it."""
    payload = {
        "task": exp.task.model_dump(mode="json"),
        "teacher": exp.teacher.model_dump(mode="json"),
        "seed": exp.seed,
        "space": space.summary(),
        "finetune": exp.finetune.model_dump(mode="json"),
        "latency": exp.latency.model_dump(mode="json"),
        "objectives": exp.objectives,
        "profiles": exp.profiles,
        "primary": exp.primary,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def open_storage(exp: Experiment) -> optuna.storages.RDBStorage:
    """The experiment's study storage; one line naming ``search.storage`` if it cannot be opened."""
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(exp.storage_url)
    except Exception as err:  # noqa: BLE001 - bad URL, missing driver, unreachable server
        reason = first_line(err)
        if isinstance(err, ModuleNotFoundError) and "psycopg" in reason:
            reason += "; pip install 'autocompress[postgres]'"
        raise AutocompressError(f"search.storage {exp.storage_url!r}: cannot open ({reason})") from None


def find_study(
    storage: optuna.storages.BaseStorage, exp: Experiment, name: str | None = None
) -> tuple[str | None, optuna.Study | None]:
    """``(name, study)``: the study named ``name``, else ``search.study_name``, else the experiment's latest;
    the study is None when there is no such study."""
    name = name or exp.search.study_name or latest_study(storage, exp.name)
    try:
        return name, optuna.load_study(study_name=name, storage=storage) if name is not None else None
    except KeyError:
        return name, None


def open_study(
    exp: Experiment,
    space: SearchSpace,
    resume: bool | str,
    metric: QualityMetric = ACCURACY,
    storage: optuna.storages.BaseStorage | None = None,
    log: Callable[[str], None] = print,
) -> tuple[optuna.Study, bool]:
    """Create a new study (``metric``: the task's, whose direction the study optimises), or load the
    one to resume; returns ``(study, resumed)``.

    ``resume=True`` with no study yet (a search killed before its first trial, e.g. while the
    teacher trained) starts one; a study named on the command line must exist.
    """
    storage = storage or open_storage(exp)
    fp = fingerprint(exp, space)
    if resume:
        name, study = find_study(storage, exp, resume if isinstance(resume, str) else None)
        if study is None and isinstance(resume, str):
            raise AutocompressError(f"--resume: no study named {name!r} in {exp.storage_url}")
        if study is not None:
            if study.user_attrs.get(FINGERPRINT_ATTR) != fp:
                raise AutocompressError(
                    f"--resume: the experiment changed since study {name!r} was created (task, space, fine-tune, "
                    "latency or objectives differ); start a new search without --resume"
                )
            study.sampler = make_sampler(exp.search, process_seed(exp.search_seed, study, _worker_id()))
            return study, True
        log(f"--resume: no study of experiment {exp.name!r} in {exp.storage_url} yet: starting one")
    name = new_search_name(exp)
    try:
        study = optuna.create_study(
            storage=storage,
            sampler=make_sampler(exp.search, exp.search_seed),
            study_name=name,
            directions=directions(exp.objectives, metric),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise AutocompressError(
            f"study {name!r} already exists in {exp.storage_url}: pass --resume to continue it, "
            "or set another search.study_name"
        ) from None
    study.set_user_attr(EXPERIMENT_ATTR, exp.name)
    study.set_user_attr(FINGERPRINT_ATTR, fp)
    for key, value in metric.attrs().items():  # the direction, readable without the task
        study.set_user_attr(key, value)
    return study, False


def planned_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The parameters a trial runs with: those it sampled, and those it was queued with (a trial killed
    right after ``ask`` has sampled none yet, but a queued plan already says what it is)."""
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def has_plan(params: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Whether ``params`` hold every value of ``plan`` (a queued point fixes only some parameters)."""
    return all(params.get(k) == v for k, v in plan.items())


def enqueue_uniform_points(study: optuna.Study, space: SearchSpace, n_trials: int) -> int:
    """Queue the space's uniform plans (:meth:`SearchSpace.uniform_points`) as the next trials.

    A plan some trial of the study already has (run, running or queued: a resumed study, another
    worker) is not queued again; neither are more plans than trials remain. Returns how many were
    queued.
    """
    trials = study.get_trials(deepcopy=False)
    seen = [planned_params(t) for t in trials]
    room = max(0, n_trials - len(trials))
    queued = 0
    for point in space.uniform_points():
        if queued >= room:
            break
        if any(has_plan(params, point) for params in seen):
            continue
        study.enqueue_trial(point)
        queued += 1
    return queued


def abandoned(trial: optuna.trial.FrozenTrial, study: optuna.Study, now: float | None = None) -> bool:
    """Whether a RUNNING trial's process is gone, so nothing will ever finish it.

    A trial names its process (``worker``, host:pid) right after ``ask``; on this host the PID says.
    A trial killed before it could name one is abandoned when no other process of the study
    (:func:`register_process`) could still be about to; else after :data:`ORPHAN_GRACE_S`.
    A live process on another host cannot be checked from here: its trials are left alone.
    """
    host, me = socket.gethostname(), _worker_id()
    worker = trial.user_attrs.get(WORKER_ATTR, "")
    if worker:
        worker_host, _, pid = worker.rpartition(":")
        return worker_host == host and pid.isdigit() and not pid_alive(int(pid))
    others = [key[len(PROCESS_PREFIX) :] for key in study.user_attrs if key.startswith(PROCESS_PREFIX)]

    def may_write(other: str) -> bool:
        other_host, _, pid = other.rpartition(":")
        return other_host != host or (pid.isdigit() and pid_alive(int(pid)))

    if not any(may_write(other) for other in others if other != me):
        return True
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return (now or time.time()) - started > ORPHAN_GRACE_S


def recover_interrupted(study: optuna.Study, log: Callable[[str], None]) -> int:
    """Fail and re-queue the trials left RUNNING by a process that died (see :func:`abandoned`).

    The re-queued copy carries the same parameters, so the work is redone once and never counted
    twice (the interrupted trial is flagged and excluded from ``n_trials``); its MLflow run is closed
    KILLED with the reason by :func:`~autocompress.search.replicate.replicate_trials`. Two processes
    recovering the same trial at once both queue a copy; the later copy is dropped unrun
    (:data:`DUPLICATE_OF`).
    """
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not abandoned(trial, study):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR, WORKER_DIED)
        except RuntimeError:
            continue  # another process finished it first
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(planned_params(trial), user_attrs={RETRY_OF_ATTR: trial.number})
        recovered += 1
    if recovered:
        log(f"resume: {recovered} interrupted trial(s) re-queued with their parameters")
    return recovered


def catch_up_tracking(
    study: optuna.Study, exp: Experiment, tracker: Tracker, metric: QualityMetric, teacher: dict[str, float], log
) -> str:
    """Make the MLflow record match the study (parent run rebuilt if lost, every finished trial's run
    as the study holds it); returns the parent run id."""
    parent_id = parent_run(study, exp, tracker, metric, log)
    fixed = replicate_trials(study, tracker, parent_id, study.user_attrs.get(TEACHER_ATTR, teacher), metric)
    if fixed:
        log(f"tracking: {fixed} MLflow trial run(s) brought in line with the study")
    return parent_id


def check_teacher(study: optuna.Study, fingerprint: str, accept: bool, log: Callable[[str], None]) -> None:
    """Refuse to resume ``study`` with a teacher other than the one its trials distilled from, unless ``accept``."""
    recorded = study.user_attrs.get(TEACHER_FINGERPRINT_ATTR)
    if recorded is None or recorded == fingerprint:
        return
    if not accept:
        raise AutocompressError(
            f"--resume: study {study.study_name!r} was searched with teacher {recorded} and this teacher is "
            f"{fingerprint} (retrained, or another checkpoint): its trials would not be comparable; pass "
            "--accept-teacher to resume anyway, or start a new search"
        )
    log(f"warning: resuming study {study.study_name!r} with teacher {fingerprint}, not {recorded} (--accept-teacher)")


def run_optuna_search(
    exp: Experiment,
    *,
    resume: bool | str = False,
    retrain: bool = False,
    accept_teacher: bool = False,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) the search of ``exp`` on Optuna until ``n_trials`` trials are finished or time runs out.

    ``accept_teacher``: resume even if the teacher's weights differ from the study's (see :func:`check_teacher`).
    """
    # Everything that can refuse the search is opened before the teacher trains.
    storage = open_storage(exp)
    tracker = open_tracker(exp, log)
    setup = prepare_search(exp, retrain=retrain, log=log)
    space, teacher_metrics = setup.space, setup.teacher_metrics
    study, resumed = open_study(exp, space, resume, setup.metric, storage, log)
    register_process(study)
    if not resumed:
        queued = enqueue_uniform_points(study, space, exp.search.n_trials)
        study.set_user_attr(TEACHER_ATTR, teacher_metrics)
        study.set_user_attr(TEACHER_FINGERPRINT_ATTR, setup.teacher.fingerprint)
        parent_id = start_parent_run(exp, setup, tracker, study.study_name)
        study.set_user_attr(PARENT_RUN_ATTR, parent_id)
    else:
        check_teacher(study, setup.teacher.fingerprint, accept_teacher, log)
        recover_interrupted(study, log)
        parent_id = catch_up_tracking(study, exp, tracker, setup.metric, teacher_metrics, log)
        tracker.set_status(parent_id, "RUNNING")
        queued = enqueue_uniform_points(study, space, exp.search.n_trials)
    log_session(exp, setup, tracker, parent_id)
    if queued:
        log(f"{queued} uniform plan(s) (all int8, one pruning ratio everywhere) queued as the first trials")
    log(
        f"study {study.study_name!r} in {exp.storage_url}{' (resumed)' if resumed else ''}; "
        f"MLflow run {parent_id} at {exp.tracking_uri}"
    )

    progress = Progress(exp.search.n_trials, finished_count(study), teacher_metrics, exp.primary, log, setup.metric)
    recorder = TrialRecorder(tracker, parent_id, teacher_metrics, exp.search.constraints, progress, setup.metric)
    loop = _OptunaLoop(study, setup, exp, recorder)
    started = time.monotonic()
    status = "FINISHED"
    workers = _start_workers(exp, study.study_name, parent_id, teacher_metrics, log)
    try:
        run_trials(study, loop, exp, started, log)
    except KeyboardInterrupt:
        status = "KILLED"
        raise SearchInterrupted(
            f"interrupted: {finished_count(study)} finished trial(s) kept in study {study.study_name!r}; "
            "continue with the same command plus --resume"
        ) from None
    finally:
        _join_workers(workers, log)
        result = _finish(study, exp, tracker, parent_id, teacher_metrics, status, log, setup.metric)
    return result


def run_trials(study: optuna.Study, loop: _OptunaLoop, exp: Experiment, started: float, log) -> int:
    """Run trials until ``n_trials`` are finished, counting the ones other workers are running.

    Every worker of a parallel search runs this loop against the same study; a worker starts a
    trial only while finished + running trials fall short of ``n_trials``, so the workers stop
    together without lost trials. Returns the number of finished trials.
    """
    while True:
        trials = study.get_trials(deepcopy=False)
        done = sum(counted(t) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done + running >= exp.search.n_trials:
            # A trial of a worker that died would hold its place forever: re-queue it and go on.
            if running and done < exp.search.n_trials and recover_interrupted(study, log):
                continue
            return done
        if exp.search.timeout is not None and time.monotonic() - started > exp.search.timeout:
            log(f"timeout of {exp.search.timeout:g}s reached after {done} finished trials")
            return done
        loop.run_one()


def _start_workers(exp: Experiment, study_name: str, parent_id: str, teacher: dict[str, float], log) -> list:
    """Start ``search.workers - 1`` processes that run trials of the same study beside this one."""
    if exp.search.workers <= 1:
        return []
    import multiprocessing

    # spawn, not fork: torch, ONNX Runtime and the MLflow/SQLAlchemy clients are not fork-safe.
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(1, exp.search.workers):
        process = context.Process(
            target=_worker_main,
            args=(exp.model_dump(mode="json"), study_name, parent_id, teacher, index),
            name=f"autocompress-worker-{index}",
        )
        process.start()
        processes.append(process)
    log(f"{exp.search.workers} workers on study {study_name!r} (this process and {len(processes)} more)")
    return processes


def _join_workers(processes: list, log) -> None:
    for process in processes:
        process.join()
        if process.exitcode not in (0, None):
            log(f"worker {process.name} exited with status {process.exitcode}; its finished trials are kept")


def _worker_main(exp_data: dict, study_name: str, parent_id: str, teacher: dict[str, float], index: int) -> None:
    """Entry point of a parallel worker process: the trial loop of :func:`run_optuna_search`, nothing else."""
    from autocompress.config import parse_experiment

    def log(message: str) -> None:
        print(f"[worker {index}] {message}", flush=True)

    exp = parse_experiment(exp_data)
    setup = prepare_search(exp, log=lambda _: None, teacher_metrics=teacher)
    study = optuna.load_study(study_name=study_name, storage=exp.storage_url)
    register_process(study)
    # Each worker samples with its own seed: identical samplers would propose identical trials.
    study.sampler = make_sampler(exp.search, process_seed(exp.search_seed + 7919 * index, study, _worker_id()))
    progress = Progress(exp.search.n_trials, finished_count(study), teacher, exp.primary, log, setup.metric)
    tracker = open_tracker(exp, log)
    recorder = TrialRecorder(tracker, parent_id, teacher, exp.search.constraints, progress, setup.metric)
    try:
        run_trials(study, _OptunaLoop(study, setup, exp, recorder), exp, time.monotonic(), log)
    except KeyboardInterrupt:
        pass  # the interrupted trial was re-queued by run_one; the main process reports the stop
    finally:
        close_tracker(tracker, exp, log)


class _OptunaLoop:
    """Runs one trial at a time against a study: ask, score, tell, record in MLflow, report progress."""

    def __init__(self, study: optuna.Study, setup: SearchSetup, exp: Experiment, recorder: TrialRecorder) -> None:
        self.study, self.setup, self.exp, self.recorder = study, setup, exp, recorder
        self.worker = _worker_id()

    def _rule(self) -> HopelessRule | None:
        config = self.exp.search.early_stop
        if not config.enabled:
            return None
        finished = [
            Finished(
                costs=t.user_attrs[METRICS_ATTR],
                curve=t.user_attrs.get(CURVE_ATTR, []),
                final=t.user_attrs[METRICS_ATTR][METRIC],
            )
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if METRICS_ATTR in t.user_attrs
        ]
        constraints = self.exp.search.constraints
        return HopelessRule(
            finished,
            self.exp.objectives,
            resolve_margin(config.margin, self.setup.teacher_metrics[METRIC]),
            config.min_epochs,
            constraints.min_metric,
            self.exp.primary,
            self.setup.metric,
            constraints.max_metric,
        )

    def _front_size(self) -> int:
        fronts = search_fronts(trial_records(self.study), self.exp, self.setup.teacher_metrics, self.setup.metric)
        return len(fronts[self.exp.primary])

    def _queued_plan(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """The parameters ``trial`` was queued with (``enqueue_trial``), or None when the sampler proposes it."""
        return self.study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")

    def _dropped(self, trial: optuna.Trial, plan: dict[str, Any] | None) -> tuple[str, Any] | None:
        """Why a trial just asked must not run, as ``(attribute, value)``, or None.

        ``surplus``: processes that checked "finished + running < n_trials" at the same moment asked
        one trial too many; the lowest-numbered trials run, later ones step back. ``duplicate_of``:
        the trial's queued plan is one an earlier trial already has (two processes queued it); a
        plan the sampler proposes again is the sampler's own choice and runs. ``plan``: the trial's
        queued parameters (None when the sampler proposes it).
        """
        others = [t for t in self.study.get_trials(deepcopy=False) if t.number != trial.number]
        ahead = sum(counted(t) or (t.state == TrialState.RUNNING and t.number < trial.number) for t in others)
        if ahead >= self.exp.search.n_trials:
            return SURPLUS, True
        for other in others if plan else []:
            if other.number < trial.number and not set_aside(other) and has_plan(planned_params(other), plan):
                return DUPLICATE_OF, other.number
        return None

    def run_one(self) -> None:
        study, recorder, exp = self.study, self.recorder, self.exp
        trial = study.ask()
        faults.point("after_ask")
        trial.set_user_attr(WORKER_ATTR, self.worker)
        faults.point("after_worker_attr")
        plan = self._queued_plan(trial)
        dropped = self._dropped(trial, plan)
        if dropped is not None:
            trial.set_user_attr(*dropped)
            study.tell(trial, state=TrialState.FAIL)
            if dropped[0] == SURPLUS and plan:
                study.enqueue_trial(plan)  # its plan stays queued for a later resume, never lost
            return
        candidate = self.setup.space.suggest(trial)
        run_id = recorder.start(trial.number, candidate)
        faults.point("after_run_start")
        rule, curve = self._rule(), []
        cost_seen: list[Cost] = []

        def on_epoch(epoch: int, value: float | None, cost: Cost) -> None:
            if value is None:
                return
            curve.append(value)
            cost_seen[:] = [cost]
            recorder.epoch(run_id, epoch, value)
            faults.point("finetune_epoch")
            reason = rule.check(epoch, value, metrics_from(value, cost).as_dict()) if rule else None
            if reason:
                raise TrialStopped(reason)

        started = time.monotonic()
        try:
            _, metrics = score_candidate(candidate, self.setup.ctx, on_epoch=on_epoch)
            values = objective_values(metrics, exp.objectives, exp.primary)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            trial.set_user_attr(FAIL_REASON_ATTR, USER_INTERRUPT)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number})
            recorder.interrupted(run_id, USER_INTERRUPT)
            raise
        except TrialStopped as stop:
            # Stopped trials keep what was measured: their costs and last metric, for the record.
            partial = metrics_from(curve[-1], cost_seen[0]).as_dict()
            trial.set_user_attr(STOP_REASON_ATTR, str(stop))
            trial.set_user_attr(CURVE_ATTR, curve)
            trial.set_user_attr(PARTIAL_ATTR, partial)
            record_constraints(trial, partial, exp.search.constraints, exp.primary)
            faults.point("before_tell")
            study.tell(trial, state=TrialState.PRUNED)
            duration, done = time.monotonic() - started, finished_count(study)
            recorder.stopped(run_id, trial.number, partial, str(stop), duration, self._front_size(), done)
            return
        except Exception as err:  # noqa: BLE001 - failures are data: record the reason, go on
            reason = fail_reason(err)
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            trial.set_user_attr(CURVE_ATTR, curve)
            faults.point("before_tell")
            study.tell(trial, state=TrialState.FAIL)
            duration, done = time.monotonic() - started, finished_count(study)
            recorder.failed(run_id, trial.number, reason, duration, self._front_size(), done)
            return
        flat = metrics.as_dict()
        feasible = record_constraints(trial, flat, exp.search.constraints, exp.primary)
        trial.set_user_attr(METRICS_ATTR, flat)
        trial.set_user_attr(CURVE_ATTR, curve)
        trial.set_user_attr(FEASIBLE_ATTR, feasible)
        faults.point("before_tell")
        study.tell(trial, values)
        duration, done = time.monotonic() - started, finished_count(study)
        recorder.complete(run_id, trial.number, flat, feasible, duration, self._front_size(), done)


def sync_search(exp: Experiment, study_name: str | None = None, log: Callable[[str], None] = print) -> int:
    """Make MLflow hold the study's whole record (``autocompress sync``): the parent run (rebuilt if the
    store lost it), every finished trial's run, the fronts and their tags; returns the trial runs written.

    Needs only the study and the MLflow store (no task, no teacher). The parent run is closed with the
    status the search ended with, unless a live process is still running trials of the study.
    """
    name, study = find_study(open_storage(exp), exp, study_name)
    if study is None:
        raise AutocompressError(
            f"sync: no study {'named ' + repr(name) if name else 'of experiment ' + repr(exp.name)} "
            f"in {exp.storage_url}"
        )
    teacher = study.user_attrs.get(TEACHER_ATTR)
    if teacher is None:
        raise AutocompressError(
            f"sync: study {study.study_name!r} has no teacher figures (it stopped before its first trial)"
        )
    try:
        metric = QualityMetric.from_attrs(study.user_attrs, f"study {study.study_name!r}: ")
    except ValueError as err:
        raise AutocompressError(f"sync: {err}") from None
    tracker = Tracker(exp.tracking_uri, exp.tracking.experiment or exp.name, exp.artifact_root)
    parent_id = parent_run(study, exp, tracker, metric, log)
    written = replicate_trials(study, tracker, parent_id, teacher, metric)
    trials = study.get_trials(deepcopy=False)
    live = [t for t in trials if t.state == TrialState.RUNNING and not abandoned(t, study)]
    records = front_records(trial_records(study), exp.search.constraints, log=None)
    publish_fronts(records, exp, teacher, tracker, parent_id, exp.out_dir / study.study_name, lambda _: None, metric)
    finished, failed = _trial_counts(trials)
    tracker.log(parent_id, metrics={FINISHED_METRIC: finished, FAILED_METRIC: failed})
    if not live:
        tracker.end_run(parent_id, study.user_attrs.get(STATUS_ATTR, "KILLED"))
    log(
        f"sync: study {study.study_name!r} -> MLflow run {parent_id} at {exp.tracking_uri}: {written} trial run(s) "
        f"written, {finished} finished trial(s), fronts and front tags published"
        + (f"; {len(live)} trial(s) still running elsewhere" if live else "")
    )
    return written


def trial_records(study: optuna.Study) -> list[TrialRecord]:
    """The study's complete trials as backend-neutral records."""
    return [
        TrialRecord(
            t.number,
            dict(t.params),
            t.user_attrs[METRICS_ATTR],
            None,  # runs are matched to trials by their trial tag (see search.replicate)
            t.user_attrs.get(FEASIBLE_ATTR, True),
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if METRICS_ATTR in t.user_attrs
    ]


def _finish(study, exp, tracker: Tracker, parent_id, teacher, status, log, metric=ACCURACY) -> SearchResult:
    """Publish the fronts (also after a timeout or an interrupt: nothing is lost) and close the run."""
    out_dir = exp.out_dir / study.study_name
    trials = study.get_trials(deepcopy=False)
    finished, failed = _trial_counts(trials)  # a trial set aside (interrupted, dropped unrun) is no failure
    records = front_records(trial_records(study), exp.search.constraints, log)
    faults.point("before_finish")
    study.set_user_attr(STATUS_ATTR, status)
    fronts, artifacts = publish_fronts(records, exp, teacher, tracker, parent_id, out_dir, log, metric)
    tracker.log(parent_id, metrics={FINISHED_METRIC: finished, FAILED_METRIC: failed})
    tracker.end_run(parent_id, status)
    close_tracker(tracker, exp, log)
    log(f"\n{finished} finished trial(s) ({failed} failed). Fronts: {out_dir}")
    return SearchResult(
        study_name=study.study_name,
        storage=exp.storage_url,
        parent_run_id=parent_id,
        teacher=teacher,
        fronts=fronts,
        finished=finished,
        failed=failed,
        out_dir=out_dir,
        artifacts=artifacts,
    )
