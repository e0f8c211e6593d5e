"""Training with knowledge distillation: the KD loss and the fine-tune loop.

The loop is written here rather than taken from a trainer library because it is small and the
search needs two hooks no generic trainer gives together: a per-epoch validation callback
(for early stopping of hopeless trials) and a hard stop with a reason on a non-finite loss.
Teacher training is the same loop without a teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which epoch and step."""


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Hinton KD: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)``.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    when T changes. With ``alpha == 0`` or no teacher this is plain cross-entropy.
    """
    hard = F.cross_entropy(student_logits, targets)
    if teacher_logits is None or alpha == 0.0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    return alpha * soft + (1.0 - alpha) * hard


class FeatureDistiller(nn.Module):
    """Intermediate-feature distillation (FitNets): MSE between adapted student and teacher features.

    Forward hooks capture the outputs of the named layers in both models; a 1x1 convolution (or a
    Linear for 2-D outputs) maps the student's width to the teacher's, since pruning changes it.
    The adapters are trained with the student and discarded after the fine-tune.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[str], example: torch.Tensor) -> None:
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
            student(example)
            teacher(example)
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
            into[name] = output

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


def fit(
    model: nn.Module,
    train_batches: Iterable,
    *,
    epochs: int,
    lr: float,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    feature_layers: Sequence[str] = (),
    feature_weight: float = 0.0,
    weight_decay: float = 5e-4,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[int, float | None], None] | None = None,
) -> FitResult:
    """Train ``model`` in place with SGD (momentum 0.9, cosine schedule) and optional KD.

    With a teacher, ``alpha`` weighs the soft-target loss (:func:`kd_loss`) and
    ``feature_weight`` adds intermediate-feature distillation on ``feature_layers``
    (:class:`FeatureDistiller`). ``evaluate(model)`` runs after every epoch;
    ``on_epoch(epoch, metric)`` receives the result (it may raise to stop training, e.g. to prune
    a hopeless trial). Raises :class:`TrainingDiverged` on a non-finite loss.
    """
    result = FitResult()
    if epochs == 0:
        return result
    features = None
    if teacher is not None and feature_weight > 0 and feature_layers:
        teacher.eval()
        first_x, _ = next(iter(train_batches))
        features = FeatureDistiller(model, teacher, feature_layers, first_x[:2])
    params = [p for p in model.parameters() if p.requires_grad]
    if features is not None:
        params += list(features.adapters.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_batches)) if hasattr(train_batches, "__len__") else 1
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    if teacher is not None:
        teacher.eval()
    try:
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for step, (x, y) in enumerate(train_batches):
                teacher_logits = None
                if teacher is not None and (alpha > 0.0 or features is not None):
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                loss = kd_loss(model(x), teacher_logits, y, temperature, alpha)
                if features is not None:
                    loss = loss + feature_weight * features.loss()
                if not math.isfinite(loss.item()):
                    raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(y)
                count += len(y)
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
