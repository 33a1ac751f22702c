"""The student side: train students from a cache. Never imports `kdpipe.pipeline`; no teacher."""
