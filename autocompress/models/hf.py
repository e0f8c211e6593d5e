"""Saving and reloading pruned Hugging Face models: per-layer shapes recorded in the config.

A Hugging Face config describes every layer with the same numbers (``hidden_size``,
``intermediate_size``, ``num_attention_heads``), so it cannot say that layer 0 kept 2 of 4
heads and layer 1 a 96-wide feed-forward. transformers 5 has no per-layer mechanism either:
``PreTrainedModel.prune_heads`` and ``config.pruned_heads`` were removed, and even those only
covered heads, never feed-forward widths. ``from_pretrained`` therefore fails on a pruned
checkpoint with size mismatches, which is why the loader here is hand-written.

When :func:`autocompress.compress.prune.prune` changes a Hugging Face model (or a model that
contains one, such as a task's wrapper), it records, under the config key
:data:`RECORD_KEY`, every module whose parameter shapes or integer size attributes changed::

    "autocompress_pruned": {
      "format": 1,
      "modules": {
        "encoder.layer.0.attention.self": {"attrs": {"num_attention_heads": 2, "all_head_size": 32}},
        "encoder.layer.0.attention.self.query": {
          "attrs": {"out_features": 32}, "params": {"weight": [32, 64], "bias": [32]}},
        ...}}

``model.save_pretrained(path)`` writes it with the rest of the config, and
:func:`from_pretrained` builds the model from the config, resizes the recorded modules (set the
attributes, reallocate the parameters), then loads the weights. The record is generic (names,
attributes, shapes), so reloading needs neither autocompress's pruner nor knowledge of the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

RECORD_KEY = "autocompress_pruned"
FORMAT = 1

Snapshot = dict[int, dict[str, dict[str, dict[str, Any]]]]
"""Per Hugging Face model (by id): per module name, its ``attrs`` and ``params`` (shapes)."""


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling over the attention mask: ``(input_ids, attention_mask)``
    -> one embedding per sentence. The encoder is kept whole (its unused pooler included), as a user
    wrapping ``AutoModel`` would."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _size_attrs(module: nn.Module) -> dict[str, Any]:
    """A module's integer (or tuple-of-integer) attributes: where sizes such as widths and head counts live."""
    attrs: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int):
            attrs[key] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            attrs[key] = list(value)
    return attrs


def _state_shapes(module: nn.Module) -> dict[str, list[int]]:
    """Shapes of a module's own parameters and persistent buffers (what its state dict holds)."""
    shapes = {name: list(p.shape) for name, p in module.named_parameters(recurse=False)}
    skip = getattr(module, "_non_persistent_buffers_set", set())
    shapes.update(
        {name: list(b.shape) for name, b in module.named_buffers(recurse=False) if b is not None and name not in skip}
    )
    return shapes


def hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost Hugging Face ``PreTrainedModel`` modules of ``model`` (itself included), by name."""
    transformers = sys.modules.get("transformers")
    if transformers is None:  # nothing can be a Hugging Face model before transformers is imported
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel) and not any(
            name == outer or name.startswith(f"{outer}.") or outer == "" for outer, _ in found
        ):
            found.append((name, module))
    return found


def snapshot(model: nn.Module) -> Snapshot:
    """The sizes of every module of each Hugging Face model in ``model`` (empty when there is none)."""
    return {
        id(hf_model): {
            name: {"attrs": _size_attrs(m), "params": _state_shapes(m)} for name, m in hf_model.named_modules()
        }
        for _, hf_model in hf_models(model)
    }


def record_pruned(model: nn.Module, before: Snapshot) -> None:
    """Add what changed since ``before`` (a :func:`snapshot`) to each Hugging Face model's config record."""
    for _, hf_model in hf_models(model):
        old = before.get(id(hf_model))
        if old is None:
            continue
        record = getattr(hf_model.config, RECORD_KEY, None) or {"format": FORMAT, "modules": {}}
        entries = record["modules"]
        for name, module in hf_model.named_modules():
            now = {"attrs": _size_attrs(module), "params": _state_shapes(module)}
            was = old.get(name, {"attrs": {}, "params": {}})
            for part in ("attrs", "params"):
                changed = {k: v for k, v in now[part].items() if was[part].get(k) != v}
                if changed:
                    entries.setdefault(name, {}).setdefault(part, {}).update(changed)
        if entries:
            setattr(hf_model.config, RECORD_KEY, record)


def resize(model: nn.Module, record: dict[str, Any]) -> None:
    """Give ``model``'s modules the attributes and parameter shapes of a :data:`RECORD_KEY` record.

    Parameters are reallocated uninitialised: load the pruned weights afterwards.
    """
    if record.get("format") != FORMAT:
        raise ValueError(f"{RECORD_KEY} format {record.get('format')!r} is not supported (expected {FORMAT})")
    modules = dict(model.named_modules())
    for name, entry in record["modules"].items():
        if name not in modules:
            raise KeyError(f"{RECORD_KEY} names module {name!r}, which {type(model).__name__} does not have")
        module = modules[name]
        for key, value in entry.get("attrs", {}).items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
        for key, shape in entry.get("params", {}).items():
            current = getattr(module, key, None)
            if not isinstance(current, torch.Tensor):
                raise KeyError(f"{RECORD_KEY} resizes {name}.{key}, which is not a tensor of {type(module).__name__}")
            fresh = torch.empty(shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, key, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                module.register_buffer(key, fresh)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(path / shard))
        return state
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} holds no model.safetensors (nor a sharded index)")
    return load_file(single)


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    prefix = getattr(model, "base_model_prefix", "")
    own = set(model.state_dict())
    if prefix and not (set(state) & own) and all(k.startswith(f"{prefix}.") for k in state):
        # Saved from a model with a head (BertForX), loaded as its base model.
        state = {k[len(prefix) + 1 :]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(
            f"{path}: weights {', '.join(sorted(unexpected)[:5])} fit no parameter of {type(model).__name__}"
        )
    if missing:
        # save_pretrained leaves tied weights out (an LM head sharing the input embeddings).
        model.tie_weights()
        loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
        untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
        if untied:
            raise KeyError(f"{path}: no saved weights for {', '.join(sorted(untied)[:5])}")


def from_pretrained(path: str | Path, model_class: Any = None) -> nn.Module:
    """Load a (possibly pruned) Hugging Face model saved with ``save_pretrained``, in eval mode.

    ``model_class`` is a transformers class (``AutoModel`` by default, or a concrete class such as
    ``BertModel``). Without an :data:`RECORD_KEY` record this is plain ``from_pretrained``; with
    one, the model is built from the config, resized to the recorded shapes, then loaded.
    """
    from transformers import AutoConfig, AutoModel

    model_class = AutoModel if model_class is None else model_class
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    if not record:
        return model_class.from_pretrained(path).eval()
    build = getattr(model_class, "from_config", None) or model_class._from_config
    model = build(config)
    resize(model, record)
    _load_weights(model, _read_weights(path), path)
    return model.eval()


def save_pretrained_parts(model: nn.Module, directory: str | Path) -> dict[str, Path]:
    """``save_pretrained`` every outermost Hugging Face model inside ``model`` (a task's wrapper included)
    into ``directory/<module name>`` (``directory/model`` for the model itself); reload each with
    :func:`from_pretrained`. Returns module name -> directory; empty when the model holds none."""
    saved: dict[str, Path] = {}
    for name, part in hf_models(model):
        target = Path(directory) / (name or "model")
        part.save_pretrained(str(target))
        saved[name] = target
    return saved
