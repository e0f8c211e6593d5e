"""Scoring on the deployment runtime: ONNX Runtime (real int8) versus eager torch."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from autocompress.compress.deploy import deploy
from autocompress.compress.distill import fit
from autocompress.compress.pipeline import PipelineSettings
from autocompress.config import LatencyConfig
from autocompress.evaluators import evaluate, model_size_bytes
from autocompress.search.objectives import TrialContext, measure
from autocompress.tasks import load_task


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    task = load_task("digits", {"width": 8, "hidden": 16, "image_size": 16})
    model = task.build_model()
    fit(model, task.loader("train", 64, shuffle=True), epochs=4, lr=0.05)
    return task, model.eval()


def _ctx(task, model, runtime):
    latency = LatencyConfig(runtime=runtime, repeats=3, warmup=1)
    return TrialContext(teacher=model, task=task, pipeline=PipelineSettings(), latency=latency)


def test_fp32_scores_agree_between_runtimes(trained):
    task, model = trained
    onnx = measure(model, {}, _ctx(task, model, "onnxruntime"))
    eager = measure(model, {}, _ctx(task, model, "torch"))
    assert onnx.accuracy == pytest.approx(eager.accuracy, abs=1e-9)
    assert onnx.size_bytes == eager.size_bytes == model_size_bytes(model)
    assert onnx.latency_ms["host"] > 0 and eager.latency_ms["host"] > 0


def test_int8_accuracy_is_measured_on_the_quantized_deployment(trained):
    task, model = trained
    bits = {n: 8 for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    deployed = measure(model, bits, _ctx(task, model, "onnxruntime"))
    fp32 = evaluate(model, task.loader("val", 256))
    assert abs(deployed.accuracy - fp32) <= 0.02  # int8 costs little accuracy ...
    # ... but it is the quantized model that was scored: its logits differ from the fp32 model's
    x = task.example_input(4)
    calibration = [b for b, _ in list(task.loader("train", 64))[:4]]
    with tempfile.TemporaryDirectory() as tmp:
        ort_model = deploy(copy.deepcopy(model), bits, task.example_input(1), calibration, tmp).model
        with torch.no_grad():
            assert not torch.allclose(ort_model(x), model(x), atol=1e-4)
    assert deployed.size_bytes < model_size_bytes(model)
