"""What a runtime is to autocompress, and the registry that finds one by name.

A runtime executes candidates: it turns a compressed, plain model into something runnable
(:meth:`Runtime.deploy`), times it (:meth:`Runtime.measure`), and tells ``profile measure`` which
operator units the model executes there and how to time each alone (:meth:`Runtime.units`).
Everything else (the config's ``latency.runtime``, the profile's ``runtime.name``, the CLI's
``--runtime``) names a runtime by :attr:`Runtime.name` and goes through :func:`get_runtime`.

Adding a runtime: one module that defines a :class:`Runtime` subclass and calls :func:`register`
on an instance, listed in :data:`BUILTIN_MODULES`. The built-in modules are imported on the first
registry query, not when this package is imported: they pull in torch, ONNX and the profile
tools, which themselves name runtimes, so importing them eagerly would tie every one of those
modules into an import cycle.
"""

from __future__ import annotations

import importlib
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autocompress.errors import AutocompressError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autocompress.evaluators.latency import Latency
    from autocompress.hw_profiles.profile import OpSignature, UnitVariant
    from autocompress.inputs import Inputs

BUILTIN_MODULES = ("autocompress.runtimes.torch_eager", "autocompress.runtimes.onnxruntime")
"""Modules that register the runtimes shipped with autocompress (imported on the first query)."""

DTYPE_OF_BITS = {32: "fp32", 8: "int8"}
"""Kernel bit-width -> the dtype name profiles use for it."""

PROFILE_CALIBRATION_BATCHES = 2

Timed = Callable[[], object]


class UnknownRuntime(AutocompressError, ValueError):
    """No runtime is registered under a name; the message names the known ones.

    A ``ValueError`` too, so pydantic validators (config, profile files) report it as a field error.
    """


@dataclass(frozen=True)
class ProfileUnit:
    """One operator unit a model executes on a runtime: its LUT signature and how to time it alone.

    ``build`` makes the timed callable (only called for signatures the profile lacks: building can
    cost a session or a module); ``source`` is the runtime's own record of the unit (an ORT node),
    for :meth:`Runtime.learn`.
    """

    signature: OpSignature
    build: Callable[[], Timed]
    source: Any = None


