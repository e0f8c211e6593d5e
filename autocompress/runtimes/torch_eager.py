"""Torch eager fp32: the compressed model runs as it is.

Bit-widths below 32 only round weights here (no integer kernels), so they count toward size, never
toward latency. Profile units come from the model's structure (:mod:`autocompress.hw_profiles.eager`),
each rebuilt from its signature to be timed alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from autocompress.hw_profiles import eager
from autocompress.hw_profiles.profile import OpSignature
from autocompress.inputs import Inputs, call
from autocompress.runtimes.base import ProfileUnit, Runtime, Timed, register


def _unit_callable(sig: OpSignature) -> Timed:
    module, inputs = eager.build_unit(sig)
    return lambda: module(*inputs)


class TorchEager(Runtime):
    """PyTorch eager mode on the CPU, fp32 kernels only."""

    name = "torch-eager"
    aliases = ("torch",)  # the config's spelling before runtimes had one name
    package = "torch"
    kernel_bits = (32,)
    structural = True

    def version(self) -> str:
        return torch.__version__

    def device(self) -> str:
        return "eager fp32"

    def deploy(
        self,
        model: nn.Module,
        bits: dict[str, int],
        example_input: Inputs,
        calibration: Iterable,
        workdir: str | Path,
        threads: int = 1,
        *,
        modes: dict[str, str] | None = None,
    ) -> nn.Module:
        """The model itself (its weights already carry any rounding; ``modes`` mean nothing here); no files."""
        return model

    def units(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> list[ProfileUnit]:
        """The eager units of ``model`` from its structure alone (``bits`` and ``threads`` change nothing)."""
        sigs = eager.eager_signatures(model, tuple(example_input.shape))
        return [ProfileUnit(sig, partial(_unit_callable, sig)) for sig in sigs]

    @contextmanager
    def end_to_end(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> Iterator[Timed]:
        """``model(example_input)`` in eval mode."""
        if any(p.is_inference() for p in model.parameters()):
            # Such a model runs faster than a loaded one: timing it would flatter the profile.
            raise ValueError(f"{self.name}: timing a model whose parameters were created in inference mode")
        model.eval()
        yield lambda: call(model, example_input)

    @contextmanager
    def timing(self, threads: int) -> Iterator[None]:
        """Torch threads fixed and inference mode, as a deployed eager model runs."""
        with super().timing(threads), torch.inference_mode():
            yield


register(TorchEager())
