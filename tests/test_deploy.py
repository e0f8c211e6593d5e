"""Real int8 deployment with ONNX Runtime, checked against torch and against the 8-bit simulation."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from autocompress.compress.deploy import (
    COMPUTE_OP_TYPES,
    INT8_OP_TYPES,
    Deployment,
    OrtModel,
    _quantize,
    deploy,
    export_onnx,
    fold_fp32_constants,
    node_module,
    onnx_nodes_for,
    optimized_graph,
)
from autocompress.compress.distill import fit
from autocompress.compress.quantize import attach_activation_quant, attach_weight_quant
from autocompress.evaluators.accuracy import evaluate, predict
from autocompress.evaluators.latency import measure_latency, torch_threads
from autocompress.runtimes.regions import quantized_regions
from autocompress.tasks import load_task

CONVS = [f"features.conv{i}.conv" for i in range(1, 6)]
LAYERS = [*CONVS, "fc1", "fc2"]
ALL_INT8 = dict.fromkeys(LAYERS, 8)
# conv3 and fc2 stay fp32 behind int8 layers: the case where ORT hands an fp32 layer an int8 input.
MIXED = {**ALL_INT8, "features.conv3.conv": 32, "fc2": 32}


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_batches: Iterable,
    keep_fp32: Iterable[str] = (),
    per_channel: bool = True,
) -> Path:
    """Statically quantize an fp32 ONNX model (QDQ, MinMax calibration on ``calibration_batches``).

    Weights become int8 symmetric (per output channel unless ``per_channel=False``), activations uint8
    asymmetric per tensor. ``keep_fp32`` are torch module names (``"features.conv1.conv"``, ``"fc2"``)
    whose nodes, and their submodules' nodes, stay fp32; every other Conv/Gemm/MatMul is quantized.
    Batches are input tensors or ``(input, target)`` pairs. Returns ``out_path``.
    """
    exclude = [n for nodes in onnx_nodes_for(fp32_path, keep_fp32).values() for n in nodes]
    return _quantize(Path(fp32_path), Path(out_path), calibration_batches, exclude, per_channel)


def int8_nodes(onnx_path: str | Path) -> list[str]:
    """Nodes of an ONNX graph that compute in int8.

    Counts integer ops (``QLinearConv``, ``ConvInteger``, ``QGemm``, ...) and, in a QDQ graph, each
    Conv/Gemm/MatMul whose data input and weight both come from ``DequantizeLinear`` (the pattern ORT
    fuses into an integer kernel).
    """
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type in INT8_OP_TYPES:
            found.append(node.name)
        elif node.op_type in COMPUTE_OP_TYPES and len(node.input) >= 2:
            if all(producer.get(name) == "DequantizeLinear" for name in node.input[:2]):
                found.append(node.name)
    return found


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads can run 10x slower, not faster."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def task():
    return load_task("digits", {"width": 8})


@pytest.fixture(scope="module")
def trained(task):
    """A narrow digits CNN trained long enough that its predictions mean something (~97% val accuracy)."""
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.loader("train", 32, shuffle=True), epochs=6, lr=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def val(task):
    return list(task.loader("val", 128))


@pytest.fixture(scope="module")
def calibration(task):
    return [x for x, _ in task.loader("train", 128)]


def simulate(model, bits, calibration):
    """The torch simulation of ``bits``: per-channel weight fake-quant, activation fake-quant on 8-bit layers."""
    sim = copy.deepcopy(model)
    attach_weight_quant(sim, bits)
    attach_activation_quant(sim, [name for name, b in bits.items() if b == 8], calibration)
    return sim.eval()


@pytest.fixture(scope="module")
def deployed(trained, task, calibration, tmp_path_factory):
    """Simulation and ORT deployment for each bit configuration used below (deployed once each)."""
    configs = {"all_int8": ALL_INT8, "mixed": MIXED, "int4": {**ALL_INT8, "features.conv2.conv": 4}}
    result = {}
    for name, bits in configs.items():
        sim = simulate(trained, bits, calibration)
        deployment = deploy(sim, bits, task.example_input(), calibration, tmp_path_factory.mktemp(name))
        result[name] = (sim, deployment)
    return result


def test_trained_model_is_meaningful(trained, val):
    assert evaluate(trained, val) > 0.9


def test_fp32_export_matches_torch(trained, val, tmp_path):
    path = export_onnx(trained, val[0][0][:1], tmp_path / "model.onnx")
    ort_model = OrtModel(path)
    for batch in (val[0][0], val[1][0][:1], val[1][0][:7]):  # dynamic batch axis: 128, 1 and 7 samples
        with torch.no_grad():
            expected = trained(batch)
        torch.testing.assert_close(ort_model(batch), expected, rtol=1e-4, atol=1e-4)
    # BatchNorm was folded into the convolutions by the exporter.
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert int8_nodes(path) == []


@pytest.mark.parametrize("config", ["all_int8", "mixed", "int4"])
def test_int8_ort_agrees_with_simulation(deployed, val, config):
    sim, deployment = deployed[config]
    sim_logits, targets = predict(sim, val)
    ort_logits, _ = predict(deployment.model, val)
    agreement = (sim_logits.argmax(1) == ort_logits.argmax(1)).float().mean().item()
    sim_acc = (sim_logits.argmax(1) == targets).float().mean().item()
    ort_acc = (ort_logits.argmax(1) == targets).float().mean().item()
    gap = (sim_logits - ort_logits).abs().mean().item()
    assert agreement >= 0.99, f"{config}: top-1 agreement {agreement:.4f}"
    assert abs(sim_acc - ort_acc) <= 0.005, f"{config}: simulation {sim_acc:.4f} vs ORT {ort_acc:.4f}"
    assert ort_acc > 0.9
    # Logits agree to rounding noise (logits span ~30 here). Measured: 0.011-0.013 with this simulation;
    # 0.024-0.034 without the output quantizers (inputs only), 0.024-0.039 with weight fake-quant alone.
    assert gap < 0.018, f"{config}: mean |logit difference| {gap:.4f}"


def test_simulation_calibrates_like_ort(deployed):
    """Every activation quantizer of the simulation gets the scale and zero point ORT computed."""
    sim, deployment = deployed["all_int8"]
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(deployment.onnx_path)).graph.initializer}
    modules = dict(sim.named_modules())
    ort_tensor = {  # simulation quantizer -> the tensor ORT quantizes there
        ("features.conv1.conv", "input_quant"): "input",
        **{(f"features.conv{i}.relu", "output_quant"): f"/features/conv{i}/relu/Relu_output_0" for i in range(1, 6)},
        ("fc1", "input_quant"): "/pool/GlobalAveragePool_output_0",
        ("relu", "output_quant"): "/relu/Relu_output_0",
        ("fc2", "output_quant"): "output",
    }
    for (module, child), tensor in ort_tensor.items():
        quantizer = getattr(modules[module], child)
        assert quantizer.scale.item() == pytest.approx(float(initializers[f"{tensor}_scale"]), rel=1e-5), tensor
        assert quantizer.zero_point.item() == int(initializers[f"{tensor}_zero_point"]), tensor
        assert initializers[f"{tensor}_zero_point"].dtype == np.uint8


def _runtime_ops(deployment: Deployment) -> dict[str, set[str]]:
    ops: dict[str, set[str]] = {}
    for node in optimized_graph(deployment.onnx_path).graph.node:
        ops.setdefault(node_module(node.name), set()).add(node.op_type)
    return ops


@pytest.mark.parametrize("config", ["all_int8", "mixed"])
def test_int8_kernels_only_for_8bit_layers(deployed, config):
    bits = {"all_int8": ALL_INT8, "mixed": MIXED}[config]
    _, deployment = deployed[config]
    wanted = [name for name in LAYERS if bits[name] == 8]
    assert list(deployment.int8_layers) == wanted
    assert list(deployment.fp32_layers) == [name for name in LAYERS if bits[name] != 8]
    # The QDQ graph: one int8 compute node per 8-bit layer, none for the others.
    assert sorted(node_module(n) for n in int8_nodes(deployment.onnx_path)) == sorted(wanted)
    # The graph ORT executes: convolutions really are QLinearConv / plain Conv, Linear layers QGemm / Gemm.
    ops = _runtime_ops(deployment)
    for name in LAYERS:
        int8_op, fp32_op = ("QLinearConv", "Conv") if name in CONVS else ("QGemm", "Gemm")
        expected = int8_op if bits[name] == 8 else fp32_op
        assert expected in ops[name], f"{name}: runs {sorted(ops[name])}, expected {expected}"
        assert ({int8_op, fp32_op} - {expected}).isdisjoint(ops[name]), f"{name}: runs {sorted(ops[name])}"


def test_4bit_layer_is_deployed_fp32_with_rounded_weights(deployed):
    _, deployment = deployed["int4"]
    assert deployment.no_kernel_layers == ("features.conv2.conv",)
    assert "features.conv2.conv" in deployment.fp32_layers
    assert "features.conv2.conv" not in deployment.int8_layers
    assert "Conv" in _runtime_ops(deployment)["features.conv2.conv"]
    # Its weight in the deployed graph is a float initializer holding the 4-bit values (BN folding scales
    # each output channel, which keeps at most 2 * 7 + 1 distinct values per channel).
    graph = onnx.load(str(deployment.onnx_path)).graph
    node = next(n for n in graph.node if n.name == "/features/conv2/conv/Conv")
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight = weights[node.input[1]]
    assert weight.dtype == np.float32
    assert max(len(np.unique(channel)) for channel in weight) <= 15


def test_ort_model_works_with_evaluators(deployed, val):
    _, deployment = deployed["all_int8"]
    ort_model = deployment.model
    logits, targets = predict(ort_model, val)
    assert logits.shape == (len(targets), 10)
    assert evaluate(ort_model, val) == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    latency = measure_latency(ort_model, val[0][0][:1], warmup=2, repeats=5)
    assert latency.median_ms > 0 and latency.repeats == 5
    with pytest.raises(ValueError, match="training mode"):
        ort_model.train(True)


def test_quantize_onnx_keeps_named_modules_fp32(trained, calibration, tmp_path):
    fp32 = export_onnx(trained, calibration[0][:1], tmp_path / "model.onnx")
    nodes = onnx_nodes_for(fp32, ["features.conv1.conv", "fc2", "features.conv1"])
    assert nodes["features.conv1.conv"] == ["/features/conv1/conv/Conv"]
    assert nodes["fc2"] == ["/fc2/Gemm"]
    assert nodes["features.conv1"] == ["/features/conv1/conv/Conv", "/features/conv1/relu/Relu"]
    with pytest.raises(ValueError, match="'features.conv9'"):
        onnx_nodes_for(fp32, ["features.conv9"])
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", calibration[:2], keep_fp32=["features.conv1.conv", "fc2"])
    assert sorted(node_module(n) for n in int8_nodes(int8)) == sorted(set(LAYERS) - {"features.conv1.conv", "fc2"})


def test_node_module_reads_exporter_scopes():
    assert node_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert node_module("/head/head.1/MatMul") == "head.1"
    assert node_module("/features/conv1/conv/Conv_token_3") == "features.conv1.conv"
    assert node_module("/Flatten") == ""
    assert node_module("input_QuantizeLinear") == ""


def test_all_fp32_deploys_unquantized(trained, task, calibration, tmp_path):
    deployment = deploy(trained, dict.fromkeys(LAYERS, 32), task.example_input(), calibration[:1], tmp_path)
    assert deployment.int8_layers == () and deployment.fp32_layers == tuple(LAYERS)
    assert deployment.onnx_path.name == "model.fp32.onnx" and int8_nodes(deployment.onnx_path) == []


def test_deploy_rejects_bad_bits(trained, task, calibration, tmp_path):
    with pytest.raises(ValueError, match="'features.conv7.conv'"):
        deploy(trained, {"features.conv7.conv": 8}, task.example_input(), calibration, tmp_path)
    with pytest.raises(ValueError, match="bits=16"):
        deploy(trained, {"fc1": 16}, task.example_input(), calibration, tmp_path)
    with pytest.raises(ValueError, match="empty"):
        deploy(trained, {"fc1": 8}, task.example_input(), [], tmp_path)


def test_ops_between_fp32_layers_stay_fp32_when_other_layers_are_int8(trained, task, calibration, val, tmp_path):
    """ORT's quantizer quantizes pools and adds wherever a graph has any int8 layer; between two fp32
    layers that only adds Quantize/Dequantize time and a rounding the simulation does not model."""
    bits = {"features.conv1.conv": 8}  # conv5 -> global pool -> fc1 are all fp32
    sim = simulate(trained, bits, calibration)
    deployment = deploy(sim, bits, task.example_input(), calibration, tmp_path)
    assert deployment.int8_layers == ("features.conv1.conv",)
    ops = _runtime_ops(deployment)
    assert ops["pool"] == {"GlobalAveragePool"}, ops["pool"]
    quantized = {n.input[0] for n in onnx.load(str(deployment.onnx_path)).graph.node if n.op_type == "QuantizeLinear"}
    assert not any(name.startswith(("/features/conv5", "/pool")) for name in quantized), sorted(quantized)
    # The int8 layer's surroundings are still quantized: its pool runs on int8 data.
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(deployment.onnx_path)).graph.node}
    sim_logits, _ = predict(sim, val)
    ort_logits, _ = predict(deployment.model, val)
    assert (sim_logits.argmax(1) == ort_logits.argmax(1)).float().mean().item() >= 0.99
    assert (sim_logits - ort_logits).abs().mean().item() < 0.018


def test_fp32_conv_sharing_a_quantized_bias_reads_it_as_a_float(tmp_path):
    """The exporter shares equal constants (two zero biases become one initializer); the int8 layer's
    bias gets quantized, and the fp32 layer must not read it through a DequantizeLinear (ORT would then
    not pre-pack that convolution: 2.3x slower on the digits CNN)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
    ).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.zero_()
    x = torch.randn(1, 1, 8, 8)
    deployment = deploy(model, {"0": 8, "2": 32}, x, [torch.randn(4, 1, 8, 8) for _ in range(2)], tmp_path)
    graph = onnx.load(str(deployment.onnx_path)).graph
    constants = {t.name for t in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and set(n.input) <= constants}
    fp32_conv = next(n for n in graph.node if n.name == "/2/Conv")
    assert not dequantized & set(fp32_conv.input), list(fp32_conv.input)
    assert set(fp32_conv.input[1:]) <= constants
    assert deployment.int8_layers == ("0",) and deployment.fp32_layers == ("2",)


