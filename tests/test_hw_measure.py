"""Hardware profiles on real models: signatures, the profiling builder, a tiny measure + validate run, resume."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence

import pytest
import torch
import yaml
from torch import nn

from autocompress.cli import main
from autocompress.compress.deploy import deploy, node_module, optimized_graph
from autocompress.compress.lowrank import layer_input_shapes
from autocompress.compress.prune import prune
from autocompress.evaluators.latency import time_in_passes, torch_threads
from autocompress.hw_profiles import load_profile, ort_map, predict
from autocompress.hw_profiles import measure as measure_mod
from autocompress.hw_profiles import validate as validate_mod
from autocompress.hw_profiles.eager import build_unit, eager_signatures, unit_graph
from autocompress.hw_profiles.host import cpu_model, runtime_version
from autocompress.hw_profiles.measure import MeasureSettings, measure_profile
from autocompress.hw_profiles.onnx_graph import model_units, unit_callable
from autocompress.hw_profiles.profile import Profile, UnitVariant, parse_profile
from autocompress.hw_profiles.target import load_target
from autocompress.hw_profiles.validate import reference_candidates, validate_profile
from autocompress.models import resnet18_cifar
from autocompress.runtimes import get_runtime
from autocompress.tasks import load_task

TINY = {
    "name": "tiny_profile",
    "task": {"name": "digits", "args": {"width": 8, "hidden": 16, "image_size": 16}},
    "space": {
        "prune": {"ratios": [0.0, 0.5]},
        "quantize": {"bits": [32, 8]},
        "distill": {"temperature": [2.0], "alpha": [0.5]},
    },
}
FAST = {"repeats": 5, "warmup_ms": 2.0, "min_sample_ms": 0.2, "calibration": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    path = tmp_path_factory.mktemp("exp") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def target(experiment):
    return load_target(experiment)


def test_eager_signatures_follow_the_real_forward():
    model = resnet18_cifar(width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    sigs = eager_signatures(model, x.shape)
    ops = [s.op for s in sigs]
    assert ops[0] == "conv2d+bn+relu" and ops[-1] == "linear"
    assert ops.count("add+relu") == 8  # one residual add per BasicBlock, ReLU fused into the unit
    assert ops.count("conv2d+bn") == 8 + 3  # second conv of each block + three 1x1 shortcuts
    # Every conv unit's input size and channels match what the model really sees.
    shapes = layer_input_shapes(model, x)
    convs = [s for s in sigs if s.op.startswith("conv2d")]
    real = [(shape[0], shape[1:]) for name, shape in shapes.items() if name != "fc"]
    assert sorted((s.in_channels, s.input_size) for s in convs) == sorted(real)
    assert all(s.batch == 2 for s in sigs)


def test_units_run_and_produce_the_signature_output():
    model = load_task("digits", {"width": 8, "image_size": 16}).build_model().eval()
    for sig in eager_signatures(model, (1, 1, 16, 16)):
        module, inputs = build_unit(sig)
        with torch.no_grad():
            out = module(*inputs)
        if sig.op.startswith(("conv", "linear")):
            assert out.shape[1] == sig.out_channels


def test_builder_matches_the_real_pruner(target):
    rng = random.Random(0)
    for _ in range(3):
        candidate = target.builder.sample(rng)
        fast, _ = target.builder.build(candidate)
        real = prune(
            copy.deepcopy(target.builder.model),
            candidate.get("prune"),
            target.example_input,
            round_to=target.builder.round_to,
        )
        assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_timed_models_have_ordinary_parameters_even_when_built_in_inference_mode(target):
    # Parameters created in inference mode ran the MNIST-1D CNN ~6% faster than a loaded model's:
    # the profile tools build and time inside inference mode, so they must not create such models.
    runtime = get_runtime("torch-eager")
    with torch.inference_mode():
        model, bits = target.builder.build(target.builder.sample(random.Random(0)))
        unit, (x,) = build_unit(eager_signatures(model, tuple(target.example_input.shape))[0])
        params = [*model.parameters(), *unit.parameters()]
        assert params and not any(p.is_inference() for p in params)
        assert x.is_inference()  # a layer's input inside an inference-mode forward is one
        with runtime.end_to_end(model, target.example_input, bits, 1) as run:
            run()
        flattering = torch.nn.Linear(4, 4)
        with pytest.raises(ValueError, match="inference mode"), runtime.end_to_end(flattering, x, None, 1):
            pass


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_time_in_passes_interleaves_averages_and_leaves_out_bursts():
    # The first callable is slow in the first pass only (a burst of load); the second wanders both
    # ways from pass to pass (a shared machine's speed), the third is steady.
    steps = []
    state = {"pass": 0}

    def on_step(p: int, i: int) -> None:
        steps.append((p, i))
        state["pass"] = p + 1 if i == 2 else p

    def bursty() -> None:
        _busy(2.0 if state["pass"] == 0 else 0.2)

    def wandering() -> None:
        _busy(0.3 if state["pass"] % 2 == 0 else 0.45)

    settings = {"warmup_ms": 1.0, "repeats": 3, "min_sample_ms": 0.1}
    timed = time_in_passes([bursty, wandering, lambda: _busy(0.5)], 4, on_step=on_step, **settings)
    bursty_ms, wandering_ms, steady_ms = (t.median_ms for t in timed)
    assert steps[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]  # round robin, not one callable at a time
    assert len(steps) == 12
    assert 0.2 <= bursty_ms < 0.5  # the burst of pass 1 is not in the figure
    assert 0.34 < wandering_ms < 0.43  # the mean of 0.3 and 0.45, not the quickest pass
    assert 0.5 <= steady_ms < 0.65
    assert timed[0].repeats == 9 and timed[1].repeats == 12  # samples of the passes kept
    with pytest.raises(ValueError, match="passes=0"):
        time_in_passes([bursty], 0)


def test_tiny_measure_and_validate(experiment, target, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eager.json"
    profile = measure_profile(target, out, MeasureSettings(cpu=None, **FAST), log=lambda _: None)
    assert load_profile(out) == profile
    assert len(profile.lut) > 5 and len(profile.calibration) == 3
    assert target.model_name in profile.overhead.constant_ms
    assert profile.probe is not None  # the machine-state reading taken with the calibration
    assert all(s.lut_by_op and sum(s.lut_by_op.values()) == pytest.approx(s.lut_ms) for s in profile.calibration)
    # Every candidate of the space is predicted from measured entries only (the space was enumerated).
    model, bits = target.builder.build(target.builder.sample(random.Random(1)))
    prediction = predict(model, target.example_input, profile, bits)
    assert prediction.exact and prediction.latency_ms > 0
    report = validate_profile(profile, target, 4, out_dir=tmp_path / "report", repeats=5, log=print)
    assert report.summary.n == 4 and len(report.summary.rows) == 4
    assert all(r.measured_ms > 0 and r.predicted_ms > 0 for r in report.summary.rows)
    assert {p.suffix for p in report.files} == {".csv", ".png", ".json"}
    assert all(p.stat().st_size > 0 for p in report.files)
    assert report.summary.probe is not None
    # The three calibration candidates were re-timed beside them: the machine's same-model drift.
    drift = report.summary.drift
    assert drift is not None and drift.n == 3
    assert drift.ratio_min <= drift.ratio_median <= drift.ratio_max
    out = capsys.readouterr().out
    assert "|error| median" in out and "machine vs when the profile was calibrated" in out
    assert "same-model drift: 3 calibration candidates run" in out
    assert "drift_scaled_abs_error_pct" in (tmp_path / "report").joinpath(report.files[0].name).read_text()
    # A model the profile holds no calibration of has no reference to re-time.
    assert reference_candidates(profile.model_copy(update={"calibration": []}), target) == []

    # Bookkeeping of the interleaved timing: every model "runs" 1.25x its prediction and every reference
    # "ran" its prediction at calibration; a timing handed back to the wrong candidate would show.
    def predicted(model_and_bits):
        return predict(model_and_bits[0], target.example_input, profile, model_and_bits[1]).latency_ms

    def slower_by_a_quarter(built, example_input, settings, label):
        return [predicted(mb) * 1.25 for mb in built], report.summary.probe

    def references_as_predicted(prof, tgt):
        return [(c, predicted(tgt.builder.build(c))) for c, _ in reference_candidates(prof, tgt)]

    monkeypatch.setattr(validate_mod, "time_end_to_end", slower_by_a_quarter)
    monkeypatch.setattr(validate_mod, "reference_candidates", references_as_predicted)
    faked = validate_profile(profile, target, 12, repeats=5, log=lambda _: None).summary
    assert [r.abs_error_pct for r in faked.rows] == pytest.approx([20.0] * 12)
    assert (faked.drift.ratio_min, faked.drift.ratio_max) == pytest.approx((1.25, 1.25))
    assert faked.drift.max_abs_error_pct == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_killed_measurement_resumes(target, tmp_path, monkeypatch):
    out = tmp_path / "resume.json"
    real_time = measure_mod.time_in_passes
    calls = {"n": 0}

    def dies_in_the_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real_time(*args, **kwargs)

    monkeypatch.setattr(measure_mod, "LUT_CHUNK", 5)
    monkeypatch.setattr(measure_mod, "time_in_passes", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        measure_profile(target, out, MeasureSettings(cpu=None, **FAST), log=lambda _: None)
    assert len(load_profile(out).lut) == 5  # what was measured before the kill is on disk
    monkeypatch.setattr(measure_mod, "time_in_passes", real_time)
    logs: list[str] = []
    profile = measure_profile(target, out, MeasureSettings(cpu=None, **FAST), log=logs.append)
    assert any("5 signatures already measured" in line for line in logs)
    fresh = measure_profile(target, tmp_path / "fresh.json", MeasureSettings(cpu=None, **FAST), log=lambda _: None)
    assert {e.signature.key() for e in profile.lut} == {e.signature.key() for e in fresh.lut}


def test_resume_refuses_another_setup(target, tmp_path, capsys):
    out = tmp_path / "p.json"
    measure_profile(target, out, MeasureSettings(cpu=None, **{**FAST, "calibration": 1}), log=lambda _: None)
    with pytest.raises(Exception, match="threads"):
        measure_profile(target, out, MeasureSettings(cpu=None, threads=2, **FAST), log=lambda _: None)


@pytest.mark.slow
def test_tiny_onnxruntime_measure_and_validate(tmp_path, monkeypatch):
    """The ONNX Runtime path end to end on a very small space (int8 on or off for two layers)."""
    exp = tmp_path / "ort.yaml"
    spec = {
        **TINY,
        "space": {**TINY["space"], "include": ["features.conv5.conv", "fc1"], "prune": {"ratios": [0.0, 0.5]}},
    }
    exp.write_text(yaml.safe_dump(spec))
    ort_target = load_target(exp)
    monkeypatch.setattr(measure_mod, "PATIENCE", 2)
    settings = MeasureSettings(runtime="onnxruntime", cpu=None, **{**FAST, "calibration": 2})
    profile = measure_profile(ort_target, tmp_path / "ort.json", settings, log=lambda _: None)
    assert profile.runtime.name == "onnxruntime" and {"fp32", "int8"} <= {e.signature.dtype for e in profile.lut}
    report = validate_profile(profile, ort_target, 2, repeats=5, log=lambda _: None)
    assert report.summary.n == 2 and all(r.measured_ms > 0 for r in report.summary.rows)


def test_onnxruntime_nodes_run_alone():
    """ORT's optimized graph, int8 included, becomes one-node models that run on their recorded shapes."""
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4)).eval()
    x = torch.randn(1, 1, 8, 8)
    fp32 = model_units(model, x, None, 1)
    int8 = model_units(model, x, {"0": 8, "3": 8}, 1)
    assert all(sig.dtype == "fp32" for sig, _ in fp32)
    assert any(sig.op.endswith("QLinearConv") for sig, _ in int8)
    assert any(sig.dtype == "int8" for sig, _ in int8)
    for sig, unit in fp32 + int8:
        unit_callable(unit, 1)()
        assert sig.batch == 1


