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

Besides static QDQ, an 8-bit layer can run *dynamic* int8 (``modes={layer: "dynamic"}``): ORT's
``quantize_dynamic`` stores its weight int8 per channel and quantizes its input at run time
(``DynamicQuantizeLinear -> MatMulInteger``, fused by ORT into ``DynamicQuantizeMatMul`` or
``MatMulIntegerToFloat``); no calibration, and the natural choice for transformers, whose activation
ranges vary per input. Only Linear layers have a dynamic int8 kernel.

Sub-8-bit weights: a Linear layer asked for 4 bits is stored packed, block-wise int4 weight-only, in ORT's
``MatMulNBits`` (it computes in fp32 on weights unpacked in the kernel), so the file really shrinks. Other
layers asked for 2..7 bits (a Conv at 4 bits, any layer at 5..7) have no packed format: they are left fp32
in the deployed graph (their weights are the already rounded values, so accuracy matches the simulation,
but nothing runs faster or ships smaller). :class:`Deployment` says which layers run int8 and which are
packed; :func:`deployed_size_bytes` counts the artifact's bytes.

Inputs may be any :mod:`autocompress.inputs` pytree (one tensor, a tuple, a dict such as ``input_ids`` /
``attention_mask``, any dtype); graph inputs are named by :func:`autocompress.inputs.input_names`.
"""

from __future__ import annotations

import itertools
import tempfile
import types
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from autocompress import inputs as pytree
from autocompress.compress.quantize import (
    ACTIVATION_QUANTIZABLE,
    FP32,
    attach_weight_quant,
    batch_inputs,
    int8_weight_qmax,
    plain_copy,
)
from autocompress.evaluators.size import artifact_files, artifact_size_bytes
from autocompress.inputs import Inputs
from autocompress.runtimes.regions import is_data_movement, quantized_regions

INT8 = 8
PACKED_BITS = 4
"""Sub-8-bit width stored packed (``MatMulNBits``) for Linear layers."""
PACKED_BLOCK = 32
"""Weights per int4 block (along the input features) of a packed layer, each block with its own scale."""
STATIC = "static"
DYNAMIC = "dynamic"
MODES = (STATIC, DYNAMIC)
"""How an 8-bit layer runs int8: calibrated QDQ (static) or activations quantized at run time (dynamic)."""
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
PACKED_OP_TYPES = frozenset({"MatMulNBits"})
"""ORT-contrib ops that hold a layer's weight packed below 8 bits."""
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]
"""ORT (>= 1.20) would quantize, per tensor, the float weights of any Conv/Gemm whose input comes from a
DequantizeLinear, i.e. silently run int8 a layer kept fp32 next to int8 ones. Disabled in every session."""