def test_fold_fp32_constants_rewires_only_fp32_readers(tmp_path):
    q = numpy_helper.from_array(np.array([4, -2, 0, 6], dtype=np.int32), "b_q")
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "b_scale")
    dq = onnx.helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"], name="b_DequantizeLinear")
    int8_user = onnx.helper.make_node("Add", ["x", "b"], ["y"], name="int8_add")
    fp32_user = onnx.helper.make_node("Add", ["y", "b"], ["z"], name="fp32_add")
    vec = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [4]) for n in ("x", "z")]
    graph = onnx.helper.make_graph([dq, int8_user, fp32_user], "g", [vec[0]], [vec[1]], [q, scale])
    path = tmp_path / "g.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert fold_fp32_constants(path, {"fp32_add"}) == 1
    folded = onnx.load(str(path)).graph
    nodes = {n.name: n for n in folded.node}
    assert list(nodes["int8_add"].input) == ["x", "b"]  # still dequantized at run time
    assert "b_DequantizeLinear" in nodes  # it has a reader left
    value = {t.name: numpy_helper.to_array(t) for t in folded.initializer}[nodes["fp32_add"].input[1]]
    np.testing.assert_array_equal(value, np.array([2.0, -1.0, 0.0, 3.0], dtype=np.float32))
    # Once every reader is fp32 the DequantizeLinear goes.
    assert fold_fp32_constants(path, {"fp32_add", "int8_add"}) == 1
    assert "b_DequantizeLinear" not in {n.name for n in onnx.load(str(path)).graph.node}


