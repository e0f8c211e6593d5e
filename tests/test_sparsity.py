"""Unstructured magnitude sparsity: a registered technique, through the space, the build, profiles and a search."""

from __future__ import annotations

import torch

from autocompress.compress.pipeline import PipelineSettings, apply
from autocompress.config import SpaceConfig
from autocompress.hw_profiles.candidates import CandidateBuilder
from autocompress.spaces import Candidate, build_space
from autocompress.tasks import load_task
from autocompress.tasks.digits import DigitsCNN
from autocompress.techniques.sparsity import magnitude_mask


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
    assert set(space.get("sparsity")) == set(space.get("bits"))
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
