"""Stage 2, `kdpipe build-curriculum`: difficulty rankings of a cache's samples, from cached
teacher statistics, a student's scoring pass or its training snapshots. The only stage that
may import the trainer (to run a student over the cache)."""
