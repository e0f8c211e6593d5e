"""Unstructured magnitude sparsity as a technique: per layer, the fraction of weights set to zero.

The smallest-magnitude weights of each chosen layer (L1, over the whole weight tensor) are zeroed
by a fixed mask the fine-tune keeps (a parametrization, baked away afterwards). Shapes do not
change and no CPU runtime used here has sparse kernels, so sparsity never counts toward latency
(:meth:`latency_choices` is ``None``): it only makes the deployed file compress better, which the
zipped artifact size measures. Written by hand because it is a mask and a ``kthvalue``: the
maintained pruning libraries are built around structured groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from autocompress.techniques.base import BuildContext, Discovery, Section, Stage, Technique, expand_to_layers


class SparsitySpace(Section):
    """Per-layer unstructured sparsity: the fraction of each layer's weights zeroed (by magnitude)."""

    enabled: bool = False  # opt-in: it shrinks the compressed file, never the latency on these runtimes
    fractions: list[float] = Field(default_factory=lambda: [0.0, 0.5, 0.75, 0.9], min_length=1)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, value: list[float]) -> list[float]:
        for f in value:
            if not 0.0 <= f < 1.0:
                raise ValueError(f"sparsity fraction {f} must be in [0, 1)")
        return sorted(set(value))


class WeightMask(nn.Module):
    """Multiplies a weight by a fixed 0/1 mask (kept through the fine-tune)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def magnitude_mask(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """A mask zeroing the ``fraction`` of ``weight``'s entries with the smallest magnitude."""
    k = int(round(fraction * weight.numel()))
    if k == 0:
        return torch.ones_like(weight)
    threshold = weight.detach().abs().flatten().kthvalue(k).values
    return (weight.detach().abs() > threshold).to(weight.dtype)


class MagnitudeSparsity(Technique):
    """Zeroed weights per layer (``sparsity/<layer>``: fraction of the layer's weights set to 0)."""

    name = "sparsity"
    config_key = "sparsity"
    config_model = SparsitySpace
    value_type = float
    neutral = 0.0
    stage = Stage.WEIGHTS
    changes_architecture = False

    def discover(self, section: SparsitySpace, found: Discovery) -> dict[str, tuple]:
        if not any(f > 0 for f in section.fractions):
            return {}
        return {name: tuple(section.fractions) for name in found.layers}

    def apply(self, model: nn.Module, values: Mapping[str, Any], section: SparsitySpace, ctx: BuildContext) -> None:
        modules = dict(model.named_modules())
        for name, fraction in expand_to_layers(model, values).items():
            if fraction > 0:
                module = modules[name]
                parametrize.register_parametrization(
                    module, "weight", WeightMask(magnitude_mask(module.weight, fraction))
                )

    def latency_choices(self, choices: tuple, kernel_bits: Iterable[int]) -> tuple | None:
        return None  # no sparse kernels: a sparse layer runs the dense kernel

    def describe(self, values: Mapping[str, Any]) -> str | None:
        sparse = [f for f in values.values() if f > 0]
        if not sparse:
            return None
        return f"sparse {min(sparse):g}-{max(sparse):g} ({len(sparse)}/{len(values)})"
