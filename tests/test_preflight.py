"""Fail before training: validate and search dry-run the task, model and techniques; user errors are one line."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from autocompress.cli import main
from tests.conftest import tiny_experiment_dict

USER_TASK = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from autocompress.tasks import Task

    def data(n=32):
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))

    class Net(nn.Module):
        def __init__(self, broken=False):
            super().__init__()
            self.fc1, self.fc2, self.broken = nn.Linear(8, 16), nn.Linear(16, 3), broken
        def forward(self, x):
            if self.broken:
                raise RuntimeError("deliberately broken forward")
            return self.fc2(torch.relu(self.fc1(x)))

    def task(mode="ok"):
        if mode == "raise":
            raise ValueError("no data here")
        def bad_metric(outputs, targets):
            raise KeyError("metric bug")
        return Task(
            name="user", build_model=lambda: Net(broken=mode == "forward"), train=data(), val=data(), test=data(),
            metric=bad_metric if mode == "metric" else Task.metric,
        )
    '''
)


@pytest.fixture()
def user_experiment(tmp_path, monkeypatch):
    (tmp_path / "user_task_mod.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(mode: str) -> str:
        exp = tiny_experiment_dict(tmp_path / "out")
        exp["task"] = {"name": "user_task_mod:task", "args": {"mode": mode}}
        exp["space"] = {"prune": {"ratios": [0.0, 0.5]}, "quantize": {"bits": [32, 8]}}
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(exp))
        return str(path)

    return write


def test_validate_dry_runs_a_user_task_and_every_technique(user_experiment, capsys):
    assert main(["validate", user_experiment("ok")]) == 0
    out = capsys.readouterr().out
    assert "one batch float32[2, 8] -> float32[2, 3]" in out
    assert "prune: most aggressive choice builds, runs and deploys on onnxruntime" in out
    assert "bits: most aggressive choice builds, runs and deploys on onnxruntime" in out


@pytest.mark.parametrize(
    ("mode", "names"),
    [
        ("raise", ["user_task_mod:task", "ValueError", "no data here"]),
        ("forward", ["forward", "RuntimeError", "deliberately broken forward"]),
        ("metric", ["metric 'accuracy'", "KeyError", "metric bug"]),
    ],
)
def test_a_user_task_that_raises_is_one_line_and_exit_2(user_experiment, capsys, mode, names):
    assert main(["validate", user_experiment(mode)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for name in names:
        assert name in err


def test_search_fails_before_training_the_teacher(user_experiment, capsys, isolated_cache):
    teachers = isolated_cache / "teachers"
    before = set(teachers.glob("*")) if teachers.exists() else set()
    assert main(["search", user_experiment("forward")]) == 2
    assert "deliberately broken forward" in capsys.readouterr().err
    after = set(teachers.glob("*")) if teachers.exists() else set()
    assert after == before  # nothing trained


def test_profiles_with_a_dict_input_task_are_refused_before_training(tmp_path):
    from autocompress.config import Experiment
    from autocompress.errors import AutocompressError
    from autocompress.preflight import preflight
    from tests.test_general_task import token_task

    exp = Experiment.model_validate({**tiny_experiment_dict(tmp_path), "profiles": ["xeon-onnxruntime-1t"]})
    with pytest.raises(AutocompressError, match=r"^profiles: hardware-profile prediction needs a single-tensor"):
        preflight(exp, task=token_task(), log=lambda line: None)
