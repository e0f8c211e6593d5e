"""``package.module:function`` references, as experiment files and commands name user code."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from autocompress.errors import AutocompressError


def import_callable(ref: str, label: str) -> Callable:
    """The function ``ref`` (``package.module:function``) names; errors start with ``label``."""
    module_name, sep, func_name = ref.partition(":")
    if not sep or not module_name or not func_name:
        raise AutocompressError(f"{label}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AutocompressError(f"{label}: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise AutocompressError(f"{label}: module {module_name!r} has no function {func_name!r}")
    return factory
