"""Apply a :class:`~autocompress.spaces.Candidate` to a teacher: the registered techniques in stage order.

Order (:class:`~autocompress.techniques.Stage`): copy teacher -> structure (pruning: channels
removed) -> factorization of the pruned layers -> weight parametrizations (sparsity masks,
fake-quant; a factorized layer's values apply to each of its factors) -> distillation fine-tune
(trains through them, with the distillation technique's settings) -> bake the weights. The result
is an ordinary ``nn.Module``; the same candidate, teacher, data and seed give the same model.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.compress.distill import FitResult, OptimizerSettings, fit
from autocompress.compress.quantize import bake_weights
from autocompress.spaces.candidate import Candidate
from autocompress.techniques import BuildContext, Section, by_stage, get, techniques


@dataclass(frozen=True)
class PipelineSettings:
    """Experiment-wide settings of the build (not searched): the fine-tune and each technique's section."""

    finetune_epochs: int = 3
    optimizer: OptimizerSettings = OptimizerSettings()
    batch_size: int = 64
    loss: Callable | None = F.cross_entropy  # the task's loss; None: distillation only
    distill_kind: str = "logits"  # the task's output kind: how the student is pulled to the teacher
    feature_layers: tuple[str, ...] = ()  # intermediate-feature distillation, off when empty
    feature_weight: float = 0.0
    seed: int = 0
    sections: dict[str, Section] | None = None  # technique name -> its config section; defaults if absent

    def section(self, technique: str) -> Section:
        """The config section of ``technique`` (its defaults when not given)."""
        if self.sections and technique in self.sections:
            return self.sections[technique]
        return get(technique).config_model()


@dataclass
class Compressed:
    """The compressed model, the deployment plan (bit-width of each of its layers), and its fine-tune history."""

    model: nn.Module
    bits: dict[str, int]
    fit: FitResult


def deployment_plan(model: nn.Module, candidate: Candidate) -> dict[str, int]:
    """Per-layer weight bit-widths of ``model`` built from ``candidate``, from every technique's plan."""
    plan: dict[str, int] = {}
    for technique in techniques():
        plan.update(technique.plan(model, candidate.get(technique.name)))
    return plan


def prepare_student(
    teacher: nn.Module,
    candidate: Candidate,
    example_input: torch.Tensor,
    settings: PipelineSettings,
    calibration_factory: Callable[[], object] | None = None,
) -> Compressed:
    """The candidate's architecture before fine-tuning: every technique applied but the fine-tune's.

    Its latency and size are already final (fine-tuning changes weights, not shapes), which lets a
    search measure them before spending the fine-tune. ``calibration_factory()`` supplies the
    training batches a technique may ask for (gradient-based pruning importance).
    """
    torch.manual_seed(settings.seed)
    student = copy.deepcopy(teacher).eval()

    def calibration(n: int) -> list:
        if calibration_factory is None:
            raise ValueError("this candidate needs calibration batches (e.g. taylor importance)")
        return list(itertools.islice(iter(calibration_factory()), n))

    ctx = BuildContext(example_input=example_input, calibration=calibration, loss=settings.loss)
    for technique in by_stage():
        values = candidate.get(technique.name)
        if technique.name in candidate.values:
            technique.apply(student, values, settings.section(technique.name), ctx)
    return Compressed(model=student, bits=deployment_plan(student, candidate), fit=FitResult())


def fit_options(candidate: Candidate) -> dict[str, Any]:
    """The fine-tune's keyword arguments the candidate's techniques set (KD temperature and weight)."""
    options: dict[str, Any] = {}
    for technique in techniques():
        options.update(technique.fit_options(candidate.get(technique.name)))
    return options


def finetune_student(
    student: Compressed,
    teacher: nn.Module,
    candidate: Candidate,
    train_batches: object,
    settings: PipelineSettings,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> Compressed:
    """Distillation fine-tune of a prepared student (through its parametrizations), then bake the weights.

    Seeds torch first: the data order and any adapter initialisation then depend on the seed alone,
    not on what ran between :func:`prepare_student` and here (a search measures the student's cost
    in between, a rebuild does not), so a rebuilt candidate is the searched one.
    """
    torch.manual_seed(settings.seed)
    history = fit(
        student.model,
        train_batches,
        epochs=settings.finetune_epochs,
        optimizer=settings.optimizer,
        loss=settings.loss,
        kind=settings.distill_kind,
        teacher=teacher,
        feature_layers=settings.feature_layers,
        feature_weight=settings.feature_weight,
        evaluate=evaluate,
        on_epoch=on_epoch,
        **fit_options(candidate),
    )
    bake_weights(student.model)
    return Compressed(model=student.model.eval(), bits=student.bits, fit=history)


def apply(
    teacher: nn.Module,
    candidate: Candidate,
    train_batches_factory: Callable[[], object],
    example_input: torch.Tensor,
    settings: PipelineSettings,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> Compressed:
    """Build the compressed model for ``candidate``; the teacher is not modified.

    ``train_batches_factory()`` returns the (shuffled) training batches; it is called after the
    seed is set so the data order is reproducible. ``evaluate``/``on_epoch`` are passed to the
    fine-tune loop (intermediate validation, early stopping).
    """
    student = prepare_student(teacher, candidate, example_input, settings, train_batches_factory)
    return finetune_student(
        student, teacher, candidate, train_batches_factory(), settings, evaluate=evaluate, on_epoch=on_epoch
    )
