"""kdpipe: run a teacher once, cache what students need, train many students from the cache."""

__version__ = "0.1.0"
