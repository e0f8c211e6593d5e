"""Evaluators: accuracy on a data split, latency on this host, size in bytes."""

from autocompress.evaluators.accuracy import evaluate, top1_accuracy
from autocompress.evaluators.latency import Latency, measure_latency
from autocompress.evaluators.size import artifact_size_bytes, compressed_size_bytes, count_parameters, model_size_bytes

__all__ = [
    "Latency",
    "compressed_size_bytes",
    "count_parameters",
    "evaluate",
    "measure_latency",
    "model_size_bytes",
    "artifact_size_bytes",
    "top1_accuracy",
]
