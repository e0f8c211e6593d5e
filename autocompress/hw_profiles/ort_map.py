"""Fast ONNX Runtime prediction: which ORT nodes each eager unit becomes, learned while measuring.

Reading ORT's optimized graph means deploying the candidate (export, quantize, optimize), far too
slow to predict every trial. But ORT's choice of nodes for one part of a model is local:
it depends on that part's shapes, on whether it and its neighbouring layers are int8, and on the
channel counts modulo the NCHWc block. So every candidate deployed during ``profile measure`` also
teaches the profile a map from each eager unit to the ORT nodes it became:

- *Which nodes belong to a unit* (:func:`attribute`): a node named after a module scope
  (``/layer1/layer1.0/conv2/...``) belongs to the unit owning that module; a node ORT or the
  quantizer added without one (layout reorders, transposes, quantize/dequantize of a tensor)
  belongs, by data flow, to the unit that produced its input (the consumer, when nothing produced
  it). Data flow, not execution order: ORT lists such a node next to either neighbour.
- *The key* (:func:`template_key`): the unit's signature with its channel counts reduced to what
  ORT's kernels look at (below the NCHWc block: the count; above: the remainder), which of its
  channel counts coincide (with each other, their NCHWc round-ups, its spatial sizes), and its
  context (:func:`unit_proxies`: int8-ness of it and its neighbouring layers, neighbours' op kinds
  and channel remainders).
- *The value* (:func:`node_template`): the node list with every channel count and size that equals
  the unit's input or output channels (or their NCHWc round-up) written as a symbol, ``{I}``,
  ``{O}``, ``{I16}``, ``{O16}``. One deployment of a 48->64 convolution thus teaches how a 40->80
  one deploys; :func:`instantiate` writes the symbols back, and the predictor looks the nodes up in
  the LUT (interpolating channel counts it has not measured).

A key seen with different node lists keeps each with its count: ORT then looked at something the
key does not capture (a ResNet block's layout choice depends on both branches of the next add).
The predictor uses the most frequent list, and when it does not dominate (``DOMINANT_SHARE`` of the
sightings) counts the spread between the lists' LUT sums as uncertainty (independent per unit: the
spreads add in quadrature); the map answers only if that stays within ``MAP_SLACK`` of the
prediction, which a transpose more or less usually does and a convolution more or less does not.
A key the map does not know, or whose doubt is too large, sends the prediction to the exact path
(deploy and read the graph), and the prediction says which it took.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from autocompress.hw_profiles import eager
from autocompress.hw_profiles.onnx_graph import NodeUnit
from autocompress.hw_profiles.profile import OpSignature, UnitVariant
from autocompress.runtimes.regions import quantized_regions

MAP_FORMAT = 3  # 3: keys carry the quantized regions; 2: without; 1: exact proxies, by execution order
MAX_VARIANTS = 8  # node lists kept per key; rarer ones beyond that add nothing to the best guess
DOMINANT_SHARE = 0.8  # a key's most frequent node list with this share of its sightings is taken as certain
MAP_SLACK = 0.02  # else the spread between its node lists' LUT sums counts, up to this share of the total
NCHWC_BLOCK = 16  # ORT's NCHWc block on AVX-512 (8 on AVX2; a multiple of 16 is then also one of 8)


def _int8(bits: dict[str, int] | None, layer: str) -> str:
    return "int8" if layer and bits and bits.get(layer) == 8 else "fp32"


def unit_proxies(model: nn.Module, input_shape: Sequence[int], bits: dict[str, int] | None) -> list[str]:
    """Per eager unit of ``model``: its signature plus the context ORT's node choice depends on.

    Context, by data flow (a residual add sees both its branches, a block output all its readers):
    whether the unit's own Conv/Linear layer, the nearest ones upstream of each of its inputs and the
    nearest ones downstream of its output are int8 (Quantize/Dequantize at dtype boundaries, integer
    kernels), and the op kinds and channel counts modulo the NCHWc block of the units it reads from
    and feeds (layout reorders and channel padding).
    """
    sigs = eager.eager_signatures(model, input_shape)
    layers = eager.unit_layers(model)
    inputs, readers = eager.unit_graph(model)

    def upstream(u: int) -> str:
        while u >= 0 and not layers[u]:
            u = inputs[u][0] if inputs[u] else -1
        return _int8(bits, layers[u]) if u >= 0 else "in"

    def reached(u: int) -> set[str]:
        found, todo, seen = set(), list(readers[u]), set()
        while todo:
            r = todo.pop()
            if r < 0:
                found.add("out")
            elif r not in seen:
                seen.add(r)
                if layers[r]:
                    found.add(_int8(bits, layers[r]))
                else:
                    todo.extend(readers[r])
        return found

    def downstream(u: int) -> str:
        # Per reader, in order: its own layer's int8-ness, or what its output reaches.
        parts = []
        for r in readers[u]:
            if r < 0:
                parts.append("out")
            elif layers[r]:
                parts.append(_int8(bits, layers[r]))
            else:
                parts.append("(" + ",".join(sorted(reached(r))) + ")")
        return ",".join(parts)

    quantized = _quantized_regions(layers, readers, bits)

    def regions(u: int) -> str:
        # A layer-less unit: its own region; a layer: the regions it reads from and feeds.
        if not layers[u]:
            return quantized[u]
        ins = "".join(quantized[p] for p in inputs[u] if p >= 0 and not layers[p])
        outs = "".join(quantized[r] for r in readers[u] if r >= 0 and not layers[r])
        return f"{ins}/{outs}"

    proxies = []
    for i, sig in enumerate(sigs):
        context = (
            _int8(bits, layers[i]),
            ",".join(upstream(p) for p in inputs[i]),
            downstream(i),
            ",".join(f"{sigs[p].op}%{sigs[p].in_channels % NCHWC_BLOCK}" if p >= 0 else "start" for p in inputs[i]),
            ",".join(f"{sigs[r].op}%{sigs[r].out_channels % NCHWC_BLOCK}" if r >= 0 else "end" for r in readers[i]),
            regions(i),
        )
        proxies.append(sig.key() + "||" + "|".join(context))
    return proxies


def _quantized_regions(
    layers: Sequence[str],
    readers: Sequence[Sequence[int]],
    bits: dict[str, int] | None,
) -> list[str]:
    """Per layer-less unit, "q" if its region is quantized at deployment, else "f" ("" for layers).

    The rule deployment follows (:func:`~autocompress.runtimes.regions.quantized_regions`), applied
    to the eager units and their data flow.
    """
    int8 = {layer for layer in layers if _int8(bits, layer) == "int8"}
    edges = [(u, r) for u, reads in enumerate(readers) for r in reads if r >= 0]
    quantized = quantized_regions([layer or None for layer in layers], edges, int8)
    return ["" if layers[u] else "q" if u in quantized else "f" for u in range(len(layers))]


def _scope(module: str, call: int) -> str:
    # The exporter names the k-th extra call of a shared module "<name>_k".
    return module if call == 0 else f"{module}_{call}"


def _module_index(model: nn.Module):  # noqa: ANN202 - deploy is imported late (it imports this package)
    from autocompress.compress.deploy import ModuleIndex

    return ModuleIndex.of(model)


def _module_path(node_name: str, modules: object = None) -> str:
    from autocompress.compress.deploy import node_module

    return node_module(node_name, modules)  # type: ignore[arg-type]


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
    index = _module_index(model)
    nodes = [unit.node for _, unit in units]
    owner: list[int | None] = [None] * len(nodes)
    for i, node in enumerate(nodes):
        # ORT renames what it fuses ("fused /fc1/Gemm"): the scope is still there after the prefix.
        name = node.name[node.name.find("/") :] if "/" in node.name else node.name
        if not name.startswith("/"):
            continue
        path = _module_path(name, index)
        target = next((scopes[s] for s in by_length if path == s or path.startswith(s + ".")), None)
        if target is None:
            candidates = functions.get(path, [])
            if len(candidates) > 1:
                op = re.split(r"[/_]", name.rsplit("/", 1)[-1])[0]
                candidates = [(k, u) for k, u in candidates if op in _KIND_HINTS.get(k, ())]
            if len(candidates) != 1:
                return None
            target = candidates[0][1]
        owner[i] = target
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)

    def resolve(i: int, seen: frozenset[int]) -> int | None:
        if owner[i] is not None or i in seen:
            return owner[i]
        upstream = [producer[t] for t in nodes[i].input if t in producer]
        downstream = [r for t in nodes[i].output for r in readers.get(t, [])]
        for j in upstream + downstream:
            found = resolve(j, seen | {i})
            if found is not None:
                owner[i] = found
                return found
        return None

    result: list[list[str]] = [[] for _ in owners]
    for i, (sig, _) in enumerate(units):
        target = resolve(i, frozenset())
        if target is None:
            return None
        result[target].append(sig.key())
    return result


# --- templates -------------------------------------------------------------------------------


def _round_up(channels: int) -> int:
    return -(-channels // NCHWC_BLOCK) * NCHWC_BLOCK


def _symbols(unit: OpSignature) -> dict[str, int]:
    i, o = unit.in_channels, unit.out_channels
    return {"I": i, "O": o, "I16": _round_up(i), "O16": _round_up(o)}


def _sizes(unit: OpSignature) -> set[int]:
    """Spatial sizes a node of ``unit`` may show: its input's and its (strided) output's."""
    return {d for dim in unit.input_size for d in (dim, dim // 2, (dim + 1) // 2)}


def _channels(c: int) -> str:
    return str(c) if c < NCHWC_BLOCK else f"r{c % NCHWC_BLOCK}"


def template_key(proxy: str, unit: OpSignature) -> str:
    """The map key of a unit: ``proxy`` (its :func:`unit_proxies` entry) with channel counts generalized."""
    symbols = list(_symbols(unit).values())
    sizes = _sizes(unit)
    same = "".join(str(int(a == b)) for n, a in enumerate(symbols) for b in symbols[n + 1 :])
    spatial = "".join(str(int(v in sizes)) for v in symbols)
    rest = proxy.split("|", 1)[1]
    return f"{_channels(unit.in_channels)}->{_channels(unit.out_channels)}|{same}.{spatial}|{rest}"


def _symbol(value: str, symbols: dict[str, int]) -> str:
    if value.isdigit():
        for name, number in symbols.items():
            if int(value) == number:
                return "{" + name + "}"
    return value


def node_template(key: str, unit: OpSignature) -> str:
    """An ORT node's LUT key with the unit's channel counts (and sizes equal to them) as symbols."""
    symbols = _symbols(unit)
    fields = key.split("|")
    channels_in, channels_out = fields[0].split("->")
    fields[0] = f"{_symbol(channels_in, symbols)}->{_symbol(channels_out, symbols)}"
    if fields[6].startswith("in") and fields[6] != "in-":
        # A size of the unit's own stays literal; another one is a channel count moved into the size
        # field by a layout change (a 1-D transpose to channels-last).
        sizes = {str(d) for d in _sizes(unit)}
        fields[6] = "in" + "x".join(d if d in sizes else _symbol(d, symbols) for d in fields[6][2:].split("x"))
    rest = "|".join(fields[9:])
    fields[9:] = [re.sub(r"channels=(\d+)", lambda m: "channels=" + _symbol(m.group(1), symbols), rest)]
    return "|".join(fields)


def instantiate(template: str, unit: OpSignature) -> str:
    """The LUT key a :func:`node_template` stands for in ``unit``."""
    symbols = _symbols(unit)
    return re.sub(r"\{(I16|O16|I|O)\}", lambda m: str(symbols[m.group(1)]), template)


def unit_keys(
    model: nn.Module, input_shape: Sequence[int], bits: dict[str, int] | None
) -> list[tuple[str, OpSignature]]:
    """Per eager unit of ``model``: its map key (:func:`template_key`) and its signature."""
    sigs = eager.eager_signatures(model, input_shape)
    return [(template_key(p, sig), sig) for p, sig in zip(unit_proxies(model, input_shape, bits), sigs, strict=True)]


def learn(
    unit_map: dict[str, list[UnitVariant]],
    model: nn.Module,
    input_shape: Sequence[int],
    bits: dict[str, int] | None,
    units: Sequence[tuple[OpSignature, NodeUnit]],
) -> int:
    """Add what one deployed candidate shows to ``unit_map`` (in place); return the number of new keys."""
    placed = attribute(model, units)
    if placed is None:
        return 0
    new = 0
    for (key, unit), nodes in zip(unit_keys(model, input_shape, bits), placed, strict=True):
        templates = [node_template(node, unit) for node in nodes]
        variants = unit_map.setdefault(key, [])
        new += not variants
        same = next((v for v in variants if v.nodes == templates), None)
        if same is not None:
            same.seen += 1
        elif len(variants) < MAX_VARIANTS:
            variants.append(UnitVariant(nodes=templates))
    return new


def mapped_variants(
    unit_map: dict[str, list[UnitVariant]], model: nn.Module, input_shape: Sequence[int], bits: dict[str, int] | None
) -> list[list[tuple[int, list[str]]]] | None:
    """Per unit of ``model``, every node list the map saw for its key, instantiated, as (times seen,
    LUT keys), the most seen first; None if the map does not know some unit's key."""
    result = []
    for key, unit in unit_keys(model, input_shape, bits):
        variants = unit_map.get(key)
        if not variants:
            return None
        ordered = sorted(variants, key=lambda v: -v.seen)  # stable: the first of equals stays first
        result.append([(v.seen, [instantiate(t, unit) for t in v.nodes]) for v in ordered])
    return result


def dominant(variants: Sequence[tuple[int, list[str]]]) -> bool:
    """Whether the first (most seen) of a unit's :func:`mapped_variants` has ``DOMINANT_SHARE`` of the sightings."""
    return variants[0][0] >= DOMINANT_SHARE * sum(seen for seen, _ in variants)
