"""Experiment schema: YAML file -> validated :class:`Experiment`, with one-line errors.

Every section has defaults, so a minimal experiment file is ``name:`` and ``task:``. Relative
paths (output directory, checkpoints, storage files) resolve against the current directory,
like the paths given to any command-line tool.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from autocompress.documents import format_validation_error, load_yaml, read_text, short_repr
from autocompress.errors import ConfigError
from autocompress.runtimes import canonical_name
from autocompress.techniques.base import Section, Stage

OBJECTIVES = ("metric", "latency", "size", "compressed_size")
OBJECTIVE_ALIASES = {"accuracy": "metric"}  # the quality objective's name before tasks had other metrics
MAX_EXPERIMENT_BYTES = 1 << 20
"""Experiment files above 1 MiB are refused unread (a real one is a few hundred bytes)."""
MAX_SEED = 2**32 - 1
"""Seeds are 0..2**32-1: what NumPy's and Optuna's generators accept."""


_Section = Section  # forbid: a misspelt key must be an error, not a silently ignored setting


class TaskConfig(_Section):
    """Which data, model and metric: a built-in task name or ``package.module:function``."""

    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The arguments are the task's own, untyped here; a NaN among them is still never meant
        # (and would make the teacher's cache key differ from run to run).
        stack: list[tuple[str, Any]] = [(str(k), v) for k, v in value.items()]
        while stack:
            where, item = stack.pop()
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{where} is {item}: numbers must be finite")
            if isinstance(item, dict):
                stack.extend((f"{where}.{k}", v) for k, v in item.items())
            elif isinstance(item, list):
                stack.extend((f"{where}.{i}", v) for i, v in enumerate(item))
        return value

    @field_validator("name")
    @classmethod
    def _known_or_importable(cls, value: str) -> str:
        from autocompress.tasks import BUILTIN_TASKS

        if value in BUILTIN_TASKS:
            return value
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            return value
        raise ValueError(
            f"unknown task {value!r}: use a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
            "or 'package.module:function'"
        )


OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"weight_decay": 5e-4},
    "adamw": {"lr": 1e-4, "weight_decay": 0.01},
}
"""Per-optimizer defaults where neither the experiment nor the task sets a value (SGD's lr is per section)."""


class _TrainingSection(_Section):
    """Optimizer settings shared by the teacher's training and the fine-tune; ``None`` means the task's
    suggestion (``Task.finetune_defaults``) or else the optimizer's default."""

    optimizer: Literal["sgd", "adamw"] | None = None
    lr: float | None = Field(default=None, gt=0, le=10)
    weight_decay: float | None = Field(default=None, ge=0, le=1)
    warmup: float | None = Field(default=None, ge=0, lt=1, description="fraction of the steps with a linear warm-up")

    def optimizer_settings(self, task_defaults: dict[str, Any] | None = None, sgd_lr: float = 0.02) -> dict[str, Any]:
        """``name``, ``lr``, ``weight_decay``, ``warmup``: this section's values, else the task's, else defaults."""
        suggested = dict(task_defaults or {})
        name = self.optimizer or suggested.get("optimizer", "sgd")
        defaults = {"lr": sgd_lr, "warmup": 0.0, **OPTIMIZER_DEFAULTS[name]}
        if name != suggested.get("optimizer", "sgd"):
            suggested = {}  # the task's lr suits its own optimizer choice, not the one the experiment picked
        resolved = {"name": name}
        for key in ("lr", "weight_decay", "warmup"):
            value = getattr(self, key)
            resolved[key] = float(value if value is not None else suggested.get(key, defaults[key]))
        return resolved


class TeacherConfig(_TrainingSection):
    """How to get the uncompressed model: load ``checkpoint`` (a state_dict), train it, or with
    ``epochs: 0`` use the task's (pretrained) model as it is."""

    checkpoint: Path | None = None
    epochs: int = Field(default=15, ge=0, le=10_000)
    batch_size: int = Field(default=64, ge=1)

    def optimizer_settings(self, task_defaults: dict[str, Any] | None = None, sgd_lr: float = 0.05) -> dict[str, Any]:
        """As for the fine-tune, with the teacher's own SGD learning rate (0.05) by default."""
        return super().optimizer_settings(task_defaults, sgd_lr)

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"checkpoint file {str(value)!r} does not exist")
        return value


