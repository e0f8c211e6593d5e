"""Real int8 deployment with ONNX Runtime: export, static QDQ quantization, a runner the evaluators accept.

Flow: :func:`export_onnx` (TorchScript exporter, opset 17, BatchNorm folded into the preceding Conv by
constant folding) -> ``quant_pre_process`` (ORT's shape inference and graph clean-up) -> ``quantize_static``
in QDQ format, calibrated with MinMax on real task batches: weights int8 symmetric per output channel,
activations uint8 asymmetric per tensor. ORT's CPU provider fuses each ``DequantizeLinear -> Conv ->
QuantizeLinear`` group into ``QLinearConv`` (Gemm into ``QGemm``, MatMul into ``QLinearMatMul``), which are
real int8 kernels; :func:`runtime_int8_layers` reads ORT's own optimized graph to prove it. An int8 kernel's
output is int8 too, after the BatchNorm and ReLU fused into it: the consumer of an int8 layer sees a
quantized input even when it runs fp32, and an int8 last layer returns logits on 256 levels.
:func:`autocompress.compress.quantize.attach_activation_quant` simulates exactly this in torch.

Why uint8 activations (QUInt8) rather than int8: the x86 integer dot-product instructions the CPU kernels use
(AVX2 ``vpmaddubsw``, VNNI ``vpdpbusd``) multiply unsigned by signed bytes; after a ReLU the range is
``[0, max]``, which uint8 covers with zero point 0; and torch's ``quint8`` observers mirror it directly.
With asymmetric ranges both types have 256 levels, so accuracy is the same, and on a CPU with VNNI the
speed is the same too.

Only 8 bits has kernels in ORT CPU. Layers asked for 2..7 bits are left fp32 in the deployed graph (their
weights are the already rounded values, so accuracy matches the simulation, but nothing runs faster); their
bit-width only counts toward model size. :class:`Deployment` says which layers really run int8.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from autocompress.compress.quantize import (
    ACTIVATION_QUANTIZABLE,
    FP32,
    attach_weight_quant,
    batch_inputs,
    int8_weight_qmax,
    plain_copy,
)
from autocompress.runtimes.regions import quantized_regions

INT8 = 8
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "output"
COMPUTE_OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
"""ONNX ops that carry a layer's weights; ORT quantizes them unless excluded."""
INT8_OP_TYPES = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
    }
)
"""ONNX / ORT-contrib ops that compute with 8-bit integer inputs."""
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]
"""ORT (>= 1.20) would quantize, per tensor, the float weights of any Conv/Gemm whose input comes from a
DequantizeLinear, i.e. silently run int8 a layer kept fp32 next to int8 ones. Disabled in every session."""


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """Export ``model`` (eval mode) to ONNX at ``path`` with a dynamic batch axis; return the path.

    A copy is exported, with fake-quant wrappers baked into plain weights and activation fake-quant
    removed: ORT quantizes the graph itself. The TorchScript exporter is used (``dynamo=False``) because it
    folds BatchNorm into Conv and names nodes after module scopes (``/features/conv1/conv/Conv``), which
    :func:`onnx_nodes_for` relies on. Single-input, single-output models only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = plain_copy(model).eval()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated on every call; it is chosen on purpose (see above).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            plain,
            (example_input,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


def node_module(node_name: str) -> str:
    """The torch module a TorchScript-exported node belongs to: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``.

    The exporter writes one path component per module scope; children of containers appear qualified with
    the parent's attribute (``layer1.0``), so only the part after the last dot is the attribute. Nodes
    outside any module (and nodes added later without a scope path) belong to ``""``.
    """
    if not node_name.startswith("/"):
        return ""
    scopes = node_name.split("/")[1:-1]
    return ".".join(scope.rsplit(".", 1)[-1] for scope in scopes)


def onnx_nodes_for(onnx_path: str | Path, module_names: Iterable[str]) -> dict[str, list[str]]:
    """ONNX node names of each torch module (its own nodes and those of its submodules).

    Raises ``ValueError`` naming a module that owns no node (a typo, or a module unused in ``forward``).
    """
    nodes = [node.name for node in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    owners = {name: node_module(name) for name in nodes}
    found: dict[str, list[str]] = {}
    for module in dict.fromkeys(module_names):
        found[module] = [n for n, owner in owners.items() if owner == module or owner.startswith(module + ".")]
        if not found[module]:
            example = next((n for n in nodes if n.startswith("/")), "none")
            raise ValueError(f"module {module!r} has no node in {onnx_path} (node names look like {example!r})")
    return found


class _Batches(CalibrationDataReader):
    """Feeds task batches to ORT's calibrator as ``{input name: float32 array}``."""

    def __init__(self, input_name: str, inputs: Iterable[torch.Tensor]) -> None:
        self._inputs = iter(inputs)
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._inputs, None)
        if x is None:
            return None
        return {self._input_name: x.detach().cpu().numpy().astype(np.float32, copy=False)}


