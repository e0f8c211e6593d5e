"""Built-in ResNet-18 and tiny transformer through the dependency-graph pruner and low-rank."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.compress.lowrank import Factorized, factorizable_layers, factorize
from autocompress.compress.prune import find_prune_groups, prune
from autocompress.models import resnet18_cifar, tiny_transformer
from tests.conftest import model_macs

NUM_CLASSES = 10
STAGE_POSITIONS = (32 * 32, 16 * 16, 8 * 8, 4 * 4)  # 3x32x32 input, stride 2 from stage 2 on
ORDINARY = (
    *(nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Identity),
    *(nn.Linear, nn.LayerNorm, nn.GELU, nn.Embedding),
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stages(width: int):
    """(in channels, out channels, output positions, has 1x1 shortcut) of each BasicBlock."""
    blocks, cin = [], width
    for i, positions in enumerate(STAGE_POSITIONS):
        cout = width * 2**i
        blocks += [(cin, cout, positions, cin != cout), (cout, cout, positions, False)]
        cin = cout
    return blocks


def resnet_params(width: int) -> int:
    total = 3 * 9 * width + 2 * width  # stem conv (no bias) + BN
    for cin, cout, _, shortcut in stages(width):
        total += 9 * cin * cout + 9 * cout * cout + 2 * 2 * cout
        if shortcut:
            total += cin * cout + 2 * cout
    return total + 8 * width * NUM_CLASSES + NUM_CLASSES


def resnet_macs(width: int) -> int:
    total = STAGE_POSITIONS[0] * 27 * width
    for cin, cout, positions, shortcut in stages(width):
        total += positions * 9 * (cin * cout + cout * cout) + (positions * cin * cout if shortcut else 0)
    return total + 8 * width * NUM_CLASSES


def transformer_linear_macs(seq: int, dim: int, heads: int, head_dim: int, ffn: int, depth: int) -> int:
    """Per example: every token through embed/q/k/v/out/fc1/fc2; the classifier once after pooling."""
    per_block = 3 * heads * dim * head_dim + heads * head_dim * dim + 2 * dim * ffn
    return seq * (dim + depth * per_block) + dim * NUM_CLASSES


def assert_onnx_matches(model: nn.Module, x: torch.Tensor, path) -> None:
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-4)


def assert_ordinary(model: nn.Module) -> None:
    """Only standard layers (and containers) remain: nothing wraps or masks the weights."""
    for name, module in model.named_modules():
        if not list(module.children()):
            assert isinstance(module, ORDINARY), (name, type(module))
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not hasattr(module, "parametrizations"), name


# --- ResNet-18 -------------------------------------------------------------------------------


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return resnet18_cifar(num_classes=NUM_CLASSES, width=16).eval()


def test_resnet18_cifar_shape_params_and_macs(resnet):
    x = torch.randn(2, 3, 32, 32)
    assert resnet(x).shape == (2, NUM_CLASSES)
    assert n_params(resnet) == resnet_params(16)
    assert model_macs(resnet, x) == resnet_macs(16)


def test_resnet_residual_coupled_convs_share_one_group(resnet):
    groups = find_prune_groups(resnet, torch.randn(1, 3, 32, 32))
    members = [m for g in groups for m in g.members]
    assert len(members) == len(set(members)), "a conv appears in two groups"
    by_member = {m: g for g in groups for m in g.members}
    # Each stage's block outputs are added together (and to the shortcut): one group per stage.
    stage1 = by_member["layer1.0.conv2"]
    assert set(stage1.members) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert stage1.channels == 16
    for i, channels in ((2, 32), (3, 64), (4, 128)):
        group = by_member[f"layer{i}.0.downsample.0"]
        assert set(group.members) == {f"layer{i}.0.downsample.0", f"layer{i}.0.conv2", f"layer{i}.1.conv2"}
        assert group.channels == channels
    # Block-internal convs are free on their own; the classifier is an output layer.
    assert by_member["layer3.1.conv1"].members == ("layer3.1.conv1",)
    assert "fc" not in members
    assert len(groups) == 4 + 8


def test_resnet_pruned_by_half_is_the_half_width_resnet(resnet, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    groups = find_prune_groups(resnet, x)
    prune(resnet, {g.name: 0.5 for g in groups}, x, round_to=8)
    assert_ordinary(resnet)
    # Every group halves, so the result has exactly the shapes of a width-8 ResNet-18.
    expected = resnet18_cifar(num_classes=NUM_CLASSES, width=8).state_dict()
    assert {k: v.shape for k, v in resnet.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    assert n_params(resnet) == resnet_params(8) < resnet_params(16)
    assert model_macs(resnet, x) == resnet_macs(8)
    assert resnet(x).shape == (2, NUM_CLASSES)
    assert_onnx_matches(resnet, x[:1], tmp_path / "resnet.onnx")


def test_resnet_pruned_then_factorized_exports(resnet, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    prune(resnet, {g.name: 0.5 for g in find_prune_groups(resnet, x)}, x, round_to=8)
    names = factorizable_layers(resnet)
    assert "layer4.1.conv2" in names and "layer2.0.downsample.0" in names
    macs_before = model_macs(resnet, x)
    factorize(resnet, {"layer4.1.conv2": 0.5, "layer2.0.downsample.0": 0.5}, example_input=x)
    conv, shortcut = resnet.layer4[1].conv2, resnet.layer2[0].downsample[0]
    assert isinstance(conv, Factorized) and conv.ranks == (32, 32)  # pruned 64 -> 64 channels, half rank
    assert isinstance(shortcut, Factorized) and shortcut.ranks == (4,)  # pruned 8 -> 16, 1x1: half of 8
    # Independent arithmetic: layer4 runs at 4x4, the layer2 shortcut at 16x16 output positions.
    saved = 16 * 9 * 64 * 64 - 16 * (64 * 32 + 9 * 32 * 32 + 32 * 64)
    saved += 256 * 8 * 16 - 256 * 4 * (8 + 16)
    assert model_macs(resnet, x) == macs_before - saved
    assert resnet(x).shape == (1, NUM_CLASSES)
    assert_onnx_matches(resnet, x, tmp_path / "resnet_lowrank.onnx")


# --- tiny transformer ------------------------------------------------------------------------

SEQ, DIM, HEADS, FFN, DEPTH = 12, 32, 2, 64, 2


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return tiny_transformer(seq_len=SEQ, in_dim=1, dim=DIM, depth=DEPTH, heads=HEADS, ffn=FFN).eval()


def test_transformer_shape_params_and_macs(transformer):
    x = torch.randn(3, 1, SEQ)
    assert transformer(x).shape == (3, NUM_CLASSES)
    head_dim = DIM // HEADS
    per_block = 2 * 2 * DIM + 3 * HEADS * (DIM * head_dim + head_dim) + DIM * DIM + DIM
    per_block += DIM * FFN + FFN + FFN * DIM + DIM
    expected = (1 * DIM + DIM) + SEQ * DIM + DEPTH * per_block + 2 * DIM + DIM * NUM_CLASSES + NUM_CLASSES
    assert n_params(transformer) == expected
    assert model_macs(transformer, x) == transformer_linear_macs(SEQ, DIM, HEADS, head_dim, FFN, DEPTH)


def test_transformer_groups(transformer):
    groups = {g.name: g for g in find_prune_groups(transformer, torch.randn(1, 1, SEQ))}
    for i in range(DEPTH):
        assert groups[f"blocks.{i}.fc1"].members == (f"blocks.{i}.fc1",)
        assert groups[f"blocks.{i}.fc1"].channels == FFN
        for h in range(HEADS):
            head = groups[f"blocks.{i}.attn.heads.{h}.v"]
            assert set(head.members) == {f"blocks.{i}.attn.heads.{h}.{p}" for p in "qkv"}
            assert head.channels == DIM // HEADS
    residual = [g for g in groups.values() if "embed" in g.members]
    assert len(residual) == 1 and residual[0].channels == DIM
    assert set(residual[0].members) == {"embed"} | {
        f"blocks.{i}.{m}" for i in range(DEPTH) for m in ("fc2", "attn.out")
    }
    assert len(groups) == 1 + DEPTH * (1 + HEADS)
    assert all("head" not in g.members for g in groups.values())


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Indices of the original rows that survived pruning (rows are unique for random weights)."""
    return [int((original == row).all(dim=1).nonzero()) for row in pruned]


