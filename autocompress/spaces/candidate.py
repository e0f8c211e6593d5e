"""A :class:`Candidate`: one point of the search space as plain, serialisable data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autocompress.techniques import Stage, get, parse_params, split_param, techniques
from autocompress.techniques.base import SEPARATOR


class Candidate:
    """Per-technique, per-key compression choices: ``{technique: {key: value}}``.

    Keys are what each technique discovered (``prune``: a dependency-group name; ``bits`` and
    ``rank``: a layer name; ``kd``: ``temperature`` and ``alpha``). The same Candidate, teacher
    and seed rebuild the same model. :meth:`to_params`/:meth:`from_params` round-trip through the
    flat names Optuna and MLflow store (``prune/<group>``, ``bits/<layer>``, ``kd/alpha`` ...);
    a name no registered technique claims is an error, never dropped.

    ``Candidate(prune={...}, bits={...})`` names techniques as keywords.
    """

    __slots__ = ("values",)

    def __init__(self, values: Mapping[str, Mapping[str, Any]] | None = None, /, **by_technique: Mapping[str, Any]):
        merged = {**(values or {}), **by_technique}
        for name in merged:
            get(name)  # an unknown technique name raises here, naming the known ones
        object.__setattr__(self, "values", {name: dict(v) for name, v in merged.items()})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Candidate is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self.values == other.values

    def __repr__(self) -> str:
        return f"Candidate({self.values!r})"

    def get(self, technique: str) -> dict[str, Any]:
        """The values of one technique (empty when the candidate does not use it)."""
        return self.values.get(technique, {})

    def to_params(self) -> dict[str, Any]:
        """Flat parameter dict (the form Optuna trials and MLflow runs store), in registry order."""
        return {
            f"{t.name}{SEPARATOR}{key}": value
            for t in techniques()
            for key, value in self.values.get(t.name, {}).items()
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Candidate:
        """Inverse of :meth:`to_params`; an unknown name or a value of the wrong type raises
        :class:`~autocompress.techniques.ParameterError` naming it."""
        values: dict[str, dict[str, Any]] = {}
        for param, value in parse_params(params).items():
            technique, key = split_param(param)
            values.setdefault(technique.name, {})[key] = value
        return cls(values)

    def describe(self) -> str:
        """A short human summary, e.g. ``prune 0.25-0.75 (4/6) | int8x3 int4x1 | T=4 a=0.7``."""
        ordered = sorted(techniques(), key=lambda t: t.stage)
        model_parts = [t.describe(self.get(t.name)) for t in ordered if t.stage < Stage.FINETUNE]
        parts = [p for p in model_parts if p] or ["uncompressed"]
        parts += [p for t in ordered if t.stage >= Stage.FINETUNE if (p := t.describe(self.get(t.name)))]
        return " | ".join(parts)
