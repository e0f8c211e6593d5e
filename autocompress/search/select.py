"""Select a front member under a budget, rebuild it, re-measure it, export it and log it to MLflow.

The member is rebuilt from teacher + candidate + seed (the same :func:`build_candidate` the search
used), then scored on the runtime the search scored (:func:`runnable`: for ``onnxruntime`` its int8
deployment), on the validation split the search saw and on the test split it never saw. The ONNX
file that is measured is the file that ships. Latency is re-measured only for the ``host`` profile
(this machine) and for a hardware profile measured on this kind of machine (same CPU model and
runtime version); for any other profile the latency is predicted again from the profile for the
rebuilt model, and the card says which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from autocompress.config import Experiment
from autocompress.errors import AutocompressError
from autocompress.hw_profiles.predictor import check_host
from autocompress.models.hf import save_pretrained_parts
from autocompress.runtimes import UnknownRuntime, canonical_name, get_runtime, runtime_names
from autocompress.search.objectives import HOST, build_candidate, make_context, predicted_latency, runnable
from autocompress.search.quality import ACCURACY, METRIC, QualityMetric, format_value
from autocompress.search.report import Row
from autocompress.search.store import StoredSearch, load_experiment_search, parse_objectives
from autocompress.search.tracking import Tracker, flatten
from autocompress.spaces.candidate import Candidate

SHIPPED_RUNTIME = "onnxruntime"  # the deployment whose files select writes, whatever the search ran on
ONNX_FP32 = "model.fp32.onnx"  # names written by compress.deploy.deploy
ONNX_INT8 = "model.int8.onnx"
TORCH_MODULE = "model.pt"
STATE_DICT = "state_dict.pt"
MODEL_CARD = "model_card.json"
HF_DIR = "hf"  # save_pretrained folders of the Hugging Face models inside the selected model
OUTPUT_FILES = (ONNX_FP32, ONNX_INT8, TORCH_MODULE, STATE_DICT, MODEL_CARD)
ARTIFACT_DIR = "model"  # artifact path of the files in the selected run (and the registered version's source)
SELECTED_TAG = "autocompress.selected"
# Settings that decide which model the candidate rebuilds to and what it runs on. Latency warm-up
# and repeats only change measurement noise, so they may differ (e.g. more repeats for a re-measure).
REBUILD_KEYS = ("seed", "objectives", "task.", "teacher.", "space.", "finetune.", "latency.")
NOISE_KEYS = ("latency.warmup", "latency.repeats")
VERSIONED = ("autocompress", "torch", "torch-pruning", "onnx", "onnxruntime", "mlflow", "optuna", "numpy")


@dataclass(frozen=True)
class Budget:
    """A budget on one profile (exactly one): at most ``max_latency_ms``, or the task's metric at
    least ``min_metric`` or at most ``max_metric`` (in the metric's own units)."""

    max_latency_ms: float | None = None
    min_metric: float | None = None
    max_metric: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.max_latency_ms, self.min_metric, self.max_metric) if v is not None]
        if len(given) != 1:
            raise AutocompressError("give exactly one budget: --max-latency-ms, --min-metric or --max-metric")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise AutocompressError(f"--max-latency-ms {self.max_latency_ms:g}: must be > 0")
        for flag, value in (("--min-metric", self.min_metric), ("--max-metric", self.max_metric)):
            if value is not None and not math.isfinite(value):
                raise AutocompressError(f"{flag} {value:g}: must be a finite number")

    def describe(self, metric: QualityMetric = ACCURACY) -> str:
        """``latency <= 2 ms``, ``accuracy >= 0.95``, ``mse <= 0.1``."""
        if self.max_latency_ms is not None:
            return f"latency <= {self.max_latency_ms:g} ms"
        if self.min_metric is not None:
            return f"{metric.name} >= {self.min_metric:g}"
        return f"{metric.name} <= {self.max_metric:g}"

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class BudgetNotMet(AutocompressError):
    """No front member meets the budget; carries the closest member (the CLI exits 1, not 2)."""

    def __init__(self, message: str, closest: Row) -> None:
        super().__init__(message)
        self.closest = closest


def _figures(row: Row, metric: QualityMetric = ACCURACY) -> str:
    return (
        f"{metric.name} {format_value(row.metric)}, latency {row.latency_ms:.3f} ms, "
        f"size {row.size_bytes / 1e3:.1f} kB, {row.summary}"
    )