def test_reduced_int8_weight_range_is_deployed_and_simulated(trained, task, calibration, val, tmp_path, monkeypatch):
    """Forced 7-bit range (what an x86 CPU without VNNI gets): ORT's int8 weights stay in [-64, 64] and
    the deployed model agrees with the simulation, whatever CPU runs the test."""
    from autocompress.compress import quantize

    monkeypatch.setenv(quantize.REDUCE_RANGE_ENV, "1")
    quantize.int8_weight_qmax.cache_clear()
    try:
        assert quantize.weight_qmax(8) == 64 and quantize.weight_qmax(4) == 7
        sim = simulate(trained, ALL_INT8, calibration)
        deployment = deploy(sim, ALL_INT8, task.example_input(), calibration, tmp_path)
        weights = [
            numpy_helper.to_array(t)
            for t in onnx.load(str(deployment.onnx_path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(t).ndim >= 2
        ]
        assert len(weights) == len(LAYERS)
        assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 64
        sim_logits, _ = predict(sim, val)
        ort_logits, _ = predict(deployment.model, val)
        assert (sim_logits.argmax(1) == ort_logits.argmax(1)).float().mean().item() >= 0.99
        assert (sim_logits - ort_logits).abs().mean().item() < 0.018
    finally:
        monkeypatch.delenv(quantize.REDUCE_RANGE_ENV)
        quantize.int8_weight_qmax.cache_clear()


def test_int8_region_rule_on_a_small_graph():
    # conv1 -> pool -> conv2 -> relu -> flatten -> fc: two regions, {pool} and {relu, flatten}.
    layers = ["conv1", None, "conv2", None, None, "fc"]
    chain = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert quantized_regions(layers, chain, set()) == set()
    assert quantized_regions(layers, chain, {"conv1"}) == {1}
    assert quantized_regions(layers, chain, {"fc"}) == {3, 4}
    assert quantized_regions(layers, chain, {"conv2"}) == {1, 3, 4}  # it borders both
    assert quantized_regions(layers, [(b, a) for a, b in chain], {"fc"}) == {3, 4}  # direction does not matter
    # Two residual adds joined by an identity shortcut are one region: an int8 layer after the
    # second add quantizes the first too, though the first borders only fp32 layers of its own.
    layers = ["conv1", None, "conv2", None, "conv3"]
    edges = [(0, 1), (1, 2), (2, 3), (1, 3), (3, 4)]
    assert quantized_regions(layers, edges, {"conv3"}) == {1, 3}
    assert quantized_regions(layers, [e for e in edges if e != (1, 3)], {"conv3"}) == {3}


def test_deployment_and_profiles_ask_the_same_region_rule(monkeypatch, trained, task, calibration, tmp_path):
    from autocompress.compress import deploy as deploy_mod
    from autocompress.hw_profiles import ort_map

    calls = []

    def spy(layers, edges, int8_layers, **kwargs):
        calls.append(set(int8_layers))
        return quantized_regions(layers, edges, int8_layers, **kwargs)

    monkeypatch.setattr(deploy_mod, "quantized_regions", spy)
    monkeypatch.setattr(ort_map, "quantized_regions", spy)
    bits = {"features.conv2.conv": 8}
    deploy(trained, bits, task.example_input(1), calibration, tmp_path)
    ort_map.unit_proxies(trained, tuple(task.example_input(1).shape), bits)
    assert calls == [{"features.conv2.conv"}, {"features.conv2.conv"}]
