"""A :class:`Candidate`: one point of the search space as plain, serialisable data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PRUNE = "prune/"
BITS = "bits/"
RANK = "rank/"
KD_TEMPERATURE = "kd/temperature"
KD_ALPHA = "kd/alpha"


@dataclass(frozen=True)
class Candidate:
    """Per-layer compression choices plus distillation settings.

    ``prune`` maps a prune-group name to the fraction of its channels removed; ``bits`` maps a
    layer name to its weight bit-width (32 = fp32); ``rank`` maps a layer name to its low-rank
    fraction of full rank (1.0 = not factorized). The same Candidate, teacher and seed rebuild
    the same model. ``to_params``/``from_params`` round-trip through the flat parameter names
    stored by Optuna and MLflow (``prune/<group>``, ``bits/<layer>``, ``rank/<layer>``,
    ``kd/temperature``, ``kd/alpha``).
    """

    prune: dict[str, float] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)
    rank: dict[str, float] = field(default_factory=dict)
    kd_temperature: float = 1.0
    kd_alpha: float = 0.0

    def to_params(self) -> dict[str, Any]:
        """Flat parameter dict (the form Optuna trials and MLflow runs store)."""
        params: dict[str, Any] = {f"{PRUNE}{k}": v for k, v in self.prune.items()}
        params.update({f"{BITS}{k}": v for k, v in self.bits.items()})
        params.update({f"{RANK}{k}": v for k, v in self.rank.items()})
        params[KD_TEMPERATURE] = self.kd_temperature
        params[KD_ALPHA] = self.kd_alpha
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Candidate:
        """Inverse of :meth:`to_params`; unknown keys raise ``ValueError`` naming them."""
        prune, bits, rank = {}, {}, {}
        temperature, alpha = 1.0, 0.0
        for key, value in params.items():
            if key.startswith(PRUNE):
                prune[key[len(PRUNE) :]] = float(value)
            elif key.startswith(BITS):
                bits[key[len(BITS) :]] = int(value)
            elif key.startswith(RANK):
                rank[key[len(RANK) :]] = float(value)
            elif key == KD_TEMPERATURE:
                temperature = float(value)
            elif key == KD_ALPHA:
                alpha = float(value)
            else:
                raise ValueError(f"unknown candidate parameter {key!r}")
        return cls(prune=prune, bits=bits, rank=rank, kd_temperature=temperature, kd_alpha=alpha)

    def describe(self) -> str:
        """A short human summary, e.g. ``prune 0.25-0.75 (4/6) | int8x3 int4x1 | T=4 a=0.7``."""
        parts = []
        ratios = [r for r in self.prune.values() if r > 0]
        if ratios:
            parts.append(f"prune {min(ratios):g}-{max(ratios):g} ({len(ratios)}/{len(self.prune)})")
        factorized = [f for f in self.rank.values() if f < 1]
        if factorized:
            parts.append(f"lowrank {min(factorized):g}-{max(factorized):g} ({len(factorized)}/{len(self.rank)})")
        counts: dict[int, int] = {}
        for b in self.bits.values():
            if b < 32:
                counts[b] = counts.get(b, 0) + 1
        if counts:
            parts.append(" ".join(f"int{b}x{n}" for b, n in sorted(counts.items(), reverse=True)))
        if not parts:
            parts.append("uncompressed")
        if self.kd_alpha > 0:
            parts.append(f"T={self.kd_temperature:g} a={self.kd_alpha:g}")
        return " | ".join(parts)
