"""Quantization simulated during search: per-channel weight fake-quant and calibrated activation fake-quant.

Weights: a torch parametrization wraps each chosen layer's weight in ``torch.fake_quantize_per_channel_affine``
(a core op with a straight-through gradient), so the distillation fine-tune trains *through*
the quantization (QAT) and the scored accuracy is the quantized model's. :func:`bake_weights`
removes the wrappers and leaves the rounded weights in plain fp32 modules.

Activations: :func:`attach_activation_quant` puts per-tensor fake-quant, calibrated with MinMax observers
on real batches, where ONNX Runtime's static QDQ int8 quantization (:mod:`autocompress.compress.deploy`)
quantizes: the input of each chosen Conv/Linear layer and its output after the BatchNorm/ReLU fused into
it. Same scheme as ORT: asymmetric uint8, scale and zero point from the global min/max of one calibration
pass over the float model (torch's ``MinMaxObserver`` computes them with ORT's formula), rounding half
to even (``torch.fake_quantize_per_tensor_affine``, no hand-written rounding). Symmetric per-channel int8
weights (``PerChannelWeightFakeQuant`` at 8 bits) are exactly ORT's weight scheme, and per-channel
symmetric rounding commutes with the per-channel scaling of a folded BatchNorm, so the simulation keeps BN
unfolded. The simulated and the real int8 logits then differ by rounding noise only.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import platform
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver
from torch.nn.utils import parametrize

from autocompress import inputs as pytree
from autocompress.inputs import Inputs

FP32 = 32
INPUT_QUANT = "input_quant"
"""Child module of a layer that fake-quantizes the layer's input (see :func:`attach_activation_quant`)."""
OUTPUT_QUANT = "output_quant"
"""Child module that fake-quantizes its parent's output (a layer's int8 output, see :func:`output_points`)."""
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACTIVATION_QUANTIZABLE = (*CONV_LAYERS, nn.Linear)
FOLDED_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Folded into a preceding Conv by the ONNX exporter."""
FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
"""Removed by ORT's QDQ quantizer after an int8 Conv/Gemm (the output's range starts at 0 instead)."""


REDUCE_RANGE_ENV = "AUTOCOMPRESS_INT8_REDUCE_RANGE"
"""``1``/``0`` forces or forbids 7-bit int8 weights whatever the CPU (tests use it to cover both)."""
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@functools.cache
def int8_weight_qmax() -> int:
    """The largest int8 weight magnitude ONNX Runtime's CPU kernels multiply exactly on this host.

    ORT multiplies uint8 activations by int8 weights with ``vpmaddubsw`` on x86 CPUs without VNNI,
    which adds pairs of products into int16 with saturation: 255 * 127 * 2 overflows, so on such a
    CPU an all-int8 model's predictions disagree with its own simulation. ORT's remedy is
    ``reduce_range`` (weights in [-64, 64]); the weight fake-quant of an 8-bit layer then uses the
    same range, so simulation and deployment stay identical. 127 on CPUs with VNNI (``vpdpbusd``
    accumulates in int32) and off x86.
    """
    forced = os.environ.get(REDUCE_RANGE_ENV)
    if forced in ("0", "1"):
        return 64 if forced == "1" else 127
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 127
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return 127  # not Linux: assume a current CPU
    return 127 if _VNNI_FLAGS & set(flags) else 64


def weight_qmax(bits: int) -> int:
    """Symmetric integer range of a ``bits``-wide weight: ``2**(bits-1) - 1``, except 8 bits on a CPU
    whose int8 kernels need a reduced range (:func:`int8_weight_qmax`)."""
    return int8_weight_qmax() if bits == 8 else 2 ** (bits - 1) - 1


class PerChannelWeightFakeQuant(nn.Module):
    """Symmetric per-output-channel fake quantization of a weight to ``bits`` (2..8)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits={bits}: fake-quant supports 2..8 bits")
        self.bits = bits
        self.qmax = weight_qmax(bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        reduce_dims = tuple(range(1, weight.dim()))
        # Scale from the current weight (detached: the op has no gradient w.r.t. scale).
        scale = weight.detach().abs().amax(dim=reduce_dims).clamp_min(1e-12) / self.qmax
        zero_point = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, -self.qmax, self.qmax)


