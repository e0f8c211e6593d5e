"""ONNX Runtime: the nodes ORT actually executes for a model, as LUT signatures, and one-node models to time.

What runs under ORT is not the exported graph but ORT's *optimized* graph: BatchNorm folded into
Conv by the exporter, Conv+ReLU fused (``FusedConv``), on x86 the NCHWc layout transform
(``nchwc.Conv`` with the ReLU and even the residual ``Add`` fused in as a ``Sum`` input, plus
``ReorderInput``/``ReorderOutput`` at layout boundaries), and in a quantized graph the QDQ groups
fused into integer kernels (``QLinearConv``, ``QGemm``). Which of these happen depends on channel
counts (NCHWc needs multiples of the SIMD block) and on which neighbours are int8, so no rule
written here could follow ORT release to release. The signatures are therefore read from the
graph ORT itself optimizes (``deploy.optimized_graph`` on the ``deploy.deploy`` output): every node
of it, with tensor shapes from one run of that graph with all intermediate tensors exposed.

Measuring a node in isolation = a one-node model: the node exactly as ORT optimized it, its
initializers (already reordered weights, scales, zero points) copied from the optimized graph,
random inputs of the recorded shapes and dtypes, run with graph optimizations off so ORT does not
rewrite it again. That is the "fused at deploy time" unit: ORT's own fusion decides it.

The price is speed: exporting, quantizing and optimizing a candidate is far slower than a LUT
look-up. Predictions
therefore go through the profile's unit map (:mod:`.ort_map`), learned from these graphs while
measuring, and come back here only for a candidate the map cannot vouch for.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.hw_profiles.profile import OpSignature
from autocompress.inputs import Inputs
from autocompress.runtimes.base import profile_calibration

DOMAINS = {"": "", "ai.onnx": "", "com.microsoft": "ms.", "com.microsoft.nchwc": "nchwc."}
# Attributes that are fields of the signature (the rest go to ``extra``).
FIELD_ATTRIBUTES = {"kernel_shape", "strides", "pads", "group", "activation"}
INT8_TYPES = (np.uint8, np.int8)


@dataclass(frozen=True)
class NodeUnit:
    """One node of an optimized graph with everything needed to run it alone."""

    node: onnx.NodeProto
    initializers: tuple[onnx.TensorProto, ...]
    inputs: tuple[tuple[str, tuple[int, ...], np.dtype], ...]  # data inputs: name, shape, dtype
    outputs: tuple[tuple[str, tuple[int, ...], np.dtype], ...]
    opset_imports: tuple[onnx.OperatorSetIdProto, ...]


def deployed_onnx(
    model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, workdir: Path, threads: int
) -> Path:
    """The ONNX file ``deploy.deploy`` produces for ``model`` with ``bits`` (int8 for 8-bit layers).

    Calibration uses random inputs of the example's shape (:func:`~autocompress.runtimes.base.profile_calibration`):
    the quantization ranges change the values, not the kernels or their cost.
    """
    from autocompress.compress.deploy import deploy

    batches = profile_calibration(example_input)
    return deploy(model, dict(bits or {}), example_input, batches, workdir, threads=threads).onnx_path


def optimized(onnx_path: Path, threads: int) -> onnx.ModelProto:
    """The graph ORT executes for ``onnx_path`` at ``threads`` intra-op threads."""
    from autocompress.compress.deploy import optimized_graph

    return optimized_graph(onnx_path, threads)


def _session_options(threads: int, optimize: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    return options


def tensor_shapes(graph_model: onnx.ModelProto, example_input: Inputs) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and dtype of every tensor of an (optimized) graph, from one run with all tensors as outputs.

    ONNX shape inference does not know ORT's contrib ops (``nchwc.Conv``, ``QLinearConv``'s fused
    forms), so the shapes come from ORT running the graph as it is (optimizations off).
    """
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(graph_model)
    names = [out for node in model.graph.node for out in node.output if out]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(
        model.SerializeToString(), _session_options(1, optimize=False), providers=["CPUExecutionProvider"]
    )
    from autocompress.compress.deploy import ort_feed

    feed = ort_feed(example_input, [i.name for i in session.get_inputs()])
    values = session.run(names, feed)
    shapes = {name: (tuple(v.shape), v.dtype) for name, v in zip(names, values, strict=True)}
    shapes.update({name: (tuple(array.shape), array.dtype) for name, array in feed.items()})
    return shapes


def _attribute_text(attr: onnx.AttributeProto) -> str:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return "x".join(_attribute_text_scalar(v) for v in value)
    return _attribute_text_scalar(value)


