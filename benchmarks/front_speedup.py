"""Re-measure a finished search's best front member against its teacher, side by side.

Rebuilds the fastest front member within ``--max-drop`` metric points (x100, task direction) of the teacher (from
teacher + candidate + seed, exactly as in the search), deploys both on the experiment's runtime
(ONNX Runtime by default: the member's 8-bit layers as real int8), then times them in alternating
rounds in one process (A B A B ...), so machine drift hits both equally. Prints accuracies and
the median of per-round latency ratios.

    python benchmarks/front_speedup.py experiments/digits_cnn.yaml [--output-dir DIR] [--max-drop 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import optuna

from autocompress.config import load_experiment
from autocompress.evaluators import evaluate, measure_latency
from autocompress.search.objectives import HOST, build_candidate, make_context, runnable
from autocompress.search.quality import METRIC, QualityMetric
from autocompress.search.report import make_rows, pareto_rows
from autocompress.search.runner import latest_study, trial_records
from autocompress.spaces import Candidate
from autocompress.tasks import load_task
from autocompress.teacher import get_teacher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--study", help="study name (default: the latest of the experiment)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="metric points (x100) worse than the teacher")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output-dir", help="the search's output directory, if not the experiment's default")
    args = parser.parse_args()

    exp = load_experiment(args.experiment, {"output_dir": args.output_dir} if args.output_dir else None)
    storage = optuna.storages.RDBStorage(exp.storage_url)
    name = args.study or latest_study(storage, exp.name)
    if name is None:
        print(f"no study of {exp.name} in {exp.storage_url}: run the search first", file=sys.stderr)
        return 2
    study = optuna.load_study(study_name=name, storage=storage)
    task = load_task(exp.task.name, exp.task.args)
    teacher = get_teacher(task, exp.task.args, exp.teacher, exp.seed, task_ref=exp.task.name, log=lambda _: None)
    val = task.loader("val", 256)
    teacher_acc = evaluate(teacher.model, val, task.metric)
    quality = QualityMetric.of(task)
    teacher_metrics = {METRIC: teacher_acc, f"latency_ms.{HOST}": 1.0, "size_bytes": 1.0}
    front = pareto_rows(make_rows(trial_records(study), teacher_metrics, HOST), exp.objectives, quality)
    eligible = [r for r in front if 100 * quality.sign * (teacher_acc - r.metric) <= args.max_drop]
    if not eligible:
        print(f"no front member within {args.max_drop} points of the teacher ({teacher_acc:.4f})")
        return 1
    best = min(eligible, key=lambda r: r.latency_ms)
    ctx = make_context(exp, teacher.model, task)
    compressed = build_candidate(Candidate.from_params(best.candidate), ctx)
    x = task.example_input(exp.latency.batch_size)
    lat = exp.latency
    with tempfile.TemporaryDirectory() as tmp:
        teacher_run = runnable(teacher.model, {}, ctx, Path(tmp) / "teacher")
        member_run = runnable(compressed.model, compressed.bits, ctx, Path(tmp) / "member")
        member_acc = evaluate(member_run, val, task.metric)
        teacher_acc = evaluate(teacher_run, val, task.metric)
        ratios, t_times, m_times = [], [], []
        for _ in range(args.rounds):
            t = measure_latency(teacher_run, x, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats)
            m = measure_latency(member_run, x, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats)
            t_times.append(t.median_ms)
            m_times.append(m.median_ms)
            ratios.append(t.median_ms / m.median_ms)
    print(f"study {name}: trial {best.trial} ({Candidate.from_params(best.candidate).describe()})")
    print(f"runtime   {exp.latency.runtime}, batch {lat.batch_size}, {lat.threads} thread(s), "
          f"median of {lat.repeats} runs per round")
    print(f"{quality.name}  teacher {teacher_acc:.4f}  member {member_acc:.4f}  "
          f"({100 * (member_acc - teacher_acc):+.2f} pt; in search {best.metric:.4f})")
    print(f"latency   teacher {statistics.median(t_times):.3f} ms  member {statistics.median(m_times):.3f} ms")
    print(f"speedup   median {statistics.median(ratios):.2f}x  min {min(ratios):.2f}x  max {max(ratios):.2f}x "
          f"over {args.rounds} alternating rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