def export_onnx(model: nn.Module, example_input: Inputs, path: str | Path) -> Path:
    """Export ``model`` (eval mode) to ONNX at ``path`` with dynamic batch (and sequence) axes; return the path.

    ``example_input`` is any :mod:`autocompress.inputs` pytree; the graph inputs are named by
    :func:`~autocompress.inputs.input_names` (``input`` for one tensor, the keys of a dict), each with a
    dynamic batch axis and, for integer inputs of two or more dimensions (token ids, masks), a dynamic
    sequence axis. The one graph output ``output`` is the model's primary output
    (:func:`~autocompress.inputs.primary_output`: a Hugging Face ``ModelOutput``'s first value).

    A copy is exported, with fake-quant wrappers baked into plain weights and activation fake-quant
    removed: ORT quantizes the graph itself. The TorchScript exporter is used (``dynamo=False``) because it
    folds BatchNorm into Conv and names nodes after module scopes (``/features/conv1/conv/Conv``), which
    :func:`node_module` relies on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = plain_copy(model).eval()
    names = pytree.input_names(example_input)
    args = tuple(pytree.flat(example_input))
    for name, arg in zip(names, args, strict=True):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"export_onnx: input {name!r} is a {type(arg).__name__}, expected a tensor")
    _flatten_forward(plain, example_input)
    with torch.no_grad():
        output = plain(*args)
    sequence = {int(a.shape[1]) for a in args if a.dim() >= 2 and not a.is_floating_point()}
    axes: dict[str, dict[int, str]] = {}
    for name, arg in zip(names, args, strict=True):
        axes[name] = {0: "batch"}
        if arg.dim() >= 2 and not arg.is_floating_point():
            axes[name][1] = "sequence"
    # A per-token output (last_hidden_state) follows the sequence axis; a pooled one has none.
    axes[OUTPUT_NAME] = {0: "batch", **({1: "sequence"} if output.dim() >= 3 and output.shape[1] in sequence else {})}
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated on every call; it is chosen on purpose (see above).
        # Tracing a Hugging Face model warns about Python control flow on shapes, fixed for the traced
        # ranks only: the dynamic axes above are the ones that stay free.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            plain,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )
    return path


def _flatten_forward(module: nn.Module, example_input: Inputs) -> None:
    """Make ``module`` (a private copy) take the example's tensors positionally and return its primary output.

    Set on the instance rather than by wrapping it in another module: a wrapper would add a scope to every
    node name (``/model/encoder/...``) and move every module name one level down.
    """
    original = type(module).forward
    keys = list(example_input) if isinstance(example_input, Mapping) else None
    single = isinstance(example_input, torch.Tensor)

    def forward(self: nn.Module, *tensors: torch.Tensor) -> torch.Tensor:
        if keys is not None:
            return pytree.primary_output(original(self, **dict(zip(keys, tensors, strict=True))))
        if single:
            return pytree.primary_output(original(self, tensors[0]))
        return pytree.primary_output(original(self, *tensors))

    module.forward = types.MethodType(forward, module)


class ModuleIndex:
    """Resolves exporter scope paths against a model's real module names (``named_modules()``).

    The TorchScript exporter writes one path component per *called* module, each the module's name relative
    to the previous called one: ``/layer1/layer1.0/conv1/Conv`` (a Sequential calls its children) but
    ``/encoder/encoder/layer.0/attention/self/query/MatMul`` (a ``ModuleList`` is never called, so its child
    ``layer.0`` appears with the list's attribute). Reading the path alone cannot tell these apart; the
    model's names can: each component is the shallowest module below the previous one whose name ends
    with it.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(n for n in names if n)
        self._by_last: dict[str, list[str]] = {}
        for name in sorted(self.names, key=lambda n: n.count(".")):
            self._by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
        self._cache: dict[str, str] = {}

    @classmethod
    def of(cls, model: nn.Module) -> ModuleIndex:
        """The index of ``model``'s modules."""
        return cls(name for name, _ in model.named_modules())

    def owner(self, node_name: str) -> str:
        """The module the node named ``node_name`` belongs to (``""``: none); see :func:`node_module`."""
        if node_name not in self._cache:
            self._cache[node_name] = self._resolve(node_name)
        return self._cache[node_name]

    def _resolve(self, node_name: str) -> str:
        if not node_name.startswith("/"):
            return ""
        current = ""
        for scope in node_name.split("/")[1:-1]:
            prefix = current + "." if current else ""
            found = next(
                (
                    n
                    for n in self._by_last.get(scope.rsplit(".", 1)[-1], ())
                    if n.startswith(prefix) and (n == scope or n.endswith("." + scope))
                ),
                None,
            )
            # A scope no module has (a shared module's second call, "relu_1") keeps the exporter's spelling.
            current = found if found is not None else prefix + scope.rsplit(".", 1)[-1]
        return current


def node_module(node_name: str, modules: ModuleIndex | None = None) -> str:
    """The torch module a TorchScript-exported node belongs to: ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``.

    With ``modules`` (the model's :class:`ModuleIndex`) the scopes are resolved against the real module
    names, exact for any nesting (``ModuleList`` children included). Without it, the path is read alone:
    one component per module scope, children of containers qualified with the parent's attribute
    (``layer1.0``), so only the part after the last dot is the attribute; right for models whose
    containers are all called (``Sequential``), wrong under a ``ModuleList``. Nodes outside any module
    (and nodes added later without a scope path) belong to ``""``.
    """
    if modules is not None:
        return modules.owner(node_name)
    if not node_name.startswith("/"):
        return ""
    scopes = node_name.split("/")[1:-1]
    return ".".join(scope.rsplit(".", 1)[-1] for scope in scopes)


def onnx_nodes_for(
    onnx_path: str | Path, module_names: Iterable[str], modules: ModuleIndex | None = None
) -> dict[str, list[str]]:
    """ONNX node names of each torch module (its own nodes and those of its submodules).

    ``modules``: the model's :class:`ModuleIndex`, for exact names under any nesting (see :func:`node_module`).
    Raises ``ValueError`` naming a module that owns no node (a typo, or a module unused in ``forward``).
    """
    nodes = [node.name for node in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    owners = {name: node_module(name, modules) for name in nodes}
    found: dict[str, list[str]] = {}
    for module in dict.fromkeys(module_names):
        found[module] = [n for n, owner in owners.items() if owner == module or owner.startswith(module + ".")]
        if not found[module]:
            example = next((n for n in nodes if n.startswith("/")), "none")
            raise ValueError(f"module {module!r} has no node in {onnx_path} (node names look like {example!r})")
    return found


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def ort_feed(inputs: Inputs, names: list[str], dtypes: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
    """The ORT feed of a pytree for a graph with inputs ``names``: a dict by key, a tensor or tuple in order.

    Arrays are cast to ``dtypes[name]`` where given (the graph's declared types: int32 token ids into an
    int64 graph). A dict key the graph does not read is dropped (the exporter removes unused inputs); a
    graph input the batch lacks raises ``ValueError`` naming it.
    """
    if isinstance(inputs, Mapping):
        arrays = pytree.numpy_feed(inputs)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"ONNX graph input(s) {missing} not in the batch's keys {list(arrays)}")
        arrays = {n: arrays[n] for n in names}
    else:
        count = len(pytree.flat(inputs))
        if count != len(names):
            raise ValueError(f"batch has {count} input tensor(s), the ONNX graph takes {len(names)}: {names}")
        arrays = pytree.numpy_feed(inputs, names)
    for name, dtype in (dtypes or {}).items():
        if dtype is not None and name in arrays and arrays[name].dtype != dtype:
            arrays[name] = arrays[name].astype(dtype)
    return arrays


class _Batches(CalibrationDataReader):
    """Feeds task batches to ORT's calibrator as ``{input name: array}`` (every named graph input)."""

    def __init__(self, names: list[str], inputs: Iterable[Inputs], dtypes: Mapping[str, object]) -> None:
        self._inputs = iter(inputs)
        self._names = names
        self._dtypes = dtypes

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._inputs, None)
        if x is None:
            return None
        return ort_feed(x, self._names, self._dtypes)


def _graph_inputs(path: Path) -> tuple[list[str], dict[str, object]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in inputs}
    return [i.name for i in inputs], dtypes


def _pre_process(fp32_path: Path, out_path: Path) -> Path:
    """ORT's quantization pre-processing. Symbolic shape inference is skipped for a graph with integer
    inputs (token ids: the traced attention-mask arithmetic of a Hugging Face encoder defeats it, after a
    long try) and wherever else it cannot finish; ONNX's own shape inference still runs."""
    _, dtypes = _graph_inputs(fp32_path)
    if not any(np.issubdtype(np.dtype(d), np.integer) for d in dtypes.values()):
        try:
            quant_pre_process(str(fp32_path), str(out_path))
            return out_path
        except Exception:  # noqa: BLE001 - ORT raises a bare Exception("Incomplete symbolic shape inference")
            pass
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def _quantize(
    fp32_path: Path,
    out_path: Path,
    calibration_batches: Iterable,
    exclude_nodes: list[str],
    per_channel: bool,
    pre_processed: bool = False,
) -> Path:
    inputs = batch_inputs(calibration_batches)
    first = next(inputs, None)
    if first is None:
        raise ValueError("quantize: calibration_batches is empty")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autocompress-ort-") as tmp:
        pre = Path(fp32_path) if pre_processed else _pre_process(Path(fp32_path), Path(tmp) / "pre.onnx")
        names, dtypes = _graph_inputs(pre)
        reader = _Batches(names, itertools.chain([first], inputs), dtypes)
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
            # A Linear on token sequences exports as MatMul then a separate bias Add, which stays fp32 (a
            # barrier, see runtimes/regions.py): rounding its output to 8 bits would feed fp32 ops a rounded
            # value and save nothing; unquantized, ORT fuses it into MatMulIntegerToFloat (int8 in, fp32 out).
            # Conv and Gemm keep their int8 output (QLinearConv/QGemm), which the simulation mirrors.
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
            # No "CalibMaxIntermediateOutputs": ORT's MinMax calibrator keeps only a per-batch ReduceMin/ReduceMax
            # of each tensor, so memory is not the issue, and in ORT 1.32 that option gave narrower ranges than
            # the global min/max, breaking parity with the torch observers.
        )
    fold_fp32_constants(out_path, set(exclude_nodes))
    unround_fp32_readers(out_path, set(exclude_nodes))
    return out_path


