"""Torch eager: the operators a model runs, as LUT signatures, and a runnable unit for each signature.

Signatures come from a ``torch.fx`` trace of the (already compressed, plain) model: leaf modules
*and* the functional ops between them (the residual ``add``, ``flatten``, ``F.relu``), which forward
hooks would miss. Eager runs Conv, BatchNorm and ReLU as three kernels, but they always run back to
back on the same tensor, so a ``Conv -> BN -> ReLU`` chain (likewise ``Conv -> BN``, ``Linear ->
ReLU``, ``add -> ReLU``) is one unit, measured as the chain: it keeps the activation in cache
between the three exactly as the model does, and it is the same unit a deploy-time fuser would
form.

Shapes are computed from module attributes with the usual output-size formulas rather than by
running the model: predicting a candidate must cost milliseconds, and a ResNet-18 forward alone
costs tens. The trace and the grouping into units depend only on the model's structure (module
names and types), so they are cached per structure; pruned candidates of one model share them.

A signature fully describes its unit (``extra`` carries bias, dilation, in-place ReLU and the
like), so :func:`build_unit` makes the measured module from the signature alone.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from autocompress.errors import AutocompressError
from autocompress.hw_profiles.profile import OpSignature

CONVS = {nn.Conv1d: 1, nn.Conv2d: 2}
NORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2}
MAXPOOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2}
AVGPOOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2}
ADAPTIVE_AVGPOOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2}
PASS_THROUGH = (nn.Identity, nn.Dropout)  # eval mode: a module call that returns its input
ADDS = (operator.add, operator.iadd, torch.add)
RELU_FUNCTIONS = (F.relu, torch.relu)


class UnsupportedModel(AutocompressError):
    """The model contains an operator the eager predictor has no rule for; the message names it."""


# --- the cached structure --------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One fx node reduced to what shape propagation needs."""

    name: str
    kind: str  # "input", "module", "add", "relu_fn", "flatten", "output"
    target: str
    args: tuple[str, ...]
    flatten_dims: tuple[int, int] = (0, -1)
    owner: str = ""  # the module whose forward made a functional call ("" = the model's own forward)


@dataclass(frozen=True)
class _Unit:
    """A group of consecutive steps measured together; ``steps`` index into the step list."""

    steps: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    steps: tuple[_Step, ...]
    units: tuple[_Unit, ...]


_PLANS: dict[tuple, _Plan] = {}


def _structure_key(model: nn.Module) -> tuple:
    return (type(model), tuple((name, type(m)) for name, m in model.named_modules()))


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    args = list(node.args[1:])
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return int(start), int(end)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def _step(node: fx.Node) -> _Step:
    tensor_args = tuple(a.name for a in node.args if isinstance(a, fx.Node))
    owner = _owner(node)
    if node.op == "placeholder":
        return _Step(node.name, "input", "", ())
    if node.op == "output":
        return _Step(node.name, "output", "", tensor_args)
    if node.op == "call_module":
        return _Step(node.name, "module", str(node.target), tensor_args)
    if node.op == "call_function" and node.target in ADDS and len(tensor_args) == 2:
        return _Step(node.name, "add", "", tensor_args, owner=owner)
    if node.op == "call_function" and node.target in RELU_FUNCTIONS and not node.kwargs.get("inplace"):
        return _Step(node.name, "relu_fn", "", tensor_args, owner=owner)
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return _Step(node.name, "flatten", "", tensor_args, _flatten_dims(node), owner=owner)
    if node.op == "call_method" and node.target == "relu":
        return _Step(node.name, "relu_fn", "", tensor_args, owner=owner)
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    raise UnsupportedModel(f"latency predictor: no rule for operator {node.op} {what!r} (node {node.name!r})")


def _is_relu(step: _Step, modules: dict[str, nn.Module]) -> bool:
    return step.kind == "relu_fn" or (step.kind == "module" and isinstance(modules[step.target], nn.ReLU))


