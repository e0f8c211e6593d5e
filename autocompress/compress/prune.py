"""Structured pruning that physically removes channels/neurons, driven by one dependency graph.

Torch-Pruning's DepGraph finds which layers are coupled (a conv's output channels, its
BatchNorm, the next layer's input channels, residual adds, concatenations, the Linear after a
flatten) and its pruner rewrites the modules, so the result is an ordinary, smaller
``nn.Module``. This module only adds what the search needs on top: naming the prunable groups
for the space, excluding output layers, and predicting kept channel counts after rounding.

Transformer attention (a module with an integer head count such as ``num_attention_heads`` and
``Linear`` children for its query/key/value projections, as Hugging Face encoders have) is
pruned by whole heads: the graph couples the q/k/v outputs with the attention output
projection's inputs, and Torch-Pruning's ``num_heads`` support removes complete heads from all of
them, so the head size is kept and only the head count (and ``all_head_size``) changes. Such a
group is named after the attention module and its ratio is the fraction of heads removed. The
residual stream of such a model is not offered (see :data:`RESIDUAL_REASON`).

A Hugging Face model pruned here records its new per-layer shapes in its config (see
:mod:`autocompress.models.hf`), so ``save_pretrained`` writes them and
:func:`autocompress.models.hf.from_pretrained` rebuilds it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autocompress import inputs as pytree
from autocompress.models import hf

ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
"""Attributes an attention module keeps its head count in (Hugging Face and common spellings)."""
HEAD_WIDTH_ATTRS = ("all_head_size",)
"""Attributes some attention modules keep ``heads x head_size`` in beside the head count."""
RESIDUAL_REASON = (
    "residual stream of a transformer: it feeds every LayerNorm and the embeddings, and modules the "
    "traced forward does not use (an unused pooler) read it too, so it is not pruned"
)


@dataclass(frozen=True)
class PruneGroup:
    """Layers whose output channels must be pruned together; named after the root layer.

    A head group (``head_size > 0``) is an attention module's q/k/v projections: ``channels`` is
    then its number of heads, it is named after the attention module, and a ratio removes whole
    heads of ``head_size`` channels each.
    """

    name: str
    channels: int
    members: tuple[str, ...]
    head_size: int = 0

    @property
    def is_heads(self) -> bool:
        """Whether this group removes whole attention heads rather than single channels."""
        return self.head_size > 0

    def kept(self, ratio: float, round_to: int = 1) -> int:
        """Channels (heads, for a head group) left after pruning ``ratio``; 0 means all removed."""
        return kept_heads(self.channels, ratio) if self.is_heads else kept_channels(self.channels, ratio, round_to)


@dataclass(frozen=True)
class Analysis:
    """The prunable groups of a model, the groups left out (with why) and its output layers."""

    groups: list[PruneGroup]
    excluded: dict[str, str]
    output_layers: list[nn.Module]


def _graph(model: nn.Module, example_input: pytree.Inputs) -> tp.DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def _group_layers(graph: tp.DependencyGraph, group) -> tuple[list[nn.Module], list[nn.Module]]:
    """(layers pruned on their outputs, layers pruned on their inputs) of a group."""
    out_layers, in_layers = [], []
    for dep, _ in group:
        module = dep.target.module
        if not isinstance(module, ROOT_TYPES):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            if module not in out_layers:
                out_layers.append(module)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            in_layers.append(module)
    return out_layers, in_layers


def head_count(module: nn.Module) -> tuple[str, int] | None:
    """``(attribute, heads)`` when ``module`` keeps an attention head count, else None."""
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attr, value
    return None


def _attention_parents(model: nn.Module) -> dict[nn.Module, str]:
    """Each Linear child of an attention module (one with a head count) -> that module's name."""
    parents = {}
    for name, module in model.named_modules():
        if head_count(module) is None:
            continue
        for child in module.children():
            if isinstance(child, nn.Linear):
                parents[child] = name
    return parents


