"""Score a candidate: build it, measure its metric, latency and size, and turn them into objectives.

This is the objective function shared by every search backend; it receives plain values (a
candidate and a :class:`TrialContext`) and knows nothing about the search that called it.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.compress.distill import OptimizerSettings
from autocompress.compress.pipeline import Compressed, PipelineSettings, apply, finetune_student, prepare_student
from autocompress.compress.quantize import plain_copy
from autocompress.config import Experiment, LatencyConfig, profile_id
from autocompress.evaluators import artifact_size_bytes, compressed_size_bytes, count_parameters, evaluate
from autocompress.hw_profiles.predictor import ProfileMismatchWarning, predict
from autocompress.hw_profiles.profile import Profile, load_profile, resolve_profile_path
from autocompress.runtimes import get_runtime
from autocompress.search.quality import METRIC, QualityMetric
from autocompress.spaces.candidate import Candidate
from autocompress.tasks import Task
from autocompress.techniques import techniques
from autocompress.techniques.quantize import int8_modes

HOST = "host"  # the latency profile "measured on this machine"

COST_DIRECTIONS = {"latency": "minimize", "size": "minimize", "compressed_size": "minimize"}


def direction(objective: str, metric: QualityMetric) -> str:
    """``maximize`` or ``minimize`` for ``objective``; ``metric`` follows the task's direction."""
    return metric.direction if objective == METRIC else COST_DIRECTIONS[objective]


def directions(objectives: list[str], metric: QualityMetric) -> list[str]:
    """The study's directions, in the experiment's objective order."""
    return [direction(o, metric) for o in objectives]


@dataclass(frozen=True)
class TrialContext:
    """What scoring a candidate needs besides the candidate itself."""

    teacher: nn.Module
    task: Task
    pipeline: PipelineSettings
    latency: LatencyConfig
    calibration_batches: int = 4  # training batches that calibrate int8 activation ranges
    # Hardware profiles a candidate's latency is predicted on, by the name its figures are logged under.
    profiles: tuple[tuple[str, Profile], ...] = ()


def make_context(exp: Experiment, teacher: nn.Module, task: Task) -> TrialContext:
    """The scoring context an experiment defines (transform settings, latency settings)."""
    pipeline = PipelineSettings(
        finetune_epochs=exp.finetune.epochs,
        optimizer=OptimizerSettings(**exp.finetune.optimizer_settings(task.finetune_defaults)),
        loss=task.loss,
        distill_kind=task.output_kind,
        batch_size=exp.finetune.batch_size,
        feature_layers=tuple(exp.finetune.feature_layers),
        feature_weight=exp.finetune.feature_weight,
        seed=exp.seed,
        sections={t.name: getattr(exp.space, t.config_key) for t in techniques()},
    )
    return TrialContext(
        teacher=teacher,
        task=task,
        pipeline=pipeline,
        latency=exp.latency,
        calibration_batches=exp.space.quantize.calibration_batches,
        profiles=tuple((profile_id(p), load_profile(resolve_profile_path(p))) for p in exp.profiles),
    )


@dataclass(frozen=True)
class Metrics:
    """Measured figures of one model: ``metric`` is the task's metric; ``latency_ms`` is per profile
    (``"host"`` = measured here)."""

    metric: float
    latency_ms: dict[str, float]
    latency_p90_ms: dict[str, float]
    size_bytes: int
    params: int
    compressed_size_bytes: int | None = None  # the deployed file zipped (None: not deployed yet)
    int8_layers: int | None = None  # layers on integer kernels in what the host runtime executes (None: not read)

    def as_dict(self) -> dict[str, float]:
        """Flat metric names as logged to MLflow (``latency_ms.host`` ...)."""
        flat = {METRIC: self.metric, "size_bytes": float(self.size_bytes), "params": float(self.params)}
        if self.int8_layers is not None:
            flat["int8_layers"] = float(self.int8_layers)
        if self.compressed_size_bytes is not None:
            flat["compressed_size_bytes"] = float(self.compressed_size_bytes)
        flat.update({f"latency_ms.{k}": v for k, v in self.latency_ms.items()})
        flat.update({f"latency_p90_ms.{k}": v for k, v in self.latency_p90_ms.items()})
        return flat


