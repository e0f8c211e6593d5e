"""Unstructured magnitude sparsity: a registered technique, through the space, the build, profiles and a search."""

from __future__ import annotations

import json

import torch
import yaml

from autocompress.cli import main
from autocompress.compress.pipeline import PipelineSettings, apply
from autocompress.config import SpaceConfig, load_experiment
from autocompress.hw_profiles.candidates import CandidateBuilder
from autocompress.search.runner import run_search
from autocompress.spaces import Candidate, build_space
from autocompress.tasks import load_task
from autocompress.tasks.digits import DigitsCNN
from autocompress.techniques.base import QUANTIZABLE
from autocompress.techniques.sparsity import magnitude_mask
from tests.conftest import tiny_experiment_dict


def test_mask_zeroes_the_smallest_weights():
    weight = torch.arange(1.0, 101.0).reshape(10, 10) * torch.where(torch.rand(10, 10) > 0.5, 1.0, -1.0)
    mask = magnitude_mask(weight, 0.75)
    assert int(mask.sum()) == 25
    assert (weight.abs()[mask.bool()] > 75).all()
    assert torch.equal(magnitude_mask(weight, 0.0), torch.ones_like(weight))


def test_space_offers_sparsity_per_layer_and_profiles_ignore_it():
    model, x = DigitsCNN(width=8).eval(), torch.randn(1, 1, 32, 32)
    off = build_space(model, x, SpaceConfig())
    assert off.get("sparsity") == {}  # opt-in
    space = build_space(model, x, SpaceConfig(sparsity={"enabled": True, "fractions": [0.0, 0.5, 0.9]}))
    assert set(space.get("sparsity")) == {name for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    assert all(v == (0.0, 0.5, 0.9) for v in space.get("sparsity").values())
    assert any(name.startswith("sparsity/") for name in space.distributions())
    builder = CandidateBuilder.learn(model, x, space)
    assert not any(name.startswith("sparsity/") for name in builder.latency_choices(int8_kernels=True))


def test_built_student_keeps_its_zeros_through_the_fine_tune_and_quantization():
    task = load_task("digits", {"width": 8, "hidden": 16, "image_size": 16})
    teacher = task.build_model().eval()
    candidate = Candidate(sparsity={"fc1": 0.75, "features.conv2.conv": 0.5}, bits={"fc1": 8}, prune={})
    result = apply(
        teacher,
        candidate,
        lambda: task.loader("train", 64, shuffle=True),
        task.example_input(1),
        PipelineSettings(finetune_epochs=1),
    )
    fc1 = result.model.fc1.weight.detach()
    conv2 = result.model.features.conv2.conv.weight.detach()
    assert (fc1 == 0).float().mean().item() >= 0.75
    assert (conv2 == 0).float().mean().item() >= 0.5
    assert not any(hasattr(m, "parametrizations") for m in result.model.modules())  # baked
    assert (teacher.fc1.weight == 0).float().mean().item() < 0.01  # the teacher is untouched


def test_sparsity_through_search_front_and_select(tmp_path, capsys):
    """A search over sparsity with the zipped artifact as an objective; front and select rebuild the member."""
    data = tiny_experiment_dict(tmp_path / "tiny", sampler="random")
    data["space"]["sparsity"] = {"enabled": True, "fractions": [0.0, 0.75]}
    data["objectives"] = ["accuracy", "latency", "compressed_size"]
    data["search"]["early_stop"] = {"enabled": False}
    path = tmp_path / "sparse.yaml"
    path.write_text(yaml.safe_dump(data))
    exp = load_experiment(path)
    result = run_search(exp, log=lambda _: None)
    assert result.finished == exp.search.n_trials and result.fronts["host"]
    assert result.teacher["compressed_size_bytes"] > 0
    members = result.fronts["host"]
    assert all(m.compressed_size_bytes > 0 for m in members)
    assert any(any(k.startswith("sparsity/") and v > 0 for k, v in m.candidate.items()) for m in members)

    assert main(["front", str(path)]) == 0
    out = capsys.readouterr().out
    assert "zip kB" in out and "sparse 0.75-0.75" in out

    assert main(["select", str(path), "--profile", "host", "--max-latency-ms", "1000"]) == 0
    card_path = next((tmp_path / "tiny").glob("*/selected-host/model_card.json"))
    card = json.loads(card_path.read_text())
    searched, remeasured = card["metrics"]["searched"], card["metrics"]["remeasured"]
    assert remeasured["compressed_size_bytes"] == searched["compressed_size_bytes"]  # the rebuild is the member
    state = torch.load(card_path.parent / "state_dict.pt")
    for param, fraction in card["candidate"]["params"].items():
        if param.startswith("sparsity/") and fraction > 0:
            weight = state[f"{param.split('/', 1)[1]}.weight"]
            assert (weight == 0).float().mean().item() >= fraction - 1e-6, param
