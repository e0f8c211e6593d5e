"""Tasks: a model factory, train/val/test data and a metric, bundled as a :class:`Task`.

Built-in tasks generate or ship their data (nothing is downloaded). A user task is any
``package.module:function`` that takes the experiment's ``task.args`` as keyword arguments
and returns a :class:`Task`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autocompress.errors import AutocompressError
from autocompress.refs import import_callable, one_line
from autocompress.tasks.base import Metric, Task

__all__ = ["BUILTIN_TASKS", "Metric", "Task", "load_task", "resolve_task_factory"]


def _builtin_tasks() -> dict[str, Callable[..., Task]]:
    from autocompress.tasks.digits import digits_task
    from autocompress.tasks.minilm import minilm_topics_task
    from autocompress.tasks.mnist1d import mnist1d_task

    return {"digits": digits_task, "mnist1d": mnist1d_task, "minilm-topics": minilm_topics_task}


BUILTIN_TASKS: tuple[str, ...] = ("digits", "mnist1d", "minilm-topics")


def resolve_task_factory(name: str) -> Callable[..., Task]:
    """The factory for a built-in task name or a ``package.module:function`` reference."""
    if name in BUILTIN_TASKS:
        return _builtin_tasks()[name]
    return import_callable(name, f"task {name!r}")


def load_task(name: str, args: dict[str, Any] | None = None) -> Task:
    """Build the task ``name`` with keyword ``args``; errors name the task and the problem."""
    factory = resolve_task_factory(name)
    try:
        task = factory(**(args or {}))
    except AutocompressError:
        raise
    except TypeError as err:
        raise AutocompressError(f"task {name!r}: bad task.args ({one_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - a user task that raises is reported in one line, not a traceback
        raise AutocompressError(
            f"task {name!r}: the task function raised {type(err).__name__}: {one_line(err)}"
        ) from None
    if not isinstance(task, Task):
        raise AutocompressError(
            f"task {name!r}: the function must return autocompress.tasks.Task, got {type(task).__name__}"
        )
    return task
