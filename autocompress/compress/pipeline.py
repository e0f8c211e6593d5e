"""Apply a :class:`~autocompress.spaces.Candidate` to a teacher: the one place the order lives.

Order: copy teacher -> prune (dependency graph, channels removed) -> low-rank factorization of
the pruned layers -> attach weight fake-quant (a factorized layer's bit-width applies to each of
its factors) -> distillation fine-tune (trains through the quantizer) -> bake quantized weights. The result
is an ordinary ``nn.Module``; the same candidate, teacher, data and seed give the same model.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.compress.distill import FitResult, fit
from autocompress.compress.lowrank import Factorized, factorize
from autocompress.compress.prune import prune
from autocompress.compress.quantize import attach_weight_quant, bake_weights
from autocompress.spaces.candidate import Candidate


@dataclass(frozen=True)
class PipelineSettings:
    """Experiment-wide settings of the transforms (not searched)."""

    finetune_epochs: int = 3
    finetune_lr: float = 0.02
    batch_size: int = 64
    round_to: int = 8
    importance: str = "l1"
    calibration_batches: int = 4  # training batches for gradient-based (taylor) importance
    feature_layers: tuple[str, ...] = ()  # intermediate-feature distillation, off when empty
    feature_weight: float = 0.0
    seed: int = 0


@dataclass
class Compressed:
    """The compressed model, the bit-width of each of its layers, and its fine-tune history."""

    model: nn.Module
    bits: dict[str, int]
    fit: FitResult


def layer_bits(model: nn.Module, bits: dict[str, int]) -> dict[str, int]:
    """``bits`` keyed by the model's actual layers: a factorized layer's entry covers its factors."""
    modules = dict(model.named_modules())
    result = {}
    for name, b in bits.items():
        module = modules.get(name)
        if isinstance(module, Factorized):
            result.update({f"{name}.{child}": b for child, _ in module.named_children()})
        else:
            result[name] = b
    return result


def prepare_student(
    teacher: nn.Module,
    candidate: Candidate,
    example_input: torch.Tensor,
    settings: PipelineSettings,
    calibration_factory: Callable[[], object] | None = None,
) -> Compressed:
    """The candidate's architecture before fine-tuning: pruned, factorized, weight quantizers attached.

    Its latency and size are already final (fine-tuning changes weights, not shapes), which lets a
    search measure them before spending the fine-tune. ``calibration_factory()`` supplies the
    batches gradient-based (taylor) pruning needs.
    """
    torch.manual_seed(settings.seed)
    student = copy.deepcopy(teacher).eval()
    calibration = None
    if settings.importance == "taylor":
        if calibration_factory is None:
            raise ValueError("taylor importance needs calibration batches")
        calibration = list(itertools.islice(iter(calibration_factory()), settings.calibration_batches))
    prune(
        student,
        candidate.prune,
        example_input,
        round_to=settings.round_to,
        importance=settings.importance,
        calibration=calibration,
    )
    factorize(student, {k: f for k, f in candidate.rank.items() if f < 1}, example_input)
    bits = layer_bits(student, candidate.bits)
    attach_weight_quant(student, bits)
    return Compressed(model=student, bits=bits, fit=FitResult())


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
    """Distillation fine-tune of a prepared student (through its quantizers), then bake the weights.

    Seeds torch first: the data order and any adapter initialisation then depend on the seed alone,
    not on what ran between :func:`prepare_student` and here (a search measures the student's cost
    in between, a rebuild does not), so a rebuilt candidate is the searched one.
    """
    torch.manual_seed(settings.seed)
    history = fit(
        student.model,
        train_batches,
        epochs=settings.finetune_epochs,
        lr=settings.finetune_lr,
        teacher=teacher,
        temperature=candidate.kd_temperature,
        alpha=candidate.kd_alpha,
        feature_layers=settings.feature_layers,
        feature_weight=settings.feature_weight,
        evaluate=evaluate,
        on_epoch=on_epoch,
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