def _quantize(
    fp32_path: Path, out_path: Path, calibration_batches: Iterable, exclude_nodes: list[str], per_channel: bool
) -> Path:
    inputs = batch_inputs(calibration_batches)
    first = next(inputs, None)
    if first is None:
        raise ValueError("quantize: calibration_batches is empty")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autocompress-ort-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        reader = _Batches(input_name, itertools.chain([first], inputs))
        quantize_static(
            str(pre),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            # 7-bit weights where the int8 kernels would saturate (the simulation uses the same range).
            reduce_range=int8_weight_qmax() < 127,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude_nodes,
            # No "CalibMaxIntermediateOutputs": ORT's MinMax calibrator keeps only a per-batch ReduceMin/ReduceMax
            # of each tensor, so memory is not the issue, and in ORT 1.32 that option gave narrower ranges than
            # the global min/max, breaking parity with the torch observers.
        )
    fold_fp32_constants(out_path, set(exclude_nodes))
    return out_path


def fold_fp32_constants(onnx_path: Path, fp32_nodes: set[str]) -> int:
    """Give the fp32 nodes that read a ``DequantizeLinear`` of a constant the float value instead.

    ``quantize_static`` quantizes the bias of an int8 Conv, and the exporter shares identical
    constants between layers (two zero biases become one initializer), so a Conv told to stay fp32
    can end up reading its bias through a ``DequantizeLinear`` too. ORT then sees a Conv whose bias is
    computed at run time, cannot pre-pack it into its blocked NCHWc layout and falls back to a plain
    ``FusedConv``, much slower than the pre-packed one.
    The float value is the dequantized one ORT computed anyway, so the numbers do not change. A
    ``DequantizeLinear`` left without readers is removed. Rewrites ``onnx_path`` in place; returns the
    number of fp32 nodes rewired.
    """
    model = onnx.load(str(onnx_path))
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    rewired, dropped = 0, []
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or not all(name in constants for name in node.input if name):
            continue
        users = [user for user in readers.get(node.output[0], []) if user.name in fp32_nodes]
        if not users:
            continue
        values = [onnx.numpy_helper.to_array(constants[name]) for name in node.input if name]
        q, scale = values[0].astype(np.float64), values[1].astype(np.float64)
        zero = values[2].astype(np.float64) if len(values) > 2 else np.zeros_like(scale)
        if scale.ndim == 1 and q.ndim > 0:  # per-axis: line the scale up with its axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        name = f"{node.output[0]}_fp32"
        graph.initializer.append(onnx.numpy_helper.from_array(((q - zero) * scale).astype(np.float32), name))
        for user in users:
            user.input[:] = [name if i == node.output[0] else i for i in user.input]
            rewired += 1
        if len(users) == len(readers[node.output[0]]) and node.output[0] not in outputs:
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    if rewired:
        onnx.save(model, str(onnx_path))
    return rewired


def session_options(threads: int = 1) -> ort.SessionOptions:
    """ORT CPU options for measurement: ``threads`` intra-op threads, one inter-op thread, sequential, all
    graph optimizations (the QDQ -> integer-kernel fusions are among them)."""
    if threads < 1:
        raise ValueError(f"threads={threads}: need at least 1")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _session(onnx_path: str | Path, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
    )


def optimized_graph(onnx_path: str | Path, threads: int = 1) -> onnx.ModelProto:
    """The graph ORT actually executes for ``onnx_path`` with :func:`session_options` (kernels fused)."""
    options = session_options(threads)
    # ORT warns that a graph optimized at this level is hardware specific; that is the point here.
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="autocompress-ort-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        _session(onnx_path, options)
        return onnx.load(options.optimized_model_filepath)


def runtime_int8_layers(onnx_path: str | Path, threads: int = 1) -> list[str]:
    """Torch modules that own an integer kernel in the graph ORT executes, in graph order."""
    graph = optimized_graph(onnx_path, threads).graph
    owners = [node_module(node.name) for node in graph.node if node.op_type in INT8_OP_TYPES]
    return list(dict.fromkeys(owners))


class OrtModel:
    """An ONNX model run by ONNX Runtime (CPU), callable like an ``nn.Module`` in eval mode.

    ``threads`` is fixed when the session is created (ORT cannot change it later), so the ``threads``
    argument of :func:`autocompress.evaluators.latency.measure_latency` has no effect here: construct the
    model with the thread count to measure. ``eval``/``train(False)``/``training`` exist so the evaluators
    work unchanged; ``train(True)`` raises, an ORT graph cannot be trained.
    """

    training = False

    def __init__(self, onnx_path: str | Path, threads: int = 1) -> None:
        self.path = Path(onnx_path)
        self.threads = threads
        self.session = _session(self.path, session_options(threads))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])

    def eval(self) -> OrtModel:
        """No-op (inference only); returns self like ``nn.Module.eval``."""
        return self

    def train(self, mode: bool = True) -> OrtModel:
        """No-op for ``mode=False``; ``mode=True`` raises ``ValueError``."""
        if mode:
            raise ValueError(f"{self.path}: an ONNX Runtime model cannot be put in training mode")
        return self

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, threads={self.threads})"


