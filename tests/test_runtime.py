"""Runtimes: the registry, and scoring on the deployment runtime (ONNX Runtime real int8 versus eager torch)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from autocompress.compress.deploy import OrtModel, deploy
from autocompress.compress.distill import fit
from autocompress.compress.pipeline import PipelineSettings
from autocompress.config import LatencyConfig
from autocompress.evaluators import evaluate, model_size_bytes
from autocompress.hw_profiles.profile import load_profile, shipped_profiles
from autocompress.runtimes import Runtime, UnknownRuntime, base, canonical_name, get_runtime, register, runtime_names
from autocompress.runtimes.torch_eager import TorchEager
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
    assert onnx.metric == pytest.approx(eager.metric, abs=1e-9)
    # Size is each deployed file's bytes: the ONNX file and the saved state_dict, both ~the fp32 weights.
    assert onnx.size_bytes == pytest.approx(model_size_bytes(model), rel=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
        assert eager.size_bytes == (Path(tmp) / "state_dict.pt").stat().st_size
    assert onnx.latency_ms["host"] > 0 and eager.latency_ms["host"] > 0
    assert onnx.int8_layers == eager.int8_layers == 0


def test_int8_accuracy_is_measured_on_the_quantized_deployment(trained):
    task, model = trained
    bits = {n: 8 for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    deployed = measure(model, bits, _ctx(task, model, "onnxruntime"))
    fp32 = evaluate(model, task.loader("val", 256))
    assert abs(deployed.metric - fp32) <= 0.02  # int8 costs little accuracy ...
    assert deployed.int8_layers == len(bits)  # read from ORT's optimized graph, not from the plan
    # ... but it is the quantized model that was scored: its logits differ from the fp32 model's
    x = task.example_input(4)
    calibration = [b for b, _ in list(task.loader("train", 64))[:4]]
    with tempfile.TemporaryDirectory() as tmp:
        ort_model = deploy(copy.deepcopy(model), bits, task.example_input(1), calibration, tmp).model
        with torch.no_grad():
            assert not torch.allclose(ort_model(x), model(x), atol=1e-4)
    assert deployed.size_bytes < model_size_bytes(model)


def test_unknown_runtime_names_the_registered_ones():
    assert runtime_names() == ("torch-eager", "onnxruntime")
    with pytest.raises(UnknownRuntime, match=r"unknown runtime 'tflite': use one of torch-eager, onnxruntime$"):
        get_runtime("tflite")
    assert isinstance(UnknownRuntime("x"), ValueError)  # so config and profile validators report it per field


def test_aliases_resolve_to_the_one_name():
    assert canonical_name("torch") == "torch-eager" and get_runtime("torch") is get_runtime("torch-eager")
    assert LatencyConfig(runtime="torch").runtime == "torch-eager"
    assert "torch" not in runtime_names()


def test_runtimes_describe_what_they_are():
    eager, onnx = get_runtime("torch-eager"), get_runtime("onnxruntime")
    assert eager.describe() == f"torch {torch.__version__} eager fp32"
    assert onnx.describe() == f"onnxruntime {ort.__version__} CPU (int8 kernels for 8-bit layers, fp32 otherwise)"
    assert (eager.kernel_bits, eager.dtypes, eager.int8_kernels) == ((32,), ("fp32",), False)
    assert (onnx.kernel_bits, onnx.dtypes, onnx.int8_kernels) == ((32, 8), ("fp32", "int8"), True)
    assert eager.structural and not onnx.structural


def test_shipped_profiles_name_registered_runtimes():
    for path in shipped_profiles().values():
        profile = load_profile(path)
        runtime = get_runtime(profile.runtime.name)
        assert runtime.name == profile.runtime.name and list(runtime.kernel_bits) == profile.runtime.kernel_bits


def test_deploy_is_the_model_on_eager_and_an_ort_session_on_onnxruntime(trained, tmp_path):
    task, model = trained
    x, calibration = task.example_input(1), [task.example_input(4)]
    assert get_runtime("torch-eager").deploy(model, {}, x, calibration, tmp_path / "eager") is model
    session = get_runtime("onnxruntime").deploy(model, {}, x, calibration, tmp_path / "ort")
    assert isinstance(session, OrtModel) and session.path == tmp_path / "ort" / "model.fp32.onnx"


def test_a_new_runtime_is_one_registration(monkeypatch):
    # What a third runtime (OpenVINO) has to do: subclass Runtime, register an instance.
    monkeypatch.setattr(base, "_RUNTIMES", dict(base._registry()))
    monkeypatch.setattr(base, "_ALIASES", dict(base._ALIASES))

    class Toy(TorchEager):
        name = "toy"
        aliases = ("toy-old",)

    toy = register(Toy())
    assert isinstance(toy, Runtime) and runtime_names()[-1] == "toy" and get_runtime("toy-old") is toy
    assert LatencyConfig(runtime="toy-old").runtime == "toy"
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register(Toy())
    with pytest.raises(ValueError, match="'torch' is already registered"):
        register(type("Clash", (Toy,), {"name": "clash", "aliases": ("torch",)})())


def test_a_search_logged_with_the_old_spelling_still_rebuilds(tmp_path):
    from types import SimpleNamespace

    from autocompress.config import parse_experiment
    from autocompress.errors import AutocompressError
    from autocompress.search.select import check_unchanged
    from autocompress.search.tracking import flatten

    exp = parse_experiment({"name": "old", "task": {"name": "digits"}, "latency": {"runtime": "torch"}})
    logged = {**flatten(exp.model_dump(mode="json")), "latency.runtime": "torch"}
    check_unchanged(exp, SimpleNamespace(params=logged, run_id="r", study="s"))  # torch is torch-eager
    logged["latency.runtime"] = "onnxruntime"
    with pytest.raises(AutocompressError, match="latency.runtime is 'torch-eager' now but was 'onnxruntime'"):
        check_unchanged(exp, SimpleNamespace(params=logged, run_id="r", study="s"))
