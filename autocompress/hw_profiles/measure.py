"""``profile measure``: fill a profile's LUT with every operator an experiment's space can produce.

1. Enumerate. Candidates come from the latency-relevant part of the space (prune ratios, rank
   fractions, and int8-or-not per layer where int8 has kernels): all of them when there are at most
   ``pool`` (the digits CNN's 4096 prune combinations), else the uncompressed and the most
   compressed candidate plus ``pool`` random ones. A structural runtime's signatures (torch eager)
   are read from each candidate's shape alone (a ``meta``-device model, cheap), so the enumeration
   is exhaustive over the pool. Other runtimes' signatures (ONNX Runtime) need a real deployment
   per candidate (export, quantize, optimize: far slower), so a subset is chosen greedily to
   cover every (eager unit signature, own/neighbour int8-ness) combination the pool shows, the
   things ORT's node choice depends on; only those are deployed.
2. Measure each new signature in isolation (:func:`~autocompress.evaluators.latency.time_in_passes`:
   warm-up, fixed threads, median of repeats, re-measured when noisy, the mean over
   ``LUT_PASSES`` interleaved passes over a chunk of ``LUT_CHUNK`` units), pinned to one CPU. The
   profile file is rewritten atomically as chunks finish (at most every second) and at exit, so a
   killed run keeps what it measured; rerunning the same command skips what is in the file.
3. Calibrate: time ``calibration`` random candidates end to end (the same ones on every run: fixed
   seed; timed in a fresh process, in round-robin passes averaged per candidate),
   measuring on demand any signature they contain that enumeration missed, and refit the overhead
   terms on all samples in the profile (every model measured into it so far).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import platform
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autocompress.compress.pipeline import deployment_plan
from autocompress.errors import AutocompressError
from autocompress.evaluators.latency import END_TO_END_PASSES, LUT_PASSES, Latency, pinned_cpu, time_in_passes
from autocompress.hw_profiles import ort_map
from autocompress.hw_profiles.host import cpu_model
from autocompress.hw_profiles.predictor import UnpredictableSignature, fit_overhead, lookup, lut_by_op
from autocompress.hw_profiles.probe import read_probe
from autocompress.hw_profiles.profile import (
    DEFAULT_RUNTIME,
    CalibrationSample,
    HostInfo,
    LutEntry,
    MeasurementInfo,
    OpSignature,
    ProbeReading,
    Profile,
    ProfileError,
    RuntimeInfo,
    load_profile,
    save_profile,
)
from autocompress.hw_profiles.progress import Progress, duration
from autocompress.hw_profiles.target import Target
from autocompress.runtimes import ProfileUnit, Runtime, get_runtime
from autocompress.spaces.candidate import Candidate

CALIBRATION_SEED = 12345  # fixed: a resumed run calibrates on the same candidates
PATIENCE = 50
MAX_EXTRA = 400
LUT_CHUNK = 50  # isolated units timed together, in interleaved passes


@dataclass(frozen=True)
class MeasureSettings:
    """How ``profile measure`` times things and how far it enumerates."""

    runtime: str = DEFAULT_RUNTIME
    threads: int = 1
    repeats: int = 30
    warmup_ms: float = 20.0
    min_sample_ms: float = 1.0
    cpu: int | None = None
    pool: int = 4096
    seed: int = 0
    calibration: int = 32
    profile_id: str | None = None
    description: str = ""


def default_cpu() -> int | None:
    """The CPU to pin measurements to: the last one this process may use (None where unsupported)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return max(os.sched_getaffinity(0))


