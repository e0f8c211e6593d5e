"""The teacher: the uncompressed model, loaded from a checkpoint, trained once and cached, or (with
``teacher.epochs: 0``) the task's pretrained model as it is.

**The cache key** (:func:`key_payload`, :func:`teacher_key`) is a hash of everything the trained weights
depend on: the task reference as configured (``task.name`` of the experiment, e.g. ``mypkg.tasks:make``,
not only the name the task gives itself), its args (a canonical, size-capped encoding), a fingerprint
of the train and val data (:func:`data_fingerprint`), the model's architecture and initial weights,
the loss, the training settings, the seed and the torch version. Any change retrains; nothing stale is
reused. Training is seeded (initialisation, data order, dropout), so the same key gives bitwise the same
weights on CPU (same torch build and thread count).

**The cache** lives in ``$AUTOCOMPRESS_CACHE/teachers`` (default ``~/.cache/autocompress``): a
``<task>-<key>.pt`` state_dict and, beside it, a ``<task>-<key>.pt.json`` sidecar with the file's
sha256, a summary of the key, the val metric at save time and when it was written. Both are written
atomically, the sidecar last, so a run killed in between leaves a pair that fails the check.

**The checks** before a cached file is used: the sidecar exists and names the key, the file's sha256
is the recorded one, it loads as a state_dict of the model's names and shapes with finite values, and
the re-evaluated val metric is the recorded one. A file that fails any check (garbled, replaced,
truncated, from an older version) is not used: one log line says why and the teacher is retrained.

**A checkpoint** (``teacher.checkpoint``) is loaded with ``weights_only`` (a pickle that needs code is
refused, its code never runs); any problem, non-finite weights included, is one line naming the file.

Every :class:`Teacher` carries a ``fingerprint`` of the weights actually used (:func:`state_fingerprint`),
whatever the source, so a study can tell whether it is resumed with the same teacher.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import io
import json
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from autocompress import faults
from autocompress.compress.distill import OptimizerSettings, TrainingDiverged, fit
from autocompress.config import TeacherConfig
from autocompress.documents import atomic_write
from autocompress.errors import AutocompressError
from autocompress.evaluators.accuracy import evaluate
from autocompress.tasks import Task

KEY_VERSION = 2
"""Bumped when the key's contents change, so files cached by an older scheme are never matched."""
ARGS_LIMIT = 1 << 20
"""Most bytes the canonical encoding of ``task.args`` may take (it is part of the key)."""
SAMPLE_LIMIT = 20_000
"""Most samples of a split the data fingerprint reads; a larger split is sampled (see :func:`data_fingerprint`)."""
METRIC_TOLERANCE = 1e-6
"""How far a cached teacher's re-evaluated val metric may be from the recorded one (float noise only)."""
_DEPTH_LIMIT = 64


def cache_dir() -> Path:
    """Root of autocompress's cache (teachers are under ``teachers/``)."""
    return Path(os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress")


# ---------------------------------------------------------------------------------------------- hashing


def _update_tensor(h: Any, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and raw bytes to the hash ``h``."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{list(t.shape)}".encode())
    # Viewed as bytes, so every dtype (bfloat16, bool, complex) hashes without a numpy conversion.
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _update_value(h: Any, value: Any) -> None:
    """Feed one sample (a pytree of tensors, arrays, numbers and strings) to ``h``, structure included.

    An object of any other type contributes its type name only: its ``repr`` may hold a memory
    address, which would change the hash on every run.
    """
    if isinstance(value, torch.Tensor):
        _update_tensor(h, value)
    elif isinstance(value, np.ndarray):
        _update_tensor(h, torch.from_numpy(np.ascontiguousarray(value)))
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key, item in value.items():
            h.update(repr(key).encode())
            _update_value(h, item)
        h.update(b"}")
    elif isinstance(value, (tuple, list)):
        h.update(b"(")
        for item in value:
            _update_value(h, item)
        h.update(b")")
    elif isinstance(value, (str, bytes, int, float, complex, bool, np.generic)) or value is None:
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        h.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())


