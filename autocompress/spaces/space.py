"""The per-layer search space of an experiment: discovered from the model, sampled by trials.

Sampling is define-by-run (``space.suggest(trial)``), so the same space serves Optuna studies
and any searcher that speaks Optuna's trial API.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from autocompress.compress.lowrank import factorizable_layers, layer_input_shapes, useful_rank_fractions
from autocompress.compress.prune import find_prune_groups, useful_ratios
from autocompress.config import SpaceConfig
from autocompress.errors import AutocompressError
from autocompress.spaces.candidate import BITS, KD_ALPHA, KD_TEMPERATURE, PRUNE, RANK, Candidate

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class SearchSpace:
    """Choices per prune group, per quantizable layer, per factorizable layer, and for distillation."""

    prune: dict[str, tuple[float, ...]]
    bits: dict[str, tuple[int, ...]]
    kd_temperature: tuple[float, ...]
    kd_alpha: tuple[float, ...]
    round_to: int = 8
    importance: str = "l1"
    rank: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def distributions(self) -> dict[str, CategoricalDistribution]:
        """Every parameter with its choices, keyed by the names :class:`Candidate` uses."""
        dists = {f"{PRUNE}{k}": CategoricalDistribution(v) for k, v in self.prune.items()}
        dists.update({f"{BITS}{k}": CategoricalDistribution(v) for k, v in self.bits.items()})
        dists.update({f"{RANK}{k}": CategoricalDistribution(v) for k, v in self.rank.items()})
        dists[KD_TEMPERATURE] = CategoricalDistribution(self.kd_temperature)
        dists[KD_ALPHA] = CategoricalDistribution(self.kd_alpha)
        return dists

    def suggest(self, trial: Any) -> Candidate:
        """Sample a candidate from an Optuna-style trial (``suggest_categorical``)."""
        params = {
            name: trial.suggest_categorical(name, list(dist.choices)) for name, dist in self.distributions().items()
        }
        return Candidate.from_params(params)

    def baseline(self) -> Candidate:
        """The uncompressed point: no pruning, fp32 everywhere, no distillation."""
        return Candidate(
            prune={k: 0.0 for k in self.prune},
            bits={k: 32 for k in self.bits},
            rank={k: 1.0 for k in self.rank},
            kd_temperature=self.kd_temperature[0],
            kd_alpha=0.0,
        )

    def size(self) -> int:
        """Number of distinct candidates."""
        n = 1
        for dist in self.distributions().values():
            n *= len(dist.choices)
        return n

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (logged with the experiment)."""
        return {
            "prune_groups": {k: list(v) for k, v in self.prune.items()},
            "bits": {k: list(v) for k, v in self.bits.items()},
            "rank": {k: list(v) for k, v in self.rank.items()},
            "kd_temperature": list(self.kd_temperature),
            "kd_alpha": list(self.kd_alpha),
            "round_to": self.round_to,
            "importance": self.importance,
            "candidates": self.size(),
        }


def _selected(name: str, include: list[str], exclude: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def build_space(model: nn.Module, example_input: torch.Tensor, config: SpaceConfig) -> SearchSpace:
    """Discover the model's prunable groups and quantizable layers and attach the choices.

    A group is searched when its root layer matches ``include`` and not ``exclude``; ratios that
    would round to the same channel count (or to zero channels), and rank fractions that would not
    lower a layer's MACs, are dropped, so every offered choice builds a different model.
    Patterns that match no layer are an error.
    """
    layer_names = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    for pattern in [*config.include, *config.exclude]:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
            raise AutocompressError(
                f"space: layer pattern {pattern!r} matches no layer (layers: {', '.join(layer_names)})"
            )
    prune: dict[str, tuple[float, ...]] = {}
    if config.prune.enabled:
        for group in find_prune_groups(model, example_input):
            if not _selected(group.name, config.include, config.exclude):
                continue
            choices = useful_ratios(group.channels, config.prune.ratios, config.prune.round_to)
            if any(r > 0 for r in choices):
                prune[group.name] = tuple(choices)
    bits: dict[str, tuple[int, ...]] = {}
    if config.quantize.enabled and config.quantize.bits != [32]:
        bits = {
            name: tuple(config.quantize.bits) for name in layer_names if _selected(name, config.include, config.exclude)
        }
    rank: dict[str, tuple[float, ...]] = {}
    if config.lowrank.enabled:
        modules = dict(model.named_modules())
        shapes = layer_input_shapes(model, example_input)
        for name in factorizable_layers(model):
            if _selected(name, config.include, config.exclude):
                choices = useful_rank_fractions(modules[name], config.lowrank.fractions, shapes.get(name))
                if any(f < 1 for f in choices):
                    rank[name] = tuple(choices)
    if not prune and not bits and not rank:
        raise AutocompressError("space: nothing to search (no prunable group, quantizable or factorizable layer)")
    return SearchSpace(
        prune=prune,
        bits=bits,
        kd_temperature=tuple(config.distill.temperature),
        kd_alpha=tuple(config.distill.alpha),
        round_to=config.prune.round_to,
        importance=config.prune.importance,
        rank=rank,
    )