def _attribute_text_scalar(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _ints(node: onnx.NodeProto, name: str) -> tuple[int, ...]:
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def _layout(node: onnx.NodeProto, in_shape: tuple, out_shape: tuple) -> tuple[int, tuple[int, ...], int]:
    """(input channels, input spatial size, output channels), wherever the channel axis is.

    ORT's int8 kernels run channels-last (``channels_last=1``, ``Nhwc*`` ops, the ``Transpose`` in
    and out of that layout); reading dim 1 there would put a spatial size where interpolation
    expects channels.
    """
    if len(in_shape) < 3:
        return (int(in_shape[1]) if len(in_shape) > 1 else 0), (), (int(out_shape[1]) if len(out_shape) > 1 else 0)
    in_last = out_last = _ints(node, "channels_last") == (1,) or node.op_type.startswith("Nhwc")
    if node.op_type == "Transpose":
        rank, perm = len(in_shape), _ints(node, "perm")
        in_last = perm == (0, rank - 1, *range(1, rank - 1))  # NHWC -> NCHW
        out_last = perm == (0, *range(2, rank), 1)  # NCHW -> NHWC
    in_channels = int(in_shape[-1] if in_last else in_shape[1])
    spatial = tuple(int(d) for d in (in_shape[1:-1] if in_last else in_shape[2:]))
    out_channels = int(out_shape[-1] if out_last else out_shape[1])
    return in_channels, spatial, out_channels


def node_signature(
    node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], shapes: dict[str, tuple[tuple, np.dtype]]
) -> OpSignature:
    """The LUT signature of one optimized-graph node (op kind with fused parts, channels, shapes, dtype)."""
    if node.domain not in DOMAINS:
        raise AutocompressError(f"onnxruntime: node {node.name!r} is in unknown domain {node.domain!r}")
    # A node on constants only (a weight DequantizeLinear ORT keeps) still runs every call: key it on its first input.
    data = [name for name in node.input if name and name not in initializers] or [node.input[0]]
    parts = [DOMAINS[node.domain] + node.op_type]
    activation = next((a for a in node.attribute if a.name == "activation"), None)
    if activation is not None:
        parts.append(_attribute_text(activation))
    if node.op_type in ("Conv", "FusedConv") and len(node.input) > 3 and node.input[3]:
        parts.append("Sum")  # residual add fused into the convolution
    in_shape, out_shape = shapes[data[0]][0], shapes[node.output[0]][0]
    in_channels, spatial, out_channels = _layout(node, in_shape, out_shape)
    dtypes = [shapes[name][1] for name in data] + [shapes[name][1] for name in node.output if name]
    kernel = _ints(node, "kernel_shape")
    if not kernel and "Conv" in node.op_type and len(node.input) > 1 and node.input[1] in initializers:
        kernel = tuple(int(d) for d in initializers[node.input[1]].dims[2:])
    extra = {a.name: _attribute_text(a) for a in node.attribute if a.name not in FIELD_ATTRIBUTES}
    # Which inputs are constants, and their ranks: per-channel vs per-tensor scales, bias present.
    extra["inputs"] = ".".join(
        "-" if not name else (str(len(initializers[name].dims)) if name in initializers else "x") for name in node.input
    )
    return OpSignature(
        op="+".join(parts),
        in_channels=in_channels,
        out_channels=out_channels,
        kernel=kernel,
        stride=_ints(node, "strides"),
        padding=_ints(node, "pads"),
        groups=(_ints(node, "group") or (1,))[0],
        input_size=spatial,
        dtype="int8" if any(np.dtype(d).type in INT8_TYPES for d in dtypes) else "fp32",
        batch=max(1, int(in_shape[0]) if in_shape else 1),
        extra=",".join(f"{k}={v}" for k, v in sorted(extra.items())),
    )


def graph_units(graph_model: onnx.ModelProto, example_input: torch.Tensor) -> list[tuple[OpSignature, NodeUnit]]:
    """Every node of an optimized graph as (signature, runnable unit), in execution order."""
    shapes = tensor_shapes(graph_model, example_input)
    initializers = {init.name: init for init in graph_model.graph.initializer}
    for name, init in initializers.items():
        shapes[name] = (tuple(int(d) for d in init.dims), np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)))
    result = []
    for node in graph_model.graph.node:
        sig = node_signature(node, initializers, shapes)
        unit = NodeUnit(
            node=node,
            initializers=tuple(initializers[name] for name in dict.fromkeys(node.input) if name in initializers),
            inputs=tuple(
                (name, *shapes[name]) for name in dict.fromkeys(node.input) if name and name not in initializers
            ),
            outputs=tuple((name, *shapes[name]) for name in node.output if name),
            opset_imports=tuple(graph_model.opset_import),
        )
        result.append((sig, unit))
    return result


def model_units(
    model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
) -> list[tuple[OpSignature, NodeUnit]]:
    """Deploy ``model`` (int8 where ``bits`` says 8), let ORT optimize it, and return its nodes as units."""
    with tempfile.TemporaryDirectory(prefix="autocompress-profile-") as tmp:
        path = deployed_onnx(model, example_input, bits, Path(tmp), threads)
        return graph_units(optimized(path, threads), example_input)


def _random(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return rng.standard_normal(shape).astype(kind)
    if kind.type in INT8_TYPES:
        info = np.iinfo(kind)
        return rng.integers(info.min, info.max + 1, size=shape, dtype=kind)
    raise AutocompressError(f"onnxruntime: cannot make a random input of dtype {kind} to time a node in isolation")


def one_node_model(unit: NodeUnit) -> onnx.ModelProto:
    """A model holding only ``unit``'s node, its constants, and graph inputs/outputs of the recorded shapes."""
    to_onnx = helper.np_dtype_to_tensor_dtype
    graph = helper.make_graph(
        [unit.node],
        "unit",
        [helper.make_tensor_value_info(name, to_onnx(np.dtype(d)), list(shape)) for name, shape, d in unit.inputs],
        [helper.make_tensor_value_info(name, to_onnx(np.dtype(d)), list(shape)) for name, shape, d in unit.outputs],
        initializer=list(unit.initializers),
    )
    return helper.make_model(graph, opset_imports=list(unit.opset_imports))


def unit_callable(unit: NodeUnit, threads: int) -> Callable[[], object]:
    """``fn()`` that runs the one-node model once on fixed random inputs (session built once)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        one_node_model(unit).SerializeToString(),
        _session_options(threads, optimize=False),
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(0)
    feed = {name: _random(shape, dtype, rng) for name, shape, dtype in unit.inputs}
    names = [name for name, _, _ in unit.outputs]
    return lambda: session.run(names, feed)
