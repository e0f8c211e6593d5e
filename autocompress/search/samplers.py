"""Optuna samplers by name: NSGA-II (default), multivariate TPE, random (the baseline).

Budgets reach NSGA-II and TPE through the constraint values each trial stores
(``Trial.set_constraint``, see :mod:`autocompress.search.constraints`); random search ignores them
by design.
"""

from __future__ import annotations

import optuna

from autocompress.config import MAX_SEED, SearchConfig


def make_sampler(config: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler named by ``config.sampler``, seeded for reproducibility."""
    # Backends derive seeds (the experiment's plus a worker's offset and the trials so far): folded
    # into NumPy's 0..2**32-1, which the samplers' generators accept, so a large seed never raises.
    seed %= MAX_SEED + 1
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=seed)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, n_startup_trials=config.population_size, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)
