"""Low-rank factorization as a technique: per layer, the rank as a fraction of full rank.

Linear layers by truncated SVD, convolutions by Tucker-2 (:mod:`autocompress.compress.lowrank`);
it runs on the pruned model, and only fractions that lower a layer's MACs are offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator
from torch import nn

from autocompress.compress.lowrank import factorizable_layers, factorize, layer_input_shapes, useful_rank_fractions
from autocompress.techniques.base import BuildContext, Discovery, Section, Stage, Technique


class LowRankSpace(Section):
    """Per-layer low-rank factorization (SVD / Tucker-2); rank as a fraction of full rank."""

    enabled: bool = False  # opt-in: on small CNNs at batch 1 the extra layers can cost more than they save
    fractions: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25], min_length=1)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, value: list[float]) -> list[float]:
        for f in value:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"rank fraction {f} must be in (0, 1]")
        return sorted(set(value))


class LowRank(Technique):
    """Factorized layers (``rank/<layer>``: fraction of full rank, 1 = not factorized)."""

    name = "rank"
    config_key = "lowrank"
    config_model = LowRankSpace
    value_type = float
    neutral = 1.0
    stage = Stage.FACTORIZE
    changes_architecture = True

    def discover(self, section: LowRankSpace, found: Discovery) -> dict[str, tuple]:
        modules = dict(found.model.named_modules())
        shapes = layer_input_shapes(found.model, found.example_input)
        choices: dict[str, tuple] = {}
        for name in factorizable_layers(found.model):
            if found.selects(name):
                offered = useful_rank_fractions(modules[name], section.fractions, shapes.get(name))
                if any(f < 1 for f in offered):
                    choices[name] = tuple(offered)
        return choices

    def apply(self, model: nn.Module, values: Mapping[str, Any], section: LowRankSpace, ctx: BuildContext) -> None:
        factorize(model, {k: f for k, f in values.items() if f < 1}, ctx.example_input)

    def describe(self, values: Mapping[str, Any]) -> str | None:
        factorized = [f for f in values.values() if f < 1]
        if not factorized:
            return None
        return f"lowrank {min(factorized):g}-{max(factorized):g} ({len(factorized)}/{len(values)})"