class _SpaceBase(_Section):
    """What the search may change, and on which layers (fnmatch globs on module names)."""

    include: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)


def _space_config() -> type[_SpaceBase]:
    """``space``: the layer globs plus one section per registered technique (its ``config_key``)."""
    from autocompress.techniques import techniques

    sections: dict[str, Any] = {
        t.config_key: (t.config_model, Field(default_factory=t.config_model)) for t in techniques()
    }
    return create_model("SpaceConfig", __base__=_SpaceBase, __doc__=_SpaceBase.__doc__, **sections)


SpaceConfig = _space_config()


class FinetuneConfig(_TrainingSection):
    """The short (distillation) fine-tune every candidate gets before it is scored."""

    epochs: int = Field(default=3, ge=0, le=1000)
    batch_size: int = Field(default=64, ge=1)
    # Optional intermediate-feature distillation (FitNets): student outputs of these layers are
    # pulled towards the teacher's through a learned 1x1 adapter (pruning changes their width).
    feature_layers: list[str] = Field(default_factory=list)
    feature_weight: float = Field(default=0.0, ge=0)


class LatencyConfig(_Section):
    """Where and how candidates are measured on this host: runtime, threads, warm-up, repeats.

    ``runtime`` is a registered runtime (:mod:`autocompress.runtimes`); accuracy *and* latency are
    measured on what it deploys. ``onnxruntime``: each candidate is exported to ONNX, its 8-bit layers
    really quantized (int8 kernels). ``torch-eager`` (formerly ``torch``, still accepted): the
    compressed model runs in eager fp32 (bit-widths then only round weights and count to size).
    """

    runtime: str = Field(default="onnxruntime", description="a registered runtime; aliases become its name")
    measure_host: bool = Field(
        default=True, description="measure every candidate here (profile 'host'); false: hardware profiles only"
    )
    threads: int = Field(default=1, ge=1, le=256)
    batch_size: int = Field(default=1, ge=1)
    warmup: int = Field(default=10, ge=0)
    repeats: int = Field(default=50, ge=3)

    @field_validator("runtime")
    @classmethod
    def _registered(cls, value: str) -> str:
        # Normalised here so the rest of autocompress compares and logs one name per runtime.
        return canonical_name(value)


class ConstraintsConfig(_Section):
    """Budgets a candidate must meet to be feasible; infeasible trials still teach the sampler.

    ``min_metric`` / ``max_metric`` bound the task's metric in its own units (no range is assumed),
    whichever its direction; ``min_accuracy`` is still accepted for ``min_metric``.
    """

    max_latency_ms: float | None = Field(default=None, gt=0, description="on the primary profile")
    min_metric: float | None = Field(default=None, description="the task's metric at least this")
    max_metric: float | None = Field(default=None, description="the task's metric at most this")
    max_size_mb: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_accuracy" in data:
            data = dict(data)
            if "min_metric" in data:
                raise ValueError("min_accuracy is the old name of min_metric: set only min_metric")
            data["min_metric"] = data.pop("min_accuracy")
        return data

    @model_validator(mode="after")
    def _bounds_meet(self) -> ConstraintsConfig:
        if self.min_metric is not None and self.max_metric is not None and self.min_metric > self.max_metric:
            raise ValueError(
                f"min_metric {self.min_metric:g} > max_metric {self.max_metric:g}: no candidate could be feasible"
            )
        return self


