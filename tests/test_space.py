"""Search-space discovery, candidate round-trips, and low-rank through the pipeline."""

from __future__ import annotations

import optuna
import pytest
import torch

from autocompress.compress.lowrank import Factorized, factorize_layer, layer_input_shapes, layer_macs
from autocompress.compress.pipeline import PipelineSettings, apply
from autocompress.config import SpaceConfig
from autocompress.errors import AutocompressError
from autocompress.evaluators import count_parameters, model_size_bytes
from autocompress.spaces import Candidate, build_space
from autocompress.tasks import load_task
from autocompress.tasks.digits import DigitsCNN

X = torch.randn(1, 1, 32, 32)


def test_space_lists_groups_layers_and_useful_choices_only():
    space = build_space(DigitsCNN(width=32).eval(), X, SpaceConfig())
    assert set(space.get("prune")) == {f"features.conv{i}.conv" for i in range(1, 6)} | {"fc1"}
    assert space.get("prune")["features.conv1.conv"] == (0.0, 0.25, 0.5, 0.75)  # 32 -> 32, 24, 16, 8
    assert set(space.get("bits")) == {"features.conv1.conv..fc2"}  # a plain chain is one region
    per_layer = build_space(DigitsCNN(width=32).eval(), X, SpaceConfig(quantize={"granularity": "layer"}))
    assert set(per_layer.get("bits")) == {f"features.conv{i}.conv" for i in range(1, 6)} | {"fc1", "fc2"}
    assert space.get("rank") == {}  # low-rank is opt-in
    narrow = build_space(DigitsCNN(width=8).eval(), X, SpaceConfig())
    assert "features.conv1.conv" not in narrow.get("prune")  # 8 channels: every ratio rounds to 0 or 8


def test_include_exclude_globs_and_unmatched_patterns():
    space = build_space(DigitsCNN(width=32).eval(), X, SpaceConfig(include=["features.*"], exclude=["*conv5*"]))
    assert set(space.get("prune")) == {f"features.conv{i}.conv" for i in range(1, 5)}
    assert set(space.get("bits")) == {"features.conv1.conv..features.conv4.conv"}  # conv5 cuts the run
    with pytest.raises(AutocompressError, match="pattern 'head.*' matches no layer"):
        build_space(DigitsCNN(width=32).eval(), X, SpaceConfig(include=["head.*"]))


def test_lowrank_choices_lower_macs_and_candidates_round_trip():
    config = SpaceConfig(lowrank={"enabled": True, "fractions": [1.0, 0.5, 0.25]})
    model = DigitsCNN(width=32).eval()
    space = build_space(model, X, config)
    assert space.get("rank") and all(1.0 in v and min(v) < 1 for v in space.get("rank").values())
    modules, shapes = dict(model.named_modules()), layer_input_shapes(model, X)
    for name, fractions in space.get("rank").items():
        layer, shape = modules[name], shapes[name]
        for f in fractions:
            if f < 1:
                assert layer_macs(factorize_layer(layer, f, shape), shape) < layer_macs(layer, shape)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    candidate = space.suggest(trial)
    assert Candidate.from_params(candidate.to_params()) == candidate
    assert set(trial.params) == set(space.distributions())
    assert Candidate.from_params(space.baseline().to_params()).describe() == "uncompressed"
    with pytest.raises(ValueError, match="unknown candidate parameter 'width'"):
        Candidate.from_params({"width": 3})


def test_pipeline_prunes_then_factorizes_then_quantizes_the_factors():
    task = load_task("digits", {"width": 16, "hidden": 32, "image_size": 16})
    teacher = task.build_model().eval()
    x = task.example_input(1)
    candidate = Candidate(
        prune={"features.conv4.conv": 0.5},
        bits={"fc1": 4, "features.conv5.conv": 8},
        rank={"fc1": 0.25, "features.conv5.conv": 0.5},
        kd={"temperature": 2.0, "alpha": 0.5},
    )
    result = apply(teacher, candidate, lambda: task.loader("train", 64, shuffle=True), x,
                   PipelineSettings(finetune_epochs=1))
    model = result.model
    assert isinstance(model.fc1, Factorized) and isinstance(model.features.conv5.conv, Factorized)
    assert model.features.conv4.conv.out_channels == 32  # pruned before factorizing
    assert model.features.conv5.conv[0].in_channels == 32
    assert result.bits["fc1.0"] == 4 and result.bits["fc1.1"] == 4 and "fc1" not in result.bits
    for factor in model.fc1:
        for row in factor.weight.detach():
            assert len(torch.unique(row)) <= 15  # 4-bit grid, per output channel
    assert count_parameters(model) < count_parameters(teacher)
    assert model_size_bytes(model, result.bits) < model_size_bytes(model)
    assert model(task.example_input(2)).shape == (2, 10)
