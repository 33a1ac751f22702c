"""Stage 1, the teacher side: read a corpus, run the teacher once, write the cache."""
