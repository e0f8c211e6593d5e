"""The teacher: the uncompressed model, loaded from a checkpoint, trained once and cached, or (with
``teacher.epochs: 0``) the task's pretrained model as it is.

The cache key is a hash of the task (name and args), the model architecture, the training
settings and the seed, so any change retrains and nothing stale is reused. The cache lives in
``$AUTOCOMPRESS_CACHE`` (default ``~/.cache/autocompress``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress.compress.distill import OptimizerSettings, fit
from autocompress.config import TeacherConfig
from autocompress.errors import AutocompressError
from autocompress.evaluators.accuracy import evaluate
from autocompress.tasks import Task


def cache_dir() -> Path:
    """Root of autocompress's cache (teachers are under ``teachers/``)."""
    return Path(os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress")


def teacher_key(task_name: str, task_args: dict[str, Any], model: nn.Module, config: TeacherConfig, seed: int) -> str:
    """Stable hash identifying a trained teacher."""
    payload = {
        "task": task_name,
        "args": task_args,
        "architecture": repr(model),
        "train": {"epochs": config.epochs, "batch_size": config.batch_size, **config.optimizer_settings()},
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Teacher:
    """A ready teacher model, its validation metric, and where it came from."""

    model: nn.Module
    val_metric: float
    source: str  # "checkpoint", "cache", "trained" or "pretrained"
    path: Path | None


def get_teacher(
    task: Task,
    task_args: dict[str, Any],
    config: TeacherConfig,
    seed: int,
    *,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Teacher:
    """Load the teacher from ``config.checkpoint``, from the cache, or train it (and cache it).

    With ``config.epochs == 0`` the task's model is used unchanged; the task must say it is pretrained
    (``Task.pretrained``), else this raises :class:`AutocompressError` before anything is computed.
    """
    if config.epochs == 0 and config.checkpoint is None and not task.pretrained:
        raise AutocompressError(
            f"teacher.epochs 0: task {task.name!r} builds an untrained model (Task.pretrained is false); "
            "give teacher.checkpoint or teacher.epochs >= 1"
        )
    model = task.build_model()
    val = task.loader("val", 256)
    if config.checkpoint is not None:
        try:
            state = torch.load(config.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - any load failure is the user's file
            raise AutocompressError(f"teacher.checkpoint {str(config.checkpoint)!r}: cannot load ({err})") from None
        model.eval()
        return Teacher(model, evaluate(model, val, task.metric), "checkpoint", config.checkpoint)
    if config.epochs == 0:
        model.eval()
        metric = evaluate(model, val, task.metric)
        log(f"teacher: the task's pretrained {type(model).__name__} as it is (val {task.metric_name} {metric:.4f})")
        return Teacher(model, metric, "pretrained", None)

    path = cache_dir() / "teachers" / f"{task.name}-{teacher_key(task.name, task_args, model, config, seed)}.pt"
    if path.is_file() and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        metric = evaluate(model, val, task.metric)
        log(f"teacher: loaded from cache {path} (val {task.metric_name} {metric:.4f})")
        return Teacher(model, metric, "cache", path)

    log(f"teacher: training {type(model).__name__} for {config.epochs} epochs (cached afterwards)")
    torch.manual_seed(seed)

    def report(epoch: int, metric: float | None) -> None:
        log(f"teacher: epoch {epoch}/{config.epochs}  val {task.metric_name} {metric:.4f}")

    fit(
        model,
        task.loader("train", config.batch_size, shuffle=True),
        epochs=config.epochs,
        optimizer=OptimizerSettings(**config.optimizer_settings(task.finetune_defaults)),
        loss=task.loss,
        evaluate=lambda m: evaluate(m, val, task.metric),
        on_epoch=report,
    )
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written teacher
    return Teacher(model, evaluate(model, val, task.metric), "trained", path)