def test_profile_list_shows_shipped_profiles(capsys):
    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert "torch-eager" in out and "onnxruntime" in out
    assert "validated on DigitsCNN" in out and "validated on ResNetCifar" in out


def mapped_keys(
    unit_map: dict[str, list[UnitVariant]], model: nn.Module, input_shape: Sequence[int], bits: dict[str, int] | None
) -> list[str] | None:
    """The LUT keys of the ORT nodes ``model`` would run, from the map alone (per unit, its dominant
    node list, instantiated); None if any unit's key is unknown or has no dominant node list."""
    units = ort_map.mapped_variants(unit_map, model, input_shape, bits)
    if units is None:
        return None
    keys: list[str] = []
    for variants in units:
        if not ort_map.dominant(variants):
            return None
        keys.extend(variants[0][1])
    return keys


def test_unit_map_learns_node_templates_that_carry_to_other_channel_counts():
    """One deployment teaches the map how every unit deploys, as templates over its channel counts: a
    model pruned to other counts is then predicted node for node without deploying it; a key seen
    deployed in two ways is used only when one way dominates."""

    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 4))

    shape, bits = (1, 1, 8, 8), {"0": 8}
    seen, other = net(48).eval(), net(64).eval()
    units = model_units(seen, torch.randn(*shape), bits, 1)
    unit_map: dict = {}
    keys = [key for key, _ in ort_map.unit_keys(seen, shape, bits)]
    assert ort_map.learn(unit_map, seen, shape, bits, units) == len(keys)
    first = unit_map[keys[0]][0]
    assert first.seen == 1 and any("{O}" in node for node in first.nodes)  # channel counts became symbols
    placed = ort_map.attribute(seen, units)
    assert mapped_keys(unit_map, seen, shape, bits) == [k for unit in placed for k in unit]
    # The 64-channel model has the same keys (same remainders mod 16, same coincidences) and is
    # predicted exactly as it deploys.
    assert [key for key, _ in ort_map.unit_keys(other, shape, bits)] == keys
    deployed = ort_map.attribute(other, model_units(other, torch.randn(*shape), bits, 1))
    assert mapped_keys(unit_map, other, shape, bits) == [k for unit in deployed for k in unit]
    # Dominance: a second way of deploying the first unit, seen as often, blocks the map; rarer, it does not.
    assert ort_map.learn(unit_map, seen, shape, bits, units) == 0 and first.seen == 2
    unit_map[keys[0]].append(UnitVariant(nodes=["other-node-list"], seen=2))
    assert mapped_keys(unit_map, seen, shape, bits) is None
    first.seen = 8
    assert mapped_keys(unit_map, seen, shape, bits)[: len(first.nodes)] == placed[0]
    assert mapped_keys(unit_map, seen, shape, None) is None  # fp32 units were never seen