def pick(front: list[Row], budget: Budget, profile: str, metric: QualityMetric = ACCURACY) -> Row:
    """The best member of ``front`` under ``budget``; ``metric`` says which direction is better.

    Max latency: the member with the best metric within it (ties: faster, then smaller). A bound on
    the metric (``min_metric``: at least, ``max_metric``: at most): the fastest member meeting it
    (ties: better metric, then smaller). Raises :class:`BudgetNotMet` naming the closest member
    (fastest, or the one nearest the bound) when none qualifies.
    """
    if not front:
        raise AutocompressError(f"the front on profile {profile!r} is empty: the search has no complete trial")
    s = metric.sign  # s * metric is better high
    if budget.max_latency_ms is not None:
        within = [r for r in front if r.latency_ms <= budget.max_latency_ms]
        if within:
            return max(within, key=lambda r: (s * r.metric, -r.latency_ms, -r.size_bytes))
        closest = min(front, key=lambda r: (r.latency_ms, -s * r.metric))
    else:
        if budget.min_metric is not None:
            meeting = [r for r in front if r.metric >= budget.min_metric]
            nearest = max(front, key=lambda r: (r.metric, -r.latency_ms))
        else:
            meeting = [r for r in front if r.metric <= budget.max_metric]
            nearest = min(front, key=lambda r: (r.metric, r.latency_ms))
        if meeting:
            return min(meeting, key=lambda r: (r.latency_ms, -s * r.metric, r.size_bytes))
        closest = nearest
    raise BudgetNotMet(
        f"no member of the {len(front)}-member front on profile {profile!r} meets {budget.describe(metric)}; "
        f"closest: trial {closest.trial} ({_figures(closest, metric)})",
        closest,
    )


def check_unchanged(exp: Experiment, search: StoredSearch) -> None:
    """Raise if the experiment now differs from the search's in a setting the rebuild depends on.

    The same candidate under other fine-tune, pruning or task settings is another model: rebuilding
    it would silently ship something that was never scored. Keys the search did not log (added by a
    later autocompress) are not compared.
    """
    now = flatten(exp.model_dump(mode="json"))
    for key, value in now.items():
        relevant = key in REBUILD_KEYS or key.startswith(tuple(k for k in REBUILD_KEYS if k.endswith(".")))
        if not relevant or key in NOISE_KEYS or key not in search.params:
            continue
        then = search.params[key]
        if key == "objectives":  # with 'accuracy' (the name before 'metric') normalised
            then = str(parse_objectives(then, search.run_id))
        if key == "latency.runtime" and then != value:
            with contextlib.suppress(UnknownRuntime):  # a search logged before runtimes had one name ("torch")
                then = canonical_name(str(then))
        if then != value:
            raise AutocompressError(
                f"{exp.name}: {key} is {value!r} now but was {search.params[key]!r} in search run {search.run_id} "
                f"(study {search.study}); restore it to rebuild that search's models"
            )


def package_versions() -> dict[str, str]:
    """Versions of the packages that built and ran the model (recorded in the model card)."""
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys([*VERSIONED, *(get_runtime(r).package for r in runtime_names())]):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Selection:
    """What ``select`` produced: the member, its figures, the files and where MLflow holds them."""

    row: Row
    profile: str
    budget: Budget
    out_dir: Path
    files: dict[str, Path]
    card: dict[str, Any]
    run_id: str
    parent_run_id: str
    registered_model: str | None = None
    model_version: str | None = None


