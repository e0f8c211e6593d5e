"""Low-rank factorization: exactness where the rank suffices, parameter/MAC arithmetic, the API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.compress.lowrank import (
    Factorized,
    factorizable_layers,
    factorize,
    factorize_layer,
    layer_macs,
    useful_rank_fractions,
)
from tests.conftest import model_macs


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def low_rank_linear(in_features: int, out_features: int, rank: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, rank) @ torch.randn(rank, in_features) / rank)
    return layer


def tucker_conv(conv: type[nn.Module], in_ch: int, out_ch: int, r_in: int, r_out: int, **kwargs) -> nn.Module:
    """A conv whose kernel has exact multilinear rank (r_out, r_in) in its channel modes."""
    layer = conv(in_ch, out_ch, 3, **kwargs)
    spatial = layer.weight.shape[2:]
    core = torch.randn(r_out, r_in, *spatial)
    a, b = torch.randn(out_ch, r_out), torch.randn(in_ch, r_in)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("rs...,or,is->oi...", core, a, b) / (r_in * r_out))
    return layer


def reconstructed_weight(factorized: Factorized) -> torch.Tensor:
    """The single weight the chain of factors computes (bias excluded)."""
    parts = [m.weight.detach() for m in factorized]
    if len(parts) == 2:  # SVD: second (out, r) @ first (r, in), spatial dims are 1 for convs
        first, second = parts
        return (second.flatten(1) @ first.flatten(1)).reshape(second.shape[0], first.shape[1], *first.shape[2:])
    first, core, last = parts
    return torch.einsum("rs...,or,si->oi...", core, last.flatten(1), first.flatten(1))


def test_full_rank_fraction_leaves_layer_and_outputs_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    x = torch.randn(5, 12)
    before = model(x)
    layers = list(model)
    factorize(model, {"0": 1.0, "2": 1.0})
    assert list(model) == layers  # the very same modules
    assert torch.allclose(model(x), before)


def test_linear_rank_fraction_gives_exact_parameter_count_and_best_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    fraction = 0.5
    rank = round(fraction * 30)  # full rank = min(40, 30)
    model = nn.Sequential(layer)
    original = copy.deepcopy(layer)
    factorize(model, {"0": fraction})
    fact = model[0]
    assert isinstance(fact, Factorized)
    assert [name for name, _ in fact.named_children()] == ["0", "1"]
    assert fact[0].bias is None and torch.equal(fact[1].bias, original.bias)
    assert (fact[0].in_features, fact[0].out_features, fact[1].out_features) == (40, rank, 30)
    assert n_params(fact) == 40 * rank + rank * 30 + 30
    # Eckart-Young: the error of the best rank-r approximation is the tail of the spectrum.
    singular = torch.linalg.svdvals(original.weight.detach().double())
    error = torch.linalg.norm(reconstructed_weight(fact).double() - original.weight.detach().double())
    assert error.item() == pytest.approx(singular[rank:].square().sum().sqrt().item(), rel=1e-4)
    x = torch.randn(7, 3, 40)  # leading token dimension: Linear semantics are kept
    assert torch.allclose(fact(x), x @ reconstructed_weight(fact).T + original.bias, atol=1e-5)


def test_linear_factorization_is_exact_when_rank_suffices():
    torch.manual_seed(0)
    layer = low_rank_linear(64, 64, rank=8)
    fact = factorize_layer(layer, 0.25)  # rank 16 >= 8 and 16 * 128 < 64 * 64
    assert isinstance(fact, Factorized) and fact.ranks == (16,)
    x = torch.randn(10, 64)
    assert torch.allclose(fact(x), layer(x), atol=1e-4)


@pytest.mark.parametrize(
    ("conv", "input_shape"), [(nn.Conv2d, (16, 10, 10)), (nn.Conv1d, (16, 20))], ids=["conv2d", "conv1d"]
)
def test_tucker2_conv_parameters_shapes_and_exactness(conv, input_shape):
    torch.manual_seed(0)
    layer = tucker_conv(conv, 16, 24, r_in=8, r_out=12, stride=2, padding=1, bias=True)
    k = 3 ** (len(input_shape) - 1)
    # full ranks: r_in = min(16, 24 * k) = 16, r_out = min(24, 16 * k) = 24; half of each
    fact = factorize_layer(layer, 0.5)
    assert isinstance(fact, Factorized) and fact.ranks == (8, 12)
    assert [name for name, _ in fact.named_children()] == ["0", "1", "2"]
    first, core, last = fact
    assert first.kernel_size == (1,) * len(first.kernel_size) and last.kernel_size == first.kernel_size
    assert core.kernel_size == layer.kernel_size and core.stride == layer.stride and core.padding == layer.padding
    assert n_params(fact) == 16 * 8 + k * 8 * 12 + 12 * 24 + 24
    x = torch.randn(2, *input_shape)
    out = fact(x)
    assert out.shape == layer(x).shape
    assert torch.allclose(out, layer(x), atol=1e-4)  # the kernel has exactly this Tucker rank
    # MACs: first 1x1 at input resolution, the rest at output resolution.
    positions_in = torch.tensor(input_shape[1:]).prod().item()
    positions_out = out[0, 0].numel()
    assert layer_macs(layer, input_shape) == positions_out * 24 * 16 * k
    assert layer_macs(fact, input_shape) == positions_in * 16 * 8 + positions_out * (k * 8 * 12 + 12 * 24)


def test_pointwise_conv_uses_two_1x1_layers_and_keeps_stride_padding_and_bias():
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 48, 1, stride=2, padding=1)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(48, 6) @ torch.randn(6, 32)).reshape(48, 32, 1, 1) / 6)
    fact = factorize_layer(layer, 0.25)  # full rank 32 -> 8 >= 6
    assert isinstance(fact, Factorized) and len(fact) == 2 and fact.ranks == (8,)
    assert n_params(fact) == 32 * 8 + 8 * 48 + 48
    x = torch.randn(2, 32, 9, 9)
    assert fact(x).shape == layer(x).shape == (2, 48, 6, 6)
    assert torch.allclose(fact(x), layer(x), atol=1e-4)  # including the padded border (= bias)


def test_approximation_error_decreases_as_rank_grows():
    torch.manual_seed(0)
    cases = [
        (nn.Linear(48, 40), [0.1, 0.2, 0.3, 0.45]),  # ranks 4..18; rank r costs r * 88 < 1920 MACs
        (nn.Conv2d(16, 24, 3, padding=1), [0.125, 0.25, 0.5, 0.75]),  # ranks (2, 3) .. (12, 18)
    ]
    for layer, fractions in cases:
        errors = []
        for fraction in fractions:
            fact = factorize_layer(layer, fraction)
            assert isinstance(fact, Factorized), (layer, fraction)
            errors.append(torch.linalg.norm(reconstructed_weight(fact) - layer.weight.detach()).item())
        assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
        assert errors[-1] < torch.linalg.norm(layer.weight.detach()).item()


def test_useful_rank_fractions_drops_costlier_and_duplicate_ranks():
    layer = nn.Linear(64, 10)  # full rank 10; rank r costs r * 74 MACs against 640
    fractions = [1.0, 0.9, 0.8, 0.5, 0.12, 0.1, 0.05]
    useful = useful_rank_fractions(layer, fractions)
    assert useful == [0.05, 0.5, 0.8, 1.0]  # ranks 1, 5, 8; 0.1 and 0.12 also give rank 1; rank 9 costs 666
    for fraction in useful[:-1]:
        rank = max(1, round(fraction * 10))
        assert rank * (64 + 10) < 64 * 10
    assert useful_rank_fractions(layer, [0.9]) == []
    # A fraction that does not lower MACs is not applied either.
    assert factorize_layer(layer, 0.9) is layer
    square = nn.Linear(64, 64)  # rank 32 costs exactly as much as the layer: not offered
    assert useful_rank_fractions(square, [0.25, 0.5, 1.0]) == [0.25, 1.0]
    assert useful_rank_fractions(nn.BatchNorm1d(4), [0.5, 1.0]) == [1.0]
    with pytest.raises(ValueError, match="1.5"):
        useful_rank_fractions(layer, [1.5])


def test_useful_rank_fractions_with_input_shape_counts_exact_positions():
    layer = nn.Conv2d(16, 16, 3)  # no padding: 16 input positions feed 4 output positions on 4x4
    # fraction 0.875 -> ranks (14, 14): 2212 < 2304 MACs per output position for a large map,
    # but on a 4x4 input the first 1x1 runs on 4x as many positions: 11536 > 9216.
    assert useful_rank_fractions(layer, [0.875, 1.0]) == [0.875, 1.0]
    assert useful_rank_fractions(layer, [0.875, 1.0], input_shape=(16, 4, 4)) == [1.0]
    assert layer_macs(layer, (16, 4, 4)) == 4 * 9 * 16 * 16
    fact = factorize_layer(layer, 0.875)
    assert layer_macs(fact, (16, 4, 4)) == 16 * 16 * 14 + 4 * 14 * (9 * 14 + 16)
    assert factorize_layer(layer, 0.875, input_shape=(16, 4, 4)) is layer
    model = nn.Sequential(layer)
    factorize(model, {"0": 0.875}, example_input=torch.randn(1, 16, 4, 4))
    assert model[0] is layer


def test_factorizable_layers_offers_only_layers_some_rank_makes_cheaper():
    model = nn.Sequential(
        nn.Linear(1, 32),  # rank 1 costs 33 > 32: never cheaper
        nn.Linear(32, 32),
        nn.Linear(2, 2),  # rank 1 costs 4 = 4
        nn.Unflatten(1, (2, 1)),
        nn.Conv1d(2, 8, 3, groups=2),  # grouped: unsupported
    )
    assert factorizable_layers(model) == ["1"]
    factorize(model, {"1": 0.25})
    # Factors of an already factorized layer are not offered again.
    assert factorizable_layers(model) == []


def test_factorize_rejects_unknown_names_and_warns_on_unsupported_layers():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3))
    with pytest.raises(KeyError, match="nope"):
        factorize(model, {"nope": 0.5, "2": 0.5})
    assert isinstance(model[2], nn.Conv2d)  # nothing applied before the error
    with pytest.raises(ValueError, match="0.0"):
        factorize(model, {"2": 0.0})
    with pytest.warns(UserWarning) as caught:
        factorize(model, {"0": 0.5, "1": 0.5, "2": 0.5})
    messages = " ".join(str(w.message) for w in caught)
    assert "'0'" in messages and "groups=2" in messages and "'1'" in messages and "BatchNorm2d" in messages
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[2], Factorized)


def test_model_macs_matches_hand_count():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 -> 8x8
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # -> 4x4
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )
    x = torch.randn(2, 3, 8, 8)
    expected = 64 * 8 * 3 * 9 + 16 * 16 * 8 * 9 + 256 * 10
    assert model_macs(model, x) == expected
    factorize(model, {"2": 0.5, "4": 0.5})
    # conv: ranks (4, 8): 1x1 on 64 positions, core and last on 16; linear: rank 5
    expected = 64 * 8 * 3 * 9 + 64 * 8 * 4 + 16 * (9 * 4 * 8 + 8 * 16) + 5 * (256 + 10)
    assert model_macs(model, x) == expected


def test_factorized_model_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10)).eval()
    factorize(model, {"0": 0.5, "3": 0.5})
    x = torch.randn(1, 3, 6, 6)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(out), model(x).detach(), atol=1e-4)


def test_shape_probe_leaves_training_state_and_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5).eval(), nn.Flatten(), nn.Linear(72, 4))
    model.train()
    model[2].eval()
    stats = model[1].running_mean.clone()
    assert model_macs(model, torch.randn(2, 3, 5, 5)) == 9 * 8 * 27 + 72 * 4
    assert torch.equal(model[1].running_mean, stats)
    assert [m.training for m in model] == [True, True, False, True, True]
