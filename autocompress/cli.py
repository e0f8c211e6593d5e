"""The ``autocompress`` command: ``search`` and ``validate`` (more verbs plug in here).

Every user-fixable problem ends as one line on stderr and exit status 2; an interrupted search
exits 130 after saving what it finished. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from autocompress import __version__
from autocompress.errors import AutocompressError
from autocompress.hw_profiles.cli import add_profile_commands
from autocompress.verbs import add_review_commands

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _overrides(args: argparse.Namespace) -> dict:
    from autocompress.config import parse_override

    overrides = dict(parse_override(text) for text in args.set or [])
    for key, attr in (
        ("search.n_trials", "n_trials"),
        ("search.timeout", "timeout"),
        ("search.workers", "workers"),
        ("output_dir", "output_dir"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    return overrides


def cmd_validate(args: argparse.Namespace) -> int:
    from autocompress.config import load_experiment
    from autocompress.preflight import preflight

    exp = load_experiment(args.experiment, _overrides(args))
    preflight(exp)
    print(
        f"{args.experiment}: valid experiment {exp.name!r} (task {exp.task.name}, "
        f"{exp.search.n_trials} trials, objectives {', '.join(exp.objectives)})"
    )
    return 0


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C: the trial in flight re-queued, fronts published


def cmd_search(args: argparse.Namespace) -> int:
    from autocompress.config import load_experiment
    from autocompress.search import SearchInterrupted, run_search

    exp = load_experiment(args.experiment, _overrides(args))
    # `kill PID` (service managers, batch schedulers, a timeout) stops a search as Ctrl-C does.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        run_search(exp, resume=args.resume or False, retrain=args.retrain, accept_teacher=args.accept_teacher)
    except SearchInterrupted as err:
        print(f"autocompress: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from autocompress.config import load_experiment
    from autocompress.search.optuna_backend import sync_search

    exp = load_experiment(args.experiment, _overrides(args))
    if exp.search.backend != "optuna":
        raise AutocompressError(
            f"sync: search.backend {exp.search.backend!r} keeps no study to sync from (optuna does)"
        )
    sync_search(exp, args.study)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autocompress",
        description="Hardware-aware compression search for PyTorch models: per-layer pruning and "
        "quantization with distillation, scored on the task's metric and measured latency, logged to MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"autocompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def experiment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("experiment", type=Path, help="experiment YAML file (see experiments/)")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config key, dotted path, value read as YAML (e.g. --set finetune.epochs=1); repeatable",
        )

    p = sub.add_parser(
        "search",
        help="run (or resume) a compression search",
        description="Run the experiment's search: train or load the teacher, score each "
        "candidate (prune, fine-tune with distillation, quantize; the task's metric, latency, size), "
        "print and log the Pareto front. Finished trials are stored as they finish.",
    )
    experiment_args(p)
    p.add_argument("--n-trials", type=int, metavar="N", help="finished trials to reach (overrides search.n_trials)")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop starting new trials after this many seconds (overrides search.timeout)",
    )
    p.add_argument(
        "--output-dir", type=Path, metavar="DIR", help="where the study database and fronts go (default runs/<name>)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="STUDY",
        help="continue the latest study of this experiment (or the named STUDY) up to n_trials, "
        "re-running trials a crash interrupted; the experiment must be unchanged",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes running trials of the study in parallel (overrides search.workers); more searches "
        "can also join a running one from other shells with --resume",
    )
    p.add_argument("--retrain", action="store_true", help="train the teacher again even if a cached one exists")
    p.add_argument(
        "--accept-teacher",
        action="store_true",
        help="with --resume: continue even if the teacher's weights differ from those the study started with",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "sync",
        help="write a search's record to MLflow from its study (after a tracking outage or a lost store)",
        description="Bring the MLflow record of the experiment's latest study (or --study) in line with the "
        "study: runs missing or cut off are written, a lost parent run is rebuilt, fronts and tags re-published. "
        "Searches do this themselves on --resume; use it when the server was away at the end of a search.",
    )
    experiment_args(p)
    p.add_argument("--study", metavar="NAME", help="the study to sync (default: the experiment's latest)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser(
        "validate",
        help="check an experiment file and exit",
        description="Validate an experiment file; prints one line naming the first problem.",
    )
    experiment_args(p)
    p.set_defaults(func=cmd_validate)
    add_profile_commands(sub)
    add_review_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except AutocompressError as err:
        print(f"autocompress: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other command-line tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
