"""Candidate models for profiling: the shapes a search space can produce, built in milliseconds.

Latency depends on a candidate's shapes, not on its weights, so profiling needs the pruned shapes
of many candidates but none of the fine-tuning. Running the real pruner per candidate costs
seconds (it rebuilds the dependency graph), so :class:`CandidateBuilder`
asks it once per prune group instead: prune that group alone at its largest ratio and record
which dimension of which parameter or buffer shrank, and by what multiple of the group's channels
(a Linear after a flatten sees ``channels x positions`` inputs). A candidate is then built by
slicing each recorded dimension to ``group.kept(ratio, round_to)`` (channels, or heads) times that multiple, the
pruner's own arithmetic, and low-rank factorization runs for real on the result. Construction
checks the shortcut against the real pruner on one candidate with every group pruned, and fails
if any shape differs. The slices keep the *first* channels, not the least important ones: that
changes values, which latency does not see.

Only the latency-relevant parameters are enumerated, as each registered technique says
(:meth:`~autocompress.techniques.Technique.latency_choices`): prune ratios, rank fractions and (for
a runtime with int8 kernels) whether a layer is 8-bit; distillation and sparsity never change latency.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from autocompress.compress.pipeline import deployment_plan
from autocompress.compress.prune import PruneGroup, find_prune_groups, prune
from autocompress.errors import AutocompressError
from autocompress.spaces.candidate import Candidate
from autocompress.spaces.space import SearchSpace
from autocompress.techniques import BuildContext, by_stage, split_param, techniques

INT8 = 8
FP32 = 32
PRUNE = "prune"  # the technique whose shapes this builder slices instead of running the pruner


def _no_calibration(n: int) -> list:
    raise AutocompressError("profiling: building shapes needs no training batches")


@dataclass(frozen=True)
class _Dim:
    group: str
    multiple: int  # the dimension is ``multiple`` x the group's channels


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(module.named_parameters(recurse=False))
    found.update({k: v for k, v in module.named_buffers(recurse=False) if v is not None and v.dim() > 0})
    return found


def _shapes(model: nn.Module) -> dict[tuple[str, str], tuple[int, ...]]:
    return {
        (name, tname): tuple(t.shape) for name, module in model.named_modules() for tname, t in _tensors(module).items()
    }


def _fix_attributes(module: nn.Module, name: str) -> None:
    """Make a module's size attributes agree with its sliced tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_channels, in_per_group = module.weight.shape[:2]
        if module.groups > 1:
            if module.groups != module.in_channels or module.in_channels != module.out_channels:
                raise AutocompressError(
                    f"profiling: cannot resize grouped convolution {name!r} (groups={module.groups})"
                )
            module.groups = out_channels  # depthwise stays depthwise
        module.out_channels = out_channels
        module.in_channels = in_per_group * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = next(iter(_tensors(module).values())).shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    else:
        raise AutocompressError(
            f"profiling: pruning resizes {name!r} ({type(module).__name__}), which has no resize rule"
        )


