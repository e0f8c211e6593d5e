"""Time bit-width plans of one teacher side by side: fp32, all int8, per-layer mixes, per-region mixes.

Deploys the experiment's teacher (no fine-tune: the weights are the teacher's, rounded) under
each plan on the experiment's runtime, then times every deployment in interleaved rounds in one
process (all plans once per round, in a fresh random order), so machine drift hits them alike.
Prints, per plan: the int8 layers, the QuantizeLinear/DequantizeLinear nodes of the deployed
graph, validation accuracy, median latency and the median of per-round ratios to fp32 (> 1 is
faster). Mixed plans draw each layer (or region) int8 with probability 1/2.

    python benchmarks/quant_plans.py experiments/digits_mobilenet.yaml [--mixes 3] [--rounds 15]
        [--set task.args.width=32] [--untrained]

``--untrained`` times the freshly initialised model instead of training a teacher (latency
depends on shapes and plans, not weights; the accuracy column is then meaningless).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

import onnx
import torch

from autocompress.config import load_experiment, parse_override
from autocompress.evaluators import evaluate, measure_latency
from autocompress.search.objectives import make_context, runnable
from autocompress.tasks import load_task
from autocompress.teacher import get_teacher
from autocompress.techniques.base import QUANTIZABLE
from autocompress.techniques.quantize import bit_groups

FP32, INT8 = 32, 8
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear")


def _boundaries(workdir: Path) -> int:
    path = workdir / "model.int8.onnx"
    if not path.exists():
        return 0
    return sum(n.op_type in BOUNDARY_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--mixes", type=int, default=3, help="random plans per granularity")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment override")
    parser.add_argument("--untrained", action="store_true", help="time the untrained model (no teacher)")
    args = parser.parse_args()

    exp = load_experiment(args.experiment, dict(parse_override(item) for item in args.set))
    task = load_task(exp.task.name, exp.task.args)
    if args.untrained:
        torch.manual_seed(exp.seed)
        model = task.build_model().eval()
    else:
        model = get_teacher(task, exp.task.args, exp.teacher, exp.seed, task_ref=exp.task.name, log=print).model.eval()
    x = task.example_input(1)
    layers = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    regions = bit_groups(model, x, layers, "region")
    rng = random.Random(args.seed)

    def mix(groups: list[list[str]]) -> dict[str, int]:
        while True:  # neither all fp32 nor all int8: those are plans of their own
            chosen = [rng.random() < 0.5 for _ in groups]
            if 0 < sum(chosen) < len(groups):
                return {name: INT8 if c else FP32 for group, c in zip(groups, chosen, strict=True) for name in group}

    plans = {"fp32": dict.fromkeys(layers, FP32), "all int8": dict.fromkeys(layers, INT8)}
    plans |= {f"layer mix {i + 1}": mix([[n] for n in layers]) for i in range(args.mixes)}
    plans |= {f"region mix {i + 1}": mix(regions) for i in range(args.mixes)}

    ctx = make_context(exp, model, task)
    lat = exp.latency
    val = task.loader("val", 256)
    with tempfile.TemporaryDirectory() as tmp:
        runs, info = {}, {}
        for name, bits in plans.items():
            workdir = Path(tmp) / name.replace(" ", "_")
            runs[name] = runnable(model, bits, ctx, workdir)
            n_int8 = sum(b == INT8 for b in bits.values())
            info[name] = (n_int8, _boundaries(workdir), evaluate(runs[name], val, task.metric))
        times: dict[str, list[float]] = {name: [] for name in plans}
        ratios: dict[str, list[float]] = {name: [] for name in plans}
        order = list(plans)
        for _ in range(args.rounds):
            rng.shuffle(order)
            this = {}
            for name in order:
                this[name] = measure_latency(
                    runs[name], x, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats
                ).median_ms
            for name in plans:
                times[name].append(this[name])
                ratios[name].append(this["fp32"] / this[name])

    print(
        f"{exp.task.name} {exp.task.args}: {len(layers)} layers, {len(regions)} regions; runtime {lat.runtime}, "
        f"batch 1, {lat.threads} thread(s), median of {lat.repeats} runs per round, {args.rounds} interleaved rounds"
    )
    print(
        f"{'plan':<14} {'int8 layers':>11} {'Q/DQ nodes':>10} {'val acc':>8} {'median ms':>10} "
        f"{'vs fp32':>8} {'min':>6} {'max':>6}"
    )
    for name in plans:
        n_int8, qdq, acc = info[name]
        r = ratios[name]
        print(
            f"{name:<14} {n_int8:>5} / {len(layers):<3} {qdq:>10} {acc:>8.4f} {statistics.median(times[name]):>10.3f} "
            f"{statistics.median(r):>7.2f}x {min(r):>5.2f}x {max(r):>5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
