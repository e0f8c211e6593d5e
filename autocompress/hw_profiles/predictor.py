"""Latency from a profile: the sum of the LUT entries of a model's operators plus fitted overhead.

``predicted = sum(scale[model, kind(op)] * LUT[op] for op in ops) + constant[model] + per_op * len(ops)``

Isolated timing misses what happens *between* operators and around the model call (dispatch
between modules, container ``forward`` calls, the session run and tensor conversion), and it runs
each operator with its weights hot in cache, which a model larger than the cache never does
(its weights stream from memory on every call, so its convolutions run slower in the model than
alone). So the overhead terms are fitted by least squares on end-to-end measurements of a handful
of random candidates (:func:`fit_overhead`). The scale is per operator kind for the kinds that
carry much of a model's time: inside a model one kind can run slower than alone while another runs
faster (a max-pool sees post-ReLU input instead of random data), so one scale for all would leave a
per-candidate error that follows the mix of the kinds. The fit minimises *relative*
error (rows weighted by 1/measured), which is what the validation reports. The per-op term is only
identifiable when the operator count varies between candidates of one model (int8 layers add
quantize nodes, low-rank adds layers); when it does not, it is fixed at 0 and the per-model
constant absorbs it. Each scale needs ``MIN_SCALE_SAMPLES`` samples of a model; with fewer there is
one scale, or none (1).

A signature missing from the LUT is interpolated over channel counts between measured neighbours of
its family (same op, kernel, stride, input size, dtype, batch): bilinear in (in, out) — exact for
``a + b*in + c*out + d*in*out``, the cost shape of a convolution or matmul — or linear for
channel-wise ops (in = out). Failing a bracketing grid, a least-squares fit of that same form on
the family, only inside the family's measured range. Interpolated operators are flagged in the
result; a signature that cannot be predicted raises :class:`UnpredictableSignature` naming it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autocompress.errors import AutocompressError
from autocompress.hw_profiles.host import cpu_model, runtime_version
from autocompress.hw_profiles.ort_map import MAP_FORMAT, MAP_SLACK, dominant, mapped_variants
from autocompress.hw_profiles.profile import CalibrationSample, LutEntry, OpSignature, Overhead, Profile
from autocompress.runtimes import get_runtime

MIN_SCALE_SAMPLES = 4
KIND_SHARE = 0.15  # an operator kind with this share of a model's LUT time gets its own scale


class UnpredictableSignature(AutocompressError):
    """An operator's signature is not in the profile and cannot be interpolated; the message names it."""


class ProfileMismatchWarning(UserWarning):
    """The profile was measured on another CPU or runtime version than the one running now."""


@dataclass(frozen=True)
class OpLatency:
    """One operator's predicted latency and where it came from."""

    signature: str
    ms: float
    interpolated: bool


@dataclass(frozen=True)
class Prediction:
    """Predicted end-to-end latency of one model on one profile, with its parts."""

    latency_ms: float
    lut_ms: float  # raw sum of the operators' LUT entries
    scale: float  # the fitted scales' net effect on that sum (scaled sum / lut_ms)
    overhead_ms: float  # constant + per-op terms
    n_ops: int
    profile: str
    model: str
    ops: tuple[OpLatency, ...]
    model_overhead: bool  # False: the model had no fitted constant, the profile's default was used
    source: str = "signatures"  # how the operators were found: "structure", "unit map", "deployed graph"

    @property
    def interpolated(self) -> tuple[str, ...]:
        """Signatures of the operators that were interpolated rather than measured."""
        return tuple(op.signature for op in self.ops if op.interpolated)

    @property
    def exact(self) -> bool:
        """True when every operator had a measured LUT entry."""
        return not any(op.interpolated for op in self.ops)