def _group(steps: list[_Step], users: dict[str, int], modules: dict[str, nn.Module]) -> tuple[_Unit, ...]:
    """Chains Conv->BN->ReLU, Conv->BN, Conv->ReLU, Linear->ReLU, add->ReLU become one unit each."""
    taken: set[int] = set()
    units = []

    def sole_consumer(i: int) -> int | None:
        # The next step in a chain must consume this one's output, and be its only consumer.
        if users[steps[i].name] != 1 or i + 1 >= len(steps):
            return None
        nxt = steps[i + 1]
        return i + 1 if nxt.args == (steps[i].name,) else None

    for i, step in enumerate(steps):
        if i in taken or step.kind in ("input", "output"):
            continue
        chain = [i]
        module = modules.get(step.target) if step.kind == "module" else None
        if isinstance(module, tuple(CONVS)):
            j = sole_consumer(i)
            if j is not None and steps[j].kind == "module" and isinstance(modules[steps[j].target], tuple(NORMS)):
                chain.append(j)
        if isinstance(module, (*CONVS, nn.Linear)) or step.kind == "add":
            j = sole_consumer(chain[-1])
            if j is not None and _is_relu(steps[j], modules):
                chain.append(j)
        taken.update(chain)
        units.append(_Unit(tuple(chain)))
    return tuple(units)


def _plan(model: nn.Module) -> _Plan:
    key = _structure_key(model)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no prediction for this model
        raise UnsupportedModel(
            f"latency predictor: cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err})"
        ) from None
    modules = dict(model.named_modules())
    steps = [_step(node) for node in graph.nodes]
    users = {node.name: len(node.users) for node in graph.nodes}
    plan = _Plan(tuple(steps), _group(steps, users, modules))
    _PLANS[key] = plan
    return plan


# --- shapes ----------------------------------------------------------------------------------


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _conv_out(size: Sequence[int], kernel, stride, padding, dilation, ceil: bool = False) -> tuple[int, ...]:
    rounding = math.ceil if ceil else math.floor
    return tuple(
        int(rounding((s + 2 * p - d * (k - 1) - 1) / st)) + 1
        for s, k, st, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
    )


def _conv_padding(conv: nn.modules.conv._ConvNd, dims: int) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0,) * dims
    if conv.padding == "same":
        # Symmetric "same" padding (odd kernels); asymmetric cases are rare and raise below.
        pads = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
        if any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)):
            raise UnsupportedModel(f"latency predictor: asymmetric 'same' padding of {conv}")
        return pads
    return _tuple(conv.padding, dims)


def _module_output(module: nn.Module, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    if isinstance(module, tuple(CONVS)):
        dims = CONVS[type(module)]
        spatial = _conv_out(shape[2:], module.kernel_size, module.stride, _conv_padding(module, dims), module.dilation)
        return (shape[0], module.out_channels, *spatial)
    if isinstance(module, nn.Linear):
        return (*shape[:-1], module.out_features)
    if isinstance(module, (*NORMS, nn.ReLU, *PASS_THROUGH)):
        return shape
    if isinstance(module, (*MAXPOOLS, *AVGPOOLS)):
        dims = len(shape) - 2
        kernel = _tuple(module.kernel_size, dims)
        stride = _tuple(module.stride or module.kernel_size, dims)
        dilation = _tuple(getattr(module, "dilation", 1), dims)
        spatial = _conv_out(shape[2:], kernel, stride, _tuple(module.padding, dims), dilation, module.ceil_mode)
        return (*shape[:2], *spatial)
    if isinstance(module, tuple(ADAPTIVE_AVGPOOLS)):
        out = _tuple(module.output_size, len(shape) - 2)
        return (*shape[:2], *(s if o is None else o for o, s in zip(out, shape[2:], strict=True)))
    if isinstance(module, nn.Flatten):
        return _flattened(shape, (module.start_dim, module.end_dim))
    raise UnsupportedModel(f"latency predictor: no rule for module {name!r} ({type(module).__name__})")


def _flattened(shape: tuple[int, ...], dims: tuple[int, int]) -> tuple[int, ...]:
    start, end = (d % len(shape) for d in dims)
    return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])


