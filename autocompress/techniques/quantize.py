"""Weight quantization as a technique: per layer, the weight bit-width (32 = fp32).

During the fine-tune each layer trains through per-channel symmetric fake-quant at its width
(:mod:`autocompress.compress.quantize`); its bit-widths are the deployment plan a runtime reads
(8-bit layers run on int8 kernels where the runtime has them) and size accounting counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, field_validator
from torch import nn

from autocompress.compress.quantize import FP32, attach_weight_quant
from autocompress.techniques.base import (
    BuildContext,
    Discovery,
    Section,
    Stage,
    Technique,
    expand_to_layers,
)


class QuantizeSpace(Section):
    """Per-layer weight bit-width; 32 means the layer stays in fp32."""

    enabled: bool = True
    bits: list[int] = Field(default_factory=lambda: [32, 8, 4], min_length=1)
    calibration_batches: int = Field(default=4, ge=1, description="training batches that calibrate int8 ranges")

    @field_validator("bits")
    @classmethod
    def _supported_bits(cls, value: list[int]) -> list[int]:
        for b in value:
            if b != 32 and not 2 <= b <= 8:
                raise ValueError(f"bit-width {b} is not supported: use 2..8, or 32 for fp32")
        return sorted(set(value), reverse=True)


class WeightQuantization(Technique):
    """Per-layer weight bit-width (``bits/<layer>``: 2..8, or 32 for fp32)."""

    name = "bits"
    config_key = "quantize"
    config_model = QuantizeSpace
    value_type = int
    neutral = FP32
    stage = Stage.WEIGHTS
    # Shapes stay; the bit-width changes which kernels run, so it is part of the latency (see latency_choices).
    changes_architecture = False

    def enabled(self, section: QuantizeSpace) -> bool:
        return section.enabled and section.bits != [FP32]

    def discover(self, section: QuantizeSpace, found: Discovery) -> dict[str, tuple]:
        return {name: tuple(section.bits) for name in found.layers}

    def apply(self, model: nn.Module, values: Mapping[str, Any], section: QuantizeSpace, ctx: BuildContext) -> None:
        attach_weight_quant(model, self.plan(model, values))

    def plan(self, model: nn.Module, values: Mapping[str, Any]) -> dict[str, int]:
        return expand_to_layers(model, values)

    def latency_choices(self, choices: tuple, kernel_bits: Iterable[int]) -> tuple | None:
        # A width without kernels runs the fp32 kernels, so fp32 stands for all of them.
        kernels = set(kernel_bits) - {FP32}
        if not kernels:
            return None  # an fp32-only runtime runs every width on the same kernels
        return tuple(dict.fromkeys(b if b in kernels else FP32 for b in choices))

    def describe(self, values: Mapping[str, Any]) -> str | None:
        counts: dict[int, int] = {}
        for b in values.values():
            if b < FP32:
                counts[b] = counts.get(b, 0) + 1
        if not counts:
            return None
        return " ".join(f"int{b}x{n}" for b, n in sorted(counts.items(), reverse=True))
