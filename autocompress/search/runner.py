"""Run an experiment's search on Optuna: open or resume the study, score trials, report fronts.

Each trial is scored by :func:`~autocompress.search.objectives.score_candidate`; a trial that
raises (divergence, out of memory, an unsupported layer) is recorded as failed with its reason
and the search goes on. The study lives in an RDB (SQLite by default), so finished trials
survive a crash; ``resume`` continues the latest study of the experiment to ``n_trials``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from autocompress.config import Experiment
from autocompress.errors import AutocompressError
from autocompress.hw_profiles import describe_host
from autocompress.hw_profiles.predictor import check_host
from autocompress.hw_profiles.profile import resolve_profile_path
from autocompress.search.constraints import any_constraint, is_feasible, violations
from autocompress.search.early_stop import Finished, HopelessRule, TrialStopped
from autocompress.search.objectives import (
    DIRECTIONS,
    HOST,
    Cost,
    TrialContext,
    make_context,
    measure,
    metrics_from,
    objective_values,
    score_candidate,
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
from autocompress.search.samplers import make_sampler
from autocompress.search.tracking import Tracker, flatten
from autocompress.spaces import SearchSpace, build_space
from autocompress.tasks import Task, load_task
from autocompress.teacher import Teacher, get_teacher

optuna.logging.set_verbosity(optuna.logging.WARNING)

INTERRUPTED = "interrupted"


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


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial counts toward ``n_trials``: complete, stopped early, or failed for a reason of its own."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED)


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


def latest_study(storage: optuna.storages.BaseStorage, experiment: str) -> str | None:
    """Name of the newest study of ``experiment`` in ``storage``, or None."""
    names = [
        s.study_name
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.user_attrs.get("experiment") == experiment
    ]
    return max(names) if names else None  # names end in a sortable timestamp


def open_study(exp: Experiment, space: SearchSpace, resume: bool | str) -> tuple[optuna.Study, bool]:
    """Create a new study, or load the one to resume; returns ``(study, resumed)``."""
    exp.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(exp.storage_url)
    except Exception as err:  # noqa: BLE001 - bad URL, missing driver, unreachable server
        raise AutocompressError(f"search.storage {exp.storage_url!r}: cannot open ({err})") from None
    fp = fingerprint(exp, space)
    if resume:
        name = resume if isinstance(resume, str) else (exp.search.study_name or latest_study(storage, exp.name))
        if name is None:
            raise AutocompressError(f"--resume: no study of experiment {exp.name!r} in {exp.storage_url}")
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise AutocompressError(f"--resume: no study named {name!r} in {exp.storage_url}") from None
        if study.user_attrs.get("fingerprint") != fp:
            raise AutocompressError(
                f"--resume: the experiment changed since study {name!r} was created (task, space, fine-tune, "
                "latency or objectives differ); start a new search without --resume"
            )
        study.sampler = make_sampler(exp.search, exp.search_seed + len(study.trials))
        return study, True
    name = exp.search.study_name or f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        study = optuna.create_study(
            storage=storage,
            sampler=make_sampler(exp.search, exp.search_seed),
            study_name=name,
            directions=[DIRECTIONS[o] for o in exp.objectives],
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise AutocompressError(
            f"study {name!r} already exists in {exp.storage_url}: pass --resume to continue it, "
            "or set another search.study_name"
        ) from None
    study.set_user_attr("experiment", exp.name)
    study.set_user_attr("fingerprint", fp)
    return study, False


def recover_interrupted(study: optuna.Study, tracker: Tracker, log: Callable[[str], None]) -> int:
    """Fail and re-queue trials left RUNNING by a worker on this host that no longer exists.

    The re-queued copy carries the same parameters, so the work is redone once and never
    counted twice (the interrupted trial is flagged and excluded from ``n_trials``).
    """
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.log(run_id, tags={"state": "FAIL", "fail_reason": "interrupted: worker process died"})
            tracker.end_run(run_id, "KILLED")
        recovered += 1
    if recovered:
        log(f"resume: {recovered} interrupted trial(s) re-queued with their parameters")
    return recovered


def runtime_description(runtime: str) -> str:
    """What executes candidates on the host, with its version (logged with the search)."""
    from autocompress.runtimes import get_runtime

    return get_runtime(runtime).describe()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Progress:
    """One line per finished trial: figures, front size, elapsed time and ETA."""

    def __init__(
        self, total: int, done: int, teacher: dict[str, float], profile: str, log: Callable[[str], None]
    ) -> None:
        self.total, self.done, self.teacher, self.profile, self.log = total, done, teacher, profile, log
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
        """Report one finished trial; ``done`` is the study's finished count when other workers add to it."""
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
                f"acc {metrics['accuracy']:.4f} ({100 * (metrics['accuracy'] - t['accuracy']):+.2f} pt)  "
                f"latency{where} {lat:.3f} ms ({t[f'latency_ms.{self.profile}'] / lat:.2f}x)  "
                f"size {metrics['size_bytes'] / 1e3:.1f} kB"
            )
            if feasible is not None:
                body += "  feasible" if feasible else "  INFEASIBLE"
        self.log(f"{head} {body} | front {front_size} | {_duration(elapsed)} elapsed, ETA {_duration(eta)}")