class EarlyStopConfig(_Section):
    """Stop a trial's fine-tune when its intermediate metric shows it cannot reach the front."""

    enabled: bool = True
    margin: float | None = Field(
        default=None,
        ge=0,
        description="how far past the bar (in metric units) a trial's best case is still let through; "
        "default 5% of the teacher's |metric|",
    )
    min_epochs: int = Field(default=1, ge=1, description="epochs before a trial may be stopped")


class RayConfig(_Section):
    """Ray Tune backend: where to run and how many resources a trial takes."""

    address: str | None = Field(default=None, description="existing cluster ('auto' or ray://...); local if unset")
    cpus_per_trial: float = Field(default=1.0, gt=0)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    asha_grace_period: int = Field(default=1, ge=1, description="epochs before ASHA may stop a trial")
    asha_reduction_factor: int = Field(default=2, ge=2)


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
"""Optuna storages: SQLAlchemy URLs of these databases (a driver may follow, ``postgresql+psycopg2``)."""
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql")
"""MLflow stores: a database, or a tracking server. MLflow's file store (``file://``, a bare path) is not
used: its runs could not be searched the way the fronts are read back."""


def check_url(url: str | None, schemes: tuple[str, ...]) -> str | None:
    """``url`` if its scheme is one of ``schemes`` and it names a place (a SQLite file path, a host);
    else ``ValueError`` naming the schemes accepted."""
    if url is None:
        return None
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0].lower()
    accepted = ", ".join(f"{s}://" for s in schemes)
    if not sep or base not in schemes or (base in ("http", "https") and "+" in scheme):
        raise ValueError(f"{short_repr(url)} has an unsupported scheme; use one of {accepted}")
    if base == "sqlite":
        path = rest.split("?", 1)[0]
        if not path.startswith("/") or path == "/":
            raise ValueError(f"{short_repr(url)}: a SQLite URL names a file, as in sqlite:///runs/study.db")
    elif base in ("http", "https") and not rest.split("/", 1)[0]:
        raise ValueError(f"{short_repr(url)} names no host")
    elif not rest:  # postgresql:///db is a local socket; postgresql:// alone names nothing
        raise ValueError(f"{short_repr(url)} names no database")
    return url


class SearchConfig(_Section):
    """The search controller: backend, sampler, budget, and where the study is stored."""

    backend: Literal["optuna", "ray"] = "optuna"
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    n_trials: int = Field(default=30, ge=1)
    timeout: float | None = Field(default=None, gt=0, description="seconds")
    population_size: int = Field(default=10, ge=2)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="defaults to the experiment seed")
    storage: str | None = Field(default=None, description="RDB URL; default sqlite in output_dir")
    study_name: str | None = None
    workers: int = Field(default=1, ge=1, description="trial processes sharing the study's storage")
    primary_profile: str | None = Field(
        default=None,
        description="profile the optimizer steers on and budgets apply to: 'host' or one of profiles "
        "(default: host when latency.measure_host, else the first profile)",
    )
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("storage")
    @classmethod
    def _rdb_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"storage {short_repr(value)} is not a database URL (e.g. 'sqlite:///study.db')")
        return check_url(value, STORAGE_SCHEMES)


class TrackingConfig(_Section):
    """Where MLflow records the experiment; default a SQLite store under ``runs/``."""

    uri: str | None = None
    experiment: str | None = Field(default=None, description="MLflow experiment name; default: name")

    @field_validator("uri")
    @classmethod
    def _supported(cls, value: str | None) -> str | None:
        return check_url(value, TRACKING_SCHEMES)


