"""Built-in ``digits`` task: scikit-learn's bundled 8x8 digits, upsampled to 32x32, and a CNN.

``model: cnn`` (default) is the plain CNN below; ``model: mobilenet`` is the MobileNetV2-style
network of :mod:`autocompress.models.mobilenet` (depthwise convolutions, inverted residuals).
The CNN is sized so that its batch-1 latency at one thread is dominated by convolution compute
rather than framework overhead (a near-empty network of the same depth is several times faster),
so pruning shows up as real speed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from autocompress.errors import AutocompressError


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, batch norm, ReLU: the unit that deployment runtimes fuse."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(inplace=True),
            )
        )


class DigitsCNN(nn.Module):
    """Five conv stages (width w, 2w, 2w, 4w, 4w), global pooling, a two-layer classifier."""

    def __init__(self, width: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            OrderedDict(
                conv1=ConvBNReLU(1, w),
                conv2=ConvBNReLU(w, 2 * w),
                pool1=nn.MaxPool2d(2),
                conv3=ConvBNReLU(2 * w, 2 * w),
                conv4=ConvBNReLU(2 * w, 4 * w),
                pool2=nn.MaxPool2d(2),
                conv5=ConvBNReLU(4 * w, 4 * w),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(4 * w, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc2(self.relu(self.fc1(x)))


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), stratify=y_rest, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def stratified_datasets(
    x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Stratified train/val/test split of float inputs and integer labels into TensorDatasets."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AutocompressError(
            f"task args: val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
            "and sum to less than 1"
        )
    parts = _split(x, y, val_fraction, test_fraction, seed)
    return tuple(
        TensorDataset(torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.long))
        for xs, ys in parts
    )


MODELS = ("cnn", "mobilenet")


def digits_task(
    model: str = "cnn",
    width: int = 32,
    hidden: int = 64,
    image_size: int = 32,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
):
    """The ``digits`` task: 1797 images, 10 classes, stratified 60/20/20 split by default.

    ``model`` picks the network (:data:`MODELS`); ``width`` is the CNN's first-stage or the
    MobileNet's stem channels, ``hidden`` the CNN's classifier width (the MobileNet's head has
    ``8 * width`` channels).
    """
    from autocompress.models.mobilenet import mobilenet_v2_small
    from autocompress.tasks.base import Task

    if model not in MODELS:
        raise AutocompressError(f"task args: model={model!r} is not one of {', '.join(MODELS)}")
    if width < 1 or hidden < 1 or image_size < 8:
        raise AutocompressError(
            f"task args: width={width}, hidden={hidden} must be >= 1 and image_size={image_size} >= 8"
        )
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    train, val, test = stratified_datasets(images.numpy(), bunch.target, val_fraction, test_fraction, split_seed)
    return Task(
        name="digits",
        build_model=(
            (lambda: DigitsCNN(width=width, hidden=hidden))
            if model == "cnn"
            else (lambda: mobilenet_v2_small(in_channels=1, num_classes=10, width=width, last_channels=8 * width))
        ),
        train=train,
        val=val,
        test=test,
        input_shape=(1, image_size, image_size),
        num_classes=10,
        info={"samples": len(bunch.target), "source": "sklearn.datasets.load_digits", "model": model},
    )
