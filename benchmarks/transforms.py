"""Latency of each compression transform on a ResNet-18-style model, measured side by side.

Variants (3x32x32 input, ``--threads`` threads, batch 1 and 32): the original in eager torch fp32
(the reference), channel pruning at 30/50/70% (dependency graph, round_to=8), low-rank at 25/50%
of full rank, ONNX Runtime fp32 and int8 (static QDQ, per-channel), and the combinations. All
variants are timed in interleaved rounds in one process (A B C ... A B C ...), so drift of this
shared machine hits them alike; each figure is the median over rounds of per-round ratios
``reference / variant``. Weights are random (latency does not depend on their values); int8 is
calibrated on random inputs.

    python benchmarks/transforms.py [--rounds 5] [--threads 1] [--width 64]

Targets at batch 1 versus eager fp32: >= 2.2x at 50% channels, >= 3.5x for ORT int8 alone,
>= 6x for 50% pruning + ORT int8.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from autocompress.compress.deploy import OrtModel, deploy
from autocompress.compress.lowrank import factorizable_layers, factorize
from autocompress.compress.prune import find_prune_groups, prune
from autocompress.evaluators import count_parameters, measure_latency
from autocompress.models import resnet18_cifar

TARGETS = {"prune 50%": 2.2, "ORT int8": 3.5, "prune 50% + ORT int8": 6.0}


def pruned(model: nn.Module, ratio: float, x: torch.Tensor) -> nn.Module:
    """Every prunable group of a copy of ``model`` at ``ratio`` (channels removed, round_to=8)."""
    return prune(copy.deepcopy(model), {g.name: ratio for g in find_prune_groups(model, x)}, x, round_to=8)


def lowrank(model: nn.Module, fraction: float, x: torch.Tensor) -> nn.Module:
    """Every factorizable layer of a copy of ``model`` at ``fraction`` of full rank."""
    clone = copy.deepcopy(model)
    return factorize(clone, {name: fraction for name in factorizable_layers(clone)}, x)


def int8(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int) -> OrtModel:
    """The model deployed in ONNX Runtime with every Conv/Linear at 8 bits (real int8 kernels)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    calibration = [torch.randn(8, *x.shape[1:]) for _ in range(4)]
    result = deploy(model, {n: 8 for n in layers}, x, calibration, workdir, threads=threads)
    missing = set(layers) - set(result.int8_layers)
    if missing:
        raise SystemExit(f"int8 deployment left {len(missing)} layers fp32: {sorted(missing)[:5]} ...")
    return result.model


def ort_fp32(model: nn.Module, x: torch.Tensor, workdir: Path, threads: int) -> OrtModel:
    return deploy(model, {}, x, [], workdir, threads=threads).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=64, help="ResNet base width (64 = ResNet-18)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    torch.manual_seed(0)
    base = resnet18_cifar(width=args.width).eval()
    x1 = torch.randn(1, 3, 32, 32)
    tmp = Path(tempfile.mkdtemp(prefix="autocompress-bench-"))
    builds: dict[str, Callable[[], object]] = {
        "eager fp32 (reference)": lambda: base,
        "prune 30%": lambda: pruned(base, 0.3, x1),
        "prune 50%": lambda: pruned(base, 0.5, x1),
        "prune 70%": lambda: pruned(base, 0.7, x1),
        "low-rank 50%": lambda: lowrank(base, 0.5, x1),
        "low-rank 25%": lambda: lowrank(base, 0.25, x1),
        "ORT fp32": lambda: ort_fp32(base, x1, tmp / "ort", args.threads),
        "ORT int8": lambda: int8(base, x1, tmp / "int8", args.threads),
        "prune 50% + ORT int8": lambda: int8(pruned(base, 0.5, x1), x1, tmp / "p50int8", args.threads),
        "prune 50% + low-rank 50% + ORT int8": lambda: int8(
            lowrank(pruned(base, 0.5, x1), 0.5, x1), x1, tmp / "p50lr50int8", args.threads
        ),
    }
    models = {name: build() for name, build in builds.items()}
    params = {name: count_parameters(m) for name, m in models.items() if isinstance(m, nn.Module)}
    print(f"ResNet-18-style width {args.width}, 3x32x32, {args.threads} thread(s), cpu {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {args.rounds} interleaved rounds")
    reference = "eager fp32 (reference)"
    for batch in args.batches:
        x = torch.randn(batch, 3, 32, 32)
        repeats = 30 if batch == 1 else 5
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                lat = measure_latency(model, x, threads=args.threads, warmup=3, repeats=repeats)
                times[name].append(lat.median_ms)
        print(f"\nbatch {batch} (median of {repeats} runs per round)")
        print(f"{'variant':<38} {'params':>10} {'ms (median)':>12} {'speedup':>8} {'min':>6} {'max':>6}  target")
        for name in models:
            ratios = [r / t for r, t in zip(times[reference], times[name], strict=True)]
            target = TARGETS.get(name) if batch == 1 else None
            verdict = ""
            if target is not None:
                verdict = f">= {target}x {'met' if statistics.median(ratios) >= target else 'NOT met'}"
            p = params.get(name)
            print(f"{name:<38} {p if p is not None else '-':>10} {statistics.median(times[name]):12.3f} "
                  f"{statistics.median(ratios):7.2f}x {min(ratios):6.2f} {max(ratios):6.2f}  {verdict}")


if __name__ == "__main__":
    main()