def _head_group(out_layers: list[nn.Module], parents: dict[nn.Module, str], modules: dict[str, nn.Module]):
    """``(attention name, heads, head size)`` when ``out_layers`` are one attention's projections;
    ``(name, 0, 0)`` when they are but their widths do not split into its heads; else None."""
    owners = {parents.get(layer) for layer in out_layers}
    if len(out_layers) < 2 or len(owners) != 1 or None in owners:
        return None
    name = owners.pop()
    heads = head_count(modules[name])[1]
    widths = {layer.out_features for layer in out_layers}
    if len(widths) != 1 or next(iter(widths)) % heads:
        # Grouped-query attention (fewer key/value heads) lands here: not supported yet.
        return name, 0, 0
    return name, heads, next(iter(widths)) // heads


def analyse(model: nn.Module, example_input: pytree.Inputs) -> Analysis:
    """Every dependency group of ``model``: prunable, excluded with a reason, or an output layer."""
    graph = _graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    modules = dict(model.named_modules())
    parents = _attention_parents(model)
    groups, excluded, output_layers = [], {}, []
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
        out_layers, in_layers = _group_layers(graph, group)
        if not out_layers:
            continue
        if not in_layers:
            # Nothing downstream consumes these channels: they are the model's output.
            output_layers.extend(out_layers)
            continue
        root = group[0].dep.target.module
        heads = _head_group(out_layers, parents, modules)
        if heads is not None:
            attention, count, size = heads
            if not count:
                widths = sorted({layer.out_features for layer in out_layers})
                excluded[attention] = f"projection widths {widths} do not split into its heads: not pruned"
                continue
            groups.append(PruneGroup(attention, count, tuple(names[m] for m in out_layers), head_size=size))
            continue
        if any(layer in parents for layer in in_layers):
            # The group feeds an attention's q/k/v inputs: the stream every block reads and adds to.
            excluded[names[root]] = RESIDUAL_REASON
            continue
        groups.append(
            PruneGroup(
                name=names[root],
                channels=int(graph.get_out_channels(root)),
                members=tuple(names[m] for m in out_layers),
            )
        )
    return Analysis(groups, excluded, output_layers)


def find_prune_groups(model: nn.Module, example_input: pytree.Inputs) -> list[PruneGroup]:
    """The model's prunable channel and head groups, in graph order; output layers are left out."""
    return analyse(model, example_input).groups


