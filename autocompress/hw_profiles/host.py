"""Facts about the machine latency is measured on (logged with every search, stored in every profile)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, ``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_host(threads: int) -> dict[str, str]:
    """CPU, cores, the thread count used for latency, OS and runtime versions."""
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(threads),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "runtime": f"torch {torch.__version__} eager fp32",
    }


def runtime_version(runtime: str) -> str:
    """Version string of ``runtime`` (``torch-eager`` or ``onnxruntime``) as installed here."""
    if runtime == "torch-eager":
        return torch.__version__
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    raise ValueError(f"unknown runtime {runtime!r}: use torch-eager or onnxruntime")