def test_unit_graph_follows_data_flow_through_a_residual_block():
    model = resnet18_cifar()
    sigs = eager_signatures(model, (1, 3, 32, 32))
    inputs, readers = unit_graph(model)
    first_add = next(i for i, s in enumerate(sigs) if s.op.startswith("add"))
    assert len(inputs[first_add]) == 2  # the block's last conv and the skip connection
    assert all(first_add in readers[p] for p in inputs[first_add])
    assert inputs[0] == [-1] and readers[len(sigs) - 1] == [-1]  # model input and output
    # Each unit's context names both branches: a residual add's int8-ness of either branch changes it.
    proxies = ort_map.unit_proxies(model, (1, 3, 32, 32), {})
    assert proxies[first_add].split("||")[1].split("|")[1] == "fp32,fp32"


def test_unit_keys_carry_the_quantized_regions_deployment_makes(tmp_path):
    # Only layer1.1's second conv is int8. Layer1.0's residual add borders fp32 layers only, but through
    # the identity shortcut it shares a region with layer1.1's add, which borders that int8 conv: the
    # deployment quantizes both adds, and both units' keys say so.
    model = resnet18_cifar(width=8).eval()
    x = torch.randn(1, 3, 32, 32)
    bits = {"layer1.1.conv2": 8}
    sigs = eager_signatures(model, tuple(x.shape))
    adds = [i for i, s in enumerate(sigs) if s.op.startswith("add")]
    proxies = ort_map.unit_proxies(model, tuple(x.shape), bits)
    regions = [proxies[i].rsplit("|", 1)[1] for i in adds]
    assert regions[:2] == ["q", "q"] and set(regions[2:]) == {"f"}, regions
    assert ort_map.unit_proxies(model, tuple(x.shape), {})[adds[0]].endswith("|f")
    deployment = deploy(model, bits, x, [torch.randn(4, 3, 32, 32)], tmp_path)
    ops: dict[str, set[str]] = {}
    for node in optimized_graph(deployment.onnx_path).graph.node:
        ops.setdefault(node_module(node.name), set()).add(node.op_type)
    assert "QLinearAdd" in ops["layer1.0"] and "QLinearAdd" in ops["layer1.1"]
    assert not any("QLinearAdd" in ops.get(f"layer{k}.{j}", set()) for k in (2, 3, 4) for j in (0, 1))


