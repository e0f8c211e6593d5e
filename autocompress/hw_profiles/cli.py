"""``autocompress profile measure | validate | list``: build, check and show hardware profiles.

Registered into the main parser by :func:`add_profile_commands`; user-fixable problems raise
:class:`~autocompress.errors.AutocompressError`, which ``autocompress.cli.main`` prints as one line
(exit 2).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from autocompress.errors import AutocompressError
from autocompress.runtimes import UnknownRuntime, canonical_name, runtime_names


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experiment", type=Path, required=True, metavar="FILE", help="experiment YAML whose search space to profile"
    )
    p.add_argument(
        "--model",
        metavar="MODULE:FUNCTION",
        help="profile this model instead of the experiment task's (e.g. autocompress.models:resnet18_cifar); "
        "the experiment still supplies the space settings; needs --input-shape",
    )
    p.add_argument(
        "--input-shape", metavar="C,H,W", help="one sample's input shape for --model, without batch (e.g. 3,32,32)"
    )


def _load_target(args: argparse.Namespace):
    from autocompress.hw_profiles.target import load_target, parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    return load_target(args.experiment, args.model, shape)


def _cpu(args: argparse.Namespace) -> int | None:
    from autocompress.hw_profiles.measure import default_cpu

    if args.no_pin:
        return None
    return default_cpu() if args.cpu is None else args.cpu


def cmd_measure(args: argparse.Namespace) -> int:
    from autocompress.hw_profiles.measure import MeasureSettings, measure_profile

    try:
        runtime = canonical_name(args.runtime)
    except UnknownRuntime as err:
        raise AutocompressError(f"--runtime: {err}") from None
    target = _load_target(args)
    settings = MeasureSettings(
        runtime=runtime,
        threads=args.threads if args.threads is not None else target.experiment.latency.threads,
        repeats=args.repeats,
        warmup_ms=args.warmup_ms,
        min_sample_ms=args.min_sample_ms,
        cpu=_cpu(args),
        pool=args.pool,
        seed=args.seed,
        calibration=args.calibration,
        profile_id=args.id,
        description=args.description or "",
    )
    measure_profile(target, args.out, settings, log=lambda msg: print(msg, file=sys.stderr))
    print(args.out)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The validate command line that reproduces this run (recorded with the summary)."""
    parts = ["autocompress", "profile", "validate", str(args.profile), "--experiment", str(args.experiment)]
    if args.model:
        parts += ["--model", args.model, "--input-shape", args.input_shape or ""]
    parts += ["--n", str(args.n)]
    if args.seed != 2024:
        parts += ["--seed", str(args.seed)]
    return shlex.join(parts)


def cmd_validate(args: argparse.Namespace) -> int:
    from autocompress.hw_profiles.profile import load_profile, resolve_profile_path, save_profile
    from autocompress.hw_profiles.validate import validate_profile

    if args.n < 1:
        raise AutocompressError(f"--n {args.n}: validate at least one candidate")
    path = resolve_profile_path(args.profile)
    profile = load_profile(path)
    target = _load_target(args)
    command = _command(args)
    report = validate_profile(
        profile,
        target,
        args.n,
        seed=args.seed,
        cpu=_cpu(args),
        repeats=args.repeats,
        out_dir=args.out_dir,
        command=command,
    )
    for file in report.files:
        print(f"wrote {file}")
    if args.record:
        kept = [
            v
            for v in profile.validation
            if (v.model, v.experiment) != (report.summary.model, report.summary.experiment)
        ]
        save_profile(profile.model_copy(update={"validation": [*kept, report.summary]}), path)
        print(f"recorded the summary in {path}")
    return 0


def cmd_rehash(args: argparse.Namespace) -> int:
    from autocompress.hw_profiles.profile import rehash_profile

    for path in args.paths:
        print(f"{rehash_profile(Path(path))}: valid, content hash written")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from autocompress.hw_profiles.profile import load_profile, shipped_profiles

    paths = [Path(p) for p in args.paths] if args.paths else list(shipped_profiles().values())
    if not paths:
        print("no shipped profiles")
        return 0
    for path in paths:
        p = load_profile(path)
        print(
            f"{p.id}  {p.runtime.name} {p.runtime.version} ({'/'.join(p.runtime.dtypes)}), {p.host.threads} thread(s), "
            f"{len(p.lut)} LUT entries, measured {p.measured_at[:10]}"
        )
        print(f"    cpu: {p.host.cpu} ({p.host.cores} cores); file: {path}")
        if p.description:
            print(f"    {p.description}")
        for v in p.validation:
            scaled = ""
            if v.drift is not None:
                scaled = (
                    f" (machine {(v.drift.ratio_median - 1) * 100:+.1f}% vs calibration; scaled by it: median "
                    f"{v.drift.median_abs_error_pct:.2f}%, p90 {v.drift.p90_abs_error_pct:.2f}%)"
                )
            print(
                f"    validated on {v.model.rsplit('.', 1)[-1]} ({v.experiment}, n={v.n}): |error| median "
                f"{v.median_abs_error_pct:.2f}%, p90 {v.p90_abs_error_pct:.2f}%, max {v.max_abs_error_pct:.2f}%{scaled}"
            )
    return 0


