"""Search controller: samplers, objectives, Pareto fronts, MLflow tracking, the runner."""

from autocompress.search.runner import SearchInterrupted, SearchResult, run_search

__all__ = ["SearchInterrupted", "SearchResult", "run_search"]