def now_iso() -> str:
    """Current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def candidate_label(candidate: Candidate) -> str:
    """A short readable label with a hash of the parameters (unique per candidate)."""
    digest = hashlib.sha1(json.dumps(candidate.to_params(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{candidate.describe()} #{digest}"


def new_profile(settings: MeasureSettings, runtime: Runtime) -> Profile:
    """An empty profile describing this machine and runtime."""
    threads = settings.threads
    profile_id = settings.profile_id or f"{runtime.name}-{threads}t"
    return Profile(
        id=profile_id,
        description=settings.description,
        host=HostInfo(
            cpu=cpu_model(),
            cores=os.cpu_count() or 1,
            threads=threads,
            machine=platform.machine(),
            os=f"{platform.system()} {platform.release()}",
        ),
        runtime=RuntimeInfo(
            name=runtime.name,
            version=runtime.version(),
            dtypes=list(runtime.dtypes),
            kernel_bits=list(runtime.kernel_bits),
        ),
        measured_at=now_iso(),
        measurement=MeasurementInfo(
            warmup_ms=settings.warmup_ms,
            repeats=settings.repeats,
            min_sample_ms=settings.min_sample_ms,
            pinned_cpu=settings.cpu,
        ),
    )


def open_profile(path: Path, settings: MeasureSettings, runtime: Runtime) -> Profile:
    """The profile at ``path`` to continue (checked to match this machine and runtime), or a new one."""
    if not path.exists():
        return new_profile(settings, runtime)
    profile = load_profile(path)
    fresh = new_profile(settings, runtime)
    checks = [
        ("runtime", profile.runtime.name, fresh.runtime.name),
        ("runtime version", profile.runtime.version, fresh.runtime.version),
        ("threads", profile.host.threads, fresh.host.threads),
        ("CPU", profile.host.cpu, fresh.host.cpu),
    ]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise ProfileError(
                f"{path}: measured with {what} {theirs!r}, this run uses {ours!r}; a profile holds one setup "
                "(choose another --out)"
            )
    return profile


class _Writer:
    """Holds the profile being measured and saves it atomically, at most once per ``interval`` seconds."""

    def __init__(self, profile: Profile, path: Path, interval: float = 1.0) -> None:
        self.profile, self.path, self.interval = profile, path, interval
        self.entries = list(profile.lut)
        self.known = {e.signature.key() for e in self.entries}
        self.samples = list(profile.calibration)
        # A map of an older format is relearned: the candidates that teach it are deployed on every run.
        self.unit_map = dict(profile.unit_map) if profile.unit_map_format == ort_map.MAP_FORMAT else {}
        self.last = 0.0

    def add(self, sig: OpSignature, latency: Latency) -> None:
        self.entries.append(
            LutEntry(signature=sig, median_ms=latency.median_ms, p90_ms=latency.p90_ms, repeats=latency.repeats)
        )
        self.known.add(sig.key())
        self.save()

    def save(self, force: bool = False, **updates: object) -> Profile:
        now = time.monotonic()
        if updates:
            self.profile = self.profile.model_copy(update=updates)
        if force or now - self.last >= self.interval:
            self.last = now
            self.profile = Profile.model_validate(
                {
                    **self.profile.model_dump(),
                    "lut": [e.model_dump() for e in self.entries],
                    "calibration": [s.model_dump() for s in self.samples],
                    "unit_map": self.unit_map,
                    "unit_map_format": ort_map.MAP_FORMAT,
                    "measured_at": now_iso(),
                }
            )
            save_profile(self.profile, self.path)
        return self.profile


def _measure_units(
    units: list[tuple[OpSignature, Callable[[], object]]],
    settings: MeasureSettings,
    writer: _Writer,
    on_done: Callable[[int], None] | None = None,
) -> None:
    """Time isolated units in chunks of ``LUT_CHUNK``, ``LUT_PASSES`` interleaved passes each, and add
    each unit's timing to the profile (a killed run keeps every finished chunk)."""
    for start in range(0, len(units), LUT_CHUNK):
        chunk = units[start : start + LUT_CHUNK]
        timed = time_in_passes(
            [fn for _, fn in chunk],
            LUT_PASSES,
            warmup_ms=settings.warmup_ms,
            repeats=settings.repeats,
            min_sample_ms=settings.min_sample_ms,
            threads=settings.threads,
        )
        for (sig, _), latency in zip(chunk, timed, strict=True):
            writer.add(sig, latency)
        if on_done is not None:
            on_done(start + len(chunk))


def _enumeration(target: Target, settings: MeasureSettings, runtime: Runtime) -> dict[str, ProfileUnit]:
    """Every distinct unit of the pool's candidates, read from their structure (a structural runtime)."""
    found: dict[str, ProfileUnit] = {}
    for candidate in target.builder.pool(runtime.int8_kernels, settings.pool, settings.seed):
        model = target.builder.shape_model(candidate)
        bits = deployment_plan(model, candidate)
        for unit in runtime.units(model, target.example_input, bits, settings.threads):
            found.setdefault(unit.signature.key(), unit)
    return found


