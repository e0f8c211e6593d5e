"""Latency measured on this host: fixed thread count, warm-up, median (and p90) of repeats.

Measurement is the ground truth every latency figure in autocompress comes from; lookup-table
predictions (hardware profiles) are checked against it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Latency:
    """Batch latency in milliseconds: median and 90th percentile over ``repeats`` runs."""

    median_ms: float
    p90_ms: float
    repeats: int
    threads: int


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous value."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    threads: int = 1,
    warmup: int = 10,
    repeats: int = 50,
) -> Latency:
    """Time ``model(example_input)`` in eval/inference mode; the median resists outliers."""
    was_training = model.training
    model.eval()
    times = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(example_input)
        for _ in range(repeats):
            start = time.perf_counter()
            model(example_input)
            times.append((time.perf_counter() - start) * 1e3)
    model.train(was_training)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Latency(median_ms=statistics.median(times), p90_ms=p90, repeats=repeats, threads=threads)
