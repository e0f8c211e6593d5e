"""Which layer-less operators a deployment quantizes: the one rule for deployment and for profiles.

A *region* is a connected group of layer-less nodes that only move data (reshapes, transposes,
flattens, pools, ReLU, residual adds of two activations: :data:`DATA_MOVEMENT_OPS`), linked by data
flow and bordered by layers (Conv/Gemm/MatMul with a weight). A region is quantized when it borders
an int8 layer and touches nothing but layers and other data movement. Every other layer-less node
is a *barrier*: it never runs int8 and a region touching it stays fp32.

Why: ORT's quantizer quantizes every op it can wherever the graph has an int8 layer. Between two
layers of a CNN that costs nothing (ReLU, pools and adds commute with the per-tensor rounding the
int8 layers apply anyway, and int8 data moves four times fewer bytes), so there the region follows
the int8 layers. In a transformer the layers are separated by LayerNorm, Softmax, GELU, the
attention-mask arithmetic, the bias add and the residual stream; quantizing those rounds values
no int8 layer rounds (a softmax or a mask of ``-inf``-like constants on 256 levels) and pulled the
whole encoder into one region behind a single int8 head. They cost accuracy and win no speed: ORT
runs them as Dequantize -> fp32 op -> Quantize, or as slow generic int8 kernels, so the fastest
int8 transformer quantizes only its Linear layers (their input and weight) and keeps the rest fp32.
The activation-by-activation MatMuls of attention (q·kᵀ, attention·v) carry no weight: they are
not layers and stay fp32 (barriers) for the same reason.

In a ResNet stage the int8 layer a region borders can be several blocks away along the identity
shortcuts. The profile's unit map must predict the same choice on the model's eager units
(:mod:`autocompress.hw_profiles.ort_map`), so both ask this module, each on its own graph: ONNX
nodes for deployment, eager units for the map.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

DATA_MOVEMENT_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Concat",
        "Split",
        "Slice",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Relu",
        "Clip",
        "Add",
        "Sum",
    }
)
"""ONNX ops that may join an int8 region; an ``Add`` only when it adds two activations (a residual
add), not a constant (a bias or the attention mask's offset): see :func:`is_data_movement`."""

ELEMENTWISE_SUMS = frozenset({"Add", "Sum"})


def is_data_movement(op_type: str, constant_inputs: int = 0) -> bool:
    """Whether an ONNX node of ``op_type`` with ``constant_inputs`` constant data inputs may join a
    region: shape and layout ops, pools, ReLU, and adds of activations only (a constant addend makes
    an add arithmetic on values, such as a bias or a mask, that int8 would round)."""
    if op_type not in DATA_MOVEMENT_OPS:
        return False
    return not (op_type in ELEMENTWISE_SUMS and constant_inputs)


def quantized_regions(
    layers: Sequence[str | None],
    edges: Iterable[tuple[int, int]],
    int8_layers: Collection[str],
    barriers: Collection[int] = (),
) -> set[int]:
    """Indices of the layer-less nodes whose region borders a layer in ``int8_layers`` and no barrier.

    ``layers[i]`` is node ``i``'s layer name, or None for a layer-less node; ``barriers`` are the
    indices of layer-less nodes that are not data movement (they join no region and keep every
    region they touch fp32); ``edges`` are data-flow pairs ``(producer, reader)`` of node indices
    (direction does not matter, nor do duplicates).
    """
    barrier = set(barriers)
    for i in barrier:
        if layers[i] is not None:
            raise ValueError(f"quantized_regions: node {i} is layer {layers[i]!r}, it cannot be a barrier")
    region = list(range(len(layers)))

    def find(u: int) -> int:
        while region[u] != u:
            region[u] = region[region[u]]
            u = region[u]
        return u

    def free(u: int) -> bool:
        return layers[u] is None and u not in barrier

    borders: list[tuple[int, int]] = []  # (layer node, layer-less node) next to each other
    touched: list[int] = []  # region members next to a barrier
    for a, b in edges:
        if free(a) and free(b):
            region[find(b)] = find(a)
        elif free(b):
            (borders.append((a, b)) if layers[a] is not None else touched.append(b))
        elif free(a):
            (borders.append((b, a)) if layers[b] is not None else touched.append(a))
    stopped = {find(u) for u in touched}
    int8 = {find(u) for layer, u in borders if layers[layer] in int8_layers} - stopped
    return {u for u in range(len(layers)) if free(u) and find(u) in int8}
