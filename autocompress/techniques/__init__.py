"""Compression techniques, registered here in the order of their search parameters.

Adding a technique is one new module with a :class:`~autocompress.techniques.base.Technique`
subclass, plus its line in :data:`BUILTIN` below.
"""

from autocompress.techniques.base import (
    BuildContext,
    Discovery,
    ParameterError,
    Section,
    Stage,
    Technique,
    by_stage,
    expand_to_layers,
    get,
    parse_params,
    register,
    split_param,
    techniques,
)
from autocompress.techniques.distill import Distillation
from autocompress.techniques.lowrank import LowRank
from autocompress.techniques.prune import StructuredPruning
from autocompress.techniques.quantize import WeightQuantization
from autocompress.techniques.sparsity import MagnitudeSparsity

BUILTIN: tuple[Technique, ...] = (
    StructuredPruning(),
    WeightQuantization(),
    LowRank(),
    MagnitudeSparsity(),
    Distillation(),
)
"""Registration order is the order of a candidate's parameters (and so of a sampler's draws)."""
for _technique in BUILTIN:
    register(_technique)

__all__ = [
    "BuildContext",
    "Discovery",
    "ParameterError",
    "Section",
    "Stage",
    "Technique",
    "by_stage",
    "expand_to_layers",
    "get",
    "parse_params",
    "register",
    "split_param",
    "techniques",
]
