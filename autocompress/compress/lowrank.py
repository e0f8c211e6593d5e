"""Low-rank factorization: replace a Linear or convolution by a chain of cheaper layers.

* ``Linear(in, out)`` -> truncated SVD ``W ~= B A``: ``Linear(in, r, bias=False)`` then
  ``Linear(r, out)`` with the original bias; the singular values are split evenly
  (``A = sqrt(S) V^T``, ``B = U sqrt(S)``) so neither factor has an outsized range, which
  matters for the per-channel weight quantization applied afterwards.
* 1x1 (or length-1) convolutions are matrices too: the same SVD as two 1x1 convolutions, the
  first carrying the stride and padding.
* ``kxk`` convolutions (Conv1d and Conv2d, ``groups=1``) -> Tucker-2: ``1x1 in->r_in``,
  ``kxk r_in->r_out`` (the original stride/padding/dilation), ``1x1 r_out->out`` (the original
  bias); the factors are the leading left singular vectors of the mode-0 (output channel) and
  mode-1 (input channel) unfoldings and the core is the weight projected onto them (HOSVD).

Tucker-2 rather than spatial SVD (``kx1`` then ``1xk``): its ranks are channel counts, so the
result is three ordinary convolutions with no new kernel shapes, which every runtime runs well
and which the pruning dependency graph still understands; and at a given fraction it is much
cheaper (for a square 3x3 layer at half rank, 36% of the MACs against spatial SVD's 100%:
spatial SVD only starts saving below half of its full rank). Because the factor subspaces
are nested, the approximation error never grows as the ranks grow.

Ranks are fractions of full rank: ``rank = max(1, round(fraction * full_rank))`` per mode, with
``full_rank = min(rows, cols)`` of the corresponding matrix/unfolding. A layer is only replaced
when that lowers its multiply-accumulates; otherwise (and at fraction 1.0) it is left as is.

MACs are compared per output position. Without an input shape, a convolution's first 1x1
layer is assumed to see ``prod(stride)`` input positions per output position (exact for "same"
padding with sizes divisible by the stride); pass ``input_shape``/``example_input`` for exact
counts. :func:`layer_macs` counts only Linear and convolution MACs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
LAYER_TYPES = (nn.Linear, *CONV_TYPES)


class Factorized(nn.Sequential):
    """A layer replaced by its low-rank factors: children "0", "1" (and "2" for Tucker-2)."""

    def __init__(self, *layers: nn.Module, ranks: tuple[int, ...]) -> None:
        super().__init__(*layers)
        self.ranks = ranks

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


# --- shapes and MACs -------------------------------------------------------------------------


def _kernel_positions(layer: nn.modules.conv._ConvNd) -> int:
    return math.prod(layer.kernel_size)


def _is_pointwise(layer: nn.modules.conv._ConvNd) -> bool:
    return _kernel_positions(layer) == 1


def _conv_output_size(layer: nn.modules.conv._ConvNd, spatial: Sequence[int]) -> tuple[int, ...]:
    if layer.padding == "same":
        return tuple(spatial)
    padding = (0,) * len(spatial) if layer.padding == "valid" else layer.padding
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(spatial, padding, layer.dilation, layer.kernel_size, layer.stride, strict=True)
    )


def _output_shape(layer: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return (*input_shape[:-1], layer.weight.shape[0])
    return (layer.weight.shape[0], *_conv_output_size(layer, input_shape[1:]))


def layer_macs(layer: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one example through ``layer`` (input shape without the batch).

    ``layer`` is a Linear (``input_shape`` ``(..., in)``: every leading position counts), a
    Conv1d/Conv2d (``(C, L)`` / ``(C, H, W)``), or a :class:`Factorized` chain of those.
    """
    if isinstance(layer, Factorized):
        total, shape = 0, tuple(input_shape)
        for part in layer:
            total += layer_macs(part, shape)
            shape = _output_shape(part, shape)
        return total
    if isinstance(layer, nn.Linear):
        return math.prod(input_shape[:-1]) * layer.weight.shape[1] * layer.weight.shape[0]
    if isinstance(layer, CONV_TYPES):
        out_channels, in_per_group = layer.weight.shape[:2]
        positions = math.prod(_conv_output_size(layer, input_shape[1:]))
        return positions * out_channels * in_per_group * _kernel_positions(layer)
    raise TypeError(f"layer_macs: unsupported layer type {type(layer).__name__}")


