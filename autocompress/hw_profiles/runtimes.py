"""The runtimes a profile can describe, behind one small interface.

A runtime turns a (compressed, plain) model into the operator signatures it executes and runs the
whole model end to end (units for isolated timing come from :mod:`.eager` and :mod:`.onnx_graph`). The torch
eager runtime reads signatures from the model's structure alone (milliseconds); ONNX Runtime's
come from the graph ORT optimizes after deployment (see :mod:`.onnx_graph`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.evaluators.latency import torch_threads
from autocompress.hw_profiles import eager, onnx_graph
from autocompress.hw_profiles.profile import OpSignature

Timed = Callable[[], object]


@dataclass(frozen=True)
class Runtime:
    """One runtime: its name, what has real kernels, and how to read, run and time models on it."""

    name: str
    dtypes: tuple[str, ...]
    kernel_bits: tuple[int, ...]

    @property
    def int8_kernels(self) -> bool:
        """Whether 8-bit layers run integer kernels here (and so are a latency dimension)."""
        return "int8" in self.dtypes

    def signatures(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> list[OpSignature]:
        """The operator signatures ``model`` executes, in order."""
        if self.name == "torch-eager":
            return eager.eager_signatures(model, tuple(example_input.shape))
        return [sig for sig, _ in onnx_graph.model_units(model, example_input, bits, threads)]

    @contextmanager
    def end_to_end(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> Iterator[Timed]:
        """A callable running the whole model once (the deployed ONNX model for ORT), valid in the block."""
        if self.name == "torch-eager":
            if any(p.is_inference() for p in model.parameters()):
                # Such a model runs a few % faster than a loaded one: timing it would flatter the profile.
                raise ValueError("torch-eager: timing a model whose parameters were created in inference mode")
            model.eval()
            yield lambda: model(example_input)
            return
        with tempfile.TemporaryDirectory(prefix="autocompress-profile-") as tmp:
            yield onnx_graph.model_callable(model, example_input, bits, threads, Path(tmp))

    @contextmanager
    def timing(self, threads: int) -> Iterator[None]:
        """The process state measurements run in: torch intra-op threads fixed (and inference mode for eager;
        not for ORT, whose deployment exports the model, which inference tensors would break)."""
        with torch_threads(threads):
            if self.name == "torch-eager":
                with torch.inference_mode():
                    yield
            else:
                yield


RUNTIMES = {
    "torch-eager": Runtime("torch-eager", ("fp32",), (32,)),
    "onnxruntime": Runtime("onnxruntime", ("fp32", "int8"), (32, 8)),
}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; :class:`AutocompressError` naming the known ones otherwise."""
    if name not in RUNTIMES:
        raise AutocompressError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]
