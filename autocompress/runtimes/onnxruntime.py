"""ONNX Runtime on the CPU: fp32, plus real int8 kernels for 8-bit layers.

Deployment is :func:`autocompress.compress.deploy.deploy` (export, static QDQ int8 of the 8-bit
layers, only the int8 regions quantized); profile units are the nodes of the graph ORT optimizes
(:mod:`autocompress.hw_profiles.onnx_graph`), learned into the profile's unit map
(:mod:`autocompress.hw_profiles.ort_map`) so predictions need not deploy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from autocompress.compress import deploy as ort_deploy
from autocompress.hw_profiles import onnx_graph, ort_map
from autocompress.hw_profiles.profile import UnitVariant
from autocompress.inputs import Inputs
from autocompress.runtimes.base import ProfileUnit, Runtime, register


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider (int8 kernels for 8-bit layers, fp32 otherwise)."""

    name = "onnxruntime"
    package = "onnxruntime"
    kernel_bits = (32, ort_deploy.INT8)

    def version(self) -> str:
        return ort.__version__

    def device(self) -> str:
        return "CPU (int8 kernels for 8-bit layers, fp32 otherwise)"

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
    ) -> ort_deploy.OrtModel:
        """The ORT session of ``model`` deployed in ``workdir`` (``model.fp32.onnx``, and
        ``model.int8.onnx`` when a layer has 8 bits; ``modes``: static or dynamic int8 per layer, see
        :func:`autocompress.compress.deploy.deploy`); ``threads`` is fixed in the session."""
        return ort_deploy.deploy(model, bits, example_input, calibration, workdir, threads, modes=modes).model

    def int8_layers(self, runnable: ort_deploy.OrtModel, model: nn.Module) -> list[str]:
        """The modules owning an integer kernel in the graph ORT optimized for ``runnable``."""
        return ort_deploy.runtime_int8_layers(runnable.path, runnable.threads, ort_deploy.ModuleIndex.of(model))

    def artifact(self, runnable: ort_deploy.OrtModel, workdir: str | Path) -> Path:
        """The ONNX file the session runs (``model.int8.onnx`` when a layer is int8)."""
        return runnable.path

    def units(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> list[ProfileUnit]:
        """The nodes of ``model``'s optimized deployed graph, each runnable as a one-node model."""
        return [
            ProfileUnit(sig, partial(onnx_graph.unit_callable, unit, threads), unit)
            for sig, unit in onnx_graph.model_units(model, example_input, bits, threads)
        ]

    def learn(
        self,
        unit_map: dict[str, list[UnitVariant]],
        model: nn.Module,
        input_shape: Sequence[int],
        bits: dict[str, int] | None,
        units: Sequence[ProfileUnit],
    ) -> int:
        return ort_map.learn(unit_map, model, input_shape, bits, [(unit.signature, unit.source) for unit in units])


register(OnnxRuntime())
