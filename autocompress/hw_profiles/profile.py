"""The hardware-profile file: versioned JSON, validated on load (pydantic, like the experiment schema).

A profile says where and how it was measured (CPU, cores, threads, runtime and its version, the
bit-widths that have real kernels there, the date) and holds the lookup table: one entry per
operator signature (op kind, channels or features, kernel, stride, padding, groups, input size,
dtype, batch) with the median and p90 latency of its isolated measurement and the repeat count.
Next to the table: the fitted overhead terms (per-model scale and constant, per-op cost), the
end-to-end samples they were fitted on (so adding a model refits everything), validation
summaries, and for ONNX Runtime the unit map that makes its predictions fast (:mod:`.ort_map`).

The LUT is a JSON list (not a mapping keyed by a string) so every field of a signature is typed
and checked; :meth:`Profile.table` indexes it by :meth:`OpSignature.key` once per loaded profile.

Every file carries ``content_sha256``, the hash of the rest of its contents (:func:`content_hash`),
written by :func:`save_profile` and checked by :func:`load_profile`: a profile changed since it was
written (corrupted, edited by hand, half-copied) is refused in one line, never used to predict
latencies. ``autocompress profile rehash`` re-signs a file whose change is the user's own.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autocompress.documents import atomic_write, format_validation_error, load_json, read_text
from autocompress.errors import AutocompressError
from autocompress.runtimes import runtime_names

FORMAT_VERSION = 1
DEFAULT_RUNTIME = "torch-eager"  # what ``profile measure`` measures unless told
DTYPE_BITS = {"fp32": 32, "int8": 8}
MAX_PROFILE_BYTES = 64 << 20
HASH_KEY = "content_sha256"
"""Profile files above 64 MiB are refused unread (the shipped ones weigh 0.25 and 1.2 MB)."""


class ProfileError(AutocompressError):
    """A profile file is missing, not JSON, or does not match the format; the message says where."""


class _Strict(BaseModel):
    # forbid: a misspelt key in a hand-edited profile must be an error, not a silently ignored field;
    # no NaN or infinity: a latency or a fitted term that is not a number poisons every prediction.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _dims(values: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in values) if values else "-"


class OpSignature(_Strict):
    """What determines one operator's latency: the LUT key.

    ``op`` is the unit that runs (``conv2d+bn+relu`` in torch eager, ``nchwc.Conv+Relu`` or
    ``QLinearConv`` in ONNX Runtime); ``in_channels``/``out_channels`` are channels or features (0
    where meaningless); ``input_size`` is the input's spatial size (token positions for a Linear);
    ``extra`` holds the remaining settings that select a different kernel (bias, dilation, fused
    inputs), as sorted ``name=value`` pairs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str = Field(min_length=1)
    in_channels: int = Field(ge=0)
    out_channels: int = Field(ge=0)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = Field(default=1, ge=1)
    input_size: tuple[int, ...] = ()
    dtype: Literal["fp32", "int8"] = "fp32"
    batch: int = Field(default=1, ge=1)
    extra: str = ""

    def family(self) -> str:
        """The key without the channel counts: signatures that differ only in channels share it."""
        return (
            f"{self.op}|k{_dims(self.kernel)}|s{_dims(self.stride)}|p{_dims(self.padding)}|g{self.groups}"
            f"|in{_dims(self.input_size)}|{self.dtype}|b{self.batch}|{self.extra}"
        )

    def key(self) -> str:
        """A unique, readable string for this signature (what errors and reports print)."""
        return f"{self.in_channels}->{self.out_channels}|{self.family()}"


class LutEntry(_Strict):
    """One measured signature: median and p90 latency (ms) over ``repeats`` timed samples."""

    signature: OpSignature
    median_ms: float = Field(gt=0)
    p90_ms: float = Field(gt=0)
    repeats: int = Field(ge=1)

    @model_validator(mode="after")
    def _p90_not_below_median(self) -> LutEntry:
        if self.p90_ms < self.median_ms:
            raise ValueError(f"p90_ms {self.p90_ms} is below median_ms {self.median_ms} for {self.signature.key()}")
        return self


class HostInfo(_Strict):
    """The machine the profile was measured on."""

    cpu: str = Field(min_length=1)
    cores: int = Field(ge=1, description="logical CPUs of the machine")
    threads: int = Field(ge=1, description="intra-op threads used for every measurement")
    machine: str = ""
    os: str = ""