def cover_candidates(target: Target, settings: MeasureSettings, runtime: Runtime) -> list[Candidate]:
    """Candidates that together show every unit proxy (:func:`.ort_map.unit_proxies`) of the pool.

    Greedy set cover over the pool: each step takes the candidate showing the most configurations
    not yet shown. The proxies are a heuristic for what ORT's graph optimizer looks at, so
    :func:`_measure_deployed` follows up with random candidates until new signatures stop appearing.
    """
    shape = tuple(target.example_input.shape)
    coverage = []
    for candidate in target.builder.pool(runtime.int8_kernels, settings.pool, settings.seed):
        model = target.builder.shape_model(candidate)
        coverage.append((candidate, set(ort_map.unit_proxies(model, shape, deployment_plan(model, candidate)))))
    chosen, covered = [], set()
    while True:
        best, gain = None, 0
        for candidate, keys in coverage:
            new = len(keys - covered)
            if new > gain:
                best, gain = (candidate, keys), new
        if best is None:
            return chosen
        chosen.append(best[0])
        covered |= best[1]


def measure_profile(
    target: Target, out: Path, settings: MeasureSettings, log: Callable[[str], None] = print
) -> Profile:
    """Measure ``target``'s operators into the profile at ``out`` (created or continued); return it."""
    runtime = get_runtime(settings.runtime)
    if settings.threads < 1:
        raise AutocompressError(f"--threads {settings.threads}: need at least 1")
    profile = open_profile(out, settings, runtime)
    writer = _Writer(profile, out)
    if len(writer.entries):
        log(f"{out}: continuing, {len(writer.entries)} signatures already measured")
    cpu = settings.cpu if settings.threads == 1 else None
    started = time.monotonic()
    try:
        with pinned_cpu(cpu), runtime.timing(settings.threads):
            if runtime.structural:
                _measure_enumerated(target, settings, runtime, writer, log)
            else:
                _measure_deployed(target, settings, runtime, writer, log)
            _calibrate(target, settings, runtime, writer, log)
    finally:
        writer.save(force=True)
    overhead = writer.profile.overhead
    kinds = overhead.op_scale.get(target.model_name, {})
    whole = f"{overhead.scale.get(target.model_name, 1.0):.3f}"
    scales = ", ".join(f"{op} {v:.3f}" for op, v in kinds.items()) or whole
    log(
        f"{out}: {len(writer.entries)} signatures, {len(writer.samples)} calibration samples, "
        f"overhead per-op {overhead.per_op_ms * 1e3:.2f} us, {target.model_name} scale {scales}, "
        f"constant {overhead.constant_ms.get(target.model_name, 0.0):.4f} ms "
        f"(fit residual {overhead.residual_pct or 0:.2f}%); {duration(time.monotonic() - started)}"
    )
    return writer.profile


def _measure_enumerated(
    target: Target, settings: MeasureSettings, runtime: Runtime, writer: _Writer, log: Callable[[str], None]
) -> None:
    found = _enumeration(target, settings, runtime)
    todo = [unit for key, unit in found.items() if key not in writer.known]
    log(f"{runtime.name}: {len(found)} distinct operator signatures in the space, {len(todo)} to measure")
    progress = Progress("measure", len(todo), "signatures")
    units = [(unit.signature, unit.build()) for unit in todo]
    _measure_units(units, settings, writer, lambda done: progress.update(done, note=f"{LUT_PASSES} passes per chunk"))
    progress.close()


def _measure_deployed(
    target: Target, settings: MeasureSettings, runtime: Runtime, writer: _Writer, log: Callable[[str], None]
) -> None:
    chosen = cover_candidates(target, settings, runtime)
    log(f"{runtime.name}: deploying {len(chosen)} candidates that cover the space's operator configurations")
    progress = Progress("measure", len(chosen), "candidates")
    for i, candidate in enumerate(chosen):
        _measure_missing(target, candidate, settings, runtime, writer)
        progress.update(i + 1, note=f"{len(writer.entries)} signatures")
    progress.close()
    # The proxies can miss a context ORT cares about: keep drawing random candidates until
    # PATIENCE in a row bring no new signature and no new unit-map key (or MAX_EXTRA were tried).
    rng = random.Random(settings.seed + 1)
    quiet = extra = 0
    while quiet < PATIENCE and extra < MAX_EXTRA:
        before = len(writer.entries), len(writer.unit_map)
        _measure_missing(target, target.builder.sample(rng), settings, runtime, writer)
        extra += 1
        quiet = 0 if (len(writer.entries), len(writer.unit_map)) != before else quiet + 1
    log(
        f"{runtime.name}: {extra} random candidates after the cover; {len(writer.entries)} signatures and "
        f"{len(writer.unit_map)} unit-map keys in the profile"
    )


