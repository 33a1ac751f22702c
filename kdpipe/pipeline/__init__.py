"""The teacher side: read a corpus, run the teacher once, write the cache; build curricula."""
