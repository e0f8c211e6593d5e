"""Runtimes: what executes candidates, found by name (see :mod:`.base`).

Built in: ``torch-eager`` (:mod:`.torch_eager`, alias ``torch``) and ``onnxruntime``
(:mod:`.onnxruntime`). Importing this package is cheap; a runtime's module loads on the first
registry query.
"""

from autocompress.runtimes.base import (
    ProfileUnit,
    Runtime,
    UnknownRuntime,
    canonical_name,
    get_runtime,
    register,
    runtime_names,
)

__all__ = ["ProfileUnit", "Runtime", "UnknownRuntime", "canonical_name", "get_runtime", "register", "runtime_names"]