def _shapes(plan: _Plan, modules: dict[str, nn.Module], input_shape: tuple[int, ...]) -> dict[str, tuple]:
    shapes: dict[str, tuple[int, ...]] = {}
    for step in plan.steps:
        if step.kind == "input":
            shapes[step.name] = input_shape
        elif step.kind == "output":
            continue
        elif step.kind == "module":
            shapes[step.name] = _module_output(modules[step.target], shapes[step.args[0]], step.target)
        elif step.kind == "add":
            shapes[step.name] = tuple(torch.broadcast_shapes(shapes[step.args[0]], shapes[step.args[1]]))
        elif step.kind == "relu_fn":
            shapes[step.name] = shapes[step.args[0]]
        elif step.kind == "flatten":
            shapes[step.name] = _flattened(shapes[step.args[0]], step.flatten_dims)
    return shapes


# --- signatures ------------------------------------------------------------------------------


def _extra(**pairs: object) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(pairs.items()))


def parse_extra(extra: str) -> dict[str, str]:
    """``"bias=0,dil=1x1"`` -> ``{"bias": "0", "dil": "1x1"}``."""
    return dict(pair.split("=", 1) for pair in extra.split(",") if pair)


def _x(values: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in values)


def _unit_signature(
    unit: _Unit, plan: _Plan, modules: dict[str, nn.Module], shapes: dict[str, tuple[int, ...]]
) -> OpSignature:
    steps = [plan.steps[i] for i in unit.steps]
    first = steps[0]
    in_shape = shapes[first.args[0]]
    out_shape = shapes[steps[-1].name]
    batch = in_shape[0]
    relu = steps[-1] if len(steps) > 1 and _is_relu(steps[-1], modules) else None
    relu_inplace = int(bool(relu is not None and relu.kind == "module" and modules[relu.target].inplace))
    head = modules.get(first.target) if first.kind == "module" else None
    if isinstance(head, tuple(CONVS)):
        dims = CONVS[type(head)]
        names = [f"conv{dims}d"] + ["bn"] * (len(steps) > 1 and not _is_relu(steps[1], modules)) + ["relu"] * bool(relu)
        extra = {"bias": int(head.bias is not None), "dil": _x(head.dilation)}
        if relu is not None:
            extra["inplace"] = relu_inplace
        if head.padding_mode != "zeros":
            extra["padmode"] = head.padding_mode
        return OpSignature(
            op="+".join(names),
            in_channels=head.in_channels,
            out_channels=head.out_channels,
            kernel=tuple(head.kernel_size),
            stride=tuple(head.stride),
            padding=_conv_padding(head, dims),
            groups=head.groups,
            input_size=tuple(in_shape[2:]),
            batch=batch,
            extra=_extra(**extra),
        )
    if isinstance(head, nn.Linear):
        extra = {"bias": int(head.bias is not None)}
        if relu is not None:
            extra["inplace"] = relu_inplace
        return OpSignature(
            op="linear+relu" if relu else "linear",
            in_channels=head.in_features,
            out_channels=head.out_features,
            input_size=tuple(in_shape[1:-1]),
            batch=batch,
            extra=_extra(**extra),
        )
    channels = in_shape[1] if len(in_shape) > 1 else 0
    common = {"in_channels": channels, "out_channels": channels, "input_size": tuple(in_shape[2:]), "batch": batch}
    if first.kind == "add":
        return OpSignature(
            op="add+relu" if relu else "add", extra=_extra(inplace=relu_inplace) if relu else "", **common
        )
    if first.kind == "relu_fn":
        return OpSignature(op="relu", extra=_extra(inplace=0), **common)
    if first.kind == "flatten":
        out = {**common, "out_channels": out_shape[1] if len(out_shape) > 1 else out_shape[0]}
        return OpSignature(op="flatten", extra=_extra(dims=_x(d % len(in_shape) for d in first.flatten_dims)), **out)
    module = head
    if isinstance(module, tuple(NORMS)):
        return OpSignature(op=f"bn{NORMS[type(module)]}d", **common)
    if isinstance(module, nn.ReLU):
        return OpSignature(op="relu", extra=_extra(inplace=int(module.inplace)), **common)
    if isinstance(module, PASS_THROUGH):
        return OpSignature(op="identity", **common)
    if isinstance(module, (*MAXPOOLS, *AVGPOOLS)):
        dims = len(in_shape) - 2
        kind = "maxpool" if isinstance(module, tuple(MAXPOOLS)) else "avgpool"
        extra = {"ceil": int(module.ceil_mode)}
        if kind == "maxpool":
            extra["dil"] = _x(_tuple(module.dilation, dims))
        else:
            extra["countpad"] = int(module.count_include_pad)
        return OpSignature(
            op=f"{kind}{dims}d",
            kernel=_tuple(module.kernel_size, dims),
            stride=_tuple(module.stride or module.kernel_size, dims),
            padding=_tuple(module.padding, dims),
            extra=_extra(**extra),
            **common,
        )
    if isinstance(module, tuple(ADAPTIVE_AVGPOOLS)):
        dims = ADAPTIVE_AVGPOOLS[type(module)]
        return OpSignature(op=f"adaptiveavgpool{dims}d", extra=_extra(out=_x(out_shape[2:])), **common)
    if isinstance(module, nn.Flatten):
        out = {**common, "out_channels": out_shape[1]}
        dims_ = (module.start_dim % len(in_shape), module.end_dim % len(in_shape))
        return OpSignature(op="flatten", extra=_extra(dims=_x(dims_)), **out)
    raise UnsupportedModel(f"latency predictor: no rule for {first.target or first.name!r}")