def state_fingerprint(model: nn.Module | Mapping[str, Any]) -> str:
    """A short hash (16 hex digits) of a model's weights: its state_dict's names, dtypes, shapes and
    bytes, in name order. Equal weights give equal fingerprints, whichever file they came from."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(f"{name}=".encode())
        _update_value(h, state[name])
    return h.hexdigest()[:16]


def _sample_indices(n: int) -> list[int]:
    """Every index of a split up to :data:`SAMPLE_LIMIT` samples, else that many evenly spaced ones."""
    if n <= SAMPLE_LIMIT:
        return list(range(n))
    return [i * n // SAMPLE_LIMIT for i in range(SAMPLE_LIMIT)]


def _dataset_digest(dataset: Dataset) -> str:
    """sha256 of a dataset's length and samples (see :func:`data_fingerprint`)."""
    h = hashlib.sha256()
    n = len(dataset)  # type: ignore[arg-type]  # a Task's splits have a length (the search prints it)
    h.update(f"n={n};{type(dataset).__name__};".encode())
    indices = _sample_indices(n)
    if isinstance(dataset, TensorDataset):  # the built-in tasks: whole tensors at once, no per-sample loop
        index = None if len(indices) == n else torch.as_tensor(indices)
        for tensor in dataset.tensors:
            _update_tensor(h, tensor if index is None else tensor[index])
        return h.hexdigest()
    for i in indices:
        _update_value(h, dataset[i])
    return h.hexdigest()


def data_fingerprint(task: Task) -> str:
    """A short hash of the task's train and val splits (the data a teacher is trained and checked on).

    Each split contributes its length and its samples read by index in order (tensors by dtype, shape
    and bytes; a ``TensorDataset`` as whole tensors). A split of more than :data:`SAMPLE_LIMIT`
    samples contributes its length and that many evenly spaced samples: a change elsewhere in a huge
    split goes unnoticed, the price of keeping this to about a second.
    """
    h = hashlib.sha256()
    for split in ("train", "val"):
        h.update(f"{split}:{_dataset_digest(getattr(task, split))};".encode())
    return h.hexdigest()[:16]


class _Budget:
    """Bytes left for the canonical encoding of ``task.args``."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self, n: int, where: str) -> None:
        self.left -= n
        if self.left < 0:
            where = re.sub(r"(\[\d+\])+$", "", where)  # the list, not the item where the budget ran out
            raise AutocompressError(
                f"task.args{where}: too large for the teacher cache key (over {ARGS_LIMIT // 1024} KiB encoded); "
                "pass a file path or a smaller value instead"
            )


def _canonical(value: Any, where: str, budget: _Budget, seen: tuple[int, ...]) -> Any:
    """``value`` as plain JSON data (sorted keys later), or an error naming ``task.args<where>``."""
    if len(seen) > _DEPTH_LIMIT:
        raise AutocompressError(f"task.args{where}: nested deeper than {_DEPTH_LIMIT} levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        budget.spend(len(str(value)) + 2, where)
        return value
    if isinstance(value, np.generic):
        return _canonical(value.item(), where, budget, seen)
    if isinstance(value, (Path, enum.Enum, datetime.date, datetime.time)):
        text = str(value.value if isinstance(value, enum.Enum) else value)
        return _canonical(text, where, budget, seen)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        h = hashlib.sha256()
        _update_value(h, value)
        return _canonical(f"<{type(value).__name__} sha256:{h.hexdigest()[:16]}>", where, budget, seen)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        if id(value) in seen:
            raise AutocompressError(f"task.args{where}: contains itself, so it cannot be part of the teacher cache key")
        inner = (*seen, id(value))
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                label = str(key)
                budget.spend(len(label) + 2, where)
                out[label] = _canonical(item, f"{where}.{label}", budget, inner)
            return out
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_canonical(item, f"{where}[{i}]", budget, inner) for i, item in enumerate(items)]
    raise AutocompressError(
        f"task.args{where}: a {type(value).__name__} cannot be part of the teacher cache key; "
        "use plain values (numbers, strings, lists, mappings)"
    )


def encode_args(task_args: Mapping[str, Any]) -> str:
    """The canonical JSON of ``task.args`` (sorted keys, at most :data:`ARGS_LIMIT` bytes).

    Raises :class:`AutocompressError` naming the offending entry for a value that cannot be encoded
    (an object, a structure that contains itself) or args too large to be part of a key.
    """
    plain = _canonical(task_args, "", _Budget(ARGS_LIMIT), ())
    return json.dumps(plain, sort_keys=True, separators=(",", ":"))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _qualname(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def key_payload(
    task: Task,
    task_ref: str,
    task_args: Mapping[str, Any],
    model: nn.Module,
    config: TeacherConfig,
    seed: int,
) -> dict[str, Any]:
    """What the cache key of a trained teacher covers, as plain (short) values.

    ``task_ref`` is the task as the experiment names it (``exp.task.name``); ``model`` is the freshly
    built model, built under :func:`seeded` (its architecture, weight shapes and initial values are
    covered, so a factory whose initialisation ignores the seed gets a new key, and a retrain, every run).
    """
    return {
        "version": KEY_VERSION,
        "task": task_ref,
        "task_name": task.name,
        "args": encode_args(task_args),
        "data": data_fingerprint(task),
        "architecture": _short_hash(repr(model)),
        "shapes": _short_hash(repr([(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()])),
        "init": state_fingerprint(model),
        "loss": _qualname(task.loss),
        "train": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            **config.optimizer_settings(task.finetune_defaults),
        },
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
    }


def teacher_key(payload: Mapping[str, Any]) -> str:
    """Stable hash (16 hex digits) of a :func:`key_payload`."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------ the teacher itself


