"""Fast ONNX Runtime prediction: which ORT nodes each eager unit becomes, learned while measuring.

Reading ORT's optimized graph means deploying the candidate (export, quantize, optimize: 0.1-1 s),
far too slow to predict every trial. But ORT's choice of nodes for one part of a model is local:
it depends on that part's shapes, on whether it and its neighbouring layers are int8, and on the
neighbours' channel counts modulo the NCHWc block. So every candidate deployed during
``profile measure`` also teaches the profile a map: *unit proxy* (the eager unit's signature plus
that context, :func:`unit_proxies`) -> the ORT node signatures that unit became, found by matching
each optimized node's module scope (``/layer1/layer1.0/conv2/...``) to the unit's modules
(:func:`attribute`). Nodes ORT adds without a scope (layout reorders, transposes) go with the next
scoped node. A proxy seen with different node lists keeps each list with the number of times it
was seen: ORT then looked at something the proxy does not capture (often only whether a layout
reorder lands in this unit or its neighbour). The list seen most often is used only when it
dominates (``DOMINANT_SHARE`` of the sightings): a close call can be a whole convolution
attributed to one unit or its neighbour, which is no guess to sum.

Prediction then computes the proxies from the model structure (a millisecond) and sums the mapped
nodes' LUT entries. A proxy the map does not know, or knows without a dominant node list, sends
the prediction to the exact path (deploy and read the graph), and the result says which path it
took.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from autocompress.hw_profiles import eager
from autocompress.hw_profiles.onnx_graph import NodeUnit
from autocompress.hw_profiles.profile import OpSignature, UnitVariant

MAX_VARIANTS = 8  # node lists kept per proxy; rarer ones beyond that add nothing to the best guess
DOMINANT_SHARE = 0.8  # a proxy's most frequent node list must be this share of its sightings to be used
NCHWC_BLOCK = 16  # ORT's NCHWc block on AVX-512 (8 on AVX2; a multiple of 16 is then also one of 8)


def _int8(bits: dict[str, int] | None, layer: str) -> str:
    return "int8" if layer and bits and bits.get(layer) == 8 else "fp32"


def unit_proxies(model: nn.Module, input_shape: Sequence[int], bits: dict[str, int] | None) -> list[str]:
    """Per eager unit of ``model``: its signature plus the context ORT's node choice depends on.

    Context: whether the unit's own, the previous and the next Conv/Linear layer are int8
    (Quantize/Dequantize at dtype boundaries, integer kernels), the neighbouring units' op kinds,
    and their channel counts modulo the NCHWc block (layout reorders and channel padding).
    """
    sigs = eager.eager_signatures(model, input_shape)
    layers = eager.unit_layers(model)
    compute = [i for i, name in enumerate(layers) if name]
    proxies = []
    for i, sig in enumerate(sigs):
        prev_layer = next((layers[j] for j in reversed(compute) if j < i), "")
        next_layer = next((layers[j] for j in compute if j > i), "")
        prev = sigs[i - 1] if i > 0 else None
        nxt = sigs[i + 1] if i + 1 < len(sigs) else None
        context = (
            _int8(bits, layers[i]),
            _int8(bits, prev_layer),
            _int8(bits, next_layer),
            f"{prev.op}%{prev.in_channels % NCHWC_BLOCK}" if prev else "start",
            f"{nxt.op}%{nxt.out_channels % NCHWC_BLOCK}" if nxt else "end",
        )
        proxies.append(sig.key() + "||" + "|".join(context))
    return proxies


def _scope(module: str, call: int) -> str:
    # The exporter names the k-th extra call of a shared module "<name>_k".
    return module if call == 0 else f"{module}_{call}"


def _module_path(node_name: str) -> str:
    from autocompress.compress.deploy import node_module

    return node_module(node_name)


_KIND_HINTS = {"add": ("Add", "Sum"), "flatten": ("Flatten", "Reshape"), "relu_fn": ("Relu",)}


def attribute(model: nn.Module, units: Sequence[tuple[OpSignature, NodeUnit]]) -> list[list[str]] | None:
    """Per eager unit, the keys of the optimized ORT nodes it became; None if a node cannot be placed."""
    owners = eager.unit_ownership(model)
    scopes: dict[str, int] = {}
    functions: dict[str, list[tuple[str, int]]] = {}
    for u, own in enumerate(owners):
        for module, call in own.modules:
            scopes[_scope(module, call)] = u
        for kind, owner in own.functions:
            functions.setdefault(owner, []).append((kind, u))
    by_length = sorted(scopes, key=len, reverse=True)
    result: list[list[str]] = [[] for _ in owners]
    pending: list[str] = []
    last = None
    for sig, unit in units:
        name = unit.node.name
        if not name.startswith("/"):
            pending.append(sig.key())  # added by ORT without a scope: goes with the next scoped node
            continue
        path = _module_path(name)
        target = next((scopes[s] for s in by_length if path == s or path.startswith(s + ".")), None)
        if target is None:
            candidates = functions.get(path, [])
            if len(candidates) > 1:
                op = re.split(r"[/_]", name.rsplit("/", 1)[-1])[0]
                candidates = [(k, u) for k, u in candidates if op in _KIND_HINTS.get(k, ())]
            if len(candidates) != 1:
                return None
            target = candidates[0][1]
        result[target].extend([*pending, sig.key()])
        pending, last = [], target
    if pending:
        if last is None:
            return None
        result[last].extend(pending)
    return result


def learn(
    unit_map: dict[str, list[UnitVariant]],
    model: nn.Module,
    input_shape: Sequence[int],
    bits: dict[str, int] | None,
    units: Sequence[tuple[OpSignature, NodeUnit]],
) -> int:
    """Add what one deployed candidate shows to ``unit_map`` (in place); return the number of new proxies."""
    placed = attribute(model, units)
    if placed is None:
        return 0
    new = 0
    for proxy, keys in zip(unit_proxies(model, input_shape, bits), placed, strict=True):
        variants = unit_map.setdefault(proxy, [])
        new += not variants
        same = next((v for v in variants if v.nodes == keys), None)
        if same is not None:
            same.seen += 1
        elif len(variants) < MAX_VARIANTS:
            variants.append(UnitVariant(nodes=keys))
    return new


def mapped_keys(
    unit_map: dict[str, list[UnitVariant]], model: nn.Module, input_shape: Sequence[int], bits: dict[str, int] | None
) -> list[str] | None:
    """The ORT node keys ``model`` would run, from the map alone (per unit, its dominant node list);
    None if any unit's proxy is unknown or has no dominant node list."""
    keys: list[str] = []
    for proxy in unit_proxies(model, input_shape, bits):
        variants = unit_map.get(proxy)
        if not variants:
            return None
        best = max(variants, key=lambda v: v.seen)  # max keeps the first of equals
        if best.seen < DOMINANT_SHARE * sum(v.seen for v in variants):
            return None
        keys.extend(best.nodes)
    return keys
