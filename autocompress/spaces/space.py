"""The per-layer search space of an experiment: discovered from the model, sampled by trials.

Each registered technique (:mod:`autocompress.techniques`) discovers its keys and choices on the
model. Sampling is define-by-run (``space.suggest(trial)``), so the same space serves Optuna
studies and any searcher that speaks Optuna's trial API.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.spaces.candidate import Candidate
from autocompress.techniques import Discovery, Section, Stage, get, techniques
from autocompress.techniques.base import QUANTIZABLE, SEPARATOR


@dataclass(frozen=True)
class SearchSpace:
    """Choices per technique and key (``{"prune": {group: ratios}, "bits": {layer: widths}, ...}``),
    and each technique's config section (its experiment-wide settings such as ``round_to``)."""

    choices: dict[str, dict[str, tuple]]
    sections: dict[str, Section] = field(default_factory=dict)

    def get(self, technique: str) -> dict[str, tuple]:
        """The choices of one technique (empty when it is not searched)."""
        return self.choices.get(technique, {})

    def section(self, technique: str) -> Section:
        """A technique's config section (its defaults when the space was built without one)."""
        if technique in self.sections:
            return self.sections[technique]
        return get(technique).config_model()

    def distributions(self) -> dict[str, CategoricalDistribution]:
        """Every parameter with its choices, keyed by the flat names :class:`Candidate` uses."""
        return {
            f"{t.name}{SEPARATOR}{key}": CategoricalDistribution(values)
            for t in techniques()
            for key, values in self.choices.get(t.name, {}).items()
        }

    def suggest(self, trial: Any) -> Candidate:
        """Sample a candidate from an Optuna-style trial (``suggest_categorical``)."""
        params = {
            name: trial.suggest_categorical(name, list(dist.choices)) for name, dist in self.distributions().items()
        }
        return Candidate.from_params(params)

    def baseline(self) -> Candidate:
        """The uncompressed point: every technique at its neutral value, no distillation."""
        return Candidate({t.name: t.baseline(self.choices[t.name]) for t in techniques() if t.name in self.choices})

    def uniform_points(self) -> list[dict[str, Any]]:
        """Uniform plans a search should try first, as flat parameters (the rest is left to the sampler).

        Every bit-width key at 8 with no pruning; each offered pruning ratio on every group, fp32
        (a group that does not offer the ratio takes its largest offered ratio below it: that is
        the same channel count, or the most it can be pruned); int8 with the smallest ratio. Only
        what the space offers; the uncompressed point and repeats are left out. Such plans are
        where mixed ones are measured against, and on a sampler's first generation they are
        unlikely to be drawn.
        """
        prune, bits = self.get("prune"), self.get("bits")

        def fixed(technique: str, values: dict[str, Any]) -> dict[str, Any]:
            # a value the key does not offer is left to the sampler (Optuna rejects it)
            choices = self.get(technique)
            return {f"{technique}{SEPARATOR}{k}": v for k, v in values.items() if v in choices[k]}

        def pruned(ratio: float) -> dict[str, Any]:
            return fixed("prune", {k: max((c for c in v if c <= ratio), default=min(v)) for k, v in prune.items()})

        int8 = fixed("bits", dict.fromkeys(bits, 8))
        fp32 = fixed("bits", dict.fromkeys(bits, get("bits").neutral))
        ratios = sorted({r for v in prune.values() for r in v if r > 0})
        unpruned = pruned(0.0)
        points = [{**unpruned, **int8}] if int8 else []
        points += [{**pruned(r), **fp32} for r in ratios]
        if int8 and ratios:
            points.append({**pruned(ratios[0]), **int8})
        neutral = {**unpruned, **fp32}
        unique: list[dict[str, Any]] = []
        for point in points:
            if point and point != neutral and point not in unique:
                unique.append(point)
        return unique

    def size(self) -> int:
        """Number of distinct candidates."""
        n = 1
        for dist in self.distributions().values():
            n *= len(dist.choices)
        return n

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (logged with the experiment, part of a study's fingerprint)."""
        out: dict[str, Any] = {}
        for t in techniques():
            if t.name in self.choices:
                out[t.name] = {k: list(v) for k, v in self.choices[t.name].items()}
                settings = t.summary(self.section(t.name))
                if settings:
                    out[f"{t.name}.settings"] = settings
        out["candidates"] = self.size()
        return out

    def describe(self) -> str:
        """One line: how many keys each technique searches, and the number of candidates."""
        counts = ", ".join(f"{len(v)} {name}" for name, v in self.choices.items())
        return f"{counts}; {self.size():.3g} candidates"


def build_space(model: nn.Module, example_input: torch.Tensor, config: Any) -> SearchSpace:
    """Ask every enabled technique of ``config`` (a ``SpaceConfig``) for its choices on ``model``.

    A layer (or prune group) is searched when it matches ``include`` and not ``exclude``; each
    technique offers only choices that build a different model. Patterns that match no layer
    are an error, and so is a space where nothing would be compressed.
    """
    layer_names = [name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    for pattern in [*config.include, *config.exclude]:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
            raise AutocompressError(
                f"space: layer pattern {pattern!r} matches no layer (layers: {', '.join(layer_names)})"
            )
    found = Discovery(model, example_input, tuple(config.include), tuple(config.exclude))
    choices: dict[str, dict[str, tuple]] = {}
    sections: dict[str, Section] = {}
    for technique in techniques():
        section = getattr(config, technique.config_key)
        sections[technique.name] = section
        if technique.enabled(section):
            discovered = technique.discover(section, found)
            if discovered:
                choices[technique.name] = discovered
    if not any(get(name).stage < Stage.FINETUNE for name in choices):
        raise AutocompressError("space: nothing to search (no prunable group, quantizable or factorizable layer)")
    return SearchSpace(choices=choices, sections=sections)