class RuntimeInfo(_Strict):
    """The runtime that executed the operators, its version, and what has real kernels there."""

    name: str = Field(description="a registered runtime (autocompress.runtimes)")
    version: str = Field(min_length=1)
    dtypes: list[Literal["fp32", "int8"]] = Field(min_length=1)
    kernel_bits: list[int] = Field(min_length=1, description="weight bit-widths with real kernels (32 = fp32)")

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        # Aliases are for experiment files; a profile records the runtime's one name.
        if value not in runtime_names():
            raise ValueError(f"unknown runtime {value!r}: use one of {', '.join(runtime_names())}")
        return value

    @model_validator(mode="after")
    def _bits_match_dtypes(self) -> RuntimeInfo:
        expected = sorted((DTYPE_BITS[d] for d in self.dtypes), reverse=True)
        if sorted(self.kernel_bits, reverse=True) != expected:
            raise ValueError(f"kernel_bits {self.kernel_bits} do not match dtypes {self.dtypes} (expected {expected})")
        return self


class MeasurementInfo(_Strict):
    """How each LUT entry was timed."""

    warmup_ms: float = Field(ge=0)
    repeats: int = Field(ge=3)
    min_sample_ms: float = Field(gt=0)
    pinned_cpu: int | None = None


class ProbeReading(_Strict):
    """Per-call times of the machine-state probe's two workloads (:mod:`.probe`), and when."""

    dispatch_us: float = Field(gt=0, description="8 x Linear(16, 16) + ReLU at batch 1, per call")
    compute_ms: float = Field(gt=0, description="Conv2d(64, 64, 3x3) at 1x64x32x32, per call")
    measured_at: str = ""


class CalibrationSample(_Strict):
    """One end-to-end measurement used to fit the overhead terms."""

    model: str = Field(min_length=1)
    candidate: str = ""
    n_ops: int = Field(ge=1)
    lut_ms: float = Field(ge=0)
    measured_ms: float = Field(gt=0)
    lut_by_op: dict[str, float] = Field(default_factory=dict, description="lut_ms split by operator kind")


class Overhead(_Strict):
    """Fitted terms: ``latency = sum(scale * LUT entry) + constant_ms[model] + per_op_ms * operators``.

    An entry's scale is ``op_scale[model][op kind]`` for the kinds that carry a large share of the
    model's time (a convolution and a max-pool do not gain or lose the same inside a model: cache,
    activations that are not random), else ``scale[model]``.

    The per-op term is the framework's dispatch cost between operators that isolated timing does not
    see; the per-model constant is what one call of the whole model costs beyond its operators
    (container modules, input/output conversion, session run); the per-model scale is the memory
    hierarchy: an operator timed alone runs with its weights hot in cache, inside a model whose
    weights exceed the cache it does not. Models without samples use the ``default_*`` values.
    """

    per_op_ms: float = 0.0
    constant_ms: dict[str, float] = Field(default_factory=dict)
    default_constant_ms: float = 0.0
    scale: dict[str, float] = Field(default_factory=dict)
    op_scale: dict[str, dict[str, float]] = Field(default_factory=dict)
    default_scale: float = Field(default=1.0, gt=0)
    residual_pct: float | None = Field(default=None, description="median |error| % of the fit on its samples")


class ValidationRow(_Strict):
    """One validated candidate: predicted vs measured end-to-end latency."""

    candidate: str
    predicted_ms: float
    measured_ms: float
    abs_error_pct: float
    interpolated_ops: int = 0
    source: str = Field(default="", description="how the prediction found the operators (Prediction.source)")


class ReferenceDrift(_Strict):
    """The machine's drift since calibration, read on the same models: calibration candidates re-timed
    beside a validation's candidates, and that validation's error once its predictions are scaled by it."""

    n: int = Field(ge=1, description="calibration candidates re-timed")
    ratio_median: float = Field(gt=0, description="median of (measured now / measured at calibration)")
    ratio_min: float = Field(gt=0)
    ratio_max: float = Field(gt=0)
    median_abs_error_pct: float = Field(description="|error| median with every prediction times ratio_median")
    p90_abs_error_pct: float
    max_abs_error_pct: float


class ValidationSummary(_Strict):
    """A validation run recorded in the profile: error statistics and the rows behind them."""

    model: str
    experiment: str
    n: int = Field(ge=1)
    median_abs_error_pct: float
    p90_abs_error_pct: float
    max_abs_error_pct: float
    measured_at: str
    command: str = ""
    probe: ProbeReading | None = Field(default=None, description="machine-state probe taken before the timing")
    drift: ReferenceDrift | None = Field(default=None, description="same-model drift since calibration")
    rows: list[ValidationRow] = Field(default_factory=list)


class UnitVariant(_Strict):
    """One list of ORT nodes an eager unit became in some deployed candidate, and how often it was seen."""

    nodes: list[str]
    seen: int = Field(default=1, ge=1)


