"""Named kill points for crash tests: ``AUTOCOMPRESS_KILL_AT=<point>[@<n>]`` SIGKILLs the process there.

A search must be recoverable whatever instant its process dies (see the ``--resume`` rules in
:mod:`~autocompress.search.optuna_backend`). Killing a subprocess from outside at a chosen instant
is a race; these points let a test stop it at exactly the step it wants to check (between
``study.ask`` and the trial's attributes, between ``tell`` and the MLflow run's end, ...), the way
databases test crash recovery with fail points. Unset (always, outside tests) a point costs one
dictionary lookup. ``@n`` kills at the n-th time the point is reached (default the first).
"""

from __future__ import annotations

import os
import signal

ENV = "AUTOCOMPRESS_KILL_AT"

POINTS = (
    "teacher_epoch",  # after a teacher training epoch
    "after_ask",  # the trial exists (RUNNING), none of its attributes yet
    "after_worker_attr",  # the trial says which process runs it
    "after_run_start",  # its MLflow run exists (RUNNING)
    "finetune_epoch",  # after a fine-tune epoch was logged
    "before_tell",  # the trial's figures are stored on it, not told yet
    "after_tell",  # told COMPLETE; its MLflow run not closed yet
    "after_end_run",  # the MLflow run closed
    "before_finish",  # every trial done; the fronts not published yet
)
"""Where a test can kill a search, in the order a trial reaches them."""

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if ``AUTOCOMPRESS_KILL_AT`` names ``name`` (at its n-th hit with ``@n``)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