def _remeasure_and_export(compressed: Any, ctx: Any, profile: str, out_dir: Path) -> tuple[dict[str, Any], Path]:
    """Deploy to ONNX in ``out_dir`` (8-bit layers int8) and measure what the search measured.

    Returns the re-measured figures and the deployed ONNX path. The ONNX files ship whatever the
    search's runtime; on another runtime (``torch-eager``) its own deployment is measured, as in the
    search, and the ONNX files are exported alongside.
    """
    from autocompress import inputs as pytree
    from autocompress.compress.deploy import ModuleIndex, runtime_int8_layers
    from autocompress.evaluators import artifact_size_bytes, compressed_size_bytes, count_parameters, evaluate

    lat = ctx.latency
    # runnable() is the search's own deployment (same calibration batches), so the file written here
    # is the model the search scored.
    deployed = {SHIPPED_RUNTIME: runnable(compressed.model, compressed.bits, ctx, out_dir, SHIPPED_RUNTIME)}

    def on(runtime: str) -> Any:
        if runtime not in deployed:
            deployed[runtime] = runnable(compressed.model, compressed.bits, ctx, out_dir, runtime)
        return deployed[runtime]

    ort_model = deployed[SHIPPED_RUNTIME]
    executable = on(lat.runtime)
    task = ctx.task
    figures: dict[str, Any] = {
        "val_metric": evaluate(executable, task.loader("val", 256), task.metric),
        "test_metric": evaluate(executable, task.loader("test", 256), task.metric),
        "params": count_parameters(compressed.model),
    }
    with tempfile.TemporaryDirectory(prefix="autocompress-artifact-") as tmp:
        # The file the search's runtime ships, zipped: the figure compressed_size_bytes stands for.
        artifact = get_runtime(lat.runtime).artifact(executable, tmp)
        figures["size_bytes"] = artifact_size_bytes(artifact)  # the deployed file, as the search scored size
        figures["compressed_size_bytes"] = compressed_size_bytes(artifact)
    example = task.example_input(lat.batch_size)
    hw = dict(ctx.profiles).get(profile)
    if hw is not None:
        only = dataclasses.replace(ctx, profiles=((profile, hw),))  # the other profiles are not asked
        figures["latency_predicted_ms"] = predicted_latency(compressed.model, compressed.bits, only)[profile]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mismatch = check_host(hw)
        figures["latency_source"] = (
            f"predicted again from profile {profile!r} for the rebuilt model (this host differs: {'; '.join(mismatch)})"
        )
        figures["latency_ms"] = figures["latency_predicted_ms"]
    timed = None
    if profile == HOST:
        timed, timed_on, threads = executable, lat.runtime, lat.threads
        figures["latency_source"] = (
            f"re-measured on this host ({lat.runtime}, batch {lat.batch_size}, {lat.threads} thread(s), "
            f"median of {lat.repeats})"
        )
    elif hw is not None and not mismatch:
        timed, timed_on, threads = on(hw.runtime.name), hw.runtime.name, hw.host.threads
        figures["latency_source"] = (
            f"re-measured on this host, the machine and runtime profile {profile!r} was measured on "
            f"({hw.runtime.name} {hw.runtime.version}, {threads} thread(s)); the profile predicts "
            f"{figures['latency_predicted_ms']:.3f} ms"
        )
    if timed is not None:
        timing = get_runtime(timed_on).measure(timed, example, threads=threads, warmup=lat.warmup, repeats=lat.repeats)
        figures["latency_ms"] = timing.median_ms
        figures["latency_p90_ms"] = timing.p90_ms
    modules = ModuleIndex.of(compressed.model)  # exact names under any nesting (ModuleList layers)
    int8 = runtime_int8_layers(ort_model.path, lat.threads, modules) if ort_model.path.name == ONNX_INT8 else []
    figures["int8_layers"] = int8
    figures["no_kernel_layers"] = sorted(n for n, b in compressed.bits.items() if 2 <= b < 8)
    figures["inputs"] = pytree.describe(task.example_input(1))  # batch 1; the batch axis is dynamic
    return figures, ort_model.path


