"""Structured pruning as a technique: one ratio per Torch-Pruning dependency group.

The dependency graph (:mod:`autocompress.compress.prune`) finds groups of coupled layers; a
group's ratio removes that fraction of its output channels and every coupled input. An attention
module's q/k/v projections form a head group (``prune/<attention module>``) whose ratio removes that
fraction of its heads, whole; a transformer's residual stream is not searched, and discovery says so
once on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from autocompress.compress.prune import analyse, prune, useful_ratios
from autocompress.techniques.base import BuildContext, Discovery, ParameterError, Section, Stage, Technique


class PruneSpace(Section):
    """Per-group structured pruning: the fraction of output channels/neurons removed."""

    enabled: bool = True
    ratios: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75], min_length=1)
    # Kernels run fastest on channel counts that are multiples of 8 (SIMD width): keep them so.
    round_to: int = Field(default=8, ge=1)
    importance: Literal["l1", "l2", "taylor"] = "l1"
    calibration_batches: int = Field(default=4, ge=1, description="batches of training data for taylor importance")

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value: list[float]) -> list[float]:
        for ratio in value:
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"pruning ratio {ratio} must be in [0, 1)")
        return sorted(set(value))


class StructuredPruning(Technique):
    """Channels removed per dependency group (``prune/<group>``: fraction removed)."""

    name = "prune"
    config_key = "prune"
    config_model = PruneSpace
    value_type = float
    neutral = 0.0
    stage = Stage.STRUCTURE
    changes_architecture = True

    def discover(self, section: PruneSpace, found: Discovery) -> dict[str, tuple]:
        choices: dict[str, tuple] = {}
        analysis = analyse(found.model, found.example_input)
        for name, reason in analysis.excluded.items():
            if found.selects(name):
                print(f"prune: not searching {name}: {reason}", file=sys.stderr)
        for group in analysis.groups:
            if not found.selects(group.name):
                continue
            offered = useful_ratios(group.channels, section.ratios, section.round_to, heads=group.is_heads)
            if any(r > 0 for r in offered):
                choices[group.name] = tuple(offered)
        return choices

    def apply(self, model: nn.Module, values: Mapping[str, Any], section: PruneSpace, ctx: BuildContext) -> None:
        calibration, loss = None, {}
        if section.importance == "taylor":
            if ctx.loss is None:
                raise ParameterError(
                    "space.prune.importance 'taylor' needs the task's loss, and this task has none: use l1 or l2"
                )
            calibration = ctx.calibration(section.calibration_batches)
            loss = {"loss": ctx.loss}
        prune(
            model,
            dict(values),
            ctx.example_input,
            round_to=section.round_to,
            importance=section.importance,
            calibration=calibration,
            **loss,
        )

    def describe(self, values: Mapping[str, Any]) -> str | None:
        ratios = [r for r in values.values() if r > 0]
        if not ratios:
            return None
        return f"prune {min(ratios):g}-{max(ratios):g} ({len(ratios)}/{len(values)})"

    def summary(self, section: PruneSpace) -> dict[str, Any]:
        return {"round_to": section.round_to, "importance": section.importance}
