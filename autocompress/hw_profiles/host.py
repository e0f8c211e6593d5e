"""Facts about the machine latency is measured on (logged with every search, stored in every profile)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from autocompress.runtimes import get_runtime


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, ``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_host(threads: int, runtime: str | None = None) -> dict[str, str]:
    """CPU, cores, the thread count used for latency, OS, and with ``runtime`` its description and version."""
    facts = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(threads),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
    }
    if runtime is not None:
        facts["runtime"] = get_runtime(runtime).describe()
    return facts


def runtime_version(runtime: str) -> str:
    """Version string of the registered runtime ``runtime`` as installed here."""
    return get_runtime(runtime).version()