class Experiment(_Section):
    """One compression experiment: everything a search needs, validated."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    output_dir: Path | None = None
    task: TaskConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)  # type: ignore[valid-type]
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    # compressed_size: the deployed file zipped (what sparsity and low-entropy weights shrink).
    # metric: the task's metric, in its direction ('accuracy' is still accepted for it).
    objectives: list[Literal["metric", "latency", "size", "compressed_size"]] = Field(
        default_factory=lambda: ["metric", "latency", "size"]
    )
    # Hardware profiles (shipped ids or JSON paths): every trial's latency is also predicted from
    # each one's lookup table, and each gets a front of its own.
    profiles: list[str] = Field(default_factory=list)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_aliases(cls, value: Any) -> Any:
        # Old experiment files name the quality objective 'accuracy'; one name is used from here on.
        if isinstance(value, list):
            return [OBJECTIVE_ALIASES.get(o, o) if isinstance(o, str) else o for o in value]
        return value

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[str]) -> list[str]:
        if "metric" not in value:
            raise ValueError(f"objectives {value} must include 'metric' (the task's metric; alias 'accuracy')")
        if len(value) < 2:
            raise ValueError("objectives need 'metric' and at least one of 'latency', 'size', 'compressed_size'")
        if len(set(value)) != len(value):
            raise ValueError(f"objectives {value} repeat an entry")
        return value

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, value: list[str]) -> list[str]:
        from autocompress.hw_profiles.profile import ProfileError, resolve_profile_path

        ids = [profile_id(p) for p in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"profiles {value} name a profile twice (latencies are logged by profile name)")
        for name in value:
            if name == "host":
                raise ValueError(
                    "profiles: 'host' is this machine, measured (latency.measure_host), not a profile file"
                )
            try:
                resolve_profile_path(name)  # a missing profile is an error now, not after the teacher is trained
            except ProfileError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _something_to_search(self) -> Experiment:
        from autocompress.techniques import techniques

        compressing = [t for t in techniques() if t.stage < Stage.FINETUNE]
        if not any(t.enabled(getattr(self.space, t.config_key)) for t in compressing):
            raise ValueError(f"space: enable at least one of {', '.join(t.config_key for t in compressing)}")
        if not self.latency.measure_host and not self.profiles:
            raise ValueError("latency.measure_host is false and no profiles are named: nothing would give a latency")
        primary = self.search.primary_profile
        if primary is not None and primary not in self.profile_names:
            raise ValueError(
                f"search.primary_profile {primary!r} is not scored; choose one of {', '.join(self.profile_names)}"
            )
        return self

    @property
    def profile_names(self) -> list[str]:
        """Every latency profile a trial is scored on: 'host' (if measured) and the named profiles."""
        return (["host"] if self.latency.measure_host else []) + [profile_id(p) for p in self.profiles]

    @property
    def primary(self) -> str:
        """The profile the optimizer steers on and the budgets apply to."""
        return self.search.primary_profile or self.profile_names[0]

    # Derived locations: one place decides where outputs go.
    @property
    def out_dir(self) -> Path:
        """Directory for this experiment's study database and artifacts."""
        return (self.output_dir or Path("runs") / self.name).resolve()

    @property
    def storage_url(self) -> str:
        """Optuna storage URL (SQLite in the output directory unless configured)."""
        return self.search.storage or f"sqlite:///{self.out_dir / 'study.db'}"

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI (a SQLite store shared by all experiments under ``runs/``)."""
        return self.tracking.uri or f"sqlite:///{(self.out_dir.parent / 'mlflow.db')}"

    @property
    def artifact_root(self) -> Path:
        """Where MLflow stores artifacts for a local tracking store."""
        return self.out_dir.parent / "mlartifacts"

    @property
    def search_seed(self) -> int:
        return self.seed if self.search.seed is None else self.search.seed


def check_locations(exp: Experiment) -> None:
    """Refuse, in one line naming the key, an output directory or SQLite store the search could not
    write: a path that is a file, lies under a file, or sits in a directory this user cannot write.

    Cheap and without side effects (nothing is created): ``validate`` and ``search`` call it before
    the task is loaded. The search creates ``output_dir`` and its parents; MLflow creates the
    directories of its SQLite file, Optuna does not, so a study file needs an existing directory
    (or one inside what the search creates).
    """
    out_key = "output_dir" if exp.output_dir is not None else f"output_dir (default runs/{exp.name})"
    out = _resolve(out_key, exp.output_dir or Path("runs") / exp.name)
    created = {out, *out.parents}
    _check_place(out_key, out, directory=True, created=created)
    for key, url, makes_parents in (
        ("search.storage", exp.storage_url, False),
        ("tracking.uri", exp.tracking_uri, True),
    ):
        if not url.startswith("sqlite:///"):
            continue  # a server or database elsewhere: nothing to check on this file system
        path = Path(url[len("sqlite:///") :].split("?", 1)[0])
        if key == "search.storage" and exp.search.storage is None:
            key = "search.storage (default <output_dir>/study.db)"
        elif key == "tracking.uri" and exp.tracking.uri is None:
            key = "tracking.uri (default mlflow.db beside output_dir)"
        _check_place(key, _resolve(key, path), directory=False, created=created if not makes_parents else None)


def _resolve(key: str, path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError) as err:  # a symlink loop, an embedded NUL byte
        raise ConfigError(f"{key}: {short_repr(str(path))} is not a usable path ({err})") from None


def _check_place(key: str, path: Path, *, directory: bool, created: set[Path] | None) -> None:
    # ``created``: directories that will exist by the time ``path`` is opened (None: any are made).
    kind = "directory" if directory else "file"
    try:
        if path.exists():
            if path.is_dir() != directory:
                raise ConfigError(f"{key}: {path} is a {'file' if directory else 'directory'}, not a {kind}")
            target = path if directory else path.parent
            if not os.access(path, os.W_OK) or not os.access(target, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}: {path} is not writable by this user")
            return
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{key}: {path} lies under {ancestor}, which is a file")
        if not directory and created is not None and path.parent not in created and ancestor != path.parent:
            raise ConfigError(
                f"{key}: the directory {path.parent} does not exist (create it, or store the file elsewhere)"
            )
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: cannot create {path}: {ancestor} is not writable by this user")
    except (OSError, ValueError) as err:  # a name too long, an embedded NUL byte
        raise ConfigError(f"{key}: {short_repr(str(path))} is not a usable path ({err})") from None


def profile_id(name_or_path: str) -> str:
    """The name a profile's latencies are logged under: a shipped id as is, a file by its stem."""
    return Path(name_or_path).stem if name_or_path.endswith(".json") else name_or_path