@dataclass(frozen=True)
class Deployment:
    """A deployed model and what runs how.

    ``int8_layers`` own an integer kernel in the graph ORT executes (checked, not assumed);
    ``fp32_layers`` are all other Conv/Linear layers. ``no_kernel_layers`` (a subset of ``fp32_layers``)
    were asked for 2..7 bits: ORT CPU has no such kernels, so they run fp32 on their rounded weights and
    their bit-width counts toward model size only.
    """

    model: OrtModel
    onnx_path: Path
    int8_layers: tuple[str, ...]
    fp32_layers: tuple[str, ...]
    no_kernel_layers: tuple[str, ...]


def outside_int8_regions(graph: onnx.GraphProto, int8_modules: set[str]) -> list[str]:
    """Names of the non-compute nodes (pools, adds, reshapes, ...) whose region borders no int8 layer.

    The region rule is :func:`autocompress.runtimes.regions.quantized_regions`, on the graph's nodes
    (Conv/Gemm/MatMul are the layers, named by their module) and its tensors. ORT's quantizer
    quantizes such ops wherever the graph has any int8 layer: a global average pool between two
    fp32 layers of the digits CNN became Quantize -> QLinearGlobalAveragePool -> Dequantize, slower
    than the fp32 pool and a rounding the simulation does not have. Excluding them keeps
    quantization to the int8 layers and their immediate surroundings.
    """
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    layers = [node_module(node.name) if node.op_type in COMPUTE_OP_TYPES else None for node in nodes]
    edges = [(producer[t], i) for i, node in enumerate(nodes) for t in node.input if t in producer]
    quantized = quantized_regions(layers, edges, int8_modules)
    return [node.name for i, node in enumerate(nodes) if layers[i] is None and i not in quantized]


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def deploy(
    model: nn.Module,
    bits: dict[str, int],
    example_input: torch.Tensor,
    calibration_batches: Iterable,
    workdir: str | Path,
    threads: int = 1,
) -> Deployment:
    """Export ``model`` to ONNX in ``workdir`` and, if any layer has 8 bits, quantize those layers to int8.

    ``bits`` maps Conv/Linear layer names to 32 (fp32) or 2..8; layers not named stay fp32. Only the
    8-bit layers are quantized (every other Conv/Gemm/MatMul node is excluded); the activations between
    int8 layers stay int8 through pooling and reshapes. The weights of all layers below 32 bits are first
    rounded per channel in a copy, as :func:`~autocompress.compress.quantize.attach_weight_quant` does (a
    no-op on a model whose weights are already baked; ORT's own int8 rounding of them is then exact too),
    so ORT calibrates and computes with the weights the simulation scored. Writes ``model.fp32.onnx`` and,
    when quantizing, ``model.int8.onnx``. Batches are input tensors or ``(input, target)`` pairs. Raises
    ``ValueError`` naming an unknown layer or an unsupported bit-width.
    """
    layers = [name for name, m in model.named_modules() if isinstance(m, ACTIVATION_QUANTIZABLE)]
    for name, b in bits.items():
        if name not in layers:
            raise ValueError(f"deploy: bits names {name!r}, which is not a Conv/Linear layer of the model")
        if b != FP32 and not 2 <= b <= INT8:
            raise ValueError(f"deploy: layer {name!r} has bits={b}; use 2..8, or 32 for fp32")
    workdir = Path(workdir)
    rounded = plain_copy(model)
    attach_weight_quant(rounded, {name: b for name, b in bits.items() if b < FP32})
    fp32_path = export_onnx(rounded, example_input, workdir / "model.fp32.onnx")
    wanted = {name for name, b in bits.items() if b == INT8}
    path = fp32_path
    if wanted:
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        exclude = [n.name for n in graph.node if n.op_type in COMPUTE_OP_TYPES and node_module(n.name) not in wanted]
        exclude += outside_int8_regions(graph, wanted)
        path = _quantize(fp32_path, workdir / "model.int8.onnx", calibration_batches, exclude, per_channel=True)
    int8 = set(runtime_int8_layers(path, threads)) if wanted else set()
    return Deployment(
        model=OrtModel(path, threads),
        onnx_path=path,
        int8_layers=tuple(name for name in layers if name in int8),
        fp32_layers=tuple(name for name in layers if name not in int8),
        no_kernel_layers=tuple(name for name in layers if 2 <= bits.get(name, FP32) < INT8),
    )