def _hand_made_ort_profile(model: nn.Module, x: torch.Tensor, bits: dict) -> Profile:
    """A profile whose LUT holds every node the model deploys to (10 us each) and a map learned from it."""
    units = model_units(model, x, bits, 1)
    unit_map: dict = {}
    ort_map.learn(unit_map, model, tuple(x.shape), bits, units)
    lut = {sig.key(): sig for sig, _ in units}
    data = {
        "format_version": 1,
        "id": "hand-made-ort",
        "host": {"cpu": cpu_model(), "cores": 2, "threads": 1, "machine": "x86_64", "os": "Linux"},
        "runtime": {
            "name": "onnxruntime",
            "version": runtime_version("onnxruntime"),
            "dtypes": ["fp32", "int8"],
            "kernel_bits": [32, 8],
        },
        "measured_at": "2026-01-01T00:00:00Z",
        "measurement": {"warmup_ms": 1.0, "repeats": 3, "min_sample_ms": 1.0},
        "lut": [
            {"signature": s.model_dump(mode="json"), "median_ms": 0.01, "p90_ms": 0.01, "repeats": 3}
            for s in lut.values()
        ],
        "unit_map": {k: [v.model_dump() for v in vs] for k, vs in unit_map.items()},
        "unit_map_format": ort_map.MAP_FORMAT,
    }
    return parse_profile(data)