def unround_fp32_readers(onnx_path: Path, fp32_nodes: set[str]) -> int:
    """Give fp32 nodes the float tensor back where ``quantize_static`` handed them its rounded copy.

    QDQ quantizes a tensor once for all its readers: the LayerNorm output a transformer's q/k/v Linears
    read is also the residual stream, and the fp32 residual ``Add`` would read it rounded to 8 bits. Here
    the fp32 readers of ``DequantizeLinear(QuantizeLinear(t))`` read ``t`` again, when ``t`` comes from an
    fp32 node or a graph input (the simulation rounds only the int8 layer's input). An int8 layer's own
    output is left alone: ORT computes it in int8, so it has no float value to give. Rewrites
    ``onnx_path`` in place; returns the number of inputs rewired.
    """
    model = onnx.load(str(onnx_path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    rewired = 0
    for node in graph.node:
        if node.name not in fp32_nodes:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = q.input[0]
            origin = producer.get(source)
            if source in graph_inputs or (origin is not None and origin.name in fp32_nodes):
                node.input[k] = source
                rewired += 1
    if rewired:
        onnx.save(model, str(onnx_path))
    return rewired


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


def _scope_of(node_name: str) -> str:
    # ORT renames what it fuses or adds ("fused /fc1/Gemm", "/fc1/MatMul_quant"): the scope path is still there.
    return node_name[node_name.find("/") :] if "/" in node_name else node_name


def runtime_int8_layers(onnx_path: str | Path, threads: int = 1, modules: ModuleIndex | None = None) -> list[str]:
    """Torch modules that own an integer kernel in the graph ORT executes, in graph order (static QDQ
    kernels and the dynamic ones, ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` / ``MatMulInteger``).

    ``modules``: the model's :class:`ModuleIndex`, for exact names under any nesting."""
    graph = optimized_graph(onnx_path, threads).graph
    owners = [node_module(_scope_of(node.name), modules) for node in graph.node if node.op_type in INT8_OP_TYPES]
    return list(dict.fromkeys(owners))


def packed_layers_of(onnx_path: str | Path, modules: ModuleIndex | None = None) -> list[str]:
    """Torch modules whose weight the ONNX file stores packed below 8 bits (``MatMulNBits``), in graph order."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    owners = [node_module(_scope_of(node.name), modules) for node in graph.node if node.op_type in PACKED_OP_TYPES]
    return list(dict.fromkeys(owners))


class OrtModel:
    """An ONNX model run by ONNX Runtime (CPU), callable like an ``nn.Module`` in eval mode.

    Called like the torch model: ``m(x)`` for a one-tensor graph, ``m(a, b)`` for positional inputs,
    ``m(input_ids=..., attention_mask=...)`` for named ones (:func:`ort_feed`; integers stay integers).
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
        if not inputs or len(outputs) != 1:
            raise ValueError(f"{self.path}: expected inputs and one output, got {len(inputs)} and {len(outputs)}")
        self.input_names = [i.name for i in inputs]
        self.input_name, self.output_name = self.input_names[0], outputs[0].name
        self.input_dtypes = {i.name: _ORT_DTYPES.get(i.type) for i in inputs}

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if kwargs and args:
            raise ValueError(f"{self.path}: pass the inputs positionally or by name, not both")
        batch: Inputs = kwargs if kwargs else args[0] if len(args) == 1 else args
        feed = ort_feed(batch, self.input_names, self.input_dtypes)
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])

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

    ``int8_layers`` own an integer kernel in the graph ORT executes (checked, not assumed), static or
    dynamic (``dynamic_layers``, a subset); ``fp32_layers`` are all other Conv/Linear layers.
    ``packed_layers`` (a subset of ``fp32_layers``: they compute in fp32) are stored packed below 8 bits
    in the file (read from it). ``no_kernel_layers`` (also a subset of ``fp32_layers``) were asked for
    2..7 bits and got neither kernel nor packing: they run fp32 on their rounded weights, stored fp32,
    so their bit-width saves nothing (:func:`deployed_size_bytes` counts the file).
    """

    model: OrtModel
    onnx_path: Path
    int8_layers: tuple[str, ...]
    fp32_layers: tuple[str, ...]
    no_kernel_layers: tuple[str, ...]
    dynamic_layers: tuple[str, ...] = ()
    packed_layers: tuple[str, ...] = ()
    files: tuple[Path, ...] = field(default=())
    """The artifact: the ONNX file and any external-data files next to it."""


def deployed_size_bytes(deployment: Deployment) -> int:
    """Bytes of the deployed artifact as stored: the ONNX file plus its external data, if any."""
    return artifact_size_bytes(deployment.onnx_path)


def _layer_nodes(graph: onnx.GraphProto) -> list[bool]:
    """Per node: whether it is a weight layer (a Conv/Gemm/MatMul whose weight is a constant)."""
    constants = {init.name for init in graph.initializer}
    return [
        node.op_type in COMPUTE_OP_TYPES and len(node.input) > 1 and node.input[1] in constants for node in graph.node
    ]


def outside_int8_regions(
    graph: onnx.GraphProto, int8_modules: set[str], modules: ModuleIndex | None = None
) -> list[str]:
    """Names of the layer-less nodes (pools, adds, reshapes, LayerNorm, Softmax, ...) left out of int8.

    The region rule is :func:`autocompress.runtimes.regions.quantized_regions` on the graph's nodes: the
    layers are the Conv/Gemm/MatMul nodes with a constant weight, named by their module; the other nodes
    that are not data movement (:func:`~autocompress.runtimes.regions.is_data_movement`) are barriers,
    among them the activation-by-activation MatMuls of attention. ORT's quantizer quantizes such ops
    wherever the graph has any int8 layer: a global average pool between two fp32 layers of the digits
    CNN became Quantize -> QLinearGlobalAveragePool -> Dequantize, slower than the fp32 pool and a
    rounding the simulation does not have. Excluding them keeps quantization to the int8 layers and the
    data movement between them.
    """
    nodes = list(graph.node)
    constants = {init.name for init in graph.initializer}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    is_layer = _layer_nodes(graph)
    layers = [node_module(node.name, modules) if is_layer[i] else None for i, node in enumerate(nodes)]
    barriers = [
        i
        for i, node in enumerate(nodes)
        if layers[i] is None and not is_data_movement(node.op_type, sum(name in constants for name in node.input))
    ]
    edges = [(producer[t], i) for i, node in enumerate(nodes) for t in node.input if t in producer]
    quantized = quantized_regions(layers, edges, int8_modules, barriers=barriers)
    return [node.name for i, node in enumerate(nodes) if layers[i] is None and i not in quantized]


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def gemm_to_matmul(model: onnx.ModelProto, node_names: Collection[str]) -> list[str]:
    """Rewrite the named ``Gemm`` nodes (a Linear on 2-D input) as ``MatMul`` + ``Add``, in place.

    ORT's dynamic int8 and packed int4 quantizers only rewrite ``MatMul`` with a constant weight. The new
    nodes keep the Gemm's scope path (``/fc1/Gemm`` -> ``/fc1/MatMul``, ``/fc1/Add``); returns the names of
    the MatMul nodes. A Gemm with ``alpha``/``beta`` other than 1 or a non-constant weight raises ``ValueError``.
    """
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    wanted, new_names = set(node_names), []
    nodes = []
    for node in graph.node:
        if node.op_type != "Gemm" or node.name not in wanted:
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            raise ValueError(f"gemm_to_matmul: {node.name!r} has attributes {attrs}; only a plain Linear is rewritten")
        if node.input[1] not in constants:
            raise ValueError(f"gemm_to_matmul: {node.name!r} has a computed weight {node.input[1]!r}")
        weight = onnx.numpy_helper.to_array(constants[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        weight_name = f"{node.input[1]}_matmul"
        graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        scope = node.name.rsplit("/", 1)[0]
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{scope}/MatMul_output_0" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight_name], [product], name=f"{scope}/MatMul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{scope}/Add"))
        new_names.append(f"{scope}/MatMul")
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread_initializers(graph)
    return new_names


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Remove the constants no node reads any more (replaced weights), so the file does not carry them."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _quantize_dynamic(path: Path, out_path: Path, nodes: list[str]) -> Path:
    quantize_dynamic(
        str(path),
        str(out_path),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        # Same saturation as static int8 on CPUs without VNNI (see int8_weight_qmax): 7-bit weights there.
        reduce_range=int8_weight_qmax() < 127,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=nodes,
        extra_options={"MatMulConstBOnly": True},
    )
    return out_path


def pack_int4(weight: np.ndarray, block_size: int = PACKED_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits`` storage of a ``[K, N]`` MatMul weight at 4 bits: packed codes ``uint8[N, blocks, block/2]``
    (two per byte, the even row in the low nibble, zero point 8) and scales ``float32[N * blocks]``.

    Symmetric per output column, one scale for all of a column's blocks: the weights were already rounded
    on exactly that grid (:class:`~autocompress.compress.quantize.PerChannelWeightFakeQuant` at 4 bits), so
    the codes reproduce them and the deployed layer computes what the simulation scored. Rows past ``K``
    pad the last block with code 8 (zero).
    """
    k, n = weight.shape
    qmax = 2 ** (PACKED_BITS - 1) - 1
    scale = np.abs(weight).max(axis=0).astype(np.float64) / qmax
    scale[scale == 0] = 1.0
    blocks = -(-k // block_size)
    codes = np.full((blocks * block_size, n), 2 ** (PACKED_BITS - 1), dtype=np.uint8)
    codes[:k] = (np.clip(np.rint(weight / scale), -qmax, qmax) + 2 ** (PACKED_BITS - 1)).astype(np.uint8)
    codes = codes.T.reshape(n, blocks, block_size)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, np.repeat(scale.astype(np.float32), blocks)


def _pack_int4(path: Path, out_path: Path, nodes: list[str]) -> Path:
    """Replace each named ``MatMul`` (constant 2-D weight) by ``com.microsoft.MatMulNBits`` at 4 bits."""
    model = onnx.load(str(path))
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    wanted = set(nodes)
    new_nodes = []
    for node in graph.node:
        weight = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if node.name not in wanted or weight is None or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        array = onnx.numpy_helper.to_array(weight).astype(np.float32)
        k, n = array.shape
        packed, scales = pack_int4(array)
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(packed, f"{node.input[1]}_Q4"),
                onnx.numpy_helper.from_array(scales, f"{node.input[1]}_scales"),
            ]
        )
        new_nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{node.input[1]}_Q4", f"{node.input[1]}_scales"],
                list(node.output),
                name=f"{node.name}_Q4",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=PACKED_BITS,
                block_size=PACKED_BLOCK,
            )
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    # The fp32 weights go unless something else still reads them (a weight shared with an fp32 layer).
    _drop_unread_initializers(graph)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return out_path