class Profile(_Strict):
    """A hardware profile: metadata, the LUT, fitted overhead, calibration samples, validation summaries."""

    format_version: Literal[1] = FORMAT_VERSION
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    host: HostInfo
    runtime: RuntimeInfo
    measured_at: str = Field(min_length=1, description="ISO date (UTC) of the latest measurement")
    measurement: MeasurementInfo
    lut: list[LutEntry] = Field(default_factory=list)
    overhead: Overhead = Field(default_factory=Overhead)
    calibration: list[CalibrationSample] = Field(default_factory=list)
    probe: ProbeReading | None = Field(default=None, description="machine-state probe of the last calibration")
    validation: list[ValidationSummary] = Field(default_factory=list)
    unit_map: dict[str, list[UnitVariant]] = Field(
        default_factory=dict,
        description="ONNX Runtime only: eager unit key -> the ORT node lists it became, with counts",
    )
    unit_map_format: int = Field(
        default=1,
        ge=1,
        le=3,
        description="1: node lists of exact unit proxies; 2: node templates (ort_map); 3: keys with quantized regions",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        keys = {entry.signature.key() for entry in self.lut}
        for proxy, variants in self.unit_map.items() if self.unit_map_format == 1 else ():
            missing = [k for variant in variants for k in variant.nodes if k not in keys]
            if missing:
                raise ValueError(f"unit_map[{proxy!r}] names {missing[0]}, which has no LUT entry")
        seen: set[str] = set()
        for i, entry in enumerate(self.lut):
            key = entry.signature.key()
            if key in seen:
                raise ValueError(f"lut[{i}]: signature {key} appears twice")
            seen.add(key)
            if entry.signature.dtype not in self.runtime.dtypes:
                raise ValueError(
                    f"lut[{i}]: signature {key} has dtype {entry.signature.dtype!r}, not one of the runtime's "
                    f"dtypes {self.runtime.dtypes}"
                )
        return self

    @cached_property
    def table(self) -> dict[str, LutEntry]:
        """The LUT indexed by signature key (built once; a profile is not edited after loading)."""
        return {entry.signature.key(): entry for entry in self.lut}

    @cached_property
    def families(self) -> dict[str, list[LutEntry]]:
        """LUT entries grouped by :meth:`OpSignature.family` (what interpolation searches)."""
        result: dict[str, list[LutEntry]] = {}
        for entry in self.lut:
            result.setdefault(entry.signature.family(), []).append(entry)
        return result


def parse_profile(data: object, source: str = "<profile>") -> Profile:
    """Validate parsed JSON into a :class:`Profile`; :class:`ProfileError` names the key path and problem."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ProfileError(f"{source}: format_version {version!r} is not supported (this autocompress reads 1)")
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(format_validation_error(source, err)) from None


def content_hash(data: dict) -> str:
    """sha256 of a profile's JSON contents (without :data:`HASH_KEY`), in a canonical form (sorted keys,
    no spaces), so indentation and key order do not matter but every value does."""
    body = {k: v for k, v in data.items() if k != HASH_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read(path: Path) -> tuple[dict, Profile]:
    text = read_text(path, what="profile file", max_bytes=MAX_PROFILE_BYTES, error=ProfileError)
    data = load_json(text, str(path), error=ProfileError)
    body = {k: v for k, v in data.items() if k != HASH_KEY} if isinstance(data, dict) else data
    return data, parse_profile(body, str(path))


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile JSON file (a path, or the id of a shipped profile), and check its
    content hash; a file whose hash is missing or wrong raises :class:`ProfileError` naming it."""
    path = resolve_profile_path(path)
    data, profile = _read(path)
    recorded = data.get(HASH_KEY)
    if recorded is None:
        raise ProfileError(
            f"{path}: no {HASH_KEY} (written before profiles carried one, or assembled by hand): measure it "
            f"again, or run `autocompress profile rehash {path}` if you trust its contents"
        )
    if recorded != content_hash(data):
        raise ProfileError(
            f"{path}: {HASH_KEY} does not match its contents (changed since it was written: corrupted or "
            f"edited); measure it again, or run `autocompress profile rehash {path}` if the change is yours"
        )
    return profile


def rehash_profile(path: str | Path) -> Path:
    """Validate the profile file at ``path`` and write it again with the hash of its current contents."""
    path = Path(path)
    _, profile = _read(path)
    return save_profile(profile, path)


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` with its content hash, atomically (temp file + rename): a kill mid-write leaves
    the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = profile.model_dump(mode="json")
    data[HASH_KEY] = content_hash(data)
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


def shipped_profiles() -> dict[str, Path]:
    """The profiles shipped with autocompress (package data), by id (the file name without ``.json``)."""
    folder = resources.files("autocompress.hw_profiles")
    return {
        entry.name[: -len(".json")]: Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".json")
    }


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A profile file: an existing path, or the id of a shipped profile; else :class:`ProfileError`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_profiles()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    known = ", ".join(shipped) or "none"
    raise ProfileError(f"{name_or_path}: no such profile file, nor a shipped profile id (shipped: {known})")
