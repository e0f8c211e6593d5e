"""The :class:`Task` a search runs on (kept apart from the task registry so built-in tasks can import it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocompress import inputs as pytree
from autocompress.evaluators.accuracy import top1_accuracy

Metric = Callable[[torch.Tensor, torch.Tensor], float]
"""``metric(outputs, targets) -> float`` over a whole split (outputs and targets concatenated)."""
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, targets) -> scalar tensor`` for one batch (what the teacher and the fine-tune minimise)."""
OutputKind = Literal["logits", "embedding", "regression"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "embedding", "regression")


@dataclass(frozen=True)
class Task:
    """Everything task-specific a search needs; the rest of autocompress is task-agnostic.

    ``build_model`` returns the model: freshly initialised, or with ``pretrained=True`` already
    trained (a teacher with ``teacher.epochs: 0`` is then used as it is). Datasets yield
    ``(inputs, target)`` where inputs are a tensor, a tuple or a dict of tensors (any dtype, see
    :mod:`autocompress.inputs`). ``loss(outputs, targets)`` is minimised (default cross-entropy);
    ``metric(outputs, targets)`` is the score, named ``metric_name``, better when higher if
    ``higher_is_better`` (no range is assumed). ``output_kind`` picks how a student is distilled:
    ``logits`` Hinton KD, ``embedding`` cosine distance to the teacher's output, ``regression`` MSE
    to it. ``finetune_defaults`` are the task's suggested fine-tune settings (e.g.
    ``{"optimizer": "adamw", "lr": 5e-5}``), used where the experiment does not set them.
    """

    name: str
    build_model: Callable[[], nn.Module]
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...] | None = None  # informational: one sample's shape, for single-tensor inputs
    num_classes: int | None = None
    metric: Metric = top1_accuracy
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    loss: Loss = F.cross_entropy
    output_kind: OutputKind = "logits"
    pretrained: bool = False
    finetune_defaults: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"Task {self.name!r}: output_kind={self.output_kind!r}; use one of {OUTPUT_KINDS}")

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize``: how the metric is optimised."""
        return "maximize" if self.higher_is_better else "minimize"

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int | None = None) -> DataLoader:
        """A DataLoader over ``split`` ('train', 'val' or 'test').

        With ``seed``, shuffling draws from a generator of its own seeded with it, so the order of every
        epoch is fixed whatever else uses torch's random numbers (dropout, other loaders); without it,
        shuffling draws from torch's global generator (``torch.manual_seed`` fixes the order).
        """
        datasets = {"train": self.train, "val": self.val, "test": self.test}
        if split not in datasets:
            raise ValueError(f"unknown split {split!r}: use one of {sorted(datasets)}")
        generator = torch.Generator().manual_seed(seed) if shuffle and seed is not None else None
        return DataLoader(datasets[split], batch_size=batch_size, shuffle=shuffle, generator=generator)

    def example_input(self, batch_size: int = 1) -> pytree.Inputs:
        """Real inputs for tracing, export and latency measurement: the first ``batch_size`` validation
        samples (repeated if the split is smaller), with the structure and dtypes the model is fed."""
        first = next(iter(self.loader("val", batch_size)))
        return pytree.repeat_to(pytree.split_batch(first)[0], batch_size)
