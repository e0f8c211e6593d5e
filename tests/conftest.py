"""Shared fixtures: an isolated cache, and a tiny but real experiment for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.compress.lowrank import _input_shapes_per_call, layer_macs

ROOT = Path(__file__).resolve().parents[1]
AUTOCOMPRESS = [sys.executable, "-m", "autocompress"]
"""The command line a test runs the CLI with, in a process of its own."""


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a test's ``autocompress`` subprocess: this checkout first on the path, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_autocompress(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``autocompress ARGS`` in a subprocess (environment :func:`cli_env` plus ``env``), output captured."""
    return subprocess.run([*AUTOCOMPRESS, *args], env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Teachers are cached per test session, never in the user's ~/.cache (session scope, so
    module-scoped fixtures that run searches see it too)."""
    cache = tmp_path_factory.getbasetemp() / "autocompress-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOCOMPRESS_CACHE", str(cache))
        yield cache


def tiny_experiment_dict(out_dir: Path, **search) -> dict:
    """A real digits search small enough for a unit-test budget (narrow CNN, short training)."""
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out_dir),
        "task": {"name": "digits", "args": {"width": 8, "hidden": 16, "image_size": 16}},
        "teacher": {"epochs": 4, "lr": 0.05},
        "space": {
            "prune": {"ratios": [0.0, 0.5, 0.75]},
            "quantize": {"bits": [32, 8]},
            "distill": {"temperature": [2.0], "alpha": [0.5]},
        },
        "finetune": {"epochs": 1},
        "latency": {"repeats": 5, "warmup": 2},
        "objectives": ["accuracy", "latency", "size"],
        "search": {"n_trials": 4, "population_size": 2, **search},
        "tracking": {"uri": f"sqlite:///{out_dir / 'mlflow.db'}"},
    }


def runs_by_trial(exp, study) -> dict:
    """The MLflow trial runs of ``study`` (of experiment ``exp``) by trial number, from the store itself."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=exp.tracking_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    experiment_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}


def model_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Linear + convolution MACs per example, every call counted (attention matmuls, norms excluded)."""
    modules = dict(model.named_modules())
    calls = _input_shapes_per_call(model, example_input)
    return sum(layer_macs(modules[name], shape) for name, shapes in calls.items() for shape in shapes)
