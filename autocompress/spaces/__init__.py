"""Search spaces: layer discovery, per-layer choices, and the :class:`Candidate` they yield."""

from autocompress.spaces.candidate import Candidate
from autocompress.spaces.space import SearchSpace, build_space

__all__ = ["Candidate", "SearchSpace", "build_space"]