def attach_weight_quant(model: nn.Module, bits: dict[str, int]) -> list[str]:
    """Wrap the weight of each named layer whose bit-width is below 32; return the wrapped names.

    A named layer that does not exist or has no weight tensor is skipped with a warning naming it.
    """
    modules = dict(model.named_modules())
    wrapped = []
    for name, b in bits.items():
        if b >= FP32:
            continue
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            reason = "no such layer" if module is None else f"{type(module).__name__} has no weight tensor"
            warnings.warn(f"quantize: skipping {name!r}: {reason}", stacklevel=2)
            continue
        parametrize.register_parametrization(module, "weight", PerChannelWeightFakeQuant(b))
        wrapped.append(name)
    return wrapped


def bake_weights(model: nn.Module) -> None:
    """Replace fake-quant wrappers by the quantized weights they produce (in place)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with weight fake-quant baked and activation fake-quant removed.

    The original keeps its quantizers. Torch deep-copies a parametrized module with the *same* generated
    class, and removing a parametrization deletes the weight property from that class, which would break
    the original; so each copied parametrized module first gets its own equivalent class.
    """
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            cls = module.__class__
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    bake_weights(plain)
    remove_activation_quant(plain)
    return plain


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric (affine, unsigned) fake quantization of an activation to ``bits`` (2..8).

    Two phases: while ``calibrating`` it only records the min/max of what passes through (a torch
    ``MinMaxObserver``, global over all calibration batches, like ORT's default MinMax calibrator) and
    returns the input unchanged; :meth:`freeze` turns the range into a scale and zero point (range widened
    to include 0, as both torch and ORT do) and from then on the forward is
    ``torch.fake_quantize_per_tensor_affine`` (straight-through gradient inside the range, so it can be
    fine-tuned through).
    """

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits={bits}: activation fake-quant supports 2..8 bits")
        self.bits = bits
        self.quant_min, self.quant_max = 0, 2**bits - 1
        self.observer = MinMaxObserver(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=self.quant_min, quant_max=self.quant_max
        )
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.calibrating = True

    def freeze(self) -> None:
        """End calibration: fix scale and zero point from the observed range; fails if nothing was observed."""
        if not torch.isfinite(self.observer.min_val) or not torch.isfinite(self.observer.max_val):
            raise RuntimeError("activation fake-quant was never calibrated: no batch reached this layer")
        scale, zero_point = self.observer.calculate_qparams()
        self.scale = scale.reshape(()).to(torch.float32)
        self.zero_point = zero_point.reshape(()).to(torch.int32)
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observer(x.detach())
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        if self.calibrating:
            return f"bits={self.bits}, calibrating"
        return f"bits={self.bits}, scale={self.scale.item():.6g}, zero_point={self.zero_point.item()}"


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    # Module-level hooks (not closures or bound methods) so that deep copies of the model keep working
    # hooks: each finds the fake-quant as a child of whichever module copy it runs on.
    return (getattr(module, INPUT_QUANT)(args[0]), *args[1:])


def _quantize_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, OUTPUT_QUANT)(output)


def batch_inputs(batches: Iterable) -> Iterator[Inputs]:
    """The model inputs of ``batches``: each item is inputs (a tensor, a dict of tensors) or an
    ``(inputs, target)`` pair (:func:`autocompress.inputs.split_batch`)."""
    return pytree.batch_inputs(batches)


def output_points(model: nn.Module, layer_names: Iterable[str], example_input: Inputs) -> dict[str, str]:
    """For each named Conv/Linear layer, the module whose output is that layer's int8 output in ORT.

    The exporter folds a Conv's BatchNorm into it and ORT fuses a following ReLU/ReLU6 into the int8
    kernel, so the int8 output is the one after them. Found with one traced forward pass: the chain
    follows the modules that take the previous output as their input, through BatchNorm (after a Conv),
    and stops after an activation. A module called more than once (a shared ``nn.ReLU``) ends the chain
    before it, and activations applied as functions (``F.relu``) are not seen; in both cases the range
    observed is the pre-activation one, wider than ORT's, so the simulation errs towards coarser steps.
    """
    modules = dict(model.named_modules())
    layers = [name for name in dict.fromkeys(layer_names) if isinstance(modules.get(name), ACTIVATION_QUANTIZABLE)]
    records: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
    handles = []
    for name, module in modules.items():
        if isinstance(module, (ActivationFakeQuant, MinMaxObserver)) or module is model:
            continue

        def record(mod: nn.Module, args: tuple, output: object, name: str = name) -> None:
            if isinstance(output, torch.Tensor):
                records.append((name, args[0] if args and isinstance(args[0], torch.Tensor) else None, output))

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            pytree.call(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    calls: dict[str, int] = {}
    for name, _, _ in records:
        calls[name] = calls.get(name, 0) + 1
    points = {}
    for layer in layers:
        index = next((i for i, (name, _, _) in enumerate(records) if name == layer), None)
        if index is None:
            continue
        fusable = (*FOLDED_NORMS, *FUSED_ACTIVATIONS) if isinstance(modules[layer], CONV_LAYERS) else FUSED_ACTIVATIONS
        point, tensor = layer, records[index][2]
        for name, inp, out in records[index + 1 :]:
            if inp is not tensor:
                continue
            if not isinstance(modules[name], fusable) or calls[name] > 1:
                break
            point, tensor = name, out
            if isinstance(modules[name], FUSED_ACTIVATIONS):
                break
        points[layer] = point
    return points


def attach_activation_quant(
    model: nn.Module, layer_names: Iterable[str], calibration_batches: Iterable, bits: int = 8, outputs: bool = True
) -> list[str]:
    """Fake-quantize the activations that ORT's static int8 quantization quantizes for the named layers.

    Each named Conv/Linear layer gets a fake-quant on its input and, with ``outputs`` (the default), one
    on its output after the BatchNorm and ReLU that ORT fuses into it (:func:`output_points`): ORT's int8
    kernels (``QLinearConv``, ``QGemm``) produce int8, so even an fp32 layer that consumes such an output
    sees a quantized input, and an int8 last layer returns logits rounded to 256 levels.

    The quantizers observe during one pass of the model (eval mode, no gradient) over
    ``calibration_batches`` with none of them active yet, which is how ORT calibrates (on the float
    graph), then are frozen. Quantizers attached earlier stay active during that pass. Batches are input
    tensors or ``(input, target)`` pairs, as a DataLoader yields. Returns the named layers, in model order.
    Raises ``ValueError`` naming a layer that does not exist, is not Conv/Linear or is already quantized.
    """
    modules = dict(model.named_modules())
    names = list(dict.fromkeys(layer_names))
    for name in names:
        module = modules.get(name)
        if not isinstance(module, ACTIVATION_QUANTIZABLE):
            kind = "no such layer" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"activation quant: {name!r} is {kind}, expected a Conv or Linear layer")
        if hasattr(module, INPUT_QUANT):
            raise ValueError(f"activation quant: layer {name!r} already has an input fake-quant")
    if not names:
        return []
    inputs = batch_inputs(calibration_batches)
    first = next(inputs, None)
    if first is None:
        raise ValueError("activation quant: calibration_batches is empty")
    was_training = model.training
    model.eval()
    attached: list[nn.Module] = []
    try:
        for name in names:
            modules[name].add_module(INPUT_QUANT, ActivationFakeQuant(bits))
            modules[name].register_forward_pre_hook(_quantize_input)
            attached.append(modules[name])
        points = output_points(model, names, first) if outputs else {}
        for point in dict.fromkeys(points.values()):
            if not hasattr(modules[point], OUTPUT_QUANT):
                modules[point].add_module(OUTPUT_QUANT, ActivationFakeQuant(bits))
                modules[point].register_forward_hook(_quantize_output)
                attached.append(modules[point])
        with torch.no_grad():
            for x in itertools.chain([first], inputs):
                pytree.call(model, x)
        for module in attached:
            for quantizer in _quantizers(module):
                if quantizer.calibrating:
                    quantizer.freeze()
    except Exception:
        for module in attached:
            _detach(module)
        raise
    finally:
        model.train(was_training)
    wanted = set(names)
    return [name for name in modules if name in wanted]


def _quantizers(module: nn.Module) -> list[ActivationFakeQuant]:
    found = (getattr(module, INPUT_QUANT, None), getattr(module, OUTPUT_QUANT, None))
    return [q for q in found if isinstance(q, ActivationFakeQuant)]


def _detach(module: nn.Module) -> None:
    # Hooks are found by identity in the module's own hook dicts: a RemovableHandle kept from attach time
    # would point at the original module's dict, not at a deep copy's.
    for hooks, hook_fn in ((module._forward_pre_hooks, _quantize_input), (module._forward_hooks, _quantize_output)):
        for hook_id, hook in list(hooks.items()):
            if hook is hook_fn:
                del hooks[hook_id]
    for child in (INPUT_QUANT, OUTPUT_QUANT):
        if hasattr(module, child):
            delattr(module, child)


def remove_activation_quant(model: nn.Module) -> list[str]:
    """Remove all activation fake-quant (inputs and outputs); return the modules that had some."""
    removed = []
    for name, module in list(model.named_modules()):
        if _quantizers(module):
            _detach(module)
            removed.append(name)
    return removed
