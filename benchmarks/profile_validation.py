"""Validate hardware profiles on the built-in models, repeatedly, and record the results in the profiles.

For each profile and each model (the built-in ``digits`` CNN of ``experiments/digits_cnn.yaml``, the
built-in ``mnist1d`` 1-D CNN of ``experiments/mnist1d_cnn.yaml``, and the ResNet-18-style
``autocompress.models:resnet18_cifar`` at 3x32x32 under the digits space settings)
runs ``profile validate`` ``--rounds`` times with different candidate draws, prints every round's
median / p90 / max absolute % error and the prediction time, and (with ``--record``) stores the
first round's summary in the profile file, as ``autocompress profile validate --record`` would.
Each line also gives the same-model drift (the profile's calibration candidates re-timed in the same
passes, now against at calibration) and the error with the predictions scaled by it, and the probe's
drift (dispatch/compute). Run it on a quiet machine: the end-to-end measurements are the reference.

    python benchmarks/profile_validation.py autocompress/hw_profiles/xeon-torch-eager-1t.json \\
        autocompress/hw_profiles/xeon-onnxruntime-1t.json --n 30 --rounds 3 --record
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from collections import Counter
from pathlib import Path

from autocompress.hw_profiles.measure import default_cpu
from autocompress.hw_profiles.probe import drift
from autocompress.hw_profiles.profile import load_profile, save_profile
from autocompress.hw_profiles.target import load_target
from autocompress.hw_profiles.validate import VALIDATION_SEED, validate_profile

EXPERIMENT = "experiments/digits_cnn.yaml"
MODELS = {  # name: (experiment, model reference, input shape)
    "digits": (EXPERIMENT, None, None),
    "mnist1d": ("experiments/mnist1d_cnn.yaml", None, None),
    "resnet18": (EXPERIMENT, "autocompress.models:resnet18_cifar", (3, 32, 32)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="profile JSON files to validate")
    parser.add_argument("--n", type=int, default=30, help="candidates per round (default 30)")
    parser.add_argument("--rounds", type=int, default=2, help="validation rounds per profile and model (default 2)")
    parser.add_argument("--first-round", type=int, default=0, help="number of the first round (its seed offset)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/profile_validation"), help="report files")
    parser.add_argument("--record", action="store_true", help="store the first round's summary in each profile")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    args = parser.parse_args()

    targets = {name: load_target(*MODELS[name]) for name in args.models}
    lines = []
    for path in args.profiles:
        profile = load_profile(path)
        recorded = list(profile.validation)
        for name, target in targets.items():
            experiment, ref, shape = MODELS[name]
            for round_ in range(args.first_round, args.first_round + args.rounds):
                seed = VALIDATION_SEED + round_
                parts = ["autocompress", "profile", "validate", str(path), "--experiment", experiment]
                if ref:
                    parts += ["--model", ref, "--input-shape", ",".join(map(str, shape))]
                parts += ["--n", str(args.n)] + (["--seed", str(seed)] if round_ else [])
                report = validate_profile(
                    profile,
                    target,
                    args.n,
                    seed=seed,
                    cpu=default_cpu(),
                    out_dir=args.out_dir / f"round{round_}",
                    command=shlex.join(parts),
                    log=lambda _: None,
                )
                s = report.summary
                bias = statistics.mean((r.predicted_ms / r.measured_ms - 1) * 100 for r in s.rows)
                machine = "no probe in profile"
                if profile.probe is not None and s.probe is not None:
                    d, c = drift(profile.probe, s.probe)
                    machine = f"probe {d:+5.1f}%/{c:+5.1f}%"
                if s.drift is not None:
                    machine = (
                        f"same-model drift {(s.drift.ratio_median - 1) * 100:+5.1f}%, scaled |error| median "
                        f"{s.drift.median_abs_error_pct:5.2f}% p90 {s.drift.p90_abs_error_pct:5.2f}%; {machine}"
                    )
                via = ", ".join(f"{n} {k}" for k, n in Counter(r.source for r in s.rows).most_common())
                lines.append(
                    f"{profile.id:<24} {name:<9} round {round_}: |error| median {s.median_abs_error_pct:5.2f}%  "
                    f"p90 {s.p90_abs_error_pct:5.2f}%  max {s.max_abs_error_pct:5.2f}%  bias {bias:+5.2f}%  "
                    f"predict {report.predict_ms_median:6.2f} ms/candidate (max {max(report.predict_ms):6.1f}; "
                    f"{via})  {machine}"
                )
                print(lines[-1], flush=True)
                if round_ == 0:
                    recorded = [v for v in recorded if (v.model, v.experiment) != (s.model, s.experiment)] + [s]
        if args.record:
            save_profile(load_profile(path).model_copy(update={"validation": recorded}), path)
    print("\n".join(["", *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
