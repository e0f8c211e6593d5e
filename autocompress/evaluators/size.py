"""Model size in bytes: quantized weights at their bit-width plus per-channel scales, and a deployed file zipped."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (after any pruning)."""
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module, bits: dict[str, int] | None = None) -> int:
    """Bytes to store the model: fp32 tensors at 4 bytes per value, and for each layer named in
    ``bits`` with fewer than 32 bits its weight at ``bits`` per value (packed) plus one fp32
    scale per output channel. Float buffers (e.g. BatchNorm statistics) count at 4 bytes.
    """
    bits = bits or {}
    total = 0
    for module_name, module in model.named_modules():
        b = bits.get(module_name, 32)
        for param_name, param in module.named_parameters(recurse=False):
            if param_name in ("weight", "parametrizations.weight.original") and b < 32:
                total += math.ceil(param.numel() * b / 8) + 4 * param.shape[0]
            else:
                total += 4 * param.numel()
        for buffer in module.buffers(recurse=False):
            if buffer.is_floating_point():
                total += 4 * buffer.numel()
    return total


def compressed_size_bytes(path: str | Path) -> int:
    """Bytes of the file ``path`` zipped (DEFLATE, level 9): what a sparse or low-entropy deployed model
    costs to ship or store, where the plain file size cannot show it (no runtime here stores zeros sparsely)."""
    path = Path(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.write(path, arcname=path.name)
    return buffer.getbuffer().nbytes
