"""Search controller: samplers, objectives, Pareto fronts, MLflow tracking, the backends and the runner."""

from autocompress.search.runner import run_search
from autocompress.search.setup import SearchInterrupted, SearchResult

__all__ = ["SearchInterrupted", "SearchResult", "run_search"]
