"""The technique protocol and its registry: what every compression technique declares and does.

A technique (structured pruning, low-rank, sparsity, weight quantization, distillation) is one
module with one :class:`Technique` subclass, registered with :func:`register`. Everything that
used to list techniques by hand goes through :func:`techniques`: the ``space`` config sections,
the search space's parameters, the order the pipeline applies them in, the stored-parameter
reader, profile candidate enumeration and the deployment plan (per-layer bit-widths) that size
accounting and the runtimes read.

Parameters are stored flat as ``<technique name>/<key>`` (``prune/features.conv1``,
``bits/fc1``, ``kd/temperature``): the names Optuna studies and MLflow runs hold.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from autocompress.errors import AutocompressError

SEPARATOR = "/"
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layers with a weight tensor the per-layer techniques (bit-width, sparsity) act on."""


class ParameterError(AutocompressError, ValueError):
    """A stored or given candidate parameter that no technique claims, or of the wrong type."""


class Section(BaseModel):
    """Base of every config section: a misspelt key is an error, not a silently ignored setting, and
    a NaN or infinite number (YAML ``.nan``, ``.inf``, the string ``"nan"``) is refused in every float
    field, lists of floats included: it would compare false with everything and end up in the study."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Stage(enum.IntEnum):
    """When a technique acts while a candidate is built; the pipeline applies them in this order."""

    STRUCTURE = 10  # removes channels (shapes change; cost is known before the fine-tune)
    FACTORIZE = 20  # replaces layers by factors of the (pruned) layers
    WEIGHTS = 30  # parametrizes weights (masks, fake-quant); the fine-tune trains through them
    FINETUNE = 40  # settings of the distillation fine-tune; the model is not touched


@dataclass(frozen=True)
class Discovery:
    """What a technique may see of the model when it discovers its choices."""

    model: nn.Module
    example_input: Any  # a tensor, tuple or dict of tensors (autocompress.inputs)
    include: tuple[str, ...] = ("*",)  # layer-name globs the search may touch
    exclude: tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        """Whether the space's globs let the search touch the layer (or group root) ``name``."""
        return selected(name, self.include, self.exclude)

    @property
    def layers(self) -> list[str]:
        """The quantizable layers (Conv/Linear) the globs select, in module order."""
        return [n for n, m in self.model.named_modules() if isinstance(m, QUANTIZABLE) and self.selects(n)]


@dataclass(frozen=True)
class BuildContext:
    """What a technique may use while it applies its values to a student."""

    example_input: Any  # a tensor, tuple or dict of tensors (autocompress.inputs)
    calibration: Callable[[int], list]  # the first n training batches (fixed order)
    loss: Callable | None = None  # the task's loss (gradient-based importance); None: the task has none


