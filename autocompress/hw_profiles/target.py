"""What a profiling command works on: a model, its latency input, and the experiment's search space.

The model is the experiment task's model, freshly built (latency does not depend on trained
weights, so no teacher is trained), or any ``module:function`` returning an ``nn.Module`` with an
explicit input shape, which is how a model without a task (``autocompress.models:resnet18_cifar``)
gets profiled under an experiment's space settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autocompress.config import Experiment, load_experiment
from autocompress.errors import AutocompressError
from autocompress.hw_profiles.candidates import CandidateBuilder
from autocompress.hw_profiles.predictor import model_key
from autocompress.refs import import_callable
from autocompress.spaces import build_space
from autocompress.tasks import load_task


@dataclass
class Target:
    """A model to profile: its overhead key, latency input (the experiment's batch), and builder."""

    experiment: Experiment
    model_name: str
    example_input: torch.Tensor
    builder: CandidateBuilder


def _import_model(ref: str) -> nn.Module:
    model = import_callable(ref, f"--model {ref!r}")()
    if not isinstance(model, nn.Module):
        raise AutocompressError(f"--model {ref!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)`` (one sample, no batch dimension)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise AutocompressError(f"--input-shape {text!r}: expected comma-separated integers, e.g. 3,32,32") from None
    if not shape or min(shape) < 1:
        raise AutocompressError(f"--input-shape {text!r}: every dimension must be >= 1")
    return shape


def load_target(
    experiment: str | Path, model_ref: str | None = None, input_shape: tuple[int, ...] | None = None
) -> Target:
    """The experiment's model (or ``model_ref``) with its space learned by a :class:`CandidateBuilder`."""
    exp = load_experiment(experiment)
    if (model_ref is None) != (input_shape is None):
        raise AutocompressError("--model and --input-shape go together (the input shape of a bare model is unknown)")
    if model_ref is not None and input_shape is not None:
        model = _import_model(model_ref)
        generator = torch.Generator().manual_seed(0)
        example = torch.randn((exp.latency.batch_size, *input_shape), generator=generator)
    else:
        task = load_task(exp.task.name, exp.task.args)
        model = task.build_model()
        example = task.example_input(exp.latency.batch_size)
    model.eval()
    one = example[:1]
    space = build_space(model, one, exp.space)
    return Target(exp, model_key(model), example, CandidateBuilder.learn(model, one, space))
