"""The :class:`Task` a search runs on (kept apart from the task registry so built-in tasks can import it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocompress.evaluators.accuracy import top1_accuracy

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class Task:
    """Everything task-specific a search needs; the rest of autocompress is task-agnostic.

    ``build_model`` returns a freshly initialised (untrained) model; ``input_shape`` is the
    shape of one sample without the batch dimension; ``metric(logits, targets)`` is higher-better.
    """

    name: str
    build_model: Callable[[], nn.Module]
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    metric: Metric = top1_accuracy
    metric_name: str = "accuracy"
    info: dict[str, Any] = field(default_factory=dict)

    def loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        """A DataLoader over ``split`` ('train', 'val' or 'test').

        Shuffling draws from torch's global generator, so ``torch.manual_seed`` fixes the order.
        """
        datasets = {"train": self.train, "val": self.val, "test": self.test}
        if split not in datasets:
            raise ValueError(f"unknown split {split!r}: use one of {sorted(datasets)}")
        return DataLoader(datasets[split], batch_size=batch_size, shuffle=shuffle)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A deterministic input of the task's shape (for tracing and latency measurement)."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn((batch_size, *self.input_shape), generator=generator)