@dataclass
class SearchSetup:
    """Everything a search backend needs before its first trial (built once per search)."""

    task: Task
    teacher: Teacher
    space: SearchSpace
    ctx: TrialContext
    teacher_metrics: dict[str, float]


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
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, retrain=retrain, log=log)
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
    log(
        f"teacher: val accuracy {teacher_metrics['accuracy']:.4f}, latency {'; '.join(latencies)}, "
        f"size {teacher_metrics['size_bytes'] / 1e3:.1f} kB"
    )
    return SearchSetup(task, teacher, space, ctx, teacher_metrics)


def start_parent_run(exp: Experiment, setup: SearchSetup, tracker: Tracker, name: str) -> str:
    """Create the search's MLflow parent run with the config, space and host description."""
    parent_id = tracker.start_run(name, tags={"autocompress.study": name})
    config = exp.model_dump(mode="json")
    tracker.log(parent_id, params=flatten(config))
    (exp.out_dir / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (exp.out_dir / "space.json").write_text(json.dumps(setup.space.summary(), indent=2))
    tracker.log_artifact(parent_id, exp.out_dir / "experiment.yaml")
    tracker.log_artifact(parent_id, exp.out_dir / "space.json")
    log_profiles(exp, setup.ctx, tracker, parent_id)
    return parent_id


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


def log_session(exp: Experiment, setup: SearchSetup, tracker: Tracker, parent_id: str) -> None:
    """Record this session's teacher figures and host on the parent run (each session, as they may differ)."""
    host = {**describe_host(exp.latency.threads), "runtime": runtime_description(exp.latency.runtime)}
    tracker.log(
        parent_id,
        metrics={f"teacher.{k}": v for k, v in setup.teacher_metrics.items()},
        tags={
            "teacher.source": setup.teacher.source,
            "teacher.path": str(setup.teacher.path),
            **{f"profile.{HOST}.{k}": v for k, v in host.items()},
        },
    )


def run_search(
    exp: Experiment,
    *,
    resume: bool | str = False,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) the search of ``exp`` until ``n_trials`` trials are finished or time runs out."""
    if exp.search.backend == "ray":
        from autocompress.search.ray_backend import run_ray_search

        return run_ray_search(exp, resume=resume, retrain=retrain, log=log)
    setup = prepare_search(exp, retrain=retrain, log=log)
    space, teacher_metrics = setup.space, setup.teacher_metrics
    study, resumed = open_study(exp, space, resume)
    tracker = Tracker(exp.tracking_uri, exp.tracking.experiment or exp.name, exp.artifact_root)
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id is None:
        parent_id = start_parent_run(exp, setup, tracker, study.study_name)
        study.set_user_attr("mlflow_parent_run_id", parent_id)
    else:
        tracker.client.update_run(parent_id, status="RUNNING")
        recover_interrupted(study, tracker, log)
    log_session(exp, setup, tracker, parent_id)
    log(
        f"study {study.study_name!r} in {exp.storage_url}{' (resumed)' if resumed else ''}; "
        f"MLflow run {parent_id} at {exp.tracking_uri}"
    )

    done = finished_count(study)
    loop = _OptunaLoop(
        study, setup, exp, tracker, parent_id, _Progress(exp.search.n_trials, done, teacher_metrics, exp.primary, log)
    )
    started = time.monotonic()
    status = "FINISHED"
    workers = _start_workers(exp, study.study_name, parent_id, teacher_metrics, log)
    try:
        done = run_trials(study, loop, exp, started, log)
    except KeyboardInterrupt:
        status = "KILLED"
        done = finished_count(study)
        raise SearchInterrupted(
            f"interrupted: {done} finished trial(s) kept in study {study.study_name!r}; "
            "continue with the same command plus --resume"
        ) from None
    finally:
        _join_workers(workers, log)
        result = _finish(study, exp, tracker, parent_id, teacher_metrics, status, log)
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
    """Entry point of a parallel worker process: the trial loop of :func:`run_search`, nothing else."""
    from autocompress.config import parse_experiment

    def log(message: str) -> None:
        print(f"[worker {index}] {message}", flush=True)

    exp = parse_experiment(exp_data)
    setup = prepare_search(exp, log=lambda _: None, teacher_metrics=teacher)
    study = optuna.load_study(study_name=study_name, storage=exp.storage_url)
    # Each worker samples with its own seed: identical samplers would propose identical trials.
    study.sampler = make_sampler(exp.search, exp.search_seed + 7919 * index + len(study.trials))
    tracker = Tracker(exp.tracking_uri, exp.tracking.experiment or exp.name, exp.artifact_root)
    done = finished_count(study)
    progress = _Progress(exp.search.n_trials, done, teacher, exp.primary, log)
    try:
        run_trials(study, _OptunaLoop(study, setup, exp, tracker, parent_id, progress), exp, time.monotonic(), log)
    except KeyboardInterrupt:
        pass  # the interrupted trial was re-queued by run_one; the main process reports the stop


class _OptunaLoop:
    """Runs one trial at a time against a study: ask, score, tell, log to MLflow, report progress."""

    def __init__(self, study, setup: SearchSetup, exp: Experiment, tracker: Tracker, parent_id: str, progress):
        self.study, self.setup, self.exp = study, setup, exp
        self.tracker, self.parent_id, self.progress = tracker, parent_id, progress
        self.worker = _worker_id()

    def _rule(self) -> HopelessRule | None:
        config = self.exp.search.early_stop
        if not config.enabled:
            return None
        finished = [
            Finished(
                costs=t.user_attrs["metrics"],
                curve=t.user_attrs.get("val_curve", []),
                final=t.user_attrs["metrics"]["accuracy"],
            )
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "metrics" in t.user_attrs
        ]
        return HopelessRule(
            finished,
            self.exp.objectives,
            config.margin,
            config.min_epochs,
            self.exp.search.constraints.min_accuracy,
            self.exp.primary,
        )

    def _report(self, number: int, metrics: dict[str, float] | None, reason: str = "", **kw) -> None:
        done = finished_count(self.study)
        self.progress.trial(number, metrics, self._front_size(), reason, done=done, **kw)

    def _front_size(self) -> int:
        return len(_fronts(self.study, self.exp, self.setup.teacher_metrics)[self.exp.primary])

    def run_one(self) -> None:
        study, tracker, exp = self.study, self.tracker, self.exp
        trial = study.ask()
        trial.set_user_attr("worker", self.worker)
        candidate = self.setup.space.suggest(trial)
        run_id = tracker.start_run(
            f"trial-{trial.number}", self.parent_id, tags={"trial": trial.number, "state": "RUNNING"}
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        tracker.log(run_id, params=candidate.to_params())
        rule, curve = self._rule(), []
        cost_seen: list[Cost] = []

        def on_epoch(epoch: int, accuracy: float | None, cost: Cost) -> None:
            if accuracy is None:
                return
            curve.append(accuracy)
            cost_seen[:] = [cost]
            tracker.log(run_id, metrics={"val_accuracy": accuracy}, step=epoch)
            reason = rule.check(epoch, accuracy, metrics_from(accuracy, cost).as_dict()) if rule else None
            if reason:
                raise TrialStopped(reason)

        started = time.monotonic()
        try:
            _, metrics = score_candidate(candidate, self.setup.ctx, on_epoch=on_epoch)
            values = objective_values(metrics, exp.objectives, exp.primary)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            tracker.log(run_id, tags={"state": "FAIL", "fail_reason": "interrupted by the user"})
            tracker.end_run(run_id, "KILLED")
            raise
        except TrialStopped as stop:
            # Stopped trials keep what was measured: their costs and last accuracy, for the record.
            partial = metrics_from(curve[-1], cost_seen[0]).as_dict()
            trial.set_user_attr("stop_reason", str(stop))
            trial.set_user_attr("val_curve", curve)
            for key, value in violations(partial, exp.search.constraints, exp.primary).items():
                trial.set_constraint(key, value)
            study.tell(trial, state=TrialState.PRUNED)
            tracker.log(
                run_id,
                metrics={**partial, "duration_s": time.monotonic() - started},
                tags={"state": "PRUNED", "stop_reason": str(stop)},
            )
            tracker.end_run(run_id, "FINISHED")
            self._report(trial.number, partial, str(stop), stopped=True)
            return
        except Exception as err:  # noqa: BLE001 - failures are data: record the reason, go on
            reason = f"{type(err).__name__}: {err}".strip()
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            tracker.log(
                run_id,
                metrics={"duration_s": time.monotonic() - started},
                tags={"state": "FAIL", "fail_reason": reason[:5000]},
            )
            tracker.end_run(run_id, "FAILED")
            self._report(trial.number, None, reason)
            return
        flat = metrics.as_dict()
        limits = violations(flat, exp.search.constraints, exp.primary)
        feasible = is_feasible(limits)
        trial.set_user_attr("metrics", flat)
        trial.set_user_attr("val_curve", curve)
        for key, value in limits.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("feasible", feasible)
        study.tell(trial, values)
        teacher = self.setup.teacher_metrics
        speedups = {f"speedup.{p}": teacher[f"latency_ms.{p}"] / v for p, v in metrics.latency_ms.items()}
        tracker.log(
            run_id,
            metrics={**flat, **speedups, "duration_s": time.monotonic() - started},
            tags={"state": "COMPLETE", "feasible": feasible},
        )
        tracker.end_run(run_id, "FINISHED")
        shown = feasible if any_constraint(exp.search.constraints) else None
        self._report(trial.number, flat, feasible=shown)


def trial_records(study: optuna.Study, feasible_only: bool = False) -> list[TrialRecord]:
    """The study's complete trials as backend-neutral records (only those meeting the budgets if asked)."""
    return [
        TrialRecord(t.number, dict(t.params), t.user_attrs["metrics"], t.user_attrs.get("mlflow_run_id"))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "metrics" in t.user_attrs and (not feasible_only or t.user_attrs.get("feasible", True))
    ]


def front_records(study: optuna.Study, exp: Experiment, log: Callable[[str], None] | None = None) -> list[TrialRecord]:
    """The records fronts are computed from: the feasible ones when budgets are set and any is met."""
    if not any_constraint(exp.search.constraints):
        return trial_records(study)
    feasible = trial_records(study, feasible_only=True)
    if feasible:
        return feasible
    if log is not None:
        log("no trial met search.constraints yet: the fronts below include infeasible trials")
    return trial_records(study)


def _fronts(study: optuna.Study, exp: Experiment, teacher: dict[str, float]) -> dict[str, list[Row]]:
    return compute_fronts(front_records(study, exp), teacher, exp.objectives)


def publish_fronts(
    records: list[TrialRecord],
    exp: Experiment,
    teacher: dict[str, float],
    tracker: Tracker,
    parent_id: str,
    out_dir: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, list[Row]], list[Path]]:
    """Compute the front per profile, print it, write CSV + PNG, log them and tag member runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fronts = compute_fronts(records, teacher, exp.objectives)
    artifacts: list[Path] = []
    for profile, front in fronts.items():
        csv_path, png_path = out_dir / f"front_{profile}.csv", out_dir / f"front_{profile}.png"
        write_csv(front, csv_path)
        plot_front(make_rows(records, teacher, profile), front, teacher, profile, png_path)
        artifacts += [csv_path, png_path]
        for path in (csv_path, png_path):
            tracker.log_artifact(parent_id, path, "fronts")
        # Every trial run gets the tag (stopped, failed and infeasible ones too), so the MLflow UI
        # can filter on front.<profile> = 'True' or 'False' alike.
        members = {r.run_id for r in records if r.number in {row.trial for row in front}}
        for run in tracker.child_runs(parent_id):
            tracker.log(run.info.run_id, tags={f"front.{profile}": run.info.run_id in members})
        volume = front_hypervolume(front, teacher, exp.objectives, profile)
        tracker.log(parent_id, metrics={f"front_size.{profile}": len(front), f"hypervolume.{profile}": volume})
        log(
            f"\nPareto front on profile '{profile}' ({len(front)} of {len(records)} trials; "
            f"objectives: {', '.join(exp.objectives)}; hypervolume {volume:.4f} vs the teacher reference):"
        )
        log(format_table(front, teacher, profile))
    return fronts, artifacts


def _finish(study, exp, tracker, parent_id, teacher, status, log) -> SearchResult:
    """Publish the fronts (also after a timeout or an interrupt: nothing is lost) and close the run."""
    out_dir = exp.out_dir / study.study_name
    trials = study.get_trials(deepcopy=False)
    finished = sum(counted(t) for t in trials)
    failed = sum(t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED) for t in trials)
    fronts, artifacts = publish_fronts(front_records(study, exp, log), exp, teacher, tracker, parent_id, out_dir, log)
    tracker.log(parent_id, metrics={"trials.finished": finished, "trials.failed": failed})
    tracker.end_run(parent_id, status)
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