def _measure_missing(
    target: Target, candidate: Candidate, settings: MeasureSettings, runtime: Runtime, writer: _Writer
) -> list[OpSignature]:
    """Measure the signatures of ``candidate`` not yet in the profile; return all its signatures."""
    model, bits = target.builder.build(candidate)
    units = runtime.units(model, target.example_input, bits, settings.threads)
    new = {unit.signature.key(): unit for unit in units if unit.signature.key() not in writer.known}
    _measure_units([(unit.signature, unit.build()) for unit in new.values()], settings, writer)
    runtime.learn(writer.unit_map, model, tuple(target.example_input.shape), bits, units)
    return [unit.signature for unit in units]


def calibration_candidates(target: Target, count: int) -> list[Candidate]:
    """The first ``count`` candidates ``profile measure`` calibrates ``target`` on (the same on every run)."""
    rng = random.Random(CALIBRATION_SEED)
    return [target.builder.sample(rng) for _ in range(count)]


def _calibrate(
    target: Target, settings: MeasureSettings, runtime: Runtime, writer: _Writer, log: Callable[[str], None]
) -> None:
    done = {(s.model, s.candidate) for s in writer.samples}
    candidates = calibration_candidates(target, settings.calibration)
    todo = [c for c in candidates if (target.model_name, candidate_label(c)) not in done]
    if todo:
        log(
            f"calibration: {len(todo)} candidates of {target.model_name}: their operators, then end-to-end "
            "timing in a fresh process"
        )
    progress = Progress("calibrate", len(todo), "candidates")
    signatures = []
    for i, candidate in enumerate(todo):
        signatures.append(_measure_missing(target, candidate, settings, runtime, writer))
        progress.update(i + 1, note="operators measured")
    progress.close()
    profile = writer.save(force=True)  # once: the look-ups below need every entry just measured
    pending = []
    for candidate, sigs in zip(todo, signatures, strict=True):
        try:
            split = lut_by_op([(sig.key(), lookup(profile, sig)[0]) for sig in sigs])
        except UnpredictableSignature as err:  # cannot happen: every signature was just measured
            raise AutocompressError(f"calibration: {err}") from None
        pending.append((candidate, len(sigs), split))
    probe = writer.profile.probe
    measured: list[float] = []
    if pending:
        built = [target.builder.build(candidate) for candidate, _, _ in pending]
        measured, probe = time_end_to_end(built, target.example_input, settings, "calibrate: timing")
    for (candidate, n_ops, split), ms in zip(pending, measured, strict=True):
        writer.samples.append(
            CalibrationSample(
                model=target.model_name,
                candidate=candidate_label(candidate),
                n_ops=n_ops,
                lut_ms=sum(split.values()),
                measured_ms=ms,
                lut_by_op=split,
            )
        )
    writer.save(force=True, overhead=fit_overhead(writer.samples), probe=probe)


def time_end_to_end(
    built: list[tuple[nn.Module, dict[str, int] | None]],
    example_input: torch.Tensor,
    settings: MeasureSettings,
    label: str = "timing",
) -> tuple[list[float], ProbeReading]:
    """End-to-end median ms of each (model, bits) on ``settings.runtime``, and a probe reading, timed
    in a fresh spawned process (calibration and ``profile validate`` both time this way).

    A long-lived process is not the process a deployed model runs in: one that has built and run
    hundreds of one-operator ORT sessions, or has built the candidates itself, runs them slower than
    a fresh one, which would read as a bias of the profile. Each
    candidate is timed in ``END_TO_END_PASSES`` round-robin passes, averaging its per-pass medians
    (:func:`time_in_passes`); the child draws its own progress line (``label``) on stderr.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_time_end_to_end, built, example_input, settings, label).result()


def _time_end_to_end(
    built: list[tuple[nn.Module, dict[str, int] | None]],
    example_input: torch.Tensor,
    settings: MeasureSettings,
    label: str,
) -> tuple[list[float], ProbeReading]:
    runtime = get_runtime(settings.runtime)
    cpu = settings.cpu if settings.threads == 1 else None
    with ExitStack() as stack, pinned_cpu(cpu), runtime.timing(settings.threads):
        runs = [
            stack.enter_context(runtime.end_to_end(model, example_input, bits, settings.threads))
            for model, bits in built
        ]
        probe = read_probe(settings.threads, now_iso())
        progress = Progress(label, len(runs) * END_TO_END_PASSES, "timings")
        timed = time_in_passes(
            runs,
            END_TO_END_PASSES,
            warmup_ms=settings.warmup_ms,
            repeats=settings.repeats,
            min_sample_ms=settings.min_sample_ms,
            threads=settings.threads,
            on_step=lambda p, i: progress.update(p * len(runs) + i + 1, note=f"pass {p + 1}/{END_TO_END_PASSES}"),
        )
        progress.close()
    return [latency.median_ms for latency in timed], probe
