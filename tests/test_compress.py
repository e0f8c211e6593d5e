"""The issue-2 transforms: structured pruning, weight fake-quant, KD loss, the pipeline."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from autocompress.compress.distill import FeatureDistiller, TrainingDiverged, fit, kd_loss
from autocompress.compress.pipeline import PipelineSettings, apply
from autocompress.compress.prune import find_prune_groups, kept_channels, prune, useful_ratios
from autocompress.compress.quantize import attach_weight_quant, bake_weights, weight_qmax
from autocompress.evaluators import count_parameters, model_size_bytes
from autocompress.spaces import Candidate
from autocompress.tasks import load_task
from autocompress.tasks.digits import DigitsCNN
from autocompress.tasks.mnist1d import MNIST1DCNN
from tests.conftest import model_macs


def _conv_weights(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() > 1}


def _digits_params(w: list[int], hidden: int, classes: int = 10) -> int:
    """Independent parameter count of DigitsCNN with per-conv widths w (5 entries)."""
    convs = [(1, w[0]), (w[0], w[1]), (w[1], w[2]), (w[2], w[3]), (w[3], w[4])]
    total = sum(9 * i * o + 2 * o for i, o in convs)  # conv (no bias) + BN affine
    return total + w[4] * hidden + hidden + hidden * classes + classes


def test_pruning_physically_removes_channels_with_round_to_8():
    model = DigitsCNN(width=32).eval()
    x = torch.randn(1, 1, 32, 32)
    groups = {g.name: g for g in find_prune_groups(model, x)}
    assert "fc2" not in groups  # the output layer is never pruned
    assert set(groups) == {f"features.conv{i}.conv" for i in range(1, 6)} | {"fc1"}
    ratios = {"features.conv1.conv": 0.5, "features.conv4.conv": 0.3, "fc1": 0.75}
    pruned = prune(copy.deepcopy(model), ratios, x, round_to=8)
    shapes = _conv_weights(pruned)
    assert shapes["features.conv1.conv.weight"] == (16, 1, 3, 3)
    assert shapes["features.conv2.conv.weight"] == (64, 16, 3, 3)  # next layer's inputs follow
    assert shapes["features.conv4.conv.weight"][0] == 88  # int(128 * 0.7) = 89 -> 88
    assert shapes["features.conv5.conv.weight"][1] == 88
    assert shapes["fc1.weight"] == (16, 128) and shapes["fc2.weight"] == (10, 16)
    assert pruned.features.conv1.bn.num_features == 16
    assert count_parameters(pruned) == _digits_params([16, 64, 64, 88, 128], 16)
    assert count_parameters(model) == _digits_params([32, 64, 64, 128, 128], 64)
    assert pruned(x).shape == (1, 10)


def test_pruning_through_flatten_into_linear():
    model = MNIST1DCNN(width=32, hidden=64).eval()
    x = torch.randn(1, 1, 40)
    pruned = prune(copy.deepcopy(model), {"features.conv3": 0.5}, x)
    assert pruned.features.conv3.out_channels == 32
    assert pruned.fc1.in_features == 32 * 10  # 10 positions per channel after two stride-2 convs
    assert pruned(torch.randn(4, 1, 40)).shape == (4, 10)


def test_ratio_zero_and_fp32_leave_the_function_unchanged():
    model = DigitsCNN(width=8).eval()
    x = torch.randn(4, 1, 32, 32)
    same = prune(copy.deepcopy(model), {g.name: 0.0 for g in find_prune_groups(model, x[:1])}, x[:1])
    attach_weight_quant(same, {"fc1": 32, "features.conv2.conv": 32})
    torch.testing.assert_close(same(x), model(x))


def test_useless_ratios_are_not_offered():
    assert kept_channels(32, 0.75, 8) == 8
    assert kept_channels(12, 0.5, 8) == 0  # would delete the layer
    assert useful_ratios(12, [0.0, 0.25, 0.5, 0.75], 8) == [0.0, 0.25]  # 12 -> 8 once, never 0
    assert useful_ratios(64, [0.0, 0.1, 0.125, 0.5], 8) == [0.0, 0.1, 0.5]  # 0.125 repeats 56
    with pytest.raises(ValueError, match="every channel"):
        prune(DigitsCNN(width=2).eval(), {"features.conv1.conv": 0.5}, torch.randn(1, 1, 32, 32))
    with pytest.raises(KeyError, match="no prunable group named nope"):
        prune(DigitsCNN(width=8).eval(), {"nope": 0.5}, torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weight_fake_quant_rounds_to_the_bit_grid(bits):
    qmax = weight_qmax(bits)  # 8 bits: 127, or 64 where the host's int8 kernels need 7-bit weights
    max_levels = 2 * qmax + 1
    model = DigitsCNN(width=8).eval()
    attach_weight_quant(model, {"features.conv2.conv": bits})
    bake_weights(model)
    w = model.features.conv2.conv.weight.detach()
    for channel in w:
        assert len(torch.unique(channel)) <= max_levels
        scale = channel.abs().max() / qmax
        assert torch.allclose(channel / scale, torch.round(channel / scale), atol=1e-3)


def test_size_counts_bits_and_scales():
    model = DigitsCNN(width=8).eval()
    fp32 = model_size_bytes(model)
    params = count_parameters(model)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert fp32 == 4 * (params + buffers)
    w = model.fc1.weight
    int4 = model_size_bytes(model, {"fc1": 4})
    assert fp32 - int4 == 4 * w.numel() - (w.numel() // 2 + 4 * w.shape[0])


def test_kd_loss_reduces_to_cross_entropy_and_scales_with_t_squared():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))
    soft = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(kd_loss(s, t, y, 4.0, 1.0), soft, atol=1e-6)
    assert kd_loss(t, t, y, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_fit_stops_on_nan_with_a_reason():
    model = DigitsCNN(width=4)
    batches = [(torch.full((4, 1, 32, 32), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1"):
        fit(model, batches, epochs=1, lr=0.1)


def test_pipeline_is_deterministic_and_does_not_touch_the_teacher():
    task = load_task("digits", {"width": 8, "hidden": 16, "image_size": 16})
    teacher = task.build_model().eval()
    before = copy.deepcopy(teacher.state_dict())
    x = task.example_input(1)
    groups = find_prune_groups(teacher, x)
    candidate = Candidate(
        prune={g.name: max(useful_ratios(g.channels, [0.0, 0.5], 8)) for g in groups},
        bits={"fc1": 8},
        kd={"temperature": 2.0, "alpha": 0.5},
    )
    settings = PipelineSettings(finetune_epochs=1, seed=5)

    def loader():
        return task.loader("train", 64, shuffle=True)

    a = apply(teacher, candidate, loader, x, settings).model
    b = apply(teacher, candidate, loader, x, settings).model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert count_parameters(a) < count_parameters(teacher)
    assert a(task.example_input(2)).shape == (2, 10)


def test_taylor_importance_uses_gradients_and_removes_channels():
    task = load_task("digits", {"width": 16, "hidden": 16, "image_size": 16})
    model = task.build_model().eval()
    x = task.example_input(1)
    batches = list(itertools.islice(iter(task.loader("train", 32)), 2))
    with pytest.raises(ValueError, match="needs calibration"):
        prune(copy.deepcopy(model), {"features.conv2.conv": 0.5}, x, importance="taylor")
    l1 = prune(copy.deepcopy(model), {"features.conv2.conv": 0.5}, x, importance="l1")
    taylor = prune(copy.deepcopy(model), {"features.conv2.conv": 0.5}, x, importance="taylor", calibration=batches)
    assert taylor.features.conv2.conv.out_channels == l1.features.conv2.conv.out_channels == 16
    assert all(p.grad is None for p in taylor.parameters())  # calibration gradients are cleared
    # the criteria rank channels differently, so different channels survive
    assert not torch.equal(taylor.features.conv2.conv.weight, l1.features.conv2.conv.weight)


def test_feature_distillation_adapts_pruned_widths_and_cleans_up():
    task = load_task("digits", {"width": 16, "hidden": 16, "image_size": 16})
    teacher = task.build_model().eval()
    x = task.example_input(1)
    student = prune(copy.deepcopy(teacher), {"features.conv4.conv": 0.5}, x)
    layers = ["features.conv4", "features.conv5"]
    batches = list(itertools.islice(iter(task.loader("train", 32)), 3))
    distiller = FeatureDistiller(student, teacher, layers, x)
    adapter = distiller.adapters["features__conv4"]
    assert (adapter.in_channels, adapter.out_channels) == (32, 64)  # pruned width -> teacher width
    distiller.remove()
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        FeatureDistiller(student, teacher, ["nope"], x)

    history = fit(student, batches, epochs=2, lr=0.01, teacher=teacher, alpha=0.5, temperature=2.0,
                  feature_layers=layers, feature_weight=1.0)
    assert len(history.train_loss) == 2 and all(math.isfinite(v) for v in history.train_loss)
    for model in (student, teacher):
        assert all(not m._forward_hooks for m in model.modules())  # hooks removed after the fine-tune


class _ConcatDepthwiseNet(torch.nn.Module):
    """Two branches joined by torch.cat, then a depthwise conv (groups == channels) and a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.dw = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.bn = torch.nn.BatchNorm2d(64)
        self.pw = torch.nn.Conv2d(64, 48, 1)
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = torch.relu(self.pw(torch.relu(self.bn(self.dw(x)))))
        return self.fc(x.mean((2, 3)))