def model_key(model: nn.Module) -> str:
    """The name a model's fitted overhead is stored under: its class's qualified name."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


# --- lookup and interpolation ----------------------------------------------------------------


def _bracket(values: Sequence[int], target: int) -> list[tuple[int, int]]:
    """(low, high) pairs around ``target`` from ``values``, tightest first; (t, t) if measured."""
    if target in values:
        return [(target, target)]
    lows = sorted((v for v in values if v < target), reverse=True)
    highs = sorted(v for v in values if v > target)
    pairs = [(lo, hi) for lo in lows for hi in highs]
    return sorted(pairs, key=lambda p: p[1] - p[0])


def _lerp(x: int, x0: int, x1: int, y0: float, y1: float) -> float:
    return y0 if x0 == x1 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _interpolate(sig: OpSignature, family: list[LutEntry]) -> float | None:
    points = {(e.signature.in_channels, e.signature.out_channels): e.median_ms for e in family}
    channelwise = sig.in_channels == sig.out_channels and all(i == o for i, o in points)
    if channelwise:
        by_c = {i: ms for (i, _), ms in points.items()}
        for lo, hi in _bracket(list(by_c), sig.in_channels)[:1]:
            return _lerp(sig.in_channels, lo, hi, by_c[lo], by_c[hi])
        return None
    ins = sorted({i for i, _ in points})
    outs = sorted({o for _, o in points})
    for i0, i1 in _bracket(ins, sig.in_channels):
        for o0, o1 in _bracket(outs, sig.out_channels):
            corners = [(i0, o0), (i0, o1), (i1, o0), (i1, o1)]
            if all(c in points for c in corners):
                low = _lerp(sig.out_channels, o0, o1, points[(i0, o0)], points[(i0, o1)])
                high = _lerp(sig.out_channels, o0, o1, points[(i1, o0)], points[(i1, o1)])
                return _lerp(sig.in_channels, i0, i1, low, high)
    # No full grid cell around the target: fit a + b*in + c*out + d*in*out on the family, inside its range.
    if len(points) >= 4 and ins[0] <= sig.in_channels <= ins[-1] and outs[0] <= sig.out_channels <= outs[-1]:
        xy = np.array(list(points), dtype=float)
        design = np.column_stack([np.ones(len(xy)), xy[:, 0], xy[:, 1], xy[:, 0] * xy[:, 1]])
        if np.linalg.matrix_rank(design) == 4:
            coef, *_ = np.linalg.lstsq(design, np.array(list(points.values())), rcond=None)
            i, o = sig.in_channels, sig.out_channels
            value = float(coef @ np.array([1.0, i, o, i * o]))
            if value > 0:
                return value
    return None


def lookup(profile: Profile, sig: OpSignature) -> tuple[float, bool]:
    """(median ms, interpolated) for ``sig``; :class:`UnpredictableSignature` if neither works."""
    entry = profile.table.get(sig.key())
    if entry is not None:
        return entry.median_ms, False
    cache = _interpolation_cache(profile)
    key = sig.key()
    if key not in cache:
        family = profile.families.get(sig.family(), [])
        cache[key] = _interpolate(sig, family) if family else None
    value = cache[key]
    if value is None:
        family = profile.families.get(sig.family(), [])
        if not family:
            why = "no entry with this op, kernel, stride, input size, dtype and batch"
        else:
            ins = sorted({e.signature.in_channels for e in family})
            outs = sorted({e.signature.out_channels for e in family})
            why = f"outside the measured channels of its family (in {ins}, out {outs})"
        raise UnpredictableSignature(
            f"profile {profile.id!r} cannot predict operator {key}: {why}; measure it with "
            "`autocompress profile measure` on an experiment whose space produces it"
        )
    return value, True


_CACHES: dict[int, tuple[Profile, dict[str, float | None]]] = {}


def _interpolation_cache(profile: Profile) -> dict[str, float | None]:
    # Keyed by id() with the profile kept alive alongside, so a recycled id never hits a stale cache.
    held = _CACHES.get(id(profile))
    if held is None or held[0] is not profile:
        held = _CACHES[id(profile)] = (profile, {})
    return held[1]


# --- overhead --------------------------------------------------------------------------------


def overhead_terms(overhead: Overhead, model: str, n_ops: int) -> tuple[float, float, bool]:
    """(scale, constant + per-op ms, whether the model had its own fitted terms)."""
    own = model in overhead.constant_ms
    constant = overhead.constant_ms[model] if own else overhead.default_constant_ms
    scale = overhead.scale.get(model, overhead.default_scale) if own else overhead.default_scale
    return scale, constant + overhead.per_op_ms * n_ops, own


def scaled_sum(overhead: Overhead, model: str, lut_by_op: dict[str, float]) -> float:
    """The model's LUT time with each operator kind's fitted scale applied (the model scale otherwise)."""
    scale, _, own = overhead_terms(overhead, model, 1)
    kinds = overhead.op_scale.get(model, {}) if own else {}
    return sum(kinds.get(op, scale) * ms for op, ms in lut_by_op.items())


def _kind_split(samples: Sequence[CalibrationSample]) -> list[str]:
    """The operator kinds of one model that get their own scale: each carries ``KIND_SHARE`` of its
    calibration LUT time, and there are ``MIN_SCALE_SAMPLES`` samples per fitted scale."""
    if not samples or any(not s.lut_by_op for s in samples):
        return []
    totals: dict[str, float] = {}
    for s in samples:
        for op, ms in s.lut_by_op.items():
            totals[op] = totals.get(op, 0.0) + ms
    whole = sum(totals.values())
    big = sorted(op for op, ms in totals.items() if whole > 0 and ms >= KIND_SHARE * whole)
    while big and len(samples) < MIN_SCALE_SAMPLES * (len(big) + 1):
        big.remove(min(big, key=totals.__getitem__))
    spread = all(np.ptp([s.lut_by_op.get(op, 0.0) for s in samples]) > 0 for op in big)
    return big if spread else []


def fit_overhead(samples: Sequence[CalibrationSample]) -> Overhead:
    """Least-squares fit of per-model scales and constant and a shared per-op term to the measurements.

    Solves ``measured = sum(scale[m, kind] * lut[kind]) + constant[m] + per_op * n_ops`` with rows
    weighted by 1/measured (relative error). A model's scales: one per operator kind that carries
    ``KIND_SHARE`` of its LUT time when its samples allow (``MIN_SCALE_SAMPLES`` per scale), the rest
    of its operators at scale 1; else one scale for all its operators, or 1 with fewer than
    ``MIN_SCALE_SAMPLES`` samples (or no spread in its LUT sums). A kind whose fitted scale comes out
    at or below zero was not identifiable from the samples (its LUT time moves with another kind's):
    it loses its own scale and the fit is redone; a model's one scale at or below zero (a few noisy
    samples with little spread) is held at 1 the same way. The per-op term is dropped (0) when the operator
    count does not vary within any model, since it is then indistinguishable from the constants.
    Models without samples get the medians of the fitted scales and constants.
    """
    if not samples:
        return Overhead()
    models = sorted({s.model for s in samples})
    by_model = {m: [s for s in samples if s.model == m] for m in models}
    kinds = {m: _kind_split(by_model[m]) for m in models}
    fixed: set[str] = set()  # models whose one scale fitted at or below zero: held at 1
    while True:
        fitted = _solve(samples, by_model, kinds, fixed)
        unphysical = {m: [op for op, v in fitted.op_scale.get(m, {}).items() if v <= 0] for m in models}
        negative = {m for m in models if fitted.scale[m] <= 0}
        if not any(unphysical.values()) and not negative:
            break
        kinds = {m: [op for op in kinds[m] if op not in unphysical[m]] for m in models}
        fixed |= negative
    errors = []
    for s in samples:
        _, extra, _ = overhead_terms(fitted, s.model, s.n_ops)
        lut = scaled_sum(fitted, s.model, s.lut_by_op) if s.lut_by_op else fitted.scale[s.model] * s.lut_ms
        errors.append(abs(lut + extra - s.measured_ms) / s.measured_ms * 100)
    return Overhead.model_validate({**fitted.model_dump(), "residual_pct": float(np.median(errors))})


def _solve(
    samples: Sequence[CalibrationSample],
    by_model: dict[str, list[CalibrationSample]],
    kinds: dict[str, list[str]],
    fixed: set[str],
) -> Overhead:
    """One weighted least-squares solve of :func:`fit_overhead` with the given per-kind split
    (``fixed``: models held at scale 1)."""
    models = sorted(by_model)
    whole = {
        m: m not in fixed
        and not kinds[m]
        and len(by_model[m]) >= MIN_SCALE_SAMPLES
        and np.ptp([s.lut_ms for s in by_model[m]]) > 0
        for m in models
    }
    columns: list[tuple[str, str]] = [(m, "") for m in models]  # constants
    columns += [(m, op) for m in models for op in kinds[m]] + [(m, "*") for m in models if whole[m]]
    identifiable = any(len({s.n_ops for s in by_model[m]}) > 1 for m in models)
    design = np.zeros((len(samples), len(columns) + int(identifiable)))
    target = np.array([s.measured_ms for s in samples])
    for r, s in enumerate(samples):
        design[r, columns.index((s.model, ""))] = 1.0
        if whole[s.model]:
            design[r, columns.index((s.model, "*"))] = s.lut_ms
        elif kinds[s.model]:
            for op, ms in s.lut_by_op.items():
                if op in kinds[s.model]:
                    design[r, columns.index((s.model, op))] = ms
                else:
                    target[r] -= ms  # scale fixed at 1
        else:
            target[r] -= s.lut_ms  # scale fixed at 1
        if identifiable:
            design[r, -1] = s.n_ops
    weights = 1.0 / np.array([s.measured_ms for s in samples])
    coef, *_ = np.linalg.lstsq(design * weights[:, None], target * weights, rcond=None)
    value = {column: float(coef[i]) for i, column in enumerate(columns)}
    constants = {m: value[(m, "")] for m in models}
    scales = {m: value.get((m, "*"), 1.0) for m in models}
    # Not validated here: a scale may come out <= 0, which fit_overhead catches and refits.
    return Overhead.model_construct(
        per_op_ms=float(coef[-1]) if identifiable else 0.0,
        constant_ms=constants,
        default_constant_ms=float(np.median(list(constants.values()))),
        scale=scales,
        op_scale={m: {op: value[(m, op)] for op in kinds[m]} for m in models if kinds[m]},
        default_scale=float(np.median(list(scales.values()))),
    )


def op_kind(signature_key: str) -> str:
    """The operator kind of a LUT key (its ``op`` field): what per-kind scales are keyed by."""
    return signature_key.split("|", 2)[1]


def lut_by_op(ops: Sequence[tuple[str, float]]) -> dict[str, float]:
    """LUT time per operator kind of (signature key, ms) pairs."""
    split: dict[str, float] = {}
    for key, ms in ops:
        kind = op_kind(key)
        split[kind] = split.get(kind, 0.0) + ms
    return split


# --- prediction ------------------------------------------------------------------------------


def _prediction(ops: list[OpLatency], profile: Profile, model: str, source: str) -> Prediction:
    total = sum(op.ms for op in ops)
    _, extra, own = overhead_terms(profile.overhead, model, len(ops))
    scaled = scaled_sum(profile.overhead, model, lut_by_op([(op.signature, op.ms) for op in ops]))
    return Prediction(
        latency_ms=scaled + extra,
        lut_ms=total,
        scale=scaled / total if total > 0 else 1.0,
        overhead_ms=extra,
        n_ops=len(ops),
        profile=profile.id,
        model=model,
        ops=tuple(ops),
        model_overhead=own,
        source=source,
    )


def predict_signatures(
    sigs: Sequence[OpSignature], profile: Profile, model: str = "", source: str = "signatures"
) -> Prediction:
    """Predict from a list of signatures (the arithmetic of :func:`predict`, without a model)."""
    ops = []
    for sig in sigs:
        ms, interpolated = lookup(profile, sig)
        ops.append(OpLatency(sig.key(), ms, interpolated))
    return _prediction(ops, profile, model, source)


@functools.cache
def _host_facts(runtime: str) -> tuple[str, str]:
    return cpu_model(), runtime_version(runtime)


_WARNED: set[tuple[str, str]] = set()


def check_host(profile: Profile) -> list[str]:
    """Differences between where ``profile`` was measured and this machine; each warned about once."""
    cpu, version = _host_facts(profile.runtime.name)
    problems = []
    if profile.host.cpu != cpu:
        problems.append(f"measured on CPU {profile.host.cpu!r}, running on {cpu!r}")
    if profile.runtime.version != version:
        problems.append(f"measured with {profile.runtime.name} {profile.runtime.version}, running {version}")
    for problem in problems:
        if (profile.id, problem) not in _WARNED:
            _WARNED.add((profile.id, problem))
            warnings.warn(
                f"hardware profile {profile.id!r} {problem}: its latency predictions may not hold here",
                ProfileMismatchWarning,
                stacklevel=3,
            )
    return problems


def _mapped_ops(profile: Profile, keys: list[str]) -> list[OpLatency] | None:
    """LUT latencies of the node keys a unit map named; None if one cannot be measured or interpolated."""
    ops = []
    for key in keys:
        entry = profile.table.get(key)
        if entry is not None:
            ops.append(OpLatency(key, entry.median_ms, False))
            continue
        channels, family_key = key.split("|", 1)
        family = profile.families.get(family_key)
        if not family:
            return None
        channels_in, channels_out = (int(c) for c in channels.split("->"))
        sig = family[0].signature.model_copy(update={"in_channels": channels_in, "out_channels": channels_out})
        try:
            ms, interpolated = lookup(profile, sig)
        except UnpredictableSignature:
            return None
        ops.append(OpLatency(key, ms, interpolated))
    return ops


def _map_prediction(
    profile: Profile, model: nn.Module, input_shape: tuple[int, ...], bits: dict[str, int] | None
) -> list[OpLatency] | None:
    """The operators of ``model`` from the profile's unit map, or None when the map cannot vouch for
    them: an unknown unit, an unpredictable node, or node-list uncertainty above ``MAP_SLACK``."""
    units = mapped_variants(profile.unit_map, model, input_shape, bits)
    if units is None:
        return None
    ops: list[OpLatency] = []
    squares = 0.0
    for variants in units:
        best = _mapped_ops(profile, variants[0][1])
        if best is None:
            return None
        ops.extend(best)
        if dominant(variants):
            continue
        others = (_mapped_ops(profile, keys) for _, keys in variants[1:])
        sums = [sum(op.ms for op in costed) for costed in (best, *others) if costed]
        squares += (max(sums) - min(sums)) ** 2
    # Each unit's doubt is a layout choice in its own neighbourhood: independent, so they add in
    # quadrature. (Added linearly they refused ResNet-18 candidates whose dominant node lists were
    # close to the deployed graph's LUT sum.)
    return ops if squares**0.5 <= MAP_SLACK * sum(op.ms for op in ops) else None


def predict(
    model: nn.Module, example_input: torch.Tensor, profile: Profile, bits: dict[str, int] | None = None
) -> Prediction:
    """Predict the end-to-end latency of ``model`` on ``example_input`` from ``profile``.

    ``model`` is the compressed, plain ``nn.Module`` a trial produced; ``bits`` (layer -> bit-width)
    matters only on a runtime with int8 kernels (ONNX Runtime), where 8-bit layers are deployed as
    int8. Torch eager: LUT look-ups only (the model's structure is traced once and cached).
    ONNX Runtime: the same, through the profile's unit map (:mod:`.ort_map`) when it knows every
    unit; otherwise the candidate is deployed and ORT-optimized to read its real nodes (far slower).
    ``Prediction.source`` says which.
    Warns (:class:`ProfileMismatchWarning`) when the profile comes from another CPU or runtime
    version; raises :class:`UnpredictableSignature` for an operator it cannot predict.
    """
    check_host(profile)
    runtime = get_runtime(profile.runtime.name)
    name = model_key(model)
    if runtime.structural:
        sigs = runtime.signatures(model, example_input, bits, profile.host.threads)
        return predict_signatures(sigs, profile, name, "structure")
    if profile.unit_map and profile.unit_map_format == MAP_FORMAT:
        ops = _map_prediction(profile, model, tuple(example_input.shape), bits)
        if ops is not None:
            return _prediction(ops, profile, name, "unit map")
    sigs = runtime.signatures(model, example_input, bits, profile.host.threads)
    return predict_signatures(sigs, profile, name, "deployed graph")