def runnable(
    model: nn.Module, bits: dict[str, int], ctx: TrialContext, workdir: str | Path, runtime: str | None = None
) -> Any:
    """What executes ``model`` on ``runtime`` (default: the host's, ``latency.runtime``): its
    deployment there (:meth:`~autocompress.runtimes.Runtime.deploy`: for ``onnxruntime`` the ONNX
    model with the 8-bit layers statically quantized to int8, for ``torch-eager`` the model itself),
    written under ``workdir`` and calibrated on the context's training batches."""
    target = get_runtime(runtime or ctx.latency.runtime)
    calibration = list(itertools.islice(iter(ctx.task.loader("train", 64)), ctx.calibration_batches))
    modes = int8_modes(model, bits, ctx.pipeline.section("bits"))
    return target.deploy(model, bits, ctx.task.example_input(1), calibration, workdir, ctx.latency.threads, modes=modes)


@dataclass(frozen=True)
class Cost:
    """What a candidate costs to run: known from its architecture, before any fine-tuning."""

    latency_ms: dict[str, float]
    latency_p90_ms: dict[str, float]
    size_bytes: int
    params: int


def predicted_latency(model: nn.Module, bits: dict[str, int], ctx: TrialContext) -> dict[str, float]:
    """Latency of ``model`` on each of the context's hardware profiles, from their lookup tables (ms).

    No timing: LUT look-ups (cheap), or for an ONNX Runtime profile whose unit map does not know the
    candidate, a deployment to read ORT's graph (export, quantize, optimize: far slower). An operator a profile
    cannot predict raises :class:`~autocompress.hw_profiles.UnpredictableSignature` naming it, which
    fails the trial with that reason.
    """
    example = ctx.task.example_input(ctx.latency.batch_size)
    with warnings.catch_warnings():
        # A profile from another machine is expected here (scoring for a remote device); the
        # search reports the mismatch once, when it starts.
        warnings.simplefilter("ignore", ProfileMismatchWarning)
        return {name: predict(model, example, profile, bits).latency_ms for name, profile in ctx.profiles}


def _run(
    model: nn.Module, bits: dict[str, int], ctx: TrialContext, *, accuracy: bool, latency: bool
) -> tuple[float | None, Any, int | None, int, int | None]:
    """Deploy ``model`` on the host's runtime: its metric, zipped artifact bytes and the number of layers
    really on int8 kernels if ``accuracy`` (the weights are final then), its latency if ``latency``,
    and always the artifact's bytes."""
    settings = ctx.latency
    runtime = get_runtime(settings.runtime)
    with tempfile.TemporaryDirectory(prefix="autocompress-deploy-") as workdir:
        executable = runnable(model, bits, ctx, workdir)
        artifact = runtime.artifact(executable, workdir)
        size = artifact_size_bytes(artifact)
        acc = evaluate(executable, ctx.task.loader("val", 256), ctx.task.metric) if accuracy else None
        zipped = compressed_size_bytes(artifact) if accuracy else None
        int8 = len(runtime.int8_layers(executable, model)) if accuracy else None
        lat = None
        if latency:
            lat = runtime.measure(
                executable,
                ctx.task.example_input(settings.batch_size),
                threads=settings.threads,
                warmup=settings.warmup,
                repeats=settings.repeats,
            )
    return acc, lat, zipped, size, int8


def _cost(model: nn.Module, bits: dict[str, int], lat: Any, size: int, ctx: TrialContext) -> Cost:
    """Size (the deployed artifact's bytes), parameters, and latency of a plain (quantizer-free) model:
    measured on the host (``lat``, None when not measured) and predicted on every profile."""
    measured = {} if lat is None else {HOST: lat.median_ms}
    return Cost(
        latency_ms={**measured, **predicted_latency(model, bits, ctx)},
        latency_p90_ms={} if lat is None else {HOST: lat.p90_ms},
        size_bytes=size,
        params=count_parameters(model),
    )


