"""NSGA-II against random search: front hypervolume with the same experiment, seed and trial count.

For each seed, runs the experiment's search once per sampler (same teacher, same space, same
number of trials; interleaved, so machine drift hits both alike) and prints the hypervolume of
each front against the teacher reference point (see ``search.report.front_hypervolume``), the
front size and the wall time, then the per-seed ratio NSGA-II / random.

Latency is scored from the shipped ONNX Runtime profile by default (``--profile``), not timed on
the host: a lookup-table prediction is the same for the same model every time, so the comparison
measures the samplers rather than the machine's noise. ``--host`` times every candidate instead.

    python benchmarks/sampler_hypervolume.py experiments/digits_cnn.yaml --n-trials 48 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from autocompress.config import load_experiment, parse_override
from autocompress.search import run_search
from autocompress.search.report import front_hypervolume


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="experiment YAML (e.g. experiments/digits_cnn.yaml)")
    parser.add_argument("--samplers", nargs="+", default=["nsga2", "random"], choices=["nsga2", "tpe", "random"])
    parser.add_argument("--n-trials", type=int, default=48, help="trials per search (default 48)")
    parser.add_argument("--population", type=int, default=8, help="NSGA-II population size (default 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="search seeds (default 0 1)")
    parser.add_argument("--profile", default="xeon-onnxruntime-1t", help="hardware profile scoring latency")
    parser.add_argument("--host", action="store_true", help="measure latency on this host instead of --profile")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_sampler_hypervolume"), help="outputs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[tuple[int, str], float] = {}
    print(f"{'seed':>4} {'sampler':>8} {'hypervolume':>12} {'front':>6} {'finished':>9} {'wall s':>8}", flush=True)
    for seed in args.seeds:
        for sampler in args.samplers:
            overrides = {
                "search.sampler": sampler,
                "search.seed": seed,
                "search.n_trials": args.n_trials,
                "search.population_size": args.population,
                "search.study_name": f"{sampler}-seed{seed}-{stamp}",
                "output_dir": str(args.out / f"{sampler}-seed{seed}"),
                "tracking.uri": f"sqlite:///{(args.out / 'mlflow.db').resolve()}",
                "tracking.experiment": f"sampler-hypervolume-{stamp}",
            }
            if not args.host:
                overrides.update({"profiles": [args.profile], "latency.measure_host": False})
            overrides.update(dict(parse_override(text) for text in args.set))
            exp = load_experiment(args.experiment, overrides)
            started = time.monotonic()
            result = run_search(exp, log=lambda _: None)
            wall = time.monotonic() - started
            front = result.fronts[exp.primary]
            volume = front_hypervolume(front, result.teacher, exp.objectives, exp.primary)
            results[seed, sampler] = volume
            print(
                f"{seed:>4} {sampler:>8} {volume:12.4f} {len(front):>6} {result.finished:>9} {wall:8.0f}", flush=True
            )
    base = args.samplers[-1]
    for sampler in args.samplers[:-1]:
        ratios = [results[s, sampler] / results[s, base] for s in args.seeds if results[s, base] > 0]
        wins = sum(results[s, sampler] > results[s, base] for s in args.seeds)
        mean = {name: statistics.mean(results[s, name] for s in args.seeds) for name in (sampler, base)}
        print(
            f"\n{sampler} vs {base}: mean hypervolume {mean[sampler]:.4f} vs {mean[base]:.4f}; "
            f"higher on {wins} of {len(args.seeds)} seeds; per-seed ratio "
            + ", ".join(f"{r:.3f}" for r in ratios)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
