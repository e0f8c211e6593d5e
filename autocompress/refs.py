"""``package.module:function`` references, as experiment files and commands name user code."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from autocompress.errors import AutocompressError


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (newlines folded), at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def import_callable(ref: str, label: str) -> Callable:
    """The function ``ref`` (``package.module:function``) names; errors start with ``label``."""
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise AutocompressError(f"{label}: expected 'package.module:function'")
    if os.getcwd() not in sys.path:
        # As `python -m` does (and uvicorn, celery): a user's module beside the experiment file imports
        # without PYTHONPATH, also from the installed `autocompress` script.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AutocompressError(f"{label}: cannot import module {module_name!r} ({err})") from None
    except Exception as err:  # noqa: BLE001 - any failure while importing is the user's module
        raise AutocompressError(
            f"{label}: importing module {module_name!r} raised {type(err).__name__}: {one_line(err)}"
        ) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise AutocompressError(f"{label}: module {module_name!r} has no function {func_name!r}")
    return factory
