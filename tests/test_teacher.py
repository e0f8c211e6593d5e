"""The teacher's trusted files: the cache key, the checked cache, reproducible training, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autocompress.config import TeacherConfig
from autocompress.errors import AutocompressError
from autocompress.tasks import load_task
from autocompress.teacher import (
    encode_args,
    get_teacher,
    key_payload,
    seeded,
    sidecar_path,
    state_fingerprint,
    teacher_key,
)

ARGS = {"width": 4, "hidden": 8, "image_size": 8}  # a teacher trains in well under a second
CONFIG = TeacherConfig(epochs=2, lr=0.05)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the test machine's cores are shared, and two threads on a busy core are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def honest():
    """A teacher trained once for this module: its file's bytes and sidecar, to restore before each test."""
    task = load_task("digits", ARGS)
    teacher = get_teacher(task, ARGS, CONFIG, seed=0, retrain=True, log=lambda line: None)
    return {
        "task": task,
        "teacher": teacher,
        "bytes": teacher.path.read_bytes(),
        "sidecar": sidecar_path(teacher.path).read_text(),
    }


def _restore(honest) -> Path:
    path = honest["teacher"].path
    path.write_bytes(honest["bytes"])
    sidecar_path(path).write_text(honest["sidecar"])
    return path


def _again(honest, logs: list[str]):
    return get_teacher(honest["task"], ARGS, CONFIG, seed=0, log=logs.append)


def _assert_retrained(honest, teacher, logs: list[str], why: str) -> None:
    assert teacher.source == "trained"
    assert teacher.val_metric == honest["teacher"].val_metric  # the honest teacher, not the file's
    assert teacher.fingerprint == honest["teacher"].fingerprint
    failed = [line for line in logs if "failed its check" in line]
    assert len(failed) == 1 and why in failed[0] and failed[0].endswith(": retraining")
    assert str(teacher.path) in failed[0]


def test_an_intact_cache_file_is_checked_and_used_and_leaves_the_callers_rng_alone(honest):
    _restore(honest)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    logs: list[str] = []
    teacher = _again(honest, logs)
    assert torch.equal(torch.rand(3), expected)
    assert teacher.source == "cache" and teacher.fingerprint == honest["teacher"].fingerprint
    assert teacher.val_metric == honest["teacher"].val_metric
    assert any("loaded from cache" in line and "checked" in line for line in logs)
    record = json.loads(sidecar_path(teacher.path).read_text())
    assert set(record) >= {"sha256", "key", "payload", "val_metric", "created_at"}
    assert record["payload"]["task"] == "digits" and record["val_metric"] == teacher.val_metric


def test_a_garbled_cache_file_is_retrained_not_used(honest):
    path = _restore(honest)
    data = bytearray(honest["bytes"])
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    logs: list[str] = []
    _assert_retrained(honest, _again(honest, logs), logs, "sha256 differs")
    assert path.read_bytes() == honest["bytes"]  # rebuilt bitwise as it was