def test_pruning_through_concatenation_and_depthwise_conv(tmp_path):
    model = _ConcatDepthwiseNet().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in find_prune_groups(model, x[:1])}
    # the depthwise conv ties its channels to its inputs, i.e. to both concatenated branches: one group
    assert set(groups) == {"dw", "pw"} and {"a", "b", "dw"} <= set(groups["dw"].members)
    pruned = prune(copy.deepcopy(model), {"dw": 0.5, "pw": 0.5}, x[:1], round_to=8)
    ca, cb = pruned.a.out_channels, pruned.b.out_channels
    assert ca + cb == 32  # channels removed from the concatenation, split by importance
    assert pruned.dw.in_channels == pruned.dw.out_channels == pruned.dw.groups == 32
    assert pruned.bn.num_features == 32 and pruned.pw.in_channels == 32 and pruned.pw.out_channels == 24
    assert pruned.fc.in_features == 24 and pruned(x).shape == (2, 10)
    expected = (27 * ca + ca) + (27 * cb + cb) + (32 * 9 + 32) + 2 * 32 + (32 * 24 + 24) + (24 * 10 + 10)
    assert count_parameters(pruned) == expected
    path = tmp_path / "m.onnx"
    torch.onnx.export(pruned, (x,), str(path), dynamo=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), pruned(x).detach(), atol=1e-4, rtol=1e-4)