def eager_signatures(model: nn.Module, input_shape: Sequence[int]) -> list[OpSignature]:
    """The units ``model`` runs in torch eager for an input of ``input_shape`` (batch first), in order."""
    plan = _plan(model)
    modules = dict(model.named_modules())
    shapes = _shapes(plan, modules, tuple(int(s) for s in input_shape))
    return [_unit_signature(unit, plan, modules, shapes) for unit in plan.units]


@dataclass(frozen=True)
class UnitOwnership:
    """Which code a unit is: module calls as (module name, call index), functional calls by kind and owner."""

    modules: tuple[tuple[str, int], ...]
    functions: tuple[tuple[str, str], ...]  # (kind, owner module path)


def unit_ownership(model: nn.Module) -> list[UnitOwnership]:
    """Per unit of :func:`eager_signatures`, the module calls and functional calls it consists of.

    A module called twice (ResNet's shared ``relu``) is told apart by call index, as the ONNX
    exporter tells its scopes apart (``relu``, ``relu_1``).
    """
    plan = _plan(model)
    calls: dict[str, int] = {}
    index: dict[str, int] = {}
    for step in plan.steps:
        if step.kind == "module":
            index[step.name] = calls.get(step.target, 0)
            calls[step.target] = index[step.name] + 1
    result = []
    for unit in plan.units:
        steps = [plan.steps[i] for i in unit.steps]
        result.append(
            UnitOwnership(
                modules=tuple((s.target, index[s.name]) for s in steps if s.kind == "module"),
                functions=tuple((s.kind, s.owner) for s in steps if s.kind != "module"),
            )
        )
    return result


def unit_graph(model: nn.Module) -> tuple[list[list[int]], list[list[int]]]:
    """Per unit of :func:`eager_signatures`: the units producing its inputs and the units reading its
    output, by data flow (a residual add has two producers); -1 stands for the model's input or output."""
    plan = _plan(model)
    unit_of = {plan.steps[i].name: u for u, unit in enumerate(plan.units) for i in unit.steps}
    outside = {step.name: -1 for step in plan.steps if step.kind == "input"}
    inputs: list[list[int]] = []
    readers: list[list[int]] = [[] for _ in plan.units]
    for u, unit in enumerate(plan.units):
        own = {plan.steps[i].name for i in unit.steps}
        args = [a for i in unit.steps for a in plan.steps[i].args if a not in own]
        producers = [unit_of.get(a, outside.get(a, -1)) for a in args]
        inputs.append(producers)
        for p in producers:
            if p >= 0 and u not in readers[p]:
                readers[p].append(u)
    for step in plan.steps:
        if step.kind == "output":
            for a in step.args:
                if a in unit_of:
                    readers[unit_of[a]].append(-1)
    return inputs, readers


def unit_layers(model: nn.Module) -> list[str]:
    """Per unit of :func:`eager_signatures`, the Conv/Linear module it starts with ("" for other units)."""
    plan = _plan(model)
    modules = dict(model.named_modules())
    names = []
    for unit in plan.units:
        step = plan.steps[unit.steps[0]]
        head = modules.get(step.target) if step.kind == "module" else None
        names.append(step.target if isinstance(head, (*CONVS, nn.Linear)) else "")
    return names