class Technique(ABC):
    """One compression technique. Subclass, set the class attributes, and :func:`register` it.

    ``name`` prefixes its parameters; ``config_key`` names its section under ``space``
    (``config_model``, a :class:`Section`); ``value_type`` is the type of every value (a stored
    value of another type is an error); ``neutral`` is the value that leaves a key uncompressed
    (``None`` for settings, like distillation's, that have no such value); ``stage`` orders the
    techniques while a candidate is built; ``changes_architecture`` says whether the technique
    changes shapes, so that a candidate's latency is known before its fine-tune.
    """

    name: ClassVar[str]
    config_key: ClassVar[str]
    config_model: ClassVar[type[Section]]
    value_type: ClassVar[type]
    neutral: ClassVar[Any]
    stage: ClassVar[Stage]
    changes_architecture: ClassVar[bool]

    def enabled(self, section: Section) -> bool:
        """Whether the experiment searches this technique (its section's ``enabled``, default on)."""
        return bool(getattr(section, "enabled", True))

    @abstractmethod
    def discover(self, section: Section, found: Discovery) -> dict[str, tuple]:
        """The technique's keys on this model with their choices; only choices that change the model."""

    def apply(self, model: nn.Module, values: Mapping[str, Any], section: Section, ctx: BuildContext) -> None:  # noqa: B027 - a fine-tune setting changes no model
        """Change ``model`` in place to ``values`` (keys as :meth:`discover` returned them)."""

    def plan(self, model: nn.Module, values: Mapping[str, Any]) -> dict[str, int]:
        """Per-layer weight bit-widths this technique asks the deployment for (keyed by ``model``'s layers)."""
        return {}

    def baseline(self, choices: Mapping[str, tuple]) -> dict[str, Any]:
        """The values of the uncompressed candidate (``neutral`` for every key)."""
        return dict.fromkeys(choices, self.neutral)

    def most_compressed(self, offered: tuple) -> Any:
        """The most compressed of one key's choices: the one furthest from ``neutral`` (the largest pruning
        ratio, the fewest bits, the smallest rank); the last offered one for non-numeric choices."""
        try:
            return max(offered, key=lambda v: abs(v - self.neutral))
        except TypeError:
            return offered[-1]

    def fit_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the distillation fine-tune (:func:`~autocompress.compress.distill.fit`)."""
        return {}

    def latency_choices(self, choices: tuple, kernel_bits: Iterable[int]) -> tuple | None:
        """The choices that give distinct latencies on a runtime with real kernels for ``kernel_bits``;
        ``None`` when this technique never changes latency there."""
        return choices if self.changes_architecture else None

    def describe(self, values: Mapping[str, Any]) -> str | None:
        """A few words for tables (``prune 0.25-0.75 (4/6)``), or None when nothing is compressed."""
        return None

    def summary(self, section: Section) -> dict[str, Any]:
        """Experiment-wide settings of this technique logged with the space (besides its choices)."""
        return {}

    def parse(self, key: str, value: Any) -> Any:
        """``value`` as this technique's type; MLflow stores strings, so numeric strings are read.

        Raises ``ValueError`` naming the parameter for a value that is not of the type (a float
        bit-width such as ``8.5``, a word, a bool, NaN).
        """
        param = f"{self.name}{SEPARATOR}{key}"
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"parameter {param}={value!r} is not a number") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"parameter {param}={value!r} is not a finite number")
        if self.value_type is int:
            if float(number) != int(number):
                raise ValueError(f"parameter {param}={value!r} is not a whole number")
            return int(number)
        return float(number)


_REGISTRY: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Add ``technique`` to the registry (its order of registration is its parameters' order)."""
    if technique.name in _REGISTRY:
        raise ValueError(f"technique {technique.name!r} is registered twice")
    for other in _REGISTRY.values():
        if other.config_key == technique.config_key:
            raise ValueError(
                f"techniques {other.name!r} and {technique.name!r} share config section {other.config_key!r}"
            )
    if SEPARATOR in technique.name:
        raise ValueError(f"technique name {technique.name!r} contains {SEPARATOR!r}")
    _REGISTRY[technique.name] = technique
    return technique


def techniques() -> list[Technique]:
    """Every registered technique, in registration order (the order of the search's parameters).

    Importing any module of this package runs its ``__init__``, which registers the built-ins.
    """
    return list(_REGISTRY.values())


def get(name: str) -> Technique:
    """The technique called ``name``; an unknown name raises naming the known ones."""
    for technique in techniques():
        if technique.name == name:
            return technique
    raise KeyError(f"unknown technique {name!r} (known: {', '.join(t.name for t in techniques())})")


def by_stage() -> list[Technique]:
    """The techniques in the order the pipeline applies them."""
    return sorted(techniques(), key=lambda t: t.stage)


def split_param(param: str) -> tuple[Technique, str]:
    """``"prune/features.conv1"`` -> (the prune technique, ``"features.conv1"``); unknown names raise
    :class:`AutocompressError` naming the parameter."""
    name, sep, key = param.partition(SEPARATOR)
    if sep and key:
        for technique in techniques():
            if technique.name == name:
                return technique, key
    known = ", ".join(f"{t.name}/..." for t in techniques())
    raise ParameterError(f"unknown candidate parameter {param!r}: no technique claims it (known: {known})")


def parse_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Stored flat parameters with their search types restored; an unknown name or a value of the
    wrong type raises :class:`ParameterError` naming the parameter (never dropped)."""
    out: dict[str, Any] = {}
    for param, value in params.items():
        technique, key = split_param(param)
        try:
            out[param] = technique.parse(key, value)
        except ParameterError:
            raise
        except ValueError as err:
            raise ParameterError(str(err)) from None
    return out


def selected(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether a layer name matches an ``include`` glob and no ``exclude`` glob."""
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def expand_to_layers(model: nn.Module, per_layer: Mapping[str, Any]) -> dict[str, Any]:
    """``per_layer`` keyed by ``model``'s actual layers: a factorized layer's entry covers each factor."""
    from autocompress.compress.lowrank import Factorized

    modules = dict(model.named_modules())
    result: dict[str, Any] = {}
    for name, value in per_layer.items():
        module = modules.get(name)
        if isinstance(module, Factorized):
            result.update({f"{name}.{child}": value for child, _ in module.named_children()})
        else:
            result[name] = value
    return result