def test_a_truncated_cache_file_is_retrained_not_a_traceback(honest):
    path = _restore(honest)
    path.write_bytes(honest["bytes"][: len(honest["bytes"]) // 2])
    logs: list[str] = []
    _assert_retrained(honest, _again(honest, logs), logs, "sha256 differs")
    # Truncated with a sidecar that vouches for it: the load itself fails, and is caught.
    path.write_bytes(honest["bytes"][:1000])
    record = json.loads(honest["sidecar"])
    record["sha256"] = hashlib.sha256(honest["bytes"][:1000]).hexdigest()
    sidecar_path(path).write_text(json.dumps(record))
    logs.clear()
    _assert_retrained(honest, _again(honest, logs), logs, "cannot load")


def test_a_cache_file_replaced_by_other_weights_of_the_same_shapes_is_detected(honest):
    path = _restore(honest)
    state = honest["teacher"].model.state_dict()
    other = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(other, path)
    logs: list[str] = []
    _assert_retrained(honest, _again(honest, logs), logs, "sha256 differs")
    # Replaced together with its sidecar's sha256: the re-evaluated metric gives it away.
    torch.save(other, path)
    record = json.loads(honest["sidecar"])
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar_path(path).write_text(json.dumps(record))
    logs.clear()
    _assert_retrained(honest, _again(honest, logs), logs, "recorded")


def test_a_cache_file_without_its_sidecar_is_retrained(honest):
    path = _restore(honest)
    sidecar_path(path).unlink()
    logs: list[str] = []
    _assert_retrained(honest, _again(honest, logs), logs, "no sidecar")
    assert sidecar_path(path).is_file()


def test_retraining_gives_bitwise_identical_weights(honest):
    first = honest["teacher"]
    again = get_teacher(honest["task"], ARGS, CONFIG, seed=0, retrain=True, log=lambda line: None)
    assert again.source == "trained" and again.fingerprint == first.fingerprint
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other_seed = get_teacher(honest["task"], ARGS, CONFIG, seed=1, log=lambda line: None)
    assert other_seed.fingerprint != first.fingerprint and other_seed.path != first.path


USER_TASKS = """
from pathlib import Path

from autocompress.tasks import Task, load_task

ARGS = {"width": 4, "hidden": 8, "image_size": 8}


def _named_bad(task, scale=1.0):
    train = type(task.train)(task.train.tensors[0] * scale, task.train.tensors[1])
    return Task(name="bad", build_model=task.build_model, train=train, val=task.val, test=task.test)


def first():
    return _named_bad(load_task("digits", ARGS))


def second():
    return _named_bad(load_task("digits", {**ARGS, "split_seed": 1}))


def from_file(path):
    return _named_bad(load_task("digits", ARGS), float(Path(path).read_text()))
"""


@pytest.fixture
def user_tasks(tmp_path, monkeypatch):
    """A user's module of tasks that all call themselves ``bad``, imported by reference."""
    (tmp_path / "teacher_user_tasks.py").write_text(textwrap.dedent(USER_TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("teacher_user_tasks", None)


def _key(task, ref: str, args: dict, seed: int = 0) -> str:
    with seeded(seed):
        model = task.build_model()
    return teacher_key(key_payload(task, ref, args, model, CONFIG, seed))


def test_the_key_covers_the_task_reference_its_args_and_its_data(user_tasks):
    first, second = "teacher_user_tasks:first", "teacher_user_tasks:second"
    a, b = load_task(first), load_task(second)
    assert a.name == b.name == "bad"
    assert _key(a, first, {}) != _key(b, second, {})
    assert _key(a, first, {}) == _key(load_task(first), first, {})
    assert _key(a, first, {}) != _key(a, first, {"unused": 1})
    assert _key(a, first, {}) != _key(a, first, {}, seed=1)

    data = user_tasks / "scale.txt"
    ref, args = "teacher_user_tasks:from_file", {"path": str(data)}
    data.write_text("1.0")
    before = _key(load_task(ref, args), ref, args)
    assert before == _key(load_task(ref, args), ref, args)
    data.write_text("2.0")  # same reference, same args, other data
    assert _key(load_task(ref, args), ref, args) != before


def test_two_user_tasks_with_the_same_name_do_not_share_a_teacher(user_tasks):
    def teacher(ref: str):
        return get_teacher(load_task(ref), {}, CONFIG, 0, task_ref=ref, log=lambda line: None)

    one, two = teacher("teacher_user_tasks:first"), teacher("teacher_user_tasks:second")
    assert one.source == two.source == "trained" and one.path != two.path
    again = teacher("teacher_user_tasks:first")
    assert again.source == "cache" and again.path == one.path


def test_args_that_cannot_be_part_of_a_key_are_refused_naming_task_args():
    loop: dict = {"a": 1}
    loop["self"] = loop
    with pytest.raises(AutocompressError, match=r"task.args.self: contains itself"):
        encode_args(loop)
    with pytest.raises(AutocompressError, match=r"task.args.sizes: too large for the teacher cache key"):
        encode_args({"sizes": list(range(1_000_000))})
    with pytest.raises(AutocompressError, match=r"task.args.fn: a function cannot be part of the teacher cache key"):
        encode_args({"fn": lambda: None})
    same = encode_args({"t": [1], "a": "/d", "b": [1, 2.5, "x"]})
    assert encode_args({"b": [1, 2.5, "x"], "a": Path("/d"), "t": (1,)}) == same  # canonical: order, paths


# ------------------------------------------------------------------------------------------ checkpoints


class _Payload:
    """Unpickling this would create ``marker``: the proof that a checkpoint's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _checkpoint_error(task, path: Path, capfd, recwarn) -> str:
    capfd.readouterr()
    with pytest.raises(AutocompressError) as info:
        get_teacher(task, ARGS, TeacherConfig(checkpoint=path), seed=0, log=lambda line: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"teacher.checkpoint {str(path)!r}: ")
    out, err = capfd.readouterr()
    assert out == "" and err == "" and len(recwarn) == 0  # no torch warning printed first
    return message


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path, capfd, recwarn):
    task = load_task("digits", ARGS)
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": _Payload(marker)}, path)
    message = _checkpoint_error(task, path, capfd, recwarn)
    assert "refused: loading it would run code" in message and "Unsupported global" in message
    assert not marker.exists()
    whole = tmp_path / "module.pt"
    torch.save(task.build_model(), whole)
    assert "DigitsCNN" in _checkpoint_error(task, whole, capfd, recwarn)


def test_a_checkpoint_of_other_shapes_or_names_is_one_line(tmp_path, capfd, recwarn):
    task = load_task("digits", ARGS)
    path = tmp_path / "wide.pt"
    torch.save(load_task("digits", {**ARGS, "width": 8}).build_model().state_dict(), path)
    message = _checkpoint_error(task, path, capfd, recwarn)
    assert "cannot load: size mismatch: 'features.conv1.conv.weight' is [8, 1, 3, 3] in the file" in message
    assert "expects [4, 1, 3, 3] (and " in message
    state = task.build_model().state_dict()
    del state["fc2.weight"], state["fc2.bias"]
    state.update({f"extra{i}": torch.zeros(1) for i in range(5)})
    torch.save(state, path)
    message = _checkpoint_error(task, path, capfd, recwarn)
    assert "2 missing key(s) (fc2.weight, fc2.bias)" in message
    assert "5 unexpected key(s) (extra0, extra1, extra2, ... (5 in all))" in message


@pytest.mark.parametrize(
    "content,why",
    [
        (b"hello world, not weights\n", "not a torch file (it starts with 'hello world,')"),
        (b"", "the file is empty"),
        (pickle.dumps({"a": 1}, protocol=4), "not a torch state_dict"),
    ],
)
def test_a_checkpoint_that_is_not_a_torch_file_is_one_line(tmp_path, capfd, recwarn, content, why):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    assert why in _checkpoint_error(load_task("digits", ARGS), path, capfd, recwarn)


def test_a_truncated_checkpoint_is_one_line(tmp_path, capfd, recwarn):
    task = load_task("digits", ARGS)
    path = tmp_path / "cut.pt"
    torch.save(task.build_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    assert "damaged or truncated" in _checkpoint_error(task, path, capfd, recwarn)


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, capfd, recwarn):
    task = load_task("digits", ARGS)
    state = task.build_model().state_dict()
    state["fc1.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    message = _checkpoint_error(task, path, capfd, recwarn)
    assert message.endswith("refused: non-finite values (NaN or inf) in 'fc1.weight'")


def test_a_good_checkpoint_and_a_pretrained_model_carry_their_weights_fingerprint(tmp_path):
    task = load_task("digits", ARGS)
    model = task.build_model()
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    teacher = get_teacher(task, ARGS, TeacherConfig(checkpoint=path), seed=0)
    assert teacher.source == "checkpoint" and teacher.fingerprint == state_fingerprint(model)
    assert len(teacher.fingerprint) == 16
    ready = load_task("digits", ARGS)
    pretrained = dataclasses.replace(ready, pretrained=True, build_model=lambda: model)
    same = get_teacher(pretrained, ARGS, TeacherConfig(epochs=0), seed=0, log=lambda line: None)
    assert same.source == "pretrained" and same.fingerprint == teacher.fingerprint
