"""The on-disk contract between the teacher side (`pipeline/`) and the student side (`trainer/`).

Everything kdpipe writes is described here: the Parquet shard schema, the cache manifest, and
the fingerprints that tie a cache to its teacher, tokenizer and corpus. Kept dependency-light
(stdlib + pyarrow) so a reader of a cache needs nothing else.
"""

from kdpipe.schemas.errors import CacheFormatError, ConfigError, KdpipeError

__all__ = ["CacheFormatError", "ConfigError", "KdpipeError"]