def _check_plan(
    layers: list[str], kinds: Mapping[str, nn.Module], bits: dict[str, int], modes: Mapping[str, str]
) -> None:
    for name, b in bits.items():
        if name not in layers:
            raise ValueError(f"deploy: bits names {name!r}, which is not a Conv/Linear layer of the model")
        if b != FP32 and not 2 <= b <= INT8:
            raise ValueError(f"deploy: layer {name!r} has bits={b}; use 2..8, or 32 for fp32")
    for name, mode in modes.items():
        if name not in layers:
            raise ValueError(f"deploy: modes names {name!r}, which is not a Conv/Linear layer of the model")
        if mode not in MODES:
            raise ValueError(f"deploy: layer {name!r} has mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == DYNAMIC and bits.get(name, FP32) != INT8:
            raise ValueError(f"deploy: layer {name!r} has mode 'dynamic' but bits={bits.get(name, FP32)}; it needs 8")
        if mode == DYNAMIC and not isinstance(kinds[name], nn.Linear):
            raise ValueError(f"deploy: layer {name!r} is a {type(kinds[name]).__name__}; only Linear runs dynamic int8")


def deploy(
    model: nn.Module,
    bits: dict[str, int],
    example_input: Inputs,
    calibration_batches: Iterable,
    workdir: str | Path,
    threads: int = 1,
    *,
    modes: Mapping[str, str] | None = None,
    pack: bool = True,
) -> Deployment:
    """Export ``model`` to ONNX in ``workdir`` and quantize its layers as ``bits`` (and ``modes``) ask.

    ``bits`` maps Conv/Linear layer names to 32 (fp32) or 2..8; layers not named stay fp32. An 8-bit layer
    runs int8 the way ``modes`` says (:data:`STATIC` by default: QDQ calibrated on ``calibration_batches``;
    :data:`DYNAMIC`: activations quantized at run time, Linear layers only). Only the static 8-bit layers
    and the data movement between them are statically quantized
    (:func:`~autocompress.runtimes.regions.quantized_regions`). With ``pack``, 4-bit Linear layers are
    stored packed (``MatMulNBits``). The weights of all layers below 32 bits are first rounded per channel
    in a copy, as :func:`~autocompress.compress.quantize.attach_weight_quant` does (a no-op on a model
    whose weights are already baked; ORT's own int8 rounding of them is then exact too), so ORT calibrates
    and computes with the weights the simulation scored. Writes ``model.fp32.onnx`` and, when quantizing,
    ``model.int8.onnx`` (``model.int4.onnx`` when only packing). ``example_input`` and the batches'
    inputs are :mod:`autocompress.inputs` pytrees; batches are inputs or ``(inputs, target)`` pairs.
    Raises ``ValueError`` naming an unknown layer, an unsupported bit-width or mode.
    """
    modes = dict(modes or {})
    kinds = {name: m for name, m in model.named_modules() if isinstance(m, ACTIVATION_QUANTIZABLE)}
    layers = list(kinds)
    _check_plan(layers, kinds, bits, modes)
    index = ModuleIndex.of(model)
    workdir = Path(workdir)
    rounded = plain_copy(model)
    attach_weight_quant(rounded, {name: b for name, b in bits.items() if b < FP32})
    fp32_path = export_onnx(rounded, example_input, workdir / "model.fp32.onnx")
    int8 = {name for name, b in bits.items() if b == INT8}
    dynamic = {name for name in int8 if modes.get(name, STATIC) == DYNAMIC}
    static = int8 - dynamic
    packed = (
        {name for name, b in bits.items() if b == PACKED_BITS and isinstance(kinds[name], nn.Linear)} if pack else set()
    )
    path = fp32_path
    if static or dynamic or packed:
        path = workdir / ("model.int8.onnx" if int8 else "model.int4.onnx")
        with tempfile.TemporaryDirectory(prefix="autocompress-ort-") as tmp:
            current = _pre_process(fp32_path, Path(tmp) / "pre.onnx")
            if dynamic or packed:
                proto = onnx.load(str(current))
                gemms = [
                    n.name for n in proto.graph.node if n.op_type == "Gemm" and index.owner(n.name) in dynamic | packed
                ]
                if gemms:
                    gemm_to_matmul(proto, gemms)
                    onnx.save(proto, str(current))
            graph = onnx.load(str(current), load_external_data=False).graph
            compute = [n for n, layer in zip(graph.node, _layer_nodes(graph), strict=True) if layer]
            if static:
                exclude = [
                    n.name for n in graph.node if n.op_type in COMPUTE_OP_TYPES and index.owner(n.name) not in static
                ]
                exclude += outside_int8_regions(graph, static, index)
                current = _quantize(current, Path(tmp) / "static.onnx", calibration_batches, exclude, True, True)
            if dynamic:
                nodes = [n.name for n in compute if n.op_type == "MatMul" and index.owner(n.name) in dynamic]
                current = _quantize_dynamic(current, Path(tmp) / "dynamic.onnx", nodes)
            if packed:
                nodes = [n.name for n in compute if n.op_type == "MatMul" and index.owner(n.name) in packed]
                current = _pack_int4(current, Path(tmp) / "packed.onnx", nodes)
            onnx.save(onnx.load(str(current)), str(path))
    runs_int8 = set(runtime_int8_layers(path, threads, index)) if int8 else set()
    stored_packed = set(packed_layers_of(path, index)) if packed else set()
    return Deployment(
        model=OrtModel(path, threads),
        onnx_path=path,
        int8_layers=tuple(name for name in layers if name in runs_int8),
        fp32_layers=tuple(name for name in layers if name not in runs_int8),
        no_kernel_layers=tuple(
            name for name in layers if 2 <= bits.get(name, FP32) < INT8 and name not in stored_packed
        ),
        dynamic_layers=tuple(name for name in layers if name in runs_int8 and name in dynamic),
        packed_layers=tuple(name for name in layers if name in stored_packed),
        files=artifact_files(path),
    )
