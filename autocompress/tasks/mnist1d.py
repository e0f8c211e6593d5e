"""Built-in ``mnist1d`` task: the MNIST-1D benchmark, generated offline, and a 1-D CNN.

Data comes from the ``mnist1d`` package's generator (``make_dataset``), never its downloader,
so the task works without network access and is identical for a given ``data_seed``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.tasks.digits import stratified_datasets


class MNIST1DCNN(nn.Module):
    """Three 1-D conv stages then a flatten into a two-layer classifier (length 40 -> 10)."""

    def __init__(self, width: int = 32, hidden: int = 128, length: int = 40, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv1d(1, w, 5, padding=2),
                relu1=nn.ReLU(inplace=True),
                conv2=nn.Conv1d(w, 2 * w, 3, stride=2, padding=1),
                relu2=nn.ReLU(inplace=True),
                conv3=nn.Conv1d(2 * w, 2 * w, 3, stride=2, padding=1),
                relu3=nn.ReLU(inplace=True),
            )
        )
        reduced = (length + 3) // 4
        self.fc1 = nn.Linear(2 * w * reduced, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.features(x).flatten(1))))


def mnist1d_task(
    num_samples: int = 5000,
    width: int = 32,
    hidden: int = 128,
    data_seed: int = 42,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    split_seed: int = 0,
):
    """The ``mnist1d`` task: ``num_samples`` generated sequences of length 40, 10 classes."""
    from mnist1d.data import get_dataset_args, make_dataset

    from autocompress.tasks.base import Task

    if num_samples < 100:
        raise AutocompressError(f"task args: num_samples={num_samples} must be >= 100")
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = data_seed
    args.train_split = 1.0  # we split ourselves, stratified, into train/val/test
    data = make_dataset(args)
    x = np.asarray(data["x"], dtype=np.float32)[:, None, :]
    y = np.asarray(data["y"], dtype=np.int64)
    train, val, test = stratified_datasets(x, y, val_fraction, test_fraction, split_seed)
    length = x.shape[-1]
    return Task(
        name="mnist1d",
        build_model=lambda: MNIST1DCNN(width=width, hidden=hidden, length=length),
        train=train,
        val=val,
        test=test,
        input_shape=(1, length),
        num_classes=10,
        info={"samples": len(y), "source": "mnist1d.data.make_dataset (generated)"},
    )