def _pin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu", type=int, metavar="N", help="pin the measuring process to CPU N (default: the last allowed CPU)"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin the measuring process to one CPU")


def add_profile_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``profile measure|validate|list`` on the main parser's subcommands."""
    from autocompress.hw_profiles.profile import DEFAULT_RUNTIME

    profile = subparsers.add_parser(
        "profile",
        help="measure, validate and list hardware latency profiles",
        description="Hardware profiles: lookup tables of operator latencies measured on one machine and runtime, "
        "used to predict a compressed model's latency without running it.",
    )
    sub = profile.add_subparsers(dest="profile_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "measure",
        help="measure every operator configuration of an experiment's space into a profile",
        description="Enumerate the operator configurations the experiment's space can produce, time each in "
        "isolation (warm-up, fixed threads, median of repeats), then time a few candidates end to end and fit "
        "the overhead terms. Resumable: rerun the same command after an interruption; an existing --out "
        "profile of the same machine and runtime is extended (another experiment's operators are added).",
    )
    _target_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="profile JSON to create or extend")
    p.add_argument(
        "--runtime",
        default=DEFAULT_RUNTIME,
        metavar="RUNTIME",
        help=f"runtime to measure: {' or '.join(runtime_names())} (default {DEFAULT_RUNTIME})",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="intra-op threads (default: the experiment's latency.threads)"
    )
    p.add_argument("--repeats", type=int, default=30, metavar="N", help="timed samples per operator (default 30)")
    p.add_argument("--warmup-ms", type=float, default=20.0, metavar="MS", help="warm-up time per operator (default 20)")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=1.0,
        metavar="MS",
        help="each timed sample repeats the operator until it lasts this long (default 1)",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=4096,
        metavar="N",
        help="candidates to enumerate signatures from: all if the space has at most N, else N random (default 4096)",
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=32,
        metavar="N",
        help="random candidates timed end to end to fit the overhead terms (default 32: 4 per fitted scale)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random enumeration pool (default 0)")
    p.add_argument("--id", metavar="ID", help="profile id for a new profile (default <runtime>-<threads>t)")
    p.add_argument("--description", metavar="TEXT", help="free-text description stored in a new profile")
    _pin_args(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser(
        "validate",
        help="compare predicted with measured latency on random candidates",
        description="Draw random candidates of the experiment's space, predict each one's latency from the "
        "profile and measure it end to end here; print the table and the median, p90 and max absolute % error, "
        "and save a CSV, a JSON summary and a predicted-vs-measured scatter plot.",
    )
    p.add_argument("profile", metavar="PROFILE", help="profile JSON file, or the id of a shipped profile")
    _target_args(p)
    p.add_argument("--n", type=int, default=30, metavar="N", help="random candidates to validate (default 30)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the candidate draw (default 2024)")
    p.add_argument("--repeats", type=int, default=30, metavar="N", help="timed samples per end-to-end run (default 30)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/profile_validation"),
        metavar="DIR",
        help="where the CSV, PNG and JSON go (default runs/profile_validation)",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="store the summary in the profile file (replacing one for the same model and experiment)",
    )
    _pin_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "list",
        help="show the shipped profiles (or the given files)",
        description="List hardware profiles: id, runtime, threads, CPU, LUT size and recorded validation results.",
    )
    p.add_argument("paths", nargs="*", metavar="PROFILE", help="profile files to show (default: the shipped ones)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "rehash",
        help="re-sign a profile file you changed yourself (write the hash of its contents)",
        description="Validate each profile file and write it again with content_sha256 of its current contents. "
        "Searches refuse a profile whose hash is missing or wrong; use this only for changes you made.",
    )
    p.add_argument("paths", nargs="+", metavar="PROFILE", help="profile files to re-sign")
    p.set_defaults(func=cmd_rehash)