def measure_cost(model: nn.Module, bits: dict[str, int], ctx: TrialContext) -> Cost:
    """Latency (measured on :func:`runnable` and/or predicted per profile), size (the deployed file, so
    the model is deployed even when no host latency is measured) and parameter count of ``model``;
    its weights do not matter."""
    plain = plain_copy(model)
    _, lat, _, size, _ = _run(plain, bits, ctx, accuracy=False, latency=ctx.latency.measure_host)
    return _cost(plain, bits, lat, size, ctx)


def metrics_from(
    metric: float, cost: Cost, compressed_size: int | None = None, int8_layers: int | None = None
) -> Metrics:
    """Combine a measured metric, cost and (once deployed) zipped artifact size and int8 layer count."""
    return Metrics(
        metric, cost.latency_ms, cost.latency_p90_ms, cost.size_bytes, cost.params, compressed_size, int8_layers
    )


def measure(model: nn.Module, bits: dict[str, int], ctx: TrialContext) -> Metrics:
    """The task's metric on the validation split, host latency, size and parameter count of a finished model.

    The metric and latency are both measured on :func:`runnable` (for ``onnxruntime``, the deployed
    model with real int8 kernels), so what is scored is what would ship.
    """
    acc, lat, zipped, size, int8 = _run(model, bits, ctx, accuracy=True, latency=ctx.latency.measure_host)
    return metrics_from(acc, _cost(model, bits, lat, size, ctx), zipped, int8)


def build_candidate(
    candidate: Candidate,
    ctx: TrialContext,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> Compressed:
    """Build ``candidate`` from the teacher (prune, low-rank, fine-tune with KD, quantize)."""
    val = ctx.task.loader("val", 256)
    return apply(
        ctx.teacher,
        candidate,
        lambda: ctx.task.loader("train", ctx.pipeline.batch_size, shuffle=True),
        ctx.task.example_input(1),
        ctx.pipeline,
        evaluate=lambda m: evaluate(m, val, ctx.task.metric),
        on_epoch=on_epoch,
    )


def score_candidate(
    candidate: Candidate,
    ctx: TrialContext,
    on_epoch: Callable[[int, float | None, Cost], None] | None = None,
) -> tuple[nn.Module, Metrics]:
    """Build ``candidate`` and measure it: cost first (from the architecture), then the fine-tune,
    then the metric on the deployed model.

    ``on_epoch(epoch, val_metric, cost)`` runs after each fine-tune epoch and may raise to stop
    a hopeless trial (see :mod:`autocompress.search.early_stop`).
    """

    def train_batches():
        return ctx.task.loader("train", ctx.pipeline.batch_size, shuffle=True)

    student = prepare_student(ctx.teacher, candidate, ctx.task.example_input(1), ctx.pipeline, train_batches)
    cost = measure_cost(student.model, student.bits, ctx)
    val = ctx.task.loader("val", 256)
    compressed = finetune_student(
        student,
        ctx.teacher,
        candidate,
        train_batches(),
        ctx.pipeline,
        evaluate=lambda m: evaluate(m, val, ctx.task.metric),
        on_epoch=None if on_epoch is None else (lambda epoch, acc: on_epoch(epoch, acc, cost)),
    )
    accuracy, _, zipped, _, int8 = _run(compressed.model, compressed.bits, ctx, accuracy=True, latency=False)
    return compressed.model, metrics_from(accuracy, cost, zipped, int8)


def objective_values(metrics: Metrics, objectives: list[str], profile: str) -> list[float]:
    """The study's objective vector, in the experiment's order (directions by :func:`directions`);
    latency is the one on ``profile`` (the experiment's primary profile)."""
    table = {
        METRIC: metrics.metric,
        "latency": metrics.latency_ms[profile],
        "size": float(metrics.size_bytes),
        "compressed_size": float("nan" if metrics.compressed_size_bytes is None else metrics.compressed_size_bytes),
    }
    values = [table[name] for name in objectives]
    if not all(torch.isfinite(torch.tensor(values))):
        raise ValueError(f"non-finite objective values {values}")
    return values