@dataclass
class Teacher:
    """A ready teacher model, its validation metric, where it came from, and a fingerprint of its weights
    (:func:`state_fingerprint`), equal for equal weights whatever the source."""

    model: nn.Module
    val_metric: float
    source: str  # "checkpoint", "cache", "trained" or "pretrained"
    path: Path | None
    fingerprint: str


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch, numpy and ``random`` seeded with ``seed`` inside the block; the caller's generator states
    are restored afterwards (a model factory may draw from any of them)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _build(task: Task, seed: int) -> nn.Module:
    with seeded(seed):
        return task.build_model()


def get_teacher(
    task: Task,
    task_args: dict[str, Any],
    config: TeacherConfig,
    seed: int,
    *,
    task_ref: str | None = None,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Teacher:
    """Load the teacher from ``config.checkpoint``, from the cache, or train it (and cache it).

    ``task_ref`` is the task as the experiment names it (``exp.task.name``; default ``task.name``),
    part of the cache key with ``task_args``. With ``config.epochs == 0`` the task's model is used
    unchanged; the task must say it is pretrained (``Task.pretrained``), else this raises
    :class:`AutocompressError` before anything is computed. A bad checkpoint is one-line
    :class:`AutocompressError`; a cached file that fails its checks is retrained (see the module docstring).
    """
    with seeded(seed):  # the caller's random state is left as it was, whether trained or cached
        return _get_teacher(task, task_args, config, seed, task_ref=task_ref, retrain=retrain, log=log)


def _get_teacher(
    task: Task,
    task_args: dict[str, Any],
    config: TeacherConfig,
    seed: int,
    *,
    task_ref: str | None,
    retrain: bool,
    log: Callable[[str], None],
) -> Teacher:
    if config.epochs == 0 and config.checkpoint is None and not task.pretrained:
        raise AutocompressError(
            f"teacher.epochs 0: task {task.name!r} builds an untrained model (Task.pretrained is false); "
            "give teacher.checkpoint or teacher.epochs >= 1"
        )
    model = _build(task, seed)
    val = task.loader("val", 256)
    if config.checkpoint is not None:
        load_checkpoint(model, config.checkpoint)
        model.eval()
        metric = evaluate(model, val, task.metric)
        return Teacher(model, metric, "checkpoint", config.checkpoint, state_fingerprint(model))
    if config.epochs == 0:
        problem = _non_finite(model.state_dict())
        if problem:
            raise AutocompressError(f"teacher: the pretrained model of task {task.name!r} has {problem}")
        model.eval()
        metric = evaluate(model, val, task.metric)
        log(f"teacher: the task's pretrained {type(model).__name__} as it is (val {task.metric_name} {metric:.4f})")
        return Teacher(model, metric, "pretrained", None, state_fingerprint(model))

    payload = key_payload(task, task_ref or task.name, task_args, model, config, seed)
    key = teacher_key(payload)
    path = cache_dir() / "teachers" / f"{_slug(task.name)}-{key}.pt"
    if not retrain and (path.exists() or sidecar_path(path).exists()):
        cached, reason = _load_cached(path, key, model, task, val)
        if cached is not None:
            log(f"teacher: loaded from cache {path} (val {task.metric_name} {cached.val_metric:.4f}, checked)")
            return cached
        log(f"teacher: cache file {path} failed its check ({reason}): retraining")
        model = _build(task, seed)  # the failed load may have overwritten part of it

    _train(model, task, config, seed, log)
    metric = evaluate(model, val, task.metric)
    try:
        _write_cache(path, model, key, payload, metric, task.metric_name)
    except OSError as err:  # a read-only or full cache costs a retrain next time, not this run
        log(f"teacher: cannot write the cache file {path} ({_first_line(err)}): not cached")
        return Teacher(model, metric, "trained", None, state_fingerprint(model))
    return Teacher(model, metric, "trained", path, state_fingerprint(model))


def _slug(name: str) -> str:
    """A task name usable in a file name (a user's ``Task.name`` may hold anything)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:48] or "task"


def _train(model: nn.Module, task: Task, config: TeacherConfig, seed: int, log: Callable[[str], None]) -> None:
    """Train ``model`` in place, seeded: the same seed gives the same weights (init is seeded by the caller)."""
    log(f"teacher: training {type(model).__name__} for {config.epochs} epochs (cached afterwards)")
    val = task.loader("val", 256)

    def report(epoch: int, metric: float | None) -> None:
        log(f"teacher: epoch {epoch}/{config.epochs}  val {task.metric_name} {metric:.4f}")
        faults.point("teacher_epoch")

    with seeded(seed):  # dropout and any other draw; the data order has its own generator
        try:
            fit(
                model,
                task.loader("train", config.batch_size, shuffle=True, seed=seed),
                epochs=config.epochs,
                optimizer=OptimizerSettings(**config.optimizer_settings(task.finetune_defaults)),
                loss=task.loss,
                evaluate=lambda m: evaluate(m, val, task.metric),
                on_epoch=report,
            )
        except TrainingDiverged as err:
            raise AutocompressError(f"teacher: training diverged ({err}); lower teacher.lr") from None
    model.eval()


# ------------------------------------------------------------------------------------------ cache files


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar recording a cached teacher's sha256, key and val metric: ``<file>.json``."""
    return path.with_name(path.name + ".json")


def _summary(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The key payload for the sidecar, with long args cut (the key itself has them whole)."""
    args = payload["args"]
    return {**payload, "args": args if len(args) <= 500 else args[:497] + "..."}


def _write_cache(
    path: Path, model: nn.Module, key: str, payload: Mapping[str, Any], metric: float, metric_name: str
) -> None:
    """Save the weights, then the sidecar (last: a kill in between leaves a pair that fails the check)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    record = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "key": key,
        "payload": _summary(payload),
        "val_metric": metric,
        "metric_name": metric_name,
        "fingerprint": state_fingerprint(model),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(sidecar_path(path), json.dumps(record, indent=2, sort_keys=True).encode())


def _read_sidecar(path: Path, key: str) -> dict[str, Any]:
    """The sidecar of ``path``, or :class:`ValueError` saying why it cannot vouch for the file."""
    side = sidecar_path(path)
    if not side.is_file():
        raise ValueError(f"no sidecar {side.name} (an older version's file, or a run killed while writing)")
    try:
        record = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"sidecar {side.name} unreadable: {_first_line(err)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise ValueError(f"sidecar {side.name} has no sha256")
    if record.get("key") != key:
        raise ValueError(f"sidecar {side.name} is for key {record.get('key')!r}")
    if not isinstance(record.get("val_metric"), (int, float)):
        raise ValueError(f"sidecar {side.name} has no val_metric")
    return record


def _load_cached(
    path: Path, key: str, model: nn.Module, task: Task, val: Any
) -> tuple[Teacher | None, str]:
    """The cached teacher if every check passes, else ``(None, why)``; never raises for a bad file."""
    try:
        record = _read_sidecar(path, key)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            return None, "sha256 differs from its sidecar's: the file changed since it was written"
        _load_state(model, data)
        model.eval()
        metric = evaluate(model, val, task.metric)
    except ValueError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - a cache file that cannot be used is rebuilt, never a traceback
        return None, f"{type(err).__name__}: {_first_line(err)}"
    recorded = float(record["val_metric"])
    if not math.isclose(metric, recorded, rel_tol=METRIC_TOLERANCE, abs_tol=METRIC_TOLERANCE):
        return None, f"val {task.metric_name} {metric:.4f}, recorded {recorded:.4f}"
    return Teacher(model, metric, "cache", path, state_fingerprint(model)), ""


# --------------------------------------------------------------------------------------- state_dict files


def _first_line(err: BaseException) -> str:
    """The first meaningful line of an exception's message (torch's run to several paragraphs)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch's advice comes first; the reason follows this marker
        text = text.split(marker, 1)[1]
        text = re.split(r"\.\s|\n\s*\n", text.strip(), maxsplit=1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # torch bolds part of its message with terminal codes
    line = line if len(line) <= 200 else line[:197] + "..."
    return line or type(err).__name__


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _shape_problem(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """Missing or unexpected names, a value that is not a tensor, or the first shape mismatch."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_names(unexpected)})")
        return "not this model's state_dict: " + "; ".join(parts)
    mismatched = []
    for name, want in expected.items():
        if not isinstance(want, torch.Tensor):
            continue
        have = state[name]
        if not isinstance(have, torch.Tensor):
            return f"{name!r} is a {type(have).__name__}, not a tensor"
        if have.shape != want.shape:
            mismatched.append((name, list(have.shape), list(want.shape)))
    if mismatched:
        name, have_shape, want_shape = mismatched[0]
        more = f" (and {len(mismatched) - 1} more size mismatch(es))" if len(mismatched) > 1 else ""
        return f"size mismatch: {name!r} is {have_shape} in the file, the model expects {want_shape}{more}"
    return None


def _non_finite(state: Mapping[str, Any]) -> str | None:
    """``non-finite values (NaN or inf) in '<first tensor>'``, or None if every float tensor is finite."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            if not bool(torch.isfinite(value).all()):
                return f"non-finite values (NaN or inf) in {name!r}"
    return None


def _torch_load(data: bytes) -> Any:
    """``torch.load`` with ``weights_only`` (no code runs), its warnings silenced (reasons become errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _load_error(data: bytes, err: Exception) -> str:
    """Why ``data`` could not be loaded, in one line."""
    if not data:
        return "cannot load: the file is empty"
    if not (data.startswith(b"PK\x03\x04") or data.startswith(b"\x80")):
        head = data[:12].decode("latin-1").encode("unicode_escape").decode()
        return f"cannot load: not a torch file (it starts with '{head}')"
    reason = _first_line(err)
    if "Unsupported global" in reason:
        return (
            f"refused: loading it would run code ({reason}); save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    if "Weights only load failed" in str(err):
        return f"cannot load: not a torch state_dict ({reason})"
    return f"cannot load: a damaged or truncated torch file ({type(err).__name__}: {reason})"


def _load_state(model: nn.Module, data: bytes) -> None:
    """Load the state_dict in ``data`` into ``model`` after checking names, shapes and finiteness;
    :class:`ValueError` saying why not (the model is untouched unless it loads)."""
    try:
        state = _torch_load(data)
    except Exception as err:  # noqa: BLE001 - whatever torch raises, the file is the problem
        raise ValueError(_load_error(data, err)) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"cannot load: it holds a {type(state).__name__}, not a state_dict")
    problem = _shape_problem(model.state_dict(), state)
    if problem:
        nested = [k for k in ("state_dict", "model", "model_state_dict") if isinstance(state.get(k), Mapping)]
        hint = f" (a training checkpoint? its {nested[0]!r} entry may be the state_dict)" if nested else ""
        raise ValueError(f"cannot load: {problem}{hint}")
    problem = _non_finite(state)
    if problem:
        raise ValueError(f"refused: {problem}")
    try:
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - e.g. a dtype torch cannot copy
        raise ValueError(f"cannot load: {_first_line(err)}") from None


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load the state_dict file ``path`` (``teacher.checkpoint``) into ``model``.

    Raises :class:`AutocompressError` in one line naming the file: unreadable, not a torch file,
    a pickle that would run code (refused by ``weights_only``; the code never runs), other names or
    shapes than the model's, or non-finite weights.
    """
    try:
        data = Path(path).read_bytes()
        _load_state(model, data)
    except OSError as err:
        raise AutocompressError(f"teacher.checkpoint {str(path)!r}: cannot read ({_first_line(err)})") from None
    except ValueError as err:
        raise AutocompressError(f"teacher.checkpoint {str(path)!r}: {' '.join(str(err).split())}") from None