def parse_experiment(data: Any, source: str = "<experiment>") -> Experiment:
    """Validate a mapping (e.g. parsed YAML) into an :class:`Experiment`.

    Raises :class:`ConfigError` with one line naming the key path and the problem.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the experiment must be a mapping of keys, got {type(data).__name__}")
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted keys set (``{"search.n_trials": 5}``)."""
    result = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {key!r} is not a section")
            node = child
        node[leaf] = value
    return result


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and validate an experiment YAML file; ``overrides`` are dotted keys applied first.

    Every problem, from an unreadable or binary file to a bad value, raises :class:`ConfigError`
    with one line naming the file and the key.
    """
    path = Path(path)
    text = read_text(path, what="experiment file", max_bytes=MAX_EXPERIMENT_BYTES, error=ConfigError)
    data = load_yaml(text, str(path), error=ConfigError)
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the experiment must be a mapping of keys")
        data = apply_overrides(data, overrides)
    return parse_experiment(data, source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value`` (value read as YAML, so ``5``, ``true``, ``[1, 2]`` work)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {short_repr(text)}: expected KEY=VALUE, e.g. search.n_trials=5")
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {short_repr(text)}: {short_repr(key)} has an empty part; use dotted keys like a.b")
    # The same loader and limits as the files: a value is a small YAML document.
    return key, load_yaml(raw, f"--set {short_repr(key)}", error=ConfigError)
