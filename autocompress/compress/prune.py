"""Structured pruning that physically removes channels/neurons, driven by one dependency graph.

Torch-Pruning's DepGraph finds which layers are coupled (a conv's output channels, its
BatchNorm, the next layer's input channels, residual adds, concatenations, the Linear after a
flatten) and its pruner rewrites the modules, so the result is an ordinary, smaller
``nn.Module``. This module only adds what the search needs on top: naming the prunable groups
for the space, excluding output layers, and predicting kept channel counts after rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)


@dataclass(frozen=True)
class PruneGroup:
    """Layers whose output channels must be pruned together; named after the root layer."""

    name: str
    channels: int
    members: tuple[str, ...]


def _graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)


def _group_layers(graph: tp.DependencyGraph, group) -> tuple[list[nn.Module], bool]:
    """(layers pruned on their outputs, whether a downstream layer's inputs are pruned too)."""
    out_layers, feeds_a_layer = [], False
    for dep, _ in group:
        module = dep.target.module
        if not isinstance(module, ROOT_TYPES):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            if module not in out_layers:
                out_layers.append(module)
        elif graph.is_in_channel_pruning_fn(dep.handler):
            feeds_a_layer = True
    return out_layers, feeds_a_layer


def _analyse(model: nn.Module, example_input: torch.Tensor):
    graph = _graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    groups, output_layers = [], []
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
        out_layers, feeds_a_layer = _group_layers(graph, group)
        if not out_layers:
            continue
        if not feeds_a_layer:
            # Nothing downstream consumes these channels: they are the model's output.
            output_layers.extend(out_layers)
            continue
        root = group[0].dep.target.module
        groups.append(
            PruneGroup(
                name=names[root],
                channels=int(graph.get_out_channels(root)),
                members=tuple(names[m] for m in out_layers),
            )
        )
    return groups, output_layers


def find_prune_groups(model: nn.Module, example_input: torch.Tensor) -> list[PruneGroup]:
    """The model's prunable channel groups, in graph order; output layers are left out."""
    return _analyse(model, example_input)[0]


def kept_channels(channels: int, ratio: float, round_to: int = 1) -> int:
    """Channels left after pruning ``ratio`` of ``channels`` with the pruner's rounding.

    Mirrors Torch-Pruning's arithmetic: keep ``int(C * (1 - ratio))``, rounded *down* to a
    multiple of ``round_to``. A result of 0 means the ratio would delete the whole layer.
    """
    if ratio <= 0:
        return channels
    kept = int(channels * (1 - ratio))
    return kept - kept % round_to if round_to > 1 else kept


def useful_ratios(channels: int, ratios: list[float], round_to: int) -> list[float]:
    """The ratios that give distinct, non-zero channel counts (smallest ratio per count)."""
    seen, result = set(), []
    for ratio in sorted(ratios):
        kept = kept_channels(channels, ratio, round_to)
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


def _accumulate_gradients(model: nn.Module, batches: Iterable) -> None:
    """Sum cross-entropy gradients over ``batches`` into ``.grad`` (what Taylor importance reads)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()


def prune(
    model: nn.Module,
    ratios: dict[str, float],
    example_input: torch.Tensor,
    *,
    round_to: int = 8,
    importance: str = "l1",
    calibration: Iterable | None = None,
) -> nn.Module:
    """Remove the least important channels of each named group, in place; return the model.

    ``ratios`` maps a group name (see :func:`find_prune_groups`) to the fraction of its output
    channels to remove. Unnamed groups are left whole; unknown names raise ``KeyError``.
    ``importance`` is ``"l1"``/``"l2"`` weight magnitude or ``"taylor"`` (first order), which
    needs ``calibration``: a few labelled ``(x, y)`` batches to compute gradients on.
    """
    active = {name: r for name, r in ratios.items() if r > 0}
    if not active:
        return model
    groups, output_layers = _analyse(model, example_input)
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(active) - set(by_name))
    if unknown:
        raise KeyError(f"no prunable group named {', '.join(unknown)}")
    modules = dict(model.named_modules())
    for name, ratio in active.items():
        if kept_channels(by_name[name].channels, ratio, round_to) < 1:
            raise ValueError(f"ratio {ratio} would remove every channel of {name}")
    if importance == "taylor" and calibration is None:
        raise ValueError("importance 'taylor' needs calibration batches to compute gradients")
    was_training = model.training
    model.eval()
    if importance == "taylor":
        _accumulate_gradients(model, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            example_input,
            importance=_importance(importance),
            pruning_ratio=0.0,
            pruning_ratio_dict={modules[name]: r for name, r in active.items()},
            ignored_layers=output_layers,
            round_to=round_to if round_to > 1 else None,
        )
        pruner.step()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return model