@dataclass
class CandidateBuilder:
    """Builds the compressed shape of any candidate of ``space`` from ``model`` without the pruner."""

    model: nn.Module
    example_input: torch.Tensor
    space: SearchSpace
    groups: dict[str, PruneGroup] = field(default_factory=dict)
    dims: dict[tuple[str, str], dict[int, _Dim]] = field(default_factory=dict)
    _meta: nn.Module | None = field(default=None, repr=False)

    @property
    def round_to(self) -> int:
        """The channel-count multiple of the space's pruning settings."""
        return self.space.section(PRUNE).round_to

    @classmethod
    def learn(cls, model: nn.Module, example_input: torch.Tensor, space: SearchSpace) -> CandidateBuilder:
        """Probe the pruner once per group of ``space`` and check the result (see the module docstring)."""
        model = copy.deepcopy(model).eval()
        builder = cls(model, example_input, space)
        groups = {g.name: g for g in find_prune_groups(model, example_input)}
        base = _shapes(model)
        round_to = builder.round_to
        for group, ratios in space.get(PRUNE).items():
            ratio = max(ratios)
            builder.groups[group] = groups[group]
            channels = groups[group].channels  # heads, for an attention head group
            probe = prune(copy.deepcopy(model), {group: ratio}, example_input, round_to=round_to)
            removed = channels - groups[group].kept(ratio, round_to)
            for key, shape in _shapes(probe).items():
                for dim, (before, after) in enumerate(zip(base[key], shape, strict=True)):
                    if before == after:
                        continue
                    if (before - after) % removed or before % channels:
                        raise AutocompressError(
                            f"profiling: pruning group {group!r} changed {key[0]}.{key[1]} dim {dim} from {before} to "
                            f"{after}, not a multiple of its {channels} channels"
                        )
                    seen = builder.dims.setdefault(key, {})
                    if dim in seen:
                        raise AutocompressError(
                            f"profiling: {key[0]}.{key[1]} dim {dim} is pruned by both "
                            f"{seen[dim].group!r} and {group!r}"
                        )
                    seen[dim] = _Dim(group, (before - after) // removed)
        builder._check_against_pruner()
        return builder

    def _check_against_pruner(self) -> None:
        if not self.space.get(PRUNE):
            return
        ratios = {g: max(r) for g, r in self.space.get(PRUNE).items()}
        real = prune(copy.deepcopy(self.model), ratios, self.example_input, round_to=self.round_to)
        fast = self._pruned(ratios)
        expected, got = _shapes(real), _shapes(fast)
        for key in expected:
            if expected[key] != got.get(key):
                raise AutocompressError(
                    f"profiling: shape-only pruning gives {key[0]}.{key[1]} shape {got.get(key)}, "
                    f"the pruner {expected[key]}"
                )

    def _pruned(self, ratios: dict[str, float], meta: bool = False) -> nn.Module:
        base = self._meta_model() if meta else self.model
        modules = dict(base.named_modules())
        # Pre-slice every pruned tensor and hand it to deepcopy through its memo, so the full-size
        # weights are never copied (for ResNet-18 that copy costs more than everything else).
        memo: dict[int, object] = {}
        with torch.no_grad():
            for (name, tname), dims in self.dims.items():
                original = getattr(modules[name], tname)
                tensor = original
                for dim, info in dims.items():
                    size = self.groups[info.group].kept(ratios.get(info.group, 0.0), self.round_to)
                    tensor = tensor.narrow(dim, 0, size * info.multiple)
                tensor = tensor.clone()
                memo[id(original)] = nn.Parameter(tensor) if isinstance(original, nn.Parameter) else tensor
        model = copy.deepcopy(base, memo)
        copied = dict(model.named_modules())
        for name in {name for name, _ in self.dims}:
            _fix_attributes(copied[name], name)
        return model

    def _meta_model(self) -> nn.Module:
        if self._meta is None:
            self._meta = copy.deepcopy(self.model).to("meta")
        return self._meta

    @torch.inference_mode(False)
    def build(self, candidate: Candidate) -> tuple[nn.Module, dict[str, int]]:
        """The candidate's model (pruned shapes, factorized layers) in eval mode, and its per-layer bits.

        Its parameters are ordinary tensors even when called in inference mode: a model built with
        inference-mode parameters runs faster than any loaded, deployed model.
        """
        model = self._pruned(candidate.get(PRUNE))
        ctx = BuildContext(example_input=self.example_input, calibration=_no_calibration)
        for technique in by_stage():
            # Pruning is done above by slicing; the other shape-changing techniques run for real.
            if technique.changes_architecture and technique.name != PRUNE and technique.name in candidate.values:
                technique.apply(model, candidate.get(technique.name), self.space.section(technique.name), ctx)
        return model.eval(), deployment_plan(model, candidate)

    def shape_model(self, candidate: Candidate) -> nn.Module:
        """The candidate's model with the right shapes for signature extraction, as cheaply as possible.

        Without factorization it lives on the ``meta`` device (no weight data at all); factorization
        needs real weights (an SVD), so then it is :meth:`build`'s model.
        """
        others = [t for t in techniques() if t.changes_architecture and t.name != PRUNE]
        if any(candidate.get(t.name) != t.baseline(candidate.get(t.name)) for t in others):
            return self.build(candidate)[0]
        return self._pruned(candidate.get(PRUNE), meta=True).eval()

    def latency_choices(self, int8_kernels: bool) -> dict[str, tuple]:
        """The parameters that can change latency, with their distinct-for-latency choices."""
        kernel_bits = (INT8, FP32) if int8_kernels else (FP32,)
        choices: dict[str, tuple] = {}
        for technique in techniques():
            for key, values in self.space.get(technique.name).items():
                distinct = technique.latency_choices(values, kernel_bits)
                if distinct is not None:
                    choices[f"{technique.name}/{key}"] = distinct
        return choices

    def candidate(self, values: dict[str, object]) -> Candidate:
        """A Candidate from latency-parameter values; other keys stay uncompressed, KD is irrelevant."""
        params: dict[str, object] = {}
        for technique in techniques():
            if technique.neutral is not None:
                params.update({f"{technique.name}/{k}": technique.neutral for k in self.space.get(technique.name)})
        params.update(values)
        return Candidate.from_params(params)

    def sample(self, rng: random.Random) -> Candidate:
        """A uniformly random candidate of the full space (every parameter, as a search would draw it)."""
        params = {name: rng.choice(list(dist.choices)) for name, dist in self.space.distributions().items()}
        return Candidate.from_params(params)

    def pool(self, int8_kernels: bool, size: int, seed: int) -> Iterator[Candidate]:
        """Latency-distinct candidates: all of them if there are at most ``size``, else ``size`` random ones.

        Always starts with the uncompressed model and the most compressed one (all largest ratios,
        smallest fractions, int8 everywhere if offered).
        """
        choices = self.latency_choices(int8_kernels)
        names = list(choices)
        total = 1
        for values in choices.values():
            total *= len(values)
        yield self.candidate({})
        extreme = {n: split_param(n)[0].most_compressed(v) for n, v in choices.items()}
        yield self.candidate(extreme)
        if total <= size:
            for combo in itertools.product(*choices.values()):
                yield self.candidate(dict(zip(names, combo, strict=True)))
            return
        rng = random.Random(seed)
        for _ in range(size):
            yield self.candidate({n: rng.choice(v) for n, v in choices.items()})
