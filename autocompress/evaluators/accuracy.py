"""A model's metric on a data split, with the task's metric function (any metric, not only accuracy)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from autocompress import inputs as pytree


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose highest logit is the target class."""
    return (logits.argmax(dim=1) == targets).float().mean().item()


def predict(model: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated primary outputs and targets of ``model`` (in eval mode) over ``(inputs, target)`` batches."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    with torch.inference_mode():
        for batch in batches:
            x, y = pytree.split_batch(batch)
            outputs.append(pytree.forward(model, x))
            targets.append(y)
    model.train(was_training)
    return torch.cat(outputs), pytree.cat(targets)


def evaluate(
    model: nn.Module,
    batches: Iterable,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = top1_accuracy,
) -> float:
    """The metric of ``model`` over a whole split (not a mean of per-batch values)."""
    logits, targets = predict(model, batches)
    return float(metric(logits, targets))
