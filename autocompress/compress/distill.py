"""Training with knowledge distillation: the KD loss and the fine-tune loop.

The loop is written here rather than taken from a trainer library because it is small and the
search needs two hooks no generic trainer gives together: a per-epoch validation callback
(for early stopping of hopeless trials) and a hard stop with a reason on a non-finite loss.
Teacher training is the same loop without a teacher.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from autocompress import inputs as pytree

DISTILL_KINDS = ("logits", "embedding", "regression")
OPTIMIZERS = ("sgd", "adamw")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which epoch and step."""


def soft_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "logits", temperature: float = 1.0
) -> torch.Tensor:
    """The distillation term for the output ``kind``.

    ``logits``: Hinton's ``T^2 * KL(teacher_T || student_T)`` (the T^2 factor keeps the soft-target
    gradients on the scale of the hard-label ones when T changes). ``embedding``: mean cosine distance
    ``1 - cos(student, teacher)`` over the last dimension (direction is what embeddings are compared
    by). ``regression``: mean squared error to the teacher's output.
    """
    if kind == "logits":
        t = temperature
        return F.kl_div(
            F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
        ) * (t * t)
    if kind == "embedding":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "regression":
        return F.mse_loss(student, teacher)
    raise ValueError(f"distillation kind {kind!r}: use one of {DISTILL_KINDS}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = F.cross_entropy,
    kind: str = "logits",
) -> torch.Tensor:
    """``alpha * soft + (1 - alpha) * loss(student, targets)``, ``soft`` from :func:`soft_loss`.

    With ``alpha == 0`` or no teacher this is the task's ``loss`` alone (default cross-entropy, so
    Hinton KD on logits by default). A task without a loss of its own (``loss=None``, e.g. embedding
    distillation) is trained on the distillation term alone, whatever ``alpha``.
    """
    if teacher_logits is None or (alpha == 0.0 and loss is not None):
        if loss is None:
            raise ValueError("the task has no loss of its own: it can only be trained by distillation from a teacher")
        return loss(student_logits, targets)
    soft = soft_loss(student_logits, teacher_logits, kind, temperature)
    if loss is None:
        return soft
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * loss(student_logits, targets)