class Runtime(ABC):
    """A runtime candidates are deployed to, timed on and profiled for.

    Class attributes: :attr:`name` (the one name configs, profiles and the CLI use), :attr:`aliases`
    (older spellings still accepted), :attr:`package` (the distribution whose version it reports),
    :attr:`kernel_bits` (weight bit-widths with real kernels, 32 = fp32) and :attr:`structural`.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    package: ClassVar[str]
    kernel_bits: ClassVar[tuple[int, ...]] = (32,)
    structural: ClassVar[bool] = False
    """True when :meth:`units` reads the model's structure alone (milliseconds, no deployment; a
    ``meta``-device model will do): then ``profile measure`` enumerates every candidate of the space
    and the predictor needs no unit map."""

    # --- identity -------------------------------------------------------------------------------

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtype names of :attr:`kernel_bits` (``fp32``, ``int8``), as a profile records them."""
        return tuple(DTYPE_OF_BITS[b] for b in self.kernel_bits)

    @property
    def int8_kernels(self) -> bool:
        """Whether 8-bit layers run integer kernels here (and so are a latency dimension)."""
        return 8 in self.kernel_bits

    @abstractmethod
    def version(self) -> str:
        """The installed version of the runtime, exactly as profiles record it."""

    @abstractmethod
    def device(self) -> str:
        """What executes candidates and with which kernels (the part of :meth:`describe` after the version)."""

    def describe(self) -> str:
        """One line naming the runtime, its version and device (logged with every search)."""
        return f"{self.package} {self.version()} {self.device()}"

    # --- deployment and timing ------------------------------------------------------------------

    @abstractmethod
    def deploy(
        self,
        model: nn.Module,
        bits: dict[str, int],
        example_input: Inputs,
        calibration: Iterable,
        workdir: str | Path,
        threads: int = 1,
        *,
        modes: dict[str, str] | None = None,
    ) -> Any:
        """What executes ``model`` here, callable like an eval-mode module (files go under ``workdir``).

        ``bits`` maps Conv/Linear layers to bit-widths; layers at a width in :attr:`kernel_bits`
        other than 32 run those kernels, the way ``modes`` says where a runtime has several
        (ONNX Runtime's int8: ``static`` or ``dynamic``). ``example_input`` and the batches are
        :mod:`autocompress.inputs` pytrees. ``calibration`` (inputs or ``(inputs, target)`` pairs)
        sets activation ranges where the runtime quantizes them; ``threads`` is the intra-op thread
        count for runtimes that fix it when the model is loaded.
        """

    def int8_layers(self, runnable: Any, model: nn.Module) -> list[str]:
        """The layers of ``model`` that run on integer kernels in ``runnable`` (its :meth:`deploy` result),
        read from what the runtime executes, not from the plan. Default: none (no int8 kernels)."""
        return []

    def artifact(self, runnable: Any, workdir: str | Path) -> Path:
        """The file a :meth:`deploy` result ships as (written under ``workdir`` if it is not a file yet):
        what the zipped artifact size measures. Default: the module's ``state_dict`` saved with torch."""
        import torch

        path = Path(workdir) / "state_dict.pt"
        torch.save(runnable.state_dict(), path)
        return path

    def measure(
        self, runnable: Any, example_input: Inputs, *, threads: int = 1, warmup: int = 10, repeats: int = 50
    ) -> Latency:
        """Time a :meth:`deploy` result on ``example_input`` (any pytree; median and p90 of ``repeats`` runs)."""
        from autocompress.evaluators.latency import measure_latency

        return measure_latency(runnable, example_input, threads=threads, warmup=warmup, repeats=repeats)

    # --- what profiles need ---------------------------------------------------------------------

    @abstractmethod
    def units(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> list[ProfileUnit]:
        """The operator units ``model`` executes here, in order (``bits``: int8 where 8, if it matters)."""

    def signatures(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> list[OpSignature]:
        """The LUT signatures of :meth:`units`."""
        return [unit.signature for unit in self.units(model, example_input, bits, threads)]

    def learn(
        self,
        unit_map: dict[str, list[UnitVariant]],
        model: nn.Module,
        input_shape: Sequence[int],
        bits: dict[str, int] | None,
        units: Sequence[ProfileUnit],
    ) -> int:
        """Teach a profile's unit map what ``units`` show (in place); return the number of new keys.

        A runtime whose units need a deployment keeps a map from the model's structural units to
        its own, so predictions need not deploy; a :attr:`structural` runtime has nothing to learn.
        """
        return 0

    @contextmanager
    def end_to_end(
        self, model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None, threads: int
    ) -> Iterator[Timed]:
        """A callable running the whole deployed model once on ``example_input``, valid in the block.

        Deployed in a temporary directory with :func:`profile_calibration` batches: calibration
        ranges change the values computed, not the kernels or their cost.
        """
        from autocompress.inputs import call

        with tempfile.TemporaryDirectory(prefix="autocompress-profile-") as tmp:
            calibration = profile_calibration(example_input)
            runnable = self.deploy(model, dict(bits or {}), example_input, calibration, tmp, threads)
            yield lambda: call(runnable, example_input)

    @contextmanager
    def timing(self, threads: int) -> Iterator[None]:
        """The process state profile measurements run in: torch intra-op threads fixed."""
        from autocompress.evaluators.latency import torch_threads

        with torch_threads(threads):
            yield

    def __repr__(self) -> str:
        return f"<runtime {self.name}>"


def profile_calibration(example_input: Inputs) -> list[Inputs]:
    """Calibration batches of the example's structure (fixed seed) for deployments a profile times:
    float tensors random normal of their shape, other tensors (token ids, masks) the example's own
    values, since random ids could fall outside a vocabulary."""
    import torch

    from autocompress.inputs import map_tensors

    generator = torch.Generator().manual_seed(0)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator) if t.is_floating_point() else t.clone()

    return [map_tensors(example_input, fresh) for _ in range(PROFILE_CALIBRATION_BATCHES)]


# --- the registry ----------------------------------------------------------------------------

_RUNTIMES: dict[str, Runtime] = {}
_ALIASES: dict[str, str] = {}
_LOADED = False


def register(runtime: Runtime) -> Runtime:
    """Make ``runtime`` findable by its name and aliases; return it. A taken name raises ``ValueError``."""
    for name in (runtime.name, *runtime.aliases):
        taken = _RUNTIMES.get(name) or _RUNTIMES.get(_ALIASES.get(name, ""))
        if taken is not None and taken is not runtime:
            raise ValueError(f"runtime name {name!r} is already registered for {taken!r}")
    _RUNTIMES[runtime.name] = runtime
    _ALIASES.update(dict.fromkeys(runtime.aliases, runtime.name))
    return runtime


def _registry() -> dict[str, Runtime]:
    global _LOADED
    if not _LOADED:
        _LOADED = True  # set first: a built-in module may query the registry while it imports
        try:
            for module in BUILTIN_MODULES:
                importlib.import_module(module)
        except BaseException:
            _LOADED = False
            raise
    return _RUNTIMES


def runtime_names() -> tuple[str, ...]:
    """The registered runtimes' names (aliases excluded): the built-in ones in :data:`BUILTIN_MODULES`
    order (whichever was imported first), then others in registration order."""
    runtimes = _registry()

    def rank(name: str) -> int:
        module = type(runtimes[name]).__module__
        return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)

    return tuple(sorted(runtimes, key=rank))  # stable: registration order within a rank


def canonical_name(name: str) -> str:
    """``name`` if it is a registered runtime, the runtime an alias stands for (``torch`` ->
    ``torch-eager``); :class:`UnknownRuntime` naming the choices otherwise."""
    if name in _registry():
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise UnknownRuntime(f"unknown runtime {name!r}: use one of {', '.join(runtime_names())}")


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name`` (or an alias of it); :class:`UnknownRuntime` naming the known ones."""
    return _registry()[canonical_name(name)]