def kept_channels(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels left after pruning ``ratio`` of ``channels`` with the pruner's rounding.

    Mirrors Torch-Pruning's arithmetic: keep ``int(C * (1 - ratio))``, rounded *down* to a
    multiple of ``round_to``. A result of 0 means the ratio would delete the whole layer.
    """
    if ratio <= 0:
        return channels
    kept = int(channels * (1 - ratio))
    return kept - kept % round_to if round_to > 1 else kept


def kept_heads(heads: int, ratio: float) -> int:
    """Heads left after pruning ``ratio`` of ``heads``: Torch-Pruning removes ``ceil(ratio * heads)``."""
    if ratio <= 0:
        return heads
    return heads - math.ceil(ratio * heads)


def useful_ratios(channels: int, ratios: list[float], round_to: int, *, heads: bool = False) -> list[float]:
    """The ratios that give distinct, non-zero channel (or, with ``heads``, head) counts; the
    smallest ratio per count."""
    seen, result = set(), []
    for ratio in sorted(ratios):
        kept = kept_heads(channels, ratio) if heads else kept_channels(channels, ratio, round_to)
        if kept >= 1 and kept not in seen:
            seen.add(kept)
            result.append(ratio)
    return result


IMPORTANCES = ("l1", "l2", "taylor")


def _importance(kind: str) -> tp.importance.Importance:
    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        # First-order Taylor: |w * dL/dw| summed over the group, from accumulated gradients.
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {kind!r}: use one of {', '.join(IMPORTANCES)}")


def _accumulate_gradients(model: nn.Module, batches: Iterable, loss: Callable) -> None:
    """Sum ``loss`` gradients over ``batches`` into ``.grad`` (what Taylor importance reads)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in batches:
            x, y = pytree.split_batch(batch)
            loss(pytree.forward(model, x), y).backward()


def prune(
    model: nn.Module,
    ratios: dict[str, float],
    example_input: pytree.Inputs,
    *,
    round_to: int = 8,
    importance: str = "l1",
    calibration: Iterable | None = None,
    loss: Callable = F.cross_entropy,
) -> nn.Module:
    """Remove the least important channels (or heads) of each named group, in place; return the model.

    ``ratios`` maps a group name (see :func:`find_prune_groups`) to the fraction of its output
    channels (of its heads, for a head group) to remove. Unnamed groups are left whole; unknown
    or excluded names raise ``KeyError``. ``importance`` is ``"l1"``/``"l2"`` weight magnitude or
    ``"taylor"`` (first order), which needs ``calibration``: a few labelled ``(x, y)`` batches to
    compute ``loss`` gradients on. A Hugging Face model (or one containing one) also gets its new
    shapes recorded in its config (:func:`autocompress.models.hf.record_pruned`).
    """
    active = {name: r for name, r in ratios.items() if r > 0}
    if not active:
        return model
    found = analyse(model, example_input)
    by_name = {g.name: g for g in found.groups}
    excluded = sorted(set(active) & set(found.excluded))
    if excluded:
        raise KeyError("; ".join(f"group {name} is not prunable: {found.excluded[name]}" for name in excluded))
    unknown = sorted(set(active) - set(by_name))
    if unknown:
        raise KeyError(f"no prunable group named {', '.join(unknown)}")
    modules = dict(model.named_modules())
    for name, ratio in active.items():
        if by_name[name].kept(ratio, round_to) < 1:
            unit = "head" if by_name[name].is_heads else "channel"
            raise ValueError(f"ratio {ratio} would remove every {unit} of {name}")
    if importance == "taylor" and calibration is None:
        raise ValueError("importance 'taylor' needs calibration batches to compute gradients")
    channel_ratios, head_ratios, num_heads = {}, {}, {}
    for name, ratio in active.items():
        group = by_name[name]
        if not group.is_heads:
            channel_ratios[modules[name]] = ratio
            continue
        for member in group.members:
            layer = modules[member]
            num_heads[layer] = group.channels
            head_ratios[layer] = ratio
            # Torch-Pruning only visits an attention group whose width ratio is non-zero; with
            # prune_head_dims off that ratio removes no single channel, only the heads below.
            channel_ratios[layer] = ratio
    before = hf.snapshot(model)
    was_training = model.training
    model.eval()
    if importance == "taylor":
        _accumulate_gradients(model, calibration, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=_importance(importance),
            pruning_ratio=0.0,
            pruning_ratio_dict=channel_ratios,
            ignored_layers=found.output_layers,
            round_to=round_to if round_to > 1 else None,
            num_heads=num_heads,
            prune_num_heads=bool(num_heads),
            prune_head_dims=False,
            head_pruning_ratio_dict=head_ratios,
            # Fresh dicts: Torch-Pruning writes into these, and its defaults are shared mutable dicts.
            in_channel_groups={},
            out_channel_groups={},
        )
        pruner.step()
    for name in active:
        if by_name[name].is_heads:
            group = by_name[name]
            _update_head_count(
                modules[name], name, group, [modules[m] for m in group.members], group.kept(active[name])
            )
    hf.record_pruned(model, before)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return model


def _update_head_count(
    attention: nn.Module, name: str, group: PruneGroup, projections: list[nn.Module], expected: int
) -> None:
    """Make the attention module's head count (and head width) agree with its pruned projections."""
    widths = sorted({p.out_features for p in projections})
    if widths != [expected * group.head_size]:
        # A Torch-Pruning change in how heads are counted or cut would land here, not in a later shape error.
        raise RuntimeError(
            f"pruning {name} left projection widths {widths}, expected {expected} heads of {group.head_size}"
        )
    width = widths[0]
    attr, _ = head_count(attention)
    setattr(attention, attr, width // group.head_size)
    for width_attr in HEAD_WIDTH_ATTRS:
        if isinstance(getattr(attention, width_attr, None), int):
            setattr(attention, width_attr, width)
