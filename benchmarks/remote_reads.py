"""Benchmark reading a cache from an object store: streamed, and through --local-cache.

    python benchmarks/remote_reads.py --cache runs/stdlib/cache --out runs/bench-remote-reads

Uploads --cache to a local S3 server (moto's `ThreadedMotoServer` on 127.0.0.1, from the dev
extra) and reads every row group of every shard, all columns, as the trainer's loader does
(`Cache.open_shard`), in these arms, each in a fresh `open_cache`:

* local      the folder itself (checksums not checked: the read alone);
* streamed   from s3://, read-ahead buffer and pre-buffered row groups, checksums off;
* streamed+verify  the same with each shard's sha256 checked first (one more pass over it);
* local-cache 1st  with --local-cache: each shard downloaded and checked once, then read;
* local-cache 2nd  a second open over the same --local-cache: local reads, no hashing (the
  second epoch, or another student on the node).

Seconds per arm are the best of --repeats; the table gives each arm's time as a ratio to
`local`. moto is a Python server on the same machine, so the streamed arms measure kdpipe's
overhead plus moto's, not a real store's latency. Writes remote_reads.json and
remote_reads.md to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kdpipe.schemas.cache import Cache, open_cache


def read_all(cache: Cache) -> int:
    """Decode every row group of every shard; returns the bytes the manifest lists."""
    cache.check_shards(cache.manifest.shards)
    for shard in cache.manifest.shards:
        parquet = cache.open_shard(shard)
        for index in range(parquet.num_row_groups):
            parquet.read_row_group(index)
    return cache.manifest.num_bytes


def best(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(str(args.cache), "bench/cache", recursive=True)
    url = "s3://bench/cache"
    total = open_cache(args.cache).manifest.num_bytes

    def with_local_cache(folder: Path) -> Callable[[], object]:
        return lambda: read_all(open_cache(url, local_cache=folder))

    node = Path(tempfile.mkdtemp(prefix="bench-node-"))
    fresh = Path(tempfile.mkdtemp(prefix="bench-fresh-"))

    def first_fill() -> None:
        shutil.rmtree(fresh, ignore_errors=True)
        read_all(open_cache(url, local_cache=fresh))

    read_all(open_cache(url, local_cache=node))  # fills `node` for the second-epoch arm
    arms = {
        "local": best(args.repeats, lambda: read_all(open_cache(args.cache,
                                                                 verify_reads=False))),
        "streamed": best(args.repeats, lambda: read_all(open_cache(url, verify_reads=False))),
        "streamed+verify": best(args.repeats, lambda: read_all(open_cache(url))),
        "local-cache 1st": best(args.repeats, first_fill),
        "local-cache 2nd": best(args.repeats, with_local_cache(node)),
    }
    server.stop()
    shutil.rmtree(node, ignore_errors=True)
    shutil.rmtree(fresh, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"cache": str(args.cache), "bytes": total, "seconds": arms}
    (args.out / "remote_reads.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| arm | seconds | ratio to local | MB/s |", "|---|---|---|---|"]
    lines += [f"| {arm} | {s:.3f} | {s / arms['local']:.1f} | {total / s / 1e6:.0f} |"
              for arm, s in arms.items()]
    (args.out / "remote_reads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
