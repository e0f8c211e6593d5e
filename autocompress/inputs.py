"""Model inputs as pytrees: one tensor, a tuple of tensors, or a dict of named tensors (``input_ids``...).

Every place that feeds a model (training, evaluation, tracing, export, calibration, timing) goes through
these helpers, so a task's inputs may have any of those structures and any dtype (int64 token ids stay
int64). A *batch* from a task's DataLoader is ``(inputs, target)``; the target may be any tensor.

Written here rather than taken from ``torch.utils._pytree`` because that module is private and the
structures a model's ``forward`` accepts are exactly these three: a tensor is passed as the one
argument, a tuple as positional arguments, a dict as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

Inputs = torch.Tensor | tuple | list | Mapping[str, Any]
"""What a model is called with: a tensor, a tuple/list of tensors, or a dict of named tensors."""


def call(model: nn.Module | Callable, inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a task's loss and metric see: the output itself, or the first value of a tuple or
    a dict-like output (a Hugging Face ``ModelOutput``'s ``last_hidden_state`` / ``logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return primary_output(next(iter(output.values())))
    if isinstance(output, (tuple, list)) and output:
        return primary_output(output[0])
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")


def forward(model: nn.Module | Callable, inputs: Inputs) -> torch.Tensor:
    """The primary output tensor of ``model`` on ``inputs``."""
    return primary_output(call(model, inputs))


def split_batch(batch: Any) -> tuple[Inputs, Any]:
    """``(inputs, target)`` of a DataLoader batch; a batch that is not a pair is all inputs (target None)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def batch_inputs(batches: Iterable) -> Iterator[Inputs]:
    """The model inputs of each batch of ``batches`` (see :func:`split_batch`)."""
    for batch in batches:
        yield split_batch(batch)[0]


def map_tensors(inputs: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``inputs`` with ``fn`` applied to every tensor, structure kept (dicts, tuples, lists)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {key: map_tensors(value, fn) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(value, fn) for value in inputs)
    return inputs


def leaves(inputs: Any) -> list[torch.Tensor]:
    """Every tensor of ``inputs`` in order (dict insertion order)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for value in inputs.values() for t in leaves(value)]
    if isinstance(inputs, (tuple, list)):
        return [t for value in inputs for t in leaves(value)]
    return []


def batch_size(inputs: Inputs) -> int:
    """The batch dimension of ``inputs`` (dimension 0 of its first tensor)."""
    tensors = leaves(inputs)
    if not tensors:
        raise TypeError(f"inputs of type {type(inputs).__name__} hold no tensor")
    return int(tensors[0].shape[0])


def take(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` samples of a batch of inputs."""
    return map_tensors(inputs, lambda t: t[:n])


def repeat_to(inputs: Inputs, n: int) -> Inputs:
    """A batch of exactly ``n`` samples: the first ``n``, cycling through the batch if it is smaller."""
    have = batch_size(inputs)
    if have >= n:
        return take(inputs, n)
    index = torch.arange(n) % have
    return map_tensors(inputs, lambda t: t[index])


def cat(batches: list[Any]) -> Any:
    """Concatenate a list of same-structured outputs or targets along dimension 0."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {key: cat([b[key] for b in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(cat([b[i] for b in batches]) for i in range(len(first)))
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def input_names(inputs: Inputs) -> list[str]:
    """Graph input names for ``inputs`` when exported: ``input`` for one tensor, ``input_<i>`` for a
    tuple, the keys of a dict (so an ONNX model of a Hugging Face encoder takes ``input_ids`` ...)."""
    if isinstance(inputs, torch.Tensor):
        return ["input"]
    if isinstance(inputs, Mapping):
        return [str(key) for key in inputs]
    return [f"input_{i}" for i in range(len(inputs))]


def flat(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of ``inputs`` in the order of :func:`input_names` (one level: the model's arguments)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def numpy_feed(inputs: Inputs, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed ``{name: array}``: floats as float32, integers keep their dtype."""
    names = names or input_names(inputs)
    arrays = {}
    for name, tensor in zip(names, flat(inputs), strict=True):
        array = tensor.detach().cpu().numpy()
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32, copy=False)
        arrays[name] = np.ascontiguousarray(array)
    return arrays


def describe(inputs: Inputs) -> str:
    """A short description of a batch's structure: ``float32[1, 1, 32, 32]`` or
    ``{input_ids: int64[1, 24], attention_mask: int64[1, 24]}``."""
    if isinstance(inputs, torch.Tensor):
        return f"{str(inputs.dtype).removeprefix('torch.')}{list(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__
