"""Quantization simulation: per-channel weight fake-quant and calibrated activation fake-quant."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnxruntime.quantization.quant_utils import compute_scale_zp
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress.quantize import (
    INPUT_QUANT,
    OUTPUT_QUANT,
    ActivationFakeQuant,
    attach_activation_quant,
    attach_weight_quant,
    bake_weights,
    output_points,
    plain_copy,
    remove_activation_quant,
)
from autocompress.evaluators.latency import torch_threads
from autocompress.tasks import load_task

CONVS = [f"features.conv{i}.conv" for i in range(1, 6)]
LAYERS = [*CONVS, "fc1", "fc2"]


def activation_quant_points(model: nn.Module) -> dict[str, list[str]]:
    """Where activation fake-quant sits: ``{"inputs": [layer, ...], "outputs": [module, ...]}``."""
    named = list(model.named_modules())
    return {
        "inputs": [n for n, m in named if isinstance(getattr(m, INPUT_QUANT, None), ActivationFakeQuant)],
        "outputs": [n for n, m in named if isinstance(getattr(m, OUTPUT_QUANT, None), ActivationFakeQuant)],
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def task():
    return load_task("digits", {"width": 8})


@pytest.fixture
def model(task):
    torch.manual_seed(0)
    return task.build_model().eval()


@pytest.fixture(scope="module")
def batches(task):
    return [x for x, _ in task.loader("train", 128)][:3]


def _capture_input(module: nn.Module) -> list[torch.Tensor]:
    """Inputs ``module`` receives after its own pre-hooks (hooks run in registration order)."""
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def _on_grid(x: torch.Tensor, scale: float, zero_point: int, levels: int = 256) -> bool:
    q = x / scale + zero_point
    return bool(torch.allclose(q, q.round(), atol=1e-3) and q.round().min() >= 0 and q.round().max() <= levels - 1)


def test_weight_quant_api_unchanged(model):
    wrapped = attach_weight_quant(model, {"features.conv1.conv": 4, "fc1": 8, "fc2": 32, "missing": 8})
    assert wrapped == ["features.conv1.conv", "fc1"]
    conv_weight = model.features.conv1.conv.weight.detach().clone()
    assert max(len(torch.unique(channel)) for channel in conv_weight) <= 15
    bake_weights(model)
    assert not parametrize.is_parametrized(model.features.conv1.conv)
    assert torch.equal(model.features.conv1.conv.weight, conv_weight)


def test_inputs_and_outputs_are_fake_quantized(model, batches):
    names = attach_activation_quant(model, ["fc1", "features.conv2.conv"], batches)
    assert names == ["features.conv2.conv", "fc1"]  # model order
    points = activation_quant_points(model)
    assert points == {"inputs": ["features.conv2.conv", "fc1"], "outputs": ["features.conv2.relu", "relu"]}
    seen_conv2 = _capture_input(model.features.conv2.conv)
    seen_conv3 = _capture_input(model.features.conv3.conv)  # fp32 layer fed by int8 conv2 (through max-pool)
    with torch.no_grad():
        model(batches[0])
    q_in = model.features.conv2.conv.input_quant
    q_out = model.features.conv2.relu.output_quant
    assert _on_grid(seen_conv2[0], q_in.scale.item(), q_in.zero_point.item())
    assert not _on_grid(seen_conv3[0], q_in.scale.item(), 0)  # the float values differ from conv2's input grid
    assert _on_grid(seen_conv3[0], q_out.scale.item(), q_out.zero_point.item())
    assert q_out.zero_point.item() == 0  # after ReLU the range starts at 0, as ORT's after removing the ReLU


def test_output_points_follow_folded_bn_and_fused_relu(model, batches):
    points = output_points(model, LAYERS, batches[0])
    expected = {f"features.conv{i}.conv": f"features.conv{i}.relu" for i in range(1, 6)}
    assert points == {**expected, "fc1": "relu", "fc2": "fc2"}  # fc2's output is the model output


class _SharedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.a(x)))
        x = self.relu(self.b(x))
        return F.relu(self.c(x))


def test_output_points_stop_before_shared_or_functional_activations():
    model = _SharedRelu().eval()
    points = output_points(model, ["a", "b", "c"], torch.randn(2, 1, 8, 8))
    assert points == {"a": "bn", "b": "b", "c": "c"}


def test_calibration_matches_ort_and_runs_on_the_float_model(model, batches):
    float_model = copy.deepcopy(model)
    relu1_out = _capture_output(float_model.features.conv1.relu)
    with torch.no_grad():
        for x in batches:
            float_model(x)
    attach_activation_quant(model, ["features.conv1.conv", "features.conv2.conv"], batches)
    # The model input: scale and zero point as ORT computes them from the same min/max.
    inputs = torch.cat(batches)
    zero_point, scale = compute_scale_zp(
        np.array(inputs.min().item(), dtype=np.float32),
        np.array(inputs.max().item(), dtype=np.float32),
        np.array(0, dtype=np.uint8),
        np.array(255, dtype=np.uint8),
    )
    quantizer = model.features.conv1.conv.input_quant
    assert quantizer.scale.item() == pytest.approx(float(scale), rel=1e-6)
    assert quantizer.zero_point.item() == int(zero_point)
    # conv2's input range was observed on float activations, not on conv1's fake-quantized ones.
    observed = model.features.conv2.conv.input_quant.observer
    assert observed.max_val.item() == max(t.max().item() for t in relu1_out)


def _capture_output(module: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    return seen


def test_remove_restores_the_float_model(model, batches):
    with torch.no_grad():
        expected = model(batches[0])
    attach_activation_quant(model, LAYERS, batches)
    with torch.no_grad():
        quantized = model(batches[0])
    assert not torch.equal(quantized, expected)
    removed = remove_activation_quant(model)
    assert "features.conv1.conv" in removed and "features.conv1.relu" in removed
    assert activation_quant_points(model) == {"inputs": [], "outputs": []}
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(batches[0]), expected)
    attach_activation_quant(model, LAYERS, batches)  # attachable again after removal
    with torch.no_grad():
        assert torch.equal(model(batches[0]), quantized)


def test_deep_copies_keep_their_own_quantizers(model, batches):
    attach_weight_quant(model, dict.fromkeys(LAYERS, 8))
    attach_activation_quant(model, LAYERS, batches)
    with torch.no_grad():
        expected = model(batches[0])
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(batches[0]), expected)
    remove_activation_quant(clone)
    plain = plain_copy(model)  # bakes weights in the copy: must not strip the original's parametrizations
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert activation_quant_points(plain) == {"inputs": [], "outputs": []}
    with torch.no_grad():
        assert torch.equal(model(batches[0]), expected)
        assert not torch.equal(plain(batches[0]), expected)


def test_fake_quant_trains_with_straight_through_gradients(model, batches, task):
    attach_activation_quant(model, LAYERS, batches)
    scale = model.fc1.input_quant.scale.clone()
    model.train()
    x, y = next(iter(task.loader("train", 32)))
    F.cross_entropy(model(x), y).backward()
    assert model.features.conv1.conv.weight.grad.abs().sum() > 0
    assert torch.equal(model.fc1.input_quant.scale, scale)  # frozen after calibration, also in train mode


def test_bad_arguments_are_named(model, batches):
    with pytest.raises(ValueError, match="'features.conv9.conv' is no such layer"):
        attach_activation_quant(model, ["features.conv9.conv"], batches)
    with pytest.raises(ValueError, match="'features.conv1.bn' is a BatchNorm2d"):
        attach_activation_quant(model, ["features.conv1.bn"], batches)
    with pytest.raises(ValueError, match="empty"):
        attach_activation_quant(model, ["fc1"], [])
    with pytest.raises(ValueError, match="bits=9"):
        attach_activation_quant(model, ["fc1"], batches, bits=9)
    assert activation_quant_points(model) == {"inputs": [], "outputs": []}  # failed attaches leave nothing
    attach_activation_quant(model, ["fc1"], batches)
    with pytest.raises(ValueError, match="'fc1' already has"):
        attach_activation_quant(model, ["fc1"], batches)