class FeatureDistiller(nn.Module):
    """Intermediate-feature distillation (FitNets): MSE between adapted student and teacher features.

    Forward hooks capture the outputs of the named layers in both models; a 1x1 convolution (or a
    Linear for 2-D outputs) maps the student's width to the teacher's, since pruning changes it.
    The adapters are trained with the student and discarded after the fine-tune.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[str], example: pytree.Inputs) -> None:
        super().__init__()
        s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
        unknown = [name for name in layers if name not in s_modules or name not in t_modules]
        if unknown:
            raise ValueError(f"feature distillation: no layer named {', '.join(map(repr, unknown))}")
        self.layers = list(layers)
        self.student_features: dict[str, torch.Tensor] = {}
        self.teacher_features: dict[str, torch.Tensor] = {}
        self._hooks = [
            s_modules[name].register_forward_hook(self._store(self.student_features, name)) for name in layers
        ] + [t_modules[name].register_forward_hook(self._store(self.teacher_features, name)) for name in layers]
        with torch.no_grad():
            pytree.call(student, example)
            pytree.call(teacher, example)
        self.adapters = nn.ModuleDict(
            {
                self._key(name): self._adapter(self.student_features[name], self.teacher_features[name])
                for name in layers
            }
        )

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys cannot contain dots

    @staticmethod
    def _store(into: dict[str, torch.Tensor], name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            into[name] = pytree.primary_output(output)

        return hook

    @staticmethod
    def _adapter(student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
        if student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"feature distillation: shapes {tuple(student.shape)} and {tuple(teacher.shape)} differ")
        s, t = student.shape[1], teacher.shape[1]
        if student.dim() == 2:
            return nn.Linear(s, t, bias=False)
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[student.dim()]
        return conv(s, t, 1, bias=False)

    def loss(self) -> torch.Tensor:
        """Mean over layers of the MSE between adapted student features and (fixed) teacher features."""
        losses = [
            F.mse_loss(self.adapters[self._key(n)](self.student_features[n]), self.teacher_features[n].detach())
            for n in self.layers
        ]
        return torch.stack(losses).mean()

    def remove(self) -> None:
        """Remove the forward hooks from both models."""
        for handle in self._hooks:
            handle.remove()


@dataclass
class FitResult:
    """Per-epoch history of a fit: mean training loss and (if evaluated) validation metric."""

    train_loss: list[float] = field(default_factory=list)
    val_metric: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer of a fit: ``sgd`` (momentum 0.9, Nesterov) or ``adamw``; learning rate, weight decay,
    and a linear warm-up over the first ``warmup`` fraction of the steps before the cosine decay."""

    name: str = "sgd"
    lr: float = 0.02
    weight_decay: float = 5e-4
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r}: use one of {OPTIMIZERS}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup}: a fraction of the steps in [0, 1)")

    def build(
        self, params: list, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer over ``params`` and its per-step schedule (warm-up, then cosine to zero)."""
        if self.name == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay)
        warm = int(self.warmup * total_steps)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    train_batches: Iterable,
    *,
    epochs: int,
    lr: float | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    feature_layers: Sequence[str] = (),
    feature_weight: float = 0.0,
    weight_decay: float | None = None,
    optimizer: OptimizerSettings | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = F.cross_entropy,
    kind: str = "logits",
    evaluate: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> FitResult:
    """Train ``model`` in place (default SGD with momentum 0.9 and a cosine schedule) with optional KD.

    ``optimizer`` chooses the optimizer, learning rate, weight decay and warm-up (``lr`` and
    ``weight_decay``, when given, override its values). Batches are ``(inputs, target)`` with inputs
    of any structure (:mod:`autocompress.inputs`). ``loss(outputs, targets)`` is the task's loss; with a
    teacher, ``alpha`` weighs the distillation term of the output ``kind`` (:func:`kd_loss`) and
    ``feature_weight`` adds intermediate-feature distillation on ``feature_layers``
    (:class:`FeatureDistiller`). ``evaluate(model)`` runs after every epoch; ``on_epoch(epoch, metric)``
    receives the result (it may raise to stop training, e.g. to prune a hopeless trial). Raises
    :class:`TrainingDiverged` on a non-finite loss.
    """
    result = FitResult()
    if epochs == 0:
        return result
    settings = optimizer or OptimizerSettings()
    overrides = {k: v for k, v in {"lr": lr, "weight_decay": weight_decay}.items() if v is not None}
    if overrides:
        settings = dataclasses.replace(settings, **overrides)
    features = None
    if teacher is not None and feature_weight > 0 and feature_layers:
        teacher.eval()
        first_x, _ = pytree.split_batch(next(iter(train_batches)))
        features = FeatureDistiller(model, teacher, feature_layers, pytree.take(first_x, 2))
    params = [p for p in model.parameters() if p.requires_grad]
    if features is not None:
        params += list(features.adapters.parameters())
    steps_per_epoch = max(1, len(train_batches)) if hasattr(train_batches, "__len__") else 1
    opt, scheduler = settings.build(params, epochs * steps_per_epoch)
    distilling = teacher is not None and (alpha > 0.0 or features is not None or loss is None)
    if teacher is not None:
        teacher.eval()
    try:
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for step, batch in enumerate(train_batches):
                x, y = pytree.split_batch(batch)
                teacher_out = None
                if distilling:
                    with torch.no_grad():
                        teacher_out = pytree.forward(teacher, x)
                value = kd_loss(pytree.forward(model, x), teacher_out, y, temperature, alpha, loss=loss, kind=kind)
                if features is not None:
                    value = value + feature_weight * features.loss()
                if not math.isfinite(value.item()):
                    raise TrainingDiverged(f"loss became {value.item()} at epoch {epoch + 1}, step {step + 1}")
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                scheduler.step()
                n = pytree.batch_size(x)
                total += value.item() * n
                count += n
            result.train_loss.append(total / max(count, 1))
            metric = evaluate(model) if evaluate is not None else None
            if metric is not None:
                result.val_metric.append(metric)
            if on_epoch is not None:
                on_epoch(epoch + 1, metric)
    finally:
        if features is not None:
            features.remove()
    model.eval()
    return result