def test_map_answers_only_while_its_uncertainty_is_small():
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 4)).eval()
    x, bits = torch.randn(1, 1, 8, 8), {"0": 8}
    profile = _hand_made_ort_profile(model, x, bits)
    certain = predict(model, x, profile, bits)
    assert certain.source == "unit map" and certain.exact
    first_key = next(iter(profile.unit_map))
    seen = profile.unit_map[first_key][0]
    # A second way of deploying the first unit, as frequent, one node more: its 10 us against a ~0.1 ms
    # total is more than MAP_SLACK of doubt, so the candidate is deployed to read its real graph.
    doubtful = copy.deepcopy(profile)
    doubtful.unit_map[first_key].append(UnitVariant(nodes=[*seen.nodes, seen.nodes[0]], seen=seen.seen))
    uncertain = predict(model, x, doubtful, bits)
    assert uncertain.source == "deployed graph"
    assert uncertain.latency_ms == pytest.approx(certain.latency_ms)  # and the map had named the right nodes
    # An alternative as frequent that differs by a node of 0.1 us stays within MAP_SLACK: the map answers.
    cheap = profile.lut[0].signature.model_copy(update={"extra": "cheap"})
    entry = profile.lut[0].model_copy(update={"signature": cheap, "median_ms": 1e-4, "p90_ms": 1e-4})
    slight = profile.model_copy(update={"lut": [*profile.lut, entry], "unit_map": copy.deepcopy(profile.unit_map)})
    slight.unit_map[first_key].append(UnitVariant(nodes=[*seen.nodes, cheap.key()], seen=seen.seen))
    assert predict(model, x, slight, bits).source == "unit map"
    # Two units in doubt by 0.6 of the allowance each: independent doubts add in quadrature (0.85), not
    # linearly (1.2), so the map still answers.
    bound = ort_map.MAP_SLACK * certain.lut_ms
    some = profile.lut[0].signature.model_copy(update={"extra": "some"})
    entry = profile.lut[0].model_copy(update={"signature": some, "median_ms": 0.6 * bound, "p90_ms": 0.6 * bound})
    two = profile.model_copy(update={"lut": [*profile.lut, entry], "unit_map": copy.deepcopy(profile.unit_map)})
    for key in list(two.unit_map)[:2]:
        first = two.unit_map[key][0]
        two.unit_map[key].append(UnitVariant(nodes=[*first.nodes, some.key()], seen=first.seen))
    assert predict(model, x, two, bits).source == "unit map"
    # Rarer than DOMINANT_SHARE allows for doubt, the alternative is ignored.
    doubtful.unit_map[first_key][-1].seen = 1
    doubtful.unit_map[first_key][0].seen = 10
    assert predict(model, x, doubtful, bits).source == "unit map"
