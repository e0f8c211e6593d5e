"""Weight quantization as a technique: the weight bit-width (32 = fp32) per layer, region or model.

Where an int8 layer meets an fp32 one the deployed graph gets a QuantizeLinear/DequantizeLinear
pair; on a network of many small layers (depthwise convolutions) those boundaries cost more than
the int8 kernels save, so a plan that mixes widths layer by layer can run slower than fp32. The
``granularity`` setting therefore decides what one parameter covers:

* ``layer``: one bit-width per Conv/Linear (``bits/<layer>``);
* ``region`` (default): one per chain of layers that hand their output only to each other
  (see :func:`layer_chains`), e.g. the expand, depthwise and project convolutions of an inverted
  residual block: switching width inside such a chain always adds a boundary, switching at a
  residual add or a fan-out often replaces one;
* ``model``: one for all searched layers.

A parameter that covers several layers is keyed ``<first>..<last>``: every Conv/Linear from the
module ``first`` through ``last`` in module order (module names never contain ``..``), so the plan
can be expanded on any build of the model (pruned, factorized) without the graph. Runs are cut at
layers the space excludes, so a range never covers one.

During the fine-tune each layer trains through per-channel symmetric fake-quant at its width
(:mod:`autocompress.compress.quantize`); its bit-widths are the deployment plan a runtime reads
(8-bit layers run on int8 kernels where the runtime has them) and size accounting counts.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from autocompress.compress.quantize import FP32, attach_weight_quant
from autocompress.techniques.base import (
    QUANTIZABLE,
    BuildContext,
    Discovery,
    Section,
    Stage,
    Technique,
    expand_to_layers,
)

RANGE = ".."
"""Joins the first and last layer of a multi-layer key (``b1.conv.expand..b1.conv.project``)."""


class QuantizeSpace(Section):
    """Per-layer weight bit-width; 32 means the layer stays in fp32."""

    enabled: bool = True
    bits: list[int] = Field(default_factory=lambda: [32, 8, 4], min_length=1)
    granularity: Literal["layer", "region", "model"] = Field(
        default="region", description="what one bit-width parameter covers: a layer, a chain of layers, all layers"
    )
    calibration_batches: int = Field(default=4, ge=1, description="training batches that calibrate int8 ranges")
    int8: Literal["static", "dynamic"] = Field(
        default="static",
        description="how 8-bit Linear layers run on ONNX Runtime: static QDQ (activation ranges calibrated once) "
        "or dynamic (activations quantized at each run, MatMulInteger); convolutions are always static",
    )

    @field_validator("bits")
    @classmethod
    def _supported_bits(cls, value: list[int]) -> list[int]:
        for b in value:
            if b != 32 and not 2 <= b <= 8:
                raise ValueError(f"bit-width {b} is not supported: use 2..8, or 32 for fp32")
        return sorted(set(value), reverse=True)


class WeightQuantization(Technique):
    """Per-layer weight bit-width (``bits/<layer>``: 2..8, or 32 for fp32)."""

    name = "bits"
    config_key = "quantize"
    config_model = QuantizeSpace
    value_type = int
    neutral = FP32
    stage = Stage.WEIGHTS
    # Shapes stay; the bit-width changes which kernels run, so it is part of the latency (see latency_choices).
    changes_architecture = False

    def enabled(self, section: QuantizeSpace) -> bool:
        return section.enabled and section.bits != [FP32]

    def discover(self, section: QuantizeSpace, found: Discovery) -> dict[str, tuple]:
        groups = bit_groups(found.model, found.example_input, found.layers, section.granularity)
        return {group_key(group): tuple(section.bits) for group in groups}

    def apply(self, model: nn.Module, values: Mapping[str, Any], section: QuantizeSpace, ctx: BuildContext) -> None:
        attach_weight_quant(model, self.plan(model, values))

    def plan(self, model: nn.Module, values: Mapping[str, Any]) -> dict[str, int]:
        single = {key: b for key, b in values.items() if RANGE not in key}
        plan: dict[str, int] = {}
        for key, b in values.items():
            if RANGE in key:
                plan.update(dict.fromkeys(range_layers(model, key), b))
        plan.update(expand_to_layers(model, single))
        return plan

    def summary(self, section: QuantizeSpace) -> dict[str, Any]:
        return {"granularity": section.granularity, "int8": section.int8}

    def latency_choices(self, choices: tuple, kernel_bits: Iterable[int]) -> tuple | None:
        # A width without kernels runs the fp32 kernels, so fp32 stands for all of them.
        kernels = set(kernel_bits) - {FP32}
        if not kernels:
            return None  # an fp32-only runtime runs every width on the same kernels
        return tuple(dict.fromkeys(b if b in kernels else FP32 for b in choices))

    def describe(self, values: Mapping[str, Any]) -> str | None:
        counts: dict[int, int] = {}
        for b in values.values():
            if b < FP32:
                counts[b] = counts.get(b, 0) + 1
        if not counts:
            return None
        return " ".join(f"int{b}x{n}" for b, n in sorted(counts.items(), reverse=True))


def group_key(layers: Sequence[str]) -> str:
    """The parameter key of a run of layers (consecutive in module order): the name, or ``first..last``."""
    return layers[0] if len(layers) == 1 else f"{layers[0]}{RANGE}{layers[-1]}"


def range_layers(model: nn.Module, key: str) -> list[str]:
    """The Conv/Linear layers a ``first..last`` (or single-layer) key covers on ``model``: module order from ``first``
    through the end of ``last``'s subtree (so low-rank factors of either end are covered).

    Raises ``ValueError`` naming the key when an end is not a module of ``model``.
    """
    first, _, last = key.partition(RANGE)
    last = last or first
    names = [name for name, _ in model.named_modules()]
    if first not in names or last not in names:
        missing = first if first not in names else last
        raise ValueError(f"bit-width parameter {key!r}: {missing!r} is not a module of the model")
    start, end = names.index(first), names.index(last)
    while end + 1 < len(names) and names[end + 1].startswith(last + "."):
        end += 1
    if end < start:
        raise ValueError(f"bit-width parameter {key!r}: {last!r} comes before {first!r} in module order")
    modules = dict(model.named_modules())
    return [name for name in names[start : end + 1] if isinstance(modules[name], QUANTIZABLE)]


def layer_chains(
    layers: Sequence[str | None], edges: Iterable[tuple[int, int]], sources: Iterable[int], sinks: Iterable[int]
) -> list[set[str]]:
    """Chains of layers joined by data flow that nothing else reads or writes.

    ``layers[i]`` is node ``i``'s layer name (several nodes may share one) or None for a layer-less
    node (activations, pools, reshapes, adds); ``edges`` are ``(producer, reader)`` node pairs;
    ``sources`` read a graph input, ``sinks`` write a graph output. Layer A reaches layer B when a
    path of layer-less nodes leads from A to B. A and B are one chain when A reaches only B (and no
    graph output) and B is reached only from A (and reads no graph input): a bit-width boundary
    between them would quantize or dequantize a tensor that no other layer shares, so it is pure
    cost. A residual add or a fan-out ends a chain.
    """
    edges = list(edges)
    readers: dict[int, list[int]] = {}
    for a, b in edges:
        readers.setdefault(a, []).append(b)
    sinks, sources = set(sinks), set(sources)
    OUT, IN = object(), object()  # noqa: N806 - sentinels standing for the graph's output and input

    reached: dict[str, set] = {name: set() for name in layers if name is not None}
    feeders: dict[str, set] = {name: set() for name in reached}
    for start, name in enumerate(layers):
        if name is None:
            continue
        if start in sources:
            feeders[name].add(IN)
        # The layer's own nodes (a MatMul and its bias Add) count as the layer, not as a path.
        seen, stack = {start}, [start]
        while stack:
            u = stack.pop()
            if u in sinks:
                reached[name].add(OUT)
            for v in readers.get(u, ()):
                if v in seen:
                    continue
                seen.add(v)
                if layers[v] is None:
                    stack.append(v)
                elif layers[v] != name:
                    reached[name].add(layers[v])
                    feeders[layers[v]].add(name)
                else:
                    stack.append(v)
    parent = {name: name for name in reached}

    def find(u: str) -> str:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for name, targets in reached.items():
        if len(targets) == 1:
            (target,) = targets
            if target is not OUT and feeders[target] == {name}:
                parent[find(target)] = find(name)
    chains: dict[str, set[str]] = {}
    for name in reached:
        chains.setdefault(find(name), set()).add(name)
    return list(chains.values())


def onnx_layer_chains(model: nn.Module, example_input: torch.Tensor, layers: Sequence[str]) -> list[set[str]]:
    """:func:`layer_chains` on the model's ONNX export (the graph the deployment quantizes).

    The nodes in the scope of a module in ``layers`` are that layer; every other node (an attention
    MatMul included) is layer-less.
    """
    import onnx

    from autocompress.compress.deploy import export_onnx, node_module

    wanted = set(layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, example_input, Path(tmp) / "regions.onnx")
        graph = onnx.load(str(path), load_external_data=False).graph
    nodes = list(graph.node)
    # A node in a layer's own scope is that layer (a Linear on a 3-d input exports as MatMul + Add).
    names = [scope if (scope := node_module(n.name)) in wanted else None for n in nodes]
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    edges = [(producer[t], i) for i, node in enumerate(nodes) for t in node.input if t in producer]
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    sources = [i for i, node in enumerate(nodes) if any(t in inputs for t in node.input)]
    sinks = [i for i, node in enumerate(nodes) if any(t in outputs for t in node.output)]
    return layer_chains(names, edges, sources, sinks)


def _runs(layers: Sequence[str], order: Sequence[str], groups: Iterable[set[str]]) -> list[list[str]]:
    """Each group split into runs of consecutive layers in ``order``, sorted by position."""
    position = {name: i for i, name in enumerate(order)}
    runs: list[list[str]] = []
    for group in groups:
        members = sorted((name for name in group if name in position), key=position.__getitem__)
        for name in members:
            if runs and runs[-1][-1] in group and position[name] == position[runs[-1][-1]] + 1:
                runs[-1].append(name)
            else:
                runs.append([name])
    return sorted(runs, key=lambda run: position[run[0]])


def bit_groups(
    model: nn.Module, example_input: torch.Tensor, layers: Sequence[str], granularity: str
) -> list[list[str]]:
    """The searched layers grouped by what one bit-width parameter covers, each group a run of
    consecutive Conv/Linear layers in module order (a layer the space excludes cuts a run)."""
    if granularity == "layer":
        return [[name] for name in layers]
    order = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if granularity == "model":
        return _runs(layers, order, [set(layers)])
    if granularity != "region":
        raise ValueError(f"space.quantize.granularity {granularity!r}: use layer, region or model")
    try:
        chains = onnx_layer_chains(model, example_input, layers)
    except Exception as err:  # noqa: BLE001 - no ONNX graph (unexportable model): no regions to read
        warnings.warn(
            f"space.quantize.granularity region: cannot export the model to ONNX ({err}); one bit-width per layer",
            stacklevel=2,
        )
        return [[name] for name in layers]
    covered = set().union(*chains) if chains else set()
    chains += [{name} for name in layers if name not in covered]  # layers the forward never calls
    return _runs(layers, order, chains)


def int8_modes(model: nn.Module, bits: Mapping[str, int], section: QuantizeSpace) -> dict[str, str]:
    """How each 8-bit layer of a deployment plan runs: ``section.int8`` for Linear layers (``static`` or
    ``dynamic``), ``static`` for every other layer (ORT has no dynamic convolution)."""
    modules = dict(model.named_modules())
    return {
        name: section.int8 if isinstance(modules.get(name), nn.Linear) else "static"
        for name, b in bits.items()
        if b == 8
    }
