"""Which layer-less operators a deployment quantizes: the one rule for deployment and for profiles.

A *region* is a connected group of layer-less nodes (pools, adds, reshapes, flattens, activations)
linked by data flow, bordered by layers (Conv/Gemm/MatMul). ORT's quantizer quantizes such ops
wherever the graph has any int8 layer; deployment keeps them fp32 unless a layer bordering their
region is int8 (see :func:`autocompress.compress.deploy.deploy`). In a ResNet stage that layer can be
several blocks away along the identity shortcuts. The profile's unit map must predict the same
choice on the model's eager units (:mod:`autocompress.hw_profiles.ort_map`), so both ask this
module, each on its own graph: ONNX nodes for deployment, eager units for the map.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def quantized_regions(
    layers: Sequence[str | None], edges: Iterable[tuple[int, int]], int8_layers: Collection[str]
) -> set[int]:
    """Indices of the layer-less nodes whose region borders a layer in ``int8_layers``.

    ``layers[i]`` is node ``i``'s layer name, or None for a layer-less node; ``edges`` are data-flow
    pairs ``(producer, reader)`` of node indices (direction does not matter, nor do duplicates).
    """
    region = list(range(len(layers)))

    def find(u: int) -> int:
        while region[u] != u:
            region[u] = region[region[u]]
            u = region[u]
        return u

    borders: list[tuple[int, int]] = []  # (layer node, layer-less node) next to each other
    for a, b in edges:
        if layers[a] is None and layers[b] is None:
            region[find(b)] = find(a)
        elif layers[a] is None:
            borders.append((b, a))
        elif layers[b] is None:
            borders.append((a, b))
    int8 = {find(free) for layer, free in borders if layers[layer] in int8_layers}
    return {u for u, layer in enumerate(layers) if layer is None and find(u) in int8}
