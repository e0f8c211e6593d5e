"""Weight quantization simulated during search: per-channel symmetric fake-quant per layer.

A torch parametrization wraps each chosen layer's weight in ``torch.fake_quantize_per_channel_affine``
(a core op with a straight-through gradient), so the distillation fine-tune trains *through*
the quantization (QAT) and the scored accuracy is the quantized model's. :func:`bake_weights`
removes the wrappers and leaves the rounded weights in plain fp32 modules.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

FP32 = 32


class PerChannelWeightFakeQuant(nn.Module):
    """Symmetric per-output-channel fake quantization of a weight to ``bits`` (2..8)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits={bits}: fake-quant supports 2..8 bits")
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        reduce_dims = tuple(range(1, weight.dim()))
        # Scale from the current weight (detached: the op has no gradient w.r.t. scale).
        scale = weight.detach().abs().amax(dim=reduce_dims).clamp_min(1e-12) / self.qmax
        zero_point = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -self.qmax, self.qmax)


def attach_weight_quant(model: nn.Module, bits: dict[str, int]) -> list[str]:
    """Wrap the weight of each named layer whose bit-width is below 32; return the wrapped names."""
    modules = dict(model.named_modules())
    wrapped = []
    for name, b in bits.items():
        if b >= FP32:
            continue
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        parametrize.register_parametrization(module, "weight", PerChannelWeightFakeQuant(b))
        wrapped.append(name)
    return wrapped


def bake_weights(model: nn.Module) -> None:
    """Replace fake-quant wrappers by the quantized weights they produce (in place)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