def _input_shapes_per_call(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Input shapes (without batch) of every Linear/convolution call, by module name."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):

            def record(_module, inputs, _output, name=name):
                shapes.setdefault(name, []).append(tuple(inputs[0].shape[1:]))

            hooks.append(module.register_forward_hook(record))
    # Eval for the probe so BatchNorm running statistics are not updated; restore each module's
    # own mode afterwards (a blanket train() would also flip modules deliberately left in eval).
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return shapes


def layer_input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape (without batch) of every Linear/convolution at its first call, by module name."""
    return {name: calls[0] for name, calls in _input_shapes_per_call(model, example_input).items()}


# --- ranks and costs -------------------------------------------------------------------------


def _unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be factorized, or None if it can."""
    if not isinstance(layer, LAYER_TYPES):
        return f"unsupported layer type {type(layer).__name__}"
    if isinstance(layer, CONV_TYPES) and layer.groups != 1:
        return f"grouped convolution (groups={layer.groups})"
    if parametrize.is_parametrized(layer):
        return "its weight is parametrized (factorize before attaching quantization)"
    return None


def _full_ranks(layer: nn.Module) -> tuple[int, ...]:
    """Full rank per factorized mode: (r,) for an SVD, (r_in, r_out) for Tucker-2."""
    out_channels, in_channels = layer.weight.shape[:2]
    if isinstance(layer, nn.Linear) or _is_pointwise(layer):
        return (min(in_channels, out_channels),)
    k = _kernel_positions(layer)
    return (min(in_channels, out_channels * k), min(out_channels, in_channels * k))


def _ranks(layer: nn.Module, fraction: float) -> tuple[int, ...]:
    return tuple(max(1, round(fraction * full)) for full in _full_ranks(layer))


def _check_fraction(name: str, fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"rank fraction {fraction} for {name} must be in (0, 1]")


def _costs(layer: nn.Module, ranks: tuple[int, ...], input_shape: Sequence[int] | None) -> tuple[int, int]:
    """(original MACs, factorized MACs) for one example."""
    out_channels, in_channels = layer.weight.shape[:2]
    if input_shape is None:
        if isinstance(layer, nn.Linear) or _is_pointwise(layer):
            return in_channels * out_channels, ranks[0] * (in_channels + out_channels)
        # Per output position; the first 1x1 runs at input resolution (prod(stride) positions).
        r_in, r_out = ranks
        k = _kernel_positions(layer)
        factorized = math.prod(layer.stride) * in_channels * r_in + k * r_in * r_out + r_out * out_channels
        return k * in_channels * out_channels, factorized
    original = layer_macs(layer, input_shape)
    if isinstance(layer, nn.Linear):
        return original, math.prod(input_shape[:-1]) * ranks[0] * (in_channels + out_channels)
    out_positions = math.prod(_conv_output_size(layer, input_shape[1:]))
    if _is_pointwise(layer):
        return original, out_positions * ranks[0] * (in_channels + out_channels)
    r_in, r_out = ranks
    in_positions = math.prod(input_shape[1:])
    k = _kernel_positions(layer)
    factorized = in_positions * in_channels * r_in + out_positions * r_out * (k * r_in + out_channels)
    return original, factorized


def _lowers_macs(layer: nn.Module, ranks: tuple[int, ...], input_shape: Sequence[int] | None) -> bool:
    original, factorized = _costs(layer, ranks, input_shape)
    return factorized < original


def useful_rank_fractions(
    layer: nn.Module, fractions: list[float], input_shape: Sequence[int] | None = None
) -> list[float]:
    """The fractions worth searching for ``layer``, sorted ascending.

    Keeps 1.0 (no factorization) if given; drops fractions whose ranks would not lower the MACs
    and, of fractions giving the same ranks, all but the smallest. A layer that cannot be
    factorized gets ``[1.0]`` (or ``[]`` if 1.0 was not given).
    """
    for fraction in fractions:
        _check_fraction(type(layer).__name__, fraction)
    result, seen = [], set()
    supported = _unsupported_reason(layer) is None
    for fraction in sorted(set(fractions)):
        if fraction == 1.0:
            result.append(fraction)
            continue
        if not supported:
            continue
        ranks = _ranks(layer, fraction)
        if ranks not in seen and _lowers_macs(layer, ranks, input_shape):
            seen.add(ranks)
            result.append(fraction)
    return result


def factorizable_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/convolution layers that some fraction below 1 would make cheaper.

    Layers already inside a :class:`Factorized` are not offered again.
    """
    inside = {id(m) for f in model.modules() if isinstance(f, Factorized) for m in f.modules() if m is not f}
    names = []
    for name, module in model.named_modules():
        if id(module) in inside or _unsupported_reason(module) is not None:
            continue
        # Rank 1 in every mode is the cheapest factorization any fraction can give.
        if _lowers_macs(module, (1,) * len(_full_ranks(module)), None):
            names.append(name)
    return names


# --- the factorizations ----------------------------------------------------------------------


def _leading_left_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def _svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (r, in), second (out, r)) with second @ first the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    return new.to(device=old.weight.device, dtype=old.weight.dtype).train(old.training)


def _factorize_linear(layer: nn.Linear, rank: int) -> Factorized:
    weight = layer.weight.detach().double()
    out_features, in_features = weight.shape
    first_w, second_w = _svd_factors(weight, rank)
    first = nn.Linear(in_features, rank, bias=False)
    second = nn.Linear(rank, out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return Factorized(_like(first, layer), _like(second, layer), ranks=(rank,))


def _factorize_pointwise(layer: nn.modules.conv._ConvNd, rank: int) -> Factorized:
    weight = layer.weight.detach().double()
    out_channels, in_channels = weight.shape[:2]
    ones = (1,) * (weight.dim() - 2)
    first_w, second_w = _svd_factors(weight.reshape(out_channels, in_channels), rank)
    conv = type(layer)
    # Stride and padding go on the first conv: it is linear without bias, so padding commutes
    # with it, and the second then runs only at output positions.
    first = conv(
        in_channels, rank, 1, stride=layer.stride, padding=layer.padding, padding_mode=layer.padding_mode, bias=False
    )
    second = conv(rank, out_channels, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(rank, in_channels, *ones))
        second.weight.copy_(second_w.reshape(out_channels, rank, *ones))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return Factorized(_like(first, layer), _like(second, layer), ranks=(rank,))


def _factorize_tucker2(layer: nn.modules.conv._ConvNd, r_in: int, r_out: int) -> Factorized:
    weight = layer.weight.detach().double()
    out_channels, in_channels = weight.shape[:2]
    ones = (1,) * (weight.dim() - 2)
    u_out = _leading_left_vectors(weight.reshape(out_channels, -1), r_out)
    u_in = _leading_left_vectors(weight.transpose(0, 1).reshape(in_channels, -1), r_in)
    core = torch.einsum("oi...,or,is->rs...", weight, u_out, u_in)
    conv = type(layer)
    first = conv(in_channels, r_in, 1, bias=False)
    middle = conv(
        r_in,
        r_out,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        padding_mode=layer.padding_mode,
        bias=False,
    )
    last = conv(r_out, out_channels, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(u_in.T.reshape(r_in, in_channels, *ones))
        middle.weight.copy_(core)
        last.weight.copy_(u_out.reshape(out_channels, r_out, *ones))
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    return Factorized(_like(first, layer), _like(middle, layer), _like(last, layer), ranks=(r_in, r_out))


def factorize_layer(layer: nn.Module, fraction: float, input_shape: Sequence[int] | None = None) -> nn.Module:
    """``layer`` replaced by its :class:`Factorized` form at ``fraction`` of full rank.

    Returns ``layer`` itself when the fraction is 1.0 or the factorization would not lower its
    MACs; raises ``TypeError`` for a layer that cannot be factorized.
    """
    _check_fraction(type(layer).__name__, fraction)
    reason = _unsupported_reason(layer)
    if reason is not None:
        raise TypeError(f"cannot factorize {type(layer).__name__}: {reason}")
    ranks = _ranks(layer, fraction)
    if fraction == 1.0 or not _lowers_macs(layer, ranks, input_shape):
        return layer
    if isinstance(layer, nn.Linear):
        return _factorize_linear(layer, ranks[0])
    if _is_pointwise(layer):
        return _factorize_pointwise(layer, ranks[0])
    return _factorize_tucker2(layer, *ranks)


def factorize(model: nn.Module, fractions: dict[str, float], example_input: torch.Tensor | None = None) -> nn.Module:
    """Factorize each named layer at its rank fraction, in place; return the model.

    Each replaced layer keeps its name and becomes a :class:`Factorized`. Layers at fraction
    1.0, or whose factorization would not lower their MACs, are left as is. Unknown names raise
    ``KeyError``; layers that cannot be factorized (not Linear/Conv1d/Conv2d, grouped, already
    quantization-wrapped) are skipped with a warning. With ``example_input`` the MAC comparison
    uses the real input shapes instead of the per-output-position estimate.
    """
    modules = dict(model.named_modules())
    unknown = sorted(set(fractions) - set(modules))
    if unknown:
        raise KeyError(f"no layer named {', '.join(map(repr, unknown))}")
    for name, fraction in fractions.items():
        _check_fraction(repr(name), fraction)
    shapes = layer_input_shapes(model, example_input) if example_input is not None else {}
    for name, fraction in fractions.items():
        layer = modules[name]
        reason = _unsupported_reason(layer)
        if reason is not None:
            warnings.warn(f"low-rank: skipping {name!r}: {reason}", stacklevel=2)
            continue
        if name == "":
            warnings.warn("low-rank: skipping '': the model itself cannot be replaced in place", stacklevel=2)
            continue
        replacement = factorize_layer(layer, fraction, shapes.get(name))
        if replacement is layer:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    return model
