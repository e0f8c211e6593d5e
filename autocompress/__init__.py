"""autocompress: hardware-aware automated model compression search for PyTorch.

The flow runs one way: experiment YAML -> :class:`~autocompress.config.Experiment` -> task and
teacher -> :class:`~autocompress.spaces.SearchSpace` -> :class:`~autocompress.spaces.Candidate`
-> compressed model -> accuracy / latency / size -> Pareto front -> MLflow.
"""

from autocompress.errors import AutocompressError, ConfigError

__version__ = "0.1.0"

__all__ = ["AutocompressError", "ConfigError", "__version__"]
