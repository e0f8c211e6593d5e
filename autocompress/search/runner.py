"""Run an experiment's search on the backend it names (``search.backend``): Optuna or Ray Tune.

The backends share :mod:`~autocompress.search.setup` (teacher, space, parent run, fronts) and
:mod:`~autocompress.search.record` (what a trial is in Optuna and MLflow) and never import each
other; this module is the only one that knows both.
"""

from __future__ import annotations

from collections.abc import Callable

from autocompress.config import Experiment, check_locations
from autocompress.search.optuna_backend import run_optuna_search, trial_records
from autocompress.search.setup import SearchInterrupted, SearchResult, latest_study

# latest_study and trial_records stay importable from here for benchmarks/front_speedup.py.
__all__ = ["SearchInterrupted", "SearchResult", "latest_study", "run_search", "trial_records"]


def run_search(
    exp: Experiment,
    *,
    resume: bool | str = False,
    retrain: bool = False,
    accept_teacher: bool = False,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) the search of ``exp`` until ``n_trials`` trials are finished or time runs out.

    Raises :class:`SearchInterrupted` on Ctrl-C, after the finished trials' fronts are published.
    """
    check_locations(exp)  # before anything creates the output directory or a store
    if exp.search.backend == "ray":
        # Imported here: Ray is slow to import and an Optuna search never needs it.
        from autocompress.search.ray_backend import run_ray_search

        return run_ray_search(exp, resume=resume, retrain=retrain, log=log)
    return run_optuna_search(exp, resume=resume, retrain=retrain, accept_teacher=accept_teacher, log=log)
