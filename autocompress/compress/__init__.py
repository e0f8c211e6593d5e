"""Compression transforms the techniques call: structured pruning, low-rank, weight quantization,
distillation, ONNX deployment, and the build order (:mod:`autocompress.compress.pipeline`)."""
