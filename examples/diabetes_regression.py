"""A user task for regression: sklearn's diabetes data (ships with scikit-learn), an MLP, MSE.

Use it from an experiment file as ``task: {name: examples.diabetes_regression:task}`` (run from the
repository root, or put this directory on ``PYTHONPATH``). The metric is the validation MSE on
standardised targets: lower is better, and no range is assumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from autocompress.tasks import Task


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return F.mse_loss(outputs, targets).item()


def task(hidden: int = 64, seed: int = 0) -> Task:
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.25, random_state=seed)

    def split(xs, ys) -> TensorDataset:
        return TensorDataset(
            torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.float32)[:, None]
        )

    return Task(
        name="diabetes",
        build_model=lambda: MLP(x.shape[1], hidden),
        train=split(x_train, y_train),
        val=split(x_val, y_val),
        test=split(x_test, y_test),
        loss=F.mse_loss,
        metric=mse,
        metric_name="mse",
        higher_is_better=False,
        output_kind="regression",  # students are distilled by MSE to the teacher's predictions
        finetune_defaults={"optimizer": "adamw", "lr": 1e-3},
    )
