"""Built-in and user tasks, and the teacher cache."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from autocompress.config import TeacherConfig
from autocompress.errors import AutocompressError
from autocompress.tasks import Task, load_task
from autocompress.teacher import get_teacher


def _labels(dataset):
    return dataset.tensors[1].numpy()


@pytest.mark.parametrize("name,shape,n", [("digits", (1, 32, 32), 1797), ("mnist1d", (1, 40), 5000)])
def test_builtin_task_shapes_and_disjoint_stratified_splits(name, shape, n):
    task = load_task(name)
    assert task.input_shape == shape and task.num_classes == 10
    sizes = [len(task.train), len(task.val), len(task.test)]
    assert sum(sizes) == n and min(sizes) > 0
    x, _ = task.train[0]
    assert tuple(x.shape) == shape
    overall = np.bincount(np.concatenate([_labels(task.train), _labels(task.val), _labels(task.test)]), minlength=10)
    for split in (task.val, task.test):
        share = np.bincount(_labels(split), minlength=10) / len(split)
        assert np.allclose(share, overall / overall.sum(), atol=0.02)  # stratified
    # no sample in two splits
    flat = {tuple(v.flatten().tolist()) for v in task.val.tensors[0][:50]}
    assert not flat & {tuple(v.flatten().tolist()) for v in task.test.tensors[0]}
    logits = task.build_model()(task.example_input(3))
    assert logits.shape == (3, 10)


def test_mnist1d_is_generated_deterministically():
    a = load_task("mnist1d", {"num_samples": 500})
    b = load_task("mnist1d", {"num_samples": 500})
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    c = load_task("mnist1d", {"num_samples": 500, "data_seed": 7})
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_user_task_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        textwrap.dedent(
            """
            from autocompress.tasks import load_task

            def small_digits(width=4):
                return load_task("digits", {"width": width, "image_size": 16})

            def not_a_task():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my_tasks:small_digits", {"width": 4})
    assert isinstance(task, Task) and task.input_shape == (1, 16, 16)
    with pytest.raises(AutocompressError, match="must return autocompress.tasks.Task, got int"):
        load_task("my_tasks:not_a_task")
    with pytest.raises(AutocompressError, match="has no function 'missing'"):
        load_task("my_tasks:missing")
    with pytest.raises(AutocompressError, match="cannot import module 'no_such_module_xyz'"):
        load_task("no_such_module_xyz:f")
    with pytest.raises(AutocompressError, match="bad task.args"):
        load_task("my_tasks:small_digits", {"depth": 3})
    sys.modules.pop("my_tasks", None)


def test_teacher_is_trained_once_then_cached(isolated_cache):
    args = {"width": 4, "hidden": 8, "image_size": 16}
    task = load_task("digits", args)
    config = TeacherConfig(epochs=2)
    logs: list[str] = []
    first = get_teacher(task, args, config, seed=3, log=logs.append)
    assert first.source == "trained" and first.path.is_file()
    assert str(first.path).startswith(str(isolated_cache))
    assert any("epoch 2/2" in line for line in logs)
    mtime = first.path.stat().st_mtime_ns

    second = get_teacher(task, args, config, seed=3, log=logs.append)
    assert second.source == "cache" and second.path == first.path
    assert first.path.stat().st_mtime_ns == mtime
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert second.val_metric == pytest.approx(first.val_metric)

    other_seed = get_teacher(task, args, config, seed=4, log=logs.append)
    assert other_seed.source == "trained" and other_seed.path != first.path
    other_args = {**args, "width": 8}
    changed = get_teacher(load_task("digits", other_args), other_args, config, seed=3, log=logs.append)
    assert changed.path != first.path

    retrained = get_teacher(task, args, config, seed=3, retrain=True, log=logs.append)
    assert retrained.source == "trained" and retrained.path == first.path


def test_teacher_from_checkpoint(tmp_path):
    task = load_task("digits", {"width": 4, "image_size": 16})
    model = task.build_model()
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    teacher = get_teacher(task, {}, TeacherConfig(checkpoint=path), seed=0)
    assert teacher.source == "checkpoint"
    bad = tmp_path / "bad.pt"
    torch.save(load_task("digits", {"width": 8, "image_size": 16}).build_model().state_dict(), bad)
    with pytest.raises(AutocompressError, match="cannot load"):
        get_teacher(task, {}, TeacherConfig(checkpoint=bad), seed=0)
