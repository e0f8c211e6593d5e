"""The MobileNetV2-style model, bit-width regions read from the data-flow graph, and their plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress.lowrank import Factorized, factorize_layer
from autocompress.compress.pipeline import deployment_plan
from autocompress.compress.prune import find_prune_groups, prune
from autocompress.config import SpaceConfig
from autocompress.errors import AutocompressError
from autocompress.models import mobilenet_v2_small, resnet18_cifar
from autocompress.spaces import Candidate, build_space
from autocompress.tasks import load_task
from autocompress.techniques import get
from autocompress.techniques.base import QUANTIZABLE
from autocompress.techniques.quantize import layer_chains, range_layers
from tests.test_models_prune import assert_onnx_matches

X = torch.randn(1, 1, 32, 32)


def layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def test_mobilenet_blocks_depthwise_and_residuals():
    model = mobilenet_v2_small(width=16).eval()
    assert model(X).shape == (1, 10)
    block = model.features.b1_1
    assert block.residual and not model.features.b1_0.residual  # stride 2 / width change: no add
    dw = block.conv.depthwise.conv
    assert dw.groups == dw.in_channels == dw.out_channels == 4 * 24
    assert isinstance(block.conv.depthwise.relu, nn.ReLU6)
    with pytest.raises(ValueError, match="width=0 must be >= 1"):
        mobilenet_v2_small(width=0)


def test_pruning_couples_depthwise_with_its_pointwise_convolutions(tmp_path):
    model = mobilenet_v2_small(width=16).eval()
    groups = {g.name: g for g in find_prune_groups(model, X)}
    expand = groups["features.b1_1.conv.depthwise.conv"]
    assert set(expand.members) == {"features.b1_1.conv.depthwise.conv", "features.b1_1.conv.expand.conv"}
    # the project outputs of blocks joined by residual adds are one group
    assert set(groups["features.b1_1.conv.project"].members) == {
        "features.b1_0.conv.project",
        "features.b1_1.conv.project",
    }
    prune(model, {name: 0.5 for name in groups}, X, round_to=8)
    dw = model.features.b1_1.conv.depthwise.conv
    assert dw.groups == dw.in_channels == dw.out_channels == 48
    conv = model.features.b1_1.conv
    assert conv.expand.conv.out_channels == 48 and conv.project.in_channels == 48
    assert model(X).shape == (1, 10)
    assert_onnx_matches(model, X, tmp_path / "pruned.onnx")


def test_digits_task_picks_the_model_by_name():
    task = load_task("digits", {"model": "mobilenet", "width": 8})
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in task.build_model().modules())
    assert task.info["model"] == "mobilenet"
    with pytest.raises(AutocompressError, match="model='vgg' is not one of cnn, mobilenet"):
        load_task("digits", {"model": "vgg"})


def test_regions_are_the_chains_between_residual_adds_and_fan_outs():
    model = mobilenet_v2_small(width=16).eval()
    space = build_space(model, X, SpaceConfig())
    keys = list(space.get("bits"))
    assert keys[:3] == [
        "features.stem.conv",  # its output feeds the first block's residual add too
        "features.b0_0.conv.depthwise.conv..features.b0_0.conv.project",
        "features.b1_0.conv.expand.conv..features.b1_0.conv.project",
    ]
    assert keys[-1] == "features.head.conv..classifier"
    covered = [name for key in keys for name in range_layers(model, key)]
    assert sorted(covered) == sorted(layers(model))  # every layer once
    # A ResNet: each block's two convolutions; a 1x1 shortcut alone (it reads the stage's fan-out).
    resnet = build_space(resnet18_cifar(width=8).eval(), torch.randn(1, 3, 32, 32), SpaceConfig())
    assert "layer2.0.conv1..layer2.0.conv2" in resnet.get("bits") and "layer2.0.downsample.0" in resnet.get("bits")


def test_layer_chains_on_a_hand_made_graph():
    # a -> relu -> b -> add(b, a's relu) -> c: b reads a, but a's output also reaches the add.
    names = ["a", None, "b", None, "c", "d"]
    edges = [(0, 1), (1, 2), (2, 3), (1, 3), (3, 4), (4, 5)]
    chains = layer_chains(names, edges, sources=[0], sinks=[5])
    assert sorted(map(sorted, chains)) == [["a"], ["b"], ["c", "d"]]


def test_granularity_model_and_layer_and_excluded_layers_cut_runs():
    model = mobilenet_v2_small(width=16).eval()
    whole = build_space(model, X, SpaceConfig(quantize={"granularity": "model"}))
    assert list(whole.get("bits")) == ["features.stem.conv..classifier"]
    per_layer = build_space(model, X, SpaceConfig(quantize={"granularity": "layer"}))
    assert list(per_layer.get("bits")) == layers(model)
    cut = build_space(model, X, SpaceConfig(quantize={"granularity": "model"}, exclude=["features.b2_0.*"]))
    first, second = cut.get("bits")
    assert first.endswith("features.b1_1.conv.project") and second.startswith("features.b2_1.")


def test_a_region_value_expands_to_its_layers_and_round_trips():
    model = mobilenet_v2_small(width=16).eval()
    space = build_space(model, X, SpaceConfig(quantize={"bits": [32, 8]}))
    key = "features.b1_0.conv.expand.conv..features.b1_0.conv.project"
    params = {f"bits/{k}": 32 for k in space.get("bits")} | {f"bits/{key}": "8"}
    candidate = Candidate.from_params(params)
    assert Candidate.from_params(candidate.to_params()) == candidate
    plan = deployment_plan(model, candidate)
    assert set(plan) == set(layers(model))
    assert {n for n, b in plan.items() if b == 8} == {
        "features.b1_0.conv.expand.conv",
        "features.b1_0.conv.depthwise.conv",
        "features.b1_0.conv.project",
    }
    # a factorized end of a range: its factors are covered
    block = model.features.b1_0.conv
    block.project = factorize_layer(block.project, 0.25)
    assert isinstance(block.project, Factorized)
    plan = get("bits").plan(model, {key: 8})
    assert "features.b1_0.conv.project.0" in plan and "features.b1_0.conv.project.1" in plan
    with pytest.raises(ValueError, match="'ghost' is not a module of the model"):
        get("bits").plan(model, {"features.stem.conv..ghost": 8})
