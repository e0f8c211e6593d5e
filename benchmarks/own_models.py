"""The fastest front member within a metric drop, against the fp32 teacher and its best uniform int8, side by side.

For each experiment (default: the built-in MiniLM task and the MobileNet-style digits task), after its
search has run: rebuild the front members of the measured (``host``) front from teacher + candidate +
seed, fastest first, until one is within ``--max-drop`` points (100 x the metric, in the task's
direction) of the fp32 teacher on the **test** split, both measured on the deployed models. Then deploy
the baselines of the same teacher on the same runtime: fp32, every Conv/Linear int8 static (QDQ), and,
for models with Linear layers, every Linear int8 dynamic (MatMulInteger). All variants are timed in
interleaved rounds (A B C ... A B C ...) in one process at the experiment's batch size and threads
(batch 1, 1 thread by default), so drift of a shared machine hits them alike; ratios are medians of
per-round ratios.

    python benchmarks/own_models.py [EXPERIMENT.yaml ...] [--max-drop 1.0] [--rounds 9] [--tries 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from autocompress.config import load_experiment
from autocompress.evaluators import artifact_size_bytes, evaluate
from autocompress.runtimes import get_runtime
from autocompress.search.objectives import HOST, build_candidate, make_context
from autocompress.search.store import load_experiment_search
from autocompress.spaces import Candidate
from autocompress.tasks import load_task
from autocompress.teacher import get_teacher
from autocompress.techniques.quantize import int8_modes

DEFAULT_EXPERIMENTS = ("experiments/minilm_topics.yaml", "experiments/digits_mobilenet.yaml")


def deploy(runtime: Any, model: nn.Module, bits: dict[str, int], modes: dict[str, str], ctx: Any, where: Path):
    """The model deployed as the search deploys it (same calibration batches), with explicit int8 modes."""
    import itertools

    calibration = list(itertools.islice(iter(ctx.task.loader("train", 64)), ctx.calibration_batches))
    return runtime.deploy(model, bits, ctx.task.example_input(1), calibration, where, ctx.latency.threads, modes=modes)


def run_experiment(path: str, args: argparse.Namespace) -> list[str]:
    exp = load_experiment(path)
    _, search = load_experiment_search(exp)
    metric = search.metric
    task = load_task(exp.task.name, exp.task.args)
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, task_ref=exp.task.name, log=lambda _: None)
    ctx = make_context(exp, teacher.model, task)
    runtime = get_runtime(exp.latency.runtime)
    test = task.loader("test", 256)
    layers = {n: m for n, m in teacher.model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
    linear = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    lines = [
        f"== {exp.name}: study {search.study}, {len(search.records)} complete trials, runtime "
        f"{exp.latency.runtime}, batch {exp.latency.batch_size}, {exp.latency.threads} thread(s)"
    ]
    with tempfile.TemporaryDirectory(prefix="own-models-") as tmp:
        tmp_path = Path(tmp)
        variants: dict[str, Any] = {}
        variants["teacher fp32"] = deploy(runtime, teacher.model, {}, {}, ctx, tmp_path / "fp32")
        variants["uniform int8 static"] = deploy(
            runtime, teacher.model, dict.fromkeys(layers, 8), dict.fromkeys(layers, "static"), ctx, tmp_path / "i8s"
        )
        if linear:
            bits = dict.fromkeys(layers, 8)
            modes = {n: "dynamic" if n in linear else "static" for n in layers}
            variants["uniform int8 dynamic"] = deploy(runtime, teacher.model, bits, modes, ctx, tmp_path / "i8d")
        scores = {name: evaluate(v, test, task.metric) for name, v in variants.items()}
        reference = scores["teacher fp32"]
        front = sorted(search.front(HOST), key=lambda r: r.latency_ms)
        chosen = None
        for row in front[: args.tries]:
            built = build_candidate(Candidate.from_params(row.candidate), ctx)
            modes = int8_modes(built.model, built.bits, ctx.pipeline.section("bits"))
            run = deploy(runtime, built.model, built.bits, modes, ctx, tmp_path / f"t{row.trial}")
            score = evaluate(run, test, task.metric)
            drop = 100.0 * metric.sign * (reference - score)
            lines.append(
                f"   front trial {row.trial:>3} ({row.summary}): test {metric.name} {score:.4f} "
                f"({-drop:+.2f} pt), searched {row.latency_ms:.3f} ms"
            )
            if drop <= args.max_drop:
                chosen = f"member: trial {row.trial}"
                variants[chosen], scores[chosen] = run, score
                break
        (tmp_path / "sz").mkdir()
        sizes = {name: artifact_size_bytes(runtime.artifact(v, tmp_path / "sz")) for name, v in variants.items()}
        example = task.example_input(exp.latency.batch_size)
        times: dict[str, list[float]] = {name: [] for name in variants}
        lat = exp.latency
        for _ in range(args.rounds):
            for name, v in variants.items():
                times[name].append(
                    runtime.measure(v, example, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats).median_ms
                )
    base = times["teacher fp32"]
    int8_names = [n for n in variants if n.startswith("uniform int8")]
    best_int8 = max(int8_names, key=lambda n: statistics.median(b / t for b, t in zip(base, times[n], strict=True)))
    lines.append(
        f"   {'variant':<22} {'test ' + metric.name:>16} {'Δ pt':>7} {'ms':>8} {'vs fp32':>8} "
        f"{'vs best int8':>12} {'MB':>7}"
    )
    for name in variants:
        vs_fp32 = statistics.median(b / t for b, t in zip(base, times[name], strict=True))
        vs_int8 = statistics.median(b / t for b, t in zip(times[best_int8], times[name], strict=True))
        lines.append(
            f"   {name:<22} {scores[name]:>16.4f} {100 * (scores[name] - reference):>+7.2f} "
            f"{statistics.median(times[name]):>8.3f} {vs_fp32:>7.2f}x {vs_int8:>11.2f}x {sizes[name] / 1e6:>7.2f}"
        )
    if chosen is None:
        lines.append(
            f"   no front member among the {args.tries} fastest is within {args.max_drop} pt on the test split"
        )
    lines.append(f"   best uniform int8: {best_int8}; ratios are medians over {args.rounds} interleaved rounds")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS))
    parser.add_argument("--max-drop", type=float, default=1.0, help="metric points (x100) worse than the teacher")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tries", type=int, default=6, help="front members rebuilt at most, fastest first")
    args = parser.parse_args()
    for path in args.experiments:
        for line in run_experiment(path, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
