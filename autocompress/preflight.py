"""Fail before training: import the task, build the model, run one batch, build the space and dry-run
every technique at its most aggressive choice through one forward pass and a deployment.

``autocompress validate`` runs this, and so does ``search`` before the teacher is trained: a user task,
model, loss or metric that raises, or a technique that cannot handle the model, is reported as one line
naming what failed (an :class:`~autocompress.errors.AutocompressError`, exit 2) instead of a traceback
an hour into a search.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from autocompress import inputs as pytree
from autocompress.config import Experiment, check_locations
from autocompress.documents import short_repr
from autocompress.errors import AutocompressError
from autocompress.refs import one_line
from autocompress.tasks import Task, load_task

T = TypeVar("T")


@dataclass
class Preflight:
    """What the dry run found: the task, its (untrained) model, the space, and one line per step."""

    task: Task
    model: torch.nn.Module
    space: Any
    steps: list[str] = field(default_factory=list)


def guarded(what: str, action: Callable[[], T]) -> T:
    """``action()``; any exception becomes an :class:`AutocompressError` ``"<what>: <Type>: <message>"``."""
    try:
        return action()
    except AutocompressError as err:
        raise AutocompressError(f"{what}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - whatever user code raises is reported in one line
        raise AutocompressError(f"{what} raised {type(err).__name__}: {one_line(err)}") from None


def check_feature_layers(exp: Experiment, model: torch.nn.Module) -> None:
    """Refuse ``finetune.feature_layers`` that name no module of ``model`` (every trial's fine-tune
    would fail on them), in one line listing a few names that exist."""
    modules = dict(model.named_modules())
    for i, name in enumerate(exp.finetune.feature_layers):
        if name not in modules:
            names = [n for n in modules if n]
            shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
            raise AutocompressError(
                f"finetune.feature_layers.{i}: the model has no layer {short_repr(name)} "
                f"(module names as in model.named_modules(): {shown or 'none'})"
            )


def preflight(exp: Experiment, *, task: Task | None = None, log: Callable[[str], None] = print) -> Preflight:
    """Dry-run ``exp`` without training (see the module docstring); raises on the first failure."""
    from autocompress.compress.pipeline import PipelineSettings, prepare_student
    from autocompress.hw_profiles.profile import load_profile, resolve_profile_path
    from autocompress.runtimes import get_runtime
    from autocompress.spaces import Candidate, build_space
    from autocompress.techniques import Stage, by_stage
    from autocompress.techniques.quantize import int8_modes

    # The cheap checks first: where the search writes, and every profile file read in full (a
    # corrupt profile is otherwise first opened after the teacher is trained).
    check_locations(exp)
    for name in exp.profiles:
        load_profile(resolve_profile_path(name))
    ref = exp.task.name
    task = task or load_task(exp.task.name, exp.task.args)
    model = guarded(f"task {ref!r}: build_model()", task.build_model)
    if not isinstance(model, torch.nn.Module):
        raise AutocompressError(f"task {ref!r}: build_model() returned {type(model).__name__}, not a torch nn.Module")
    model.eval()
    check_feature_layers(exp, model)
    report = Preflight(task, model, None)
    batch = guarded(f"task {ref!r}: the first training batch", lambda: next(iter(task.loader("train", 2))))
    x, y = pytree.split_batch(batch)
    with torch.no_grad():
        out = guarded(f"task {ref!r}: the model's forward on {pytree.describe(x)}", lambda: pytree.forward(model, x))
    if task.loss is not None:
        guarded(f"task {ref!r}: loss(outputs, targets)", lambda: float(task.loss(out, y)))
    guarded(f"task {ref!r}: metric {task.metric_name!r}(outputs, targets)", lambda: float(task.metric(out, y)))
    report.steps.append(f"task {task.name}: one batch {pytree.describe(x)} -> {pytree.describe(out)}")
    example = task.example_input(1)
    if exp.profiles and not isinstance(example, torch.Tensor):
        # The lookup-table predictors trace one input tensor's shape through the model.
        raise AutocompressError(
            f"profiles: hardware-profile prediction needs a single-tensor input, and task {ref!r} takes "
            f"{pytree.describe(example)}; remove 'profiles' (latency is then measured on this host)"
        )
    space = guarded("space", lambda: build_space(model, example, exp.space))
    report.space = space
    report.steps.append(f"space: {space.describe()}")

    settings = PipelineSettings(finetune_epochs=0, seed=exp.seed, sections={
        t.name: getattr(exp.space, t.config_key) for t in by_stage()
    })  # fmt: skip
    runtime = get_runtime(exp.latency.runtime)
    calibration = list(itertools.islice(iter(task.loader("train", 8)), 2))
    for technique in by_stage():
        choices = space.get(technique.name)
        if not choices or technique.stage >= Stage.FINETUNE:  # fine-tune settings change no model
            continue
        values = {key: technique.most_compressed(offered) for key, offered in choices.items()}
        candidate = Candidate({technique.name: values})
        what = f"dry run of {technique.name} at its most aggressive choice"
        built = guarded(
            what,
            lambda c=candidate: prepare_student(model, c, example, settings, lambda: iter(task.loader("train", 8))),
        )
        with torch.no_grad():
            guarded(f"{what}: forward", lambda b=built: pytree.forward(b.model, example))
        with tempfile.TemporaryDirectory(prefix="autocompress-preflight-") as tmp:
            deployed = guarded(
                f"{what}: deployment on {runtime.name}",
                lambda b=built, where=tmp: runtime.deploy(
                    b.model,
                    b.bits,
                    example,
                    calibration,
                    where,
                    exp.latency.threads,
                    modes=int8_modes(b.model, b.bits, exp.space.quantize),
                ),
            )
            guarded(f"{what}: the deployed model's forward", lambda d=deployed: pytree.forward(d, example))
        report.steps.append(f"{technique.name}: most aggressive choice builds, runs and deploys on {runtime.name}")
    for step in report.steps:
        log(f"validate: {step}")
    return report
