"""Tasks: a model factory, train/val/test data and a metric, bundled as a :class:`Task`.

Built-in tasks generate or ship their data (nothing is downloaded). A user task is any
``package.module:function`` that takes the experiment's ``task.args`` as keyword arguments
and returns a :class:`Task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocompress.errors import AutocompressError
from autocompress.evaluators.accuracy import top1_accuracy
from autocompress.refs import import_callable

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


def _builtin_tasks() -> dict[str, Callable[..., Task]]:
    from autocompress.tasks.digits import digits_task
    from autocompress.tasks.mnist1d import mnist1d_task

    return {"digits": digits_task, "mnist1d": mnist1d_task}


BUILTIN_TASKS: tuple[str, ...] = ("digits", "mnist1d")


def resolve_task_factory(name: str) -> Callable[..., Task]:
    """The factory for a built-in task name or a ``package.module:function`` reference."""
    if name in BUILTIN_TASKS:
        return _builtin_tasks()[name]
    return import_callable(name, f"task {name!r}")


def load_task(name: str, args: dict[str, Any] | None = None) -> Task:
    """Build the task ``name`` with keyword ``args``; errors name the task and the problem."""
    factory = resolve_task_factory(name)
    try:
        task = factory(**(args or {}))
    except TypeError as err:
        raise AutocompressError(f"task {name!r}: bad task.args ({err})") from None
    if not isinstance(task, Task):
        raise AutocompressError(
            f"task {name!r}: the function must return autocompress.tasks.Task, got {type(task).__name__}"
        )
    return task