def test_transformer_ffn_and_head_pruning_keep_exact_semantics(transformer):
    """Pruning a group equals zeroing the removed channels in the unpruned model."""
    x = torch.randn(4, 1, SEQ)
    pruned = copy.deepcopy(transformer)
    prune(pruned, {"blocks.0.fc1": 0.5, "blocks.1.attn.heads.0.v": 0.5}, x, round_to=8)
    assert pruned.blocks[0].fc1.out_features == FFN // 2 and pruned.blocks[0].fc2.in_features == FFN // 2
    reference = copy.deepcopy(transformer)
    with torch.no_grad():
        block = reference.blocks[0]
        kept = _kept_rows(pruned.blocks[0].fc1.weight, block.fc1.weight)
        removed = sorted(set(range(FFN)) - set(kept))
        block.fc2.weight[:, removed] = 0  # a removed hidden unit contributes nothing downstream
        head = reference.blocks[1].attn.heads[0]
        kept = _kept_rows(pruned.blocks[1].attn.heads[0].q.weight, head.q.weight)
        assert len(kept) == DIM // HEADS // 2
        removed = sorted(set(range(DIM // HEADS)) - set(kept))
        for proj in (head.q, head.k, head.v):  # same dimensions gone from q, k and v
            proj.weight[removed] = 0
            proj.bias[removed] = 0
        assert torch.allclose(pruned(x), reference(x), atol=1e-5)


def test_transformer_pruned_by_half_then_factorized(transformer, tmp_path):
    x = torch.randn(1, 1, SEQ)
    groups = find_prune_groups(transformer, x)
    prune(transformer, {g.name: 0.5 for g in groups}, x, round_to=8)
    assert_ordinary(transformer)
    dim, head_dim, ffn = DIM // 2, DIM // HEADS // 2, FFN // 2
    smaller = tiny_transformer(seq_len=SEQ, dim=dim, depth=DEPTH, heads=HEADS, ffn=ffn).state_dict()
    assert {k: v.shape for k, v in transformer.state_dict().items()} == {k: v.shape for k, v in smaller.items()}
    assert transformer.blocks[0].fc1.out_features == ffn
    assert model_macs(transformer, x) == transformer_linear_macs(SEQ, dim, HEADS, head_dim, ffn, DEPTH)
    params_pruned = n_params(transformer)
    assert params_pruned == n_params(tiny_transformer(seq_len=SEQ, dim=dim, depth=DEPTH, heads=HEADS, ffn=ffn))

    names = factorizable_layers(transformer)
    assert "embed" not in names  # 1 -> dim: no rank is cheaper
    projections = [f"blocks.{i}.{p}" for i in range(DEPTH) for p in ("attn.heads.0.q", "attn.out", "fc1", "fc2")]
    assert set(projections) <= set(names)
    factorize(transformer, dict.fromkeys(projections, 0.25))
    fc1, q, out = transformer.blocks[0].fc1, transformer.blocks[0].attn.heads[0].q, transformer.blocks[0].attn.out
    assert isinstance(fc1, Factorized) and fc1.ranks == (4,)  # min(16, 32) / 4
    assert n_params(fc1) == dim * 4 + 4 * ffn + ffn
    assert isinstance(q, Factorized) and q.ranks == (2,)  # min(16, 8) / 4
    assert isinstance(out, Factorized) and out.ranks == (4,)
    # Each factorized Linear(i, o) at rank r saves (i * o - r * (i + o)) MACs per token.
    saved = DEPTH * (dim * head_dim - 2 * (dim + head_dim))  # q of head 0
    saved += DEPTH * (dim * dim - 4 * 2 * dim)  # attn.out
    saved += DEPTH * 2 * (dim * ffn - 4 * (dim + ffn))  # fc1 and fc2
    expected = transformer_linear_macs(SEQ, dim, HEADS, head_dim, ffn, DEPTH) - SEQ * saved
    assert model_macs(transformer, x) == expected
    assert n_params(transformer) < params_pruned
    assert transformer(x).shape == (1, NUM_CLASSES)
    assert_onnx_matches(transformer, x, tmp_path / "transformer.onnx")