# --- units for measurement -------------------------------------------------------------------


class _Add(nn.Module):
    def __init__(self, relu: bool, inplace: bool) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=inplace) if relu else None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        return self.relu(out) if self.relu is not None else out


class _Flatten(nn.Module):
    def __init__(self, start: int, end: int) -> None:
        super().__init__()
        self.start, self.end = start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(self.start, self.end)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def build_unit(sig: OpSignature) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A fresh module that runs exactly the unit ``sig`` describes, and random inputs for it.

    The module's parameters are ordinary tensors even when this is called in inference mode, as a
    deployed model's are (parameters created in inference mode skip autograd bookkeeping and run
    faster than any loaded model does); the inputs are made in the caller's
    mode, as a layer's input is inside an inference-mode forward.
    """
    with torch.inference_mode(False):
        module, inputs = _build_unit(sig)
    if torch.is_inference_mode_enabled():
        inputs = tuple(x.clone() for x in inputs)
    return module, inputs


def _build_unit(sig: OpSignature) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    extra = parse_extra(sig.extra)
    parts = sig.op.split("+")
    head = parts[0]
    spatial = tuple(sig.input_size)
    x_shape = (sig.batch, sig.in_channels, *spatial)
    inplace = extra.get("inplace") == "1"
    if head in ("conv1d", "conv2d"):
        conv_cls = nn.Conv1d if head == "conv1d" else nn.Conv2d
        layers: list[nn.Module] = [
            conv_cls(
                sig.in_channels,
                sig.out_channels,
                sig.kernel,
                stride=sig.stride,
                padding=sig.padding,
                dilation=_ints(extra["dil"]),
                groups=sig.groups,
                bias=extra["bias"] == "1",
                padding_mode=extra.get("padmode", "zeros"),
            )
        ]
        if "bn" in parts:
            layers.append((nn.BatchNorm1d if head == "conv1d" else nn.BatchNorm2d)(sig.out_channels))
        if "relu" in parts:
            layers.append(nn.ReLU(inplace=inplace))
        return nn.Sequential(*layers).eval(), (torch.randn(x_shape),)
    if head == "linear":
        layers = [nn.Linear(sig.in_channels, sig.out_channels, bias=extra["bias"] == "1")]
        if "relu" in parts:
            layers.append(nn.ReLU(inplace=inplace))
        return nn.Sequential(*layers).eval(), (torch.randn((sig.batch, *spatial, sig.in_channels)),)
    if head == "add":
        return _Add("relu" in parts, inplace).eval(), (torch.randn(x_shape), torch.randn(x_shape))
    builders: dict[str, Callable[[], nn.Module]] = {
        "bn1d": lambda: nn.BatchNorm1d(sig.in_channels),
        "bn2d": lambda: nn.BatchNorm2d(sig.in_channels),
        "relu": lambda: nn.ReLU(inplace=inplace),
        "identity": nn.Identity,
        "maxpool1d": lambda: nn.MaxPool1d(
            sig.kernel, sig.stride, sig.padding, _ints(extra["dil"]), ceil_mode=extra["ceil"] == "1"
        ),
        "maxpool2d": lambda: nn.MaxPool2d(
            sig.kernel, sig.stride, sig.padding, _ints(extra["dil"]), ceil_mode=extra["ceil"] == "1"
        ),
        "avgpool1d": lambda: nn.AvgPool1d(
            sig.kernel, sig.stride, sig.padding, extra["ceil"] == "1", extra["countpad"] == "1"
        ),
        "avgpool2d": lambda: nn.AvgPool2d(
            sig.kernel, sig.stride, sig.padding, extra["ceil"] == "1", extra["countpad"] == "1"
        ),
        "adaptiveavgpool1d": lambda: nn.AdaptiveAvgPool1d(_ints(extra["out"])),
        "adaptiveavgpool2d": lambda: nn.AdaptiveAvgPool2d(_ints(extra["out"])),
        "flatten": lambda: _Flatten(*_ints(extra["dims"])),
    }
    if head not in builders:
        raise UnsupportedModel(f"torch-eager: cannot build a unit for op {sig.op!r} ({sig.key()})")
    return builders[head]().eval(), (torch.randn(x_shape),)