def test_digits_macs_drop_as_computed_by_hand():
    model = DigitsCNN(width=32).eval()
    x = torch.randn(1, 1, 32, 32)

    def macs(w, hidden):  # 3x3 convs at 32x32, 32x32, 16x16, 16x16, 8x8, then the two Linears
        sizes = [32 * 32, 32 * 32, 16 * 16, 16 * 16, 8 * 8]
        ins = [1, *w[:4]]
        return sum(9 * i * o * hw for i, o, hw in zip(ins, w, sizes, strict=True)) + w[4] * hidden + hidden * 10

    assert model_macs(model, x) == macs([32, 64, 64, 128, 128], 64)
    pruned = prune(copy.deepcopy(model), {"features.conv2.conv": 0.5, "features.conv5.conv": 0.75}, x)
    assert model_macs(pruned, x) == macs([32, 32, 64, 128, 32], 64)


def test_quantize_warns_about_layers_it_cannot_handle():
    model = DigitsCNN(width=8).eval()
    with pytest.warns(UserWarning) as caught:
        wrapped = attach_weight_quant(model, {"features.pool1": 8, "fc1": 8, "ghost": 4})
    assert wrapped == ["fc1"]
    messages = [str(w.message) for w in caught]
    assert "quantize: skipping 'features.pool1': MaxPool2d has no weight tensor" in messages
    assert "quantize: skipping 'ghost': no such layer" in messages