def _card(
    exp: Experiment,
    search: StoredSearch,
    row: Row,
    profile: str,
    budget: Budget,
    measured: dict[str, Any],
    onnx_path: Path,
    run_id: str,
    teacher_source: str,
) -> dict[str, Any]:
    record = search.record(row.trial)
    latency_source = measured.get(
        "latency_source", f"searched figure: profile {profile!r} is not one of this experiment's profiles"
    )
    searched = {
        METRIC: row.metric,
        "latency_ms": row.latency_ms,
        "size_bytes": row.size_bytes,
        "params": row.params,
        "speedup": row.speedup,
        "metric_delta_pt": row.metric_delta,
        "compressed_size_bytes": None if math.isnan(row.compressed_size_bytes) else row.compressed_size_bytes,
    }
    remeasured = {
        "val_metric": measured["val_metric"],
        "test_metric": measured["test_metric"],
        "latency_ms": measured.get("latency_ms", row.latency_ms),
        "latency_p90_ms": measured.get("latency_p90_ms"),
        "latency_predicted_ms": measured.get("latency_predicted_ms"),
        "size_bytes": measured["size_bytes"],
        "params": measured["params"],
        "compressed_size_bytes": measured["compressed_size_bytes"],
    }
    return {
        "name": f"{exp.name} trial {row.trial} ({profile})",
        "candidate": {"trial": row.trial, "summary": row.summary, "params": dict(row.candidate)},
        "profile": profile,
        "budget": budget.as_dict(),
        "metric": {"name": search.metric.name, "direction": search.metric.direction},
        "metrics": {
            "searched": searched,
            "remeasured": remeasured,
            "latency_source": latency_source,
            "teacher": dict(search.teacher),
        },
        "deployment": {
            "runtime": exp.latency.runtime,
            "onnx": onnx_path.name,
            "onnx_fp32": ONNX_FP32,
            "int8_layers": measured["int8_layers"],
            "no_kernel_layers": measured["no_kernel_layers"],
            "hf_pretrained": measured["hf_pretrained"],
            "torch_module": TORCH_MODULE,
            "state_dict": STATE_DICT,
            "inputs": measured["inputs"],
            "note": f"{TORCH_MODULE} is a pickled module: torch.load(path, weights_only=False) with autocompress "
            f"importable; {STATE_DICT} fits the pruned architecture only",
        },
        "provenance": {
            "experiment": exp.name,
            "task": exp.task.model_dump(mode="json"),
            "seed": exp.seed,
            "study": search.study,
            "trial": row.trial,
            "mlflow": {
                "tracking_uri": search.tracking_uri,
                "experiment": search.experiment_name,
                "parent_run_id": search.run_id,
                "trial_run_id": record.run_id,
                "selected_run_id": run_id,
            },
            "teacher_source": teacher_source,
            "versions": package_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


def _clear_outputs(out_dir: Path) -> None:
    # Only this command's own file names: a stale model.int8.onnx from another member must not be
    # mistaken for this one's, and nothing else in the directory is touched.
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def register_model(tracker: Tracker, name: str, run_id: str, search: StoredSearch, row: Row, profile: str) -> str:
    """Register the selected run's ``model/`` artifacts as a new version of ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(
            name, description=f"models selected by autocompress from {search.experiment_name}"
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise AutocompressError(f"--register {name!r}: {err.message.splitlines()[0]}") from None
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    try:
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={"profile": profile, "trial": str(row.trial), "study": search.study, "candidate": row.summary},
            description=f"trial {row.trial} of {search.study} on profile {profile}: {row.summary}",
        )
    except MlflowException as err:
        raise AutocompressError(f"--register {name!r}: {err.message.splitlines()[0]}") from None
    return str(version.version)


def select(
    exp: Experiment,
    profile: str,
    budget: Budget,
    *,
    study: str | None = None,
    out_dir: Path | None = None,
    register: str | None = None,
    log: Callable[[str], None] = print,
) -> Selection:
    """Pick the best front member of the experiment's latest search (or ``study``) under ``budget`` on
    ``profile``, rebuild and re-measure it, export it to ``out_dir`` (default
    ``<output_dir>/<study>/selected-<profile>``) and log it as the nested MLflow run
    ``selected-<profile>``; ``register`` names a registered model to add it to as a new version.

    Raises :class:`BudgetNotMet` (nothing built, written or logged) when no member meets the budget.
    """
    client, search = load_experiment_search(exp, study)
    metric = search.metric
    row = pick(search.front(profile), budget, profile, metric)
    check_unchanged(exp, search)
    log(
        f"search {search.study} (MLflow run {search.run_id}): trial {row.trial} is the best of the "
        f"{len(search.front(profile))}-member front on {profile!r} under {budget.describe(metric)}: "
        f"{_figures(row, metric)}"
    )

    import torch

    from autocompress.tasks import load_task
    from autocompress.teacher import get_teacher

    out_dir = Path(out_dir or exp.out_dir / search.study / f"selected-{profile}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    tracker = Tracker(search.tracking_uri, search.experiment_name)
    run_id = tracker.start_run(
        f"selected-{profile}",
        search.run_id,
        tags={SELECTED_TAG: profile, "selected.trial": row.trial, "selected.budget": budget.describe(metric)},
    )
    try:
        task = load_task(exp.task.name, exp.task.args)
        teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, task_ref=exp.task.name, log=log)
        ctx = make_context(exp, teacher.model, task)
        log(f"rebuilding trial {row.trial} from the teacher ({exp.finetune.epochs} fine-tune epoch(s))")
        compressed = build_candidate(Candidate.from_params(row.candidate), ctx)
        measured, onnx_path = _remeasure_and_export(compressed, ctx, profile, out_dir)
        torch.save(compressed.model, out_dir / TORCH_MODULE)
        torch.save(compressed.model.state_dict(), out_dir / STATE_DICT)
        # A Hugging Face model inside also ships as save_pretrained folders (autocompress.models.hf.from_pretrained).
        measured["hf_pretrained"] = {
            name or "model": str(path.relative_to(out_dir))
            for name, path in save_pretrained_parts(compressed.model, out_dir / HF_DIR).items()
        }
        card = _card(exp, search, row, profile, budget, measured, onnx_path, run_id, teacher.source)
        (out_dir / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
        files = {"onnx": onnx_path, "onnx_fp32": out_dir / ONNX_FP32, "torch_module": out_dir / TORCH_MODULE}
        files |= {"state_dict": out_dir / STATE_DICT, "model_card": out_dir / MODEL_CARD}
        remeasured = card["metrics"]["remeasured"]
        figures = {
            METRIC: remeasured["val_metric"],
            f"test_{METRIC}": remeasured["test_metric"],
            f"latency_ms.{profile}": remeasured["latency_ms"],
            "size_bytes": remeasured["size_bytes"],
            "params": remeasured["params"],
            f"searched.{METRIC}": row.metric,
            f"searched.latency_ms.{profile}": row.latency_ms,
        }
        readable = {**metric.readable(figures), **metric.readable(figures, "test_")}
        readable |= metric.readable(figures, "searched.")
        tracker.log(
            run_id,
            params={"profile": profile, "trial": row.trial, **budget.as_dict(), **metric.attrs(), **row.candidate},
            metrics={**figures, **readable},
            tags={"latency_source": card["metrics"]["latency_source"][:5000]},
        )
        for path in files.values():
            tracker.log_artifact(run_id, path, ARTIFACT_DIR)
        version = register_model(tracker, register, run_id, search, row, profile) if register else None
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return Selection(row, profile, budget, out_dir, files, card, run_id, search.run_id, register, version)


def describe_selection(sel: Selection) -> str:
    """The lines ``autocompress select`` prints: searched vs re-measured figures, files, MLflow."""
    m = sel.card["metrics"]
    s, r = m["searched"], m["remeasured"]
    lat_note = m["latency_source"].split(" (")[0]
    int8 = sel.card["deployment"]["int8_layers"]
    metric = QualityMetric(sel.card["metric"]["name"], sel.card["metric"]["direction"] == "maximize")
    name = metric.name[:11]
    lines = [
        f"selected trial {sel.row.trial} on profile {sel.profile!r} ({sel.budget.describe(metric)}): {sel.row.summary}",
        f"{'':16}{'searched':>10} {'now':>10}",
        f"{'val ' + name:16}{format_value(s[METRIC]):>10} {format_value(r['val_metric']):>10}",
        f"{'test ' + name:16}{'-':>10} {format_value(r['test_metric']):>10}",
        f"{'latency ms':16}{s['latency_ms']:10.3f} {r['latency_ms']:10.3f}  ({lat_note})",
        f"{'size kB':16}{s['size_bytes'] / 1e3:10.1f} {r['size_bytes'] / 1e3:10.1f}",
        f"ONNX {sel.files['onnx']} ({f'int8: {len(int8)} layer(s)' if int8 else 'fp32'})",
        f"torch {sel.files['torch_module']}, {sel.files['state_dict'].name}; card {sel.files['model_card'].name}",
        f"MLflow run selected-{sel.profile} {sel.run_id} under search run {sel.parent_run_id}",
    ]
    if sel.model_version is not None:
        lines.append(f"registered as version {sel.model_version} of model {sel.registered_model!r}")
    return "\n".join(lines)
