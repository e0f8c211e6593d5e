"""Knowledge distillation as a technique: the temperature and KD weight of the fine-tune.

It changes no layer: its values are the settings of the candidate's distillation fine-tune
(:func:`autocompress.compress.distill.fit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

from autocompress.techniques.base import Discovery, Section, Stage, Technique

TEMPERATURE = "temperature"
ALPHA = "alpha"


class DistillSpace(Section):
    """Knowledge-distillation settings searched per trial (temperature T, KD weight alpha)."""

    temperature: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0], min_length=1)
    alpha: list[float] = Field(default_factory=lambda: [0.0, 0.5, 0.7, 0.9], min_length=1)

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        for t in value:
            if t <= 0:
                raise ValueError(f"temperature {t} must be > 0")
        return sorted(set(value))

    @field_validator("alpha")
    @classmethod
    def _unit(cls, value: list[float]) -> list[float]:
        for a in value:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha {a} must be in [0, 1]")
        return sorted(set(value))


class Distillation(Technique):
    """KD settings (``kd/temperature``, ``kd/alpha``) of the fine-tune."""

    name = "kd"
    config_key = "distill"
    config_model = DistillSpace
    value_type = float
    neutral = None  # no "off" value per key: alpha 0 turns KD off (see baseline)
    stage = Stage.FINETUNE
    changes_architecture = False

    def discover(self, section: DistillSpace, found: Discovery) -> dict[str, tuple]:
        return {TEMPERATURE: tuple(section.temperature), ALPHA: tuple(section.alpha)}

    def baseline(self, choices: Mapping[str, tuple]) -> dict[str, Any]:
        """The candidate without distillation: the first temperature, KD weight 0."""
        return {TEMPERATURE: choices[TEMPERATURE][0], ALPHA: 0.0}

    def fit_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {"temperature": values.get(TEMPERATURE, 1.0), "alpha": values.get(ALPHA, 0.0)}

    def describe(self, values: Mapping[str, Any]) -> str | None:
        alpha = values.get(ALPHA, 0.0)
        return f"T={values.get(TEMPERATURE, 1.0):g} a={alpha:g}" if alpha > 0 else None
