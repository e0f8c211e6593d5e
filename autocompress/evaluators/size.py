"""Model size in bytes: the deployed artifact as stored (what ``size`` means), zipped, and an estimate from the
weights at their bit-width (for a plan no runtime has deployed)."""

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


def artifact_files(path: str | Path) -> tuple[Path, ...]:
    """The files a deployed artifact is stored in: ``path``, plus the external-data files an ONNX model names."""
    path = Path(path)
    if path.suffix != ".onnx":
        return (path,)
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    locations = {
        entry.value
        for init in graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return (path, *(path.parent / name for name in sorted(locations)))


def artifact_size_bytes(path: str | Path) -> int:
    """Bytes of a deployed artifact as stored (:func:`artifact_files`).

    This is the ``size`` a search scores: sub-8-bit weights count small only where the runtime's format
    really packs them (ORT ``MatMulNBits``), not where they are fp32 values on a coarse grid.
    """
    return sum(f.stat().st_size for f in artifact_files(path))


def compressed_size_bytes(path: str | Path) -> int:
    """Bytes of the file ``path`` zipped (DEFLATE, level 9): what a sparse or low-entropy deployed model
    costs to ship or store, where the plain file size cannot show it (no runtime here stores zeros sparsely)."""
    path = Path(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.write(path, arcname=path.name)
    return buffer.getbuffer().nbytes
