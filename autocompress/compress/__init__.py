"""Compression transforms: structured pruning, weight quantization, distillation, the pipeline."""

from autocompress.compress.pipeline import PipelineSettings, apply

__all__ = ["PipelineSettings", "apply"]
