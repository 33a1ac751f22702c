"""An S3 server on 127.0.0.1 (moto's `ThreadedMotoServer`, from the `dev` extra) for the
object-storage tests, and a fresh bucket per test.

moto and s3fs are imported unconditionally: where they are missing these tests fail at
collection, as CI must, instead of being skipped. Credentials and the endpoint reach s3fs the
way a user's do, through the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from moto.server import ThreadedMotoServer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a running S3 server, set in the environment with test keys."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)  # never the user's own
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture()
def fs(s3_endpoint: str) -> s3fs.S3FileSystem:
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


@pytest.fixture()
def bucket(fs: s3fs.S3FileSystem) -> str:
    """A new, empty bucket: `s3://NAME`."""
    name = f"kdpipe-test-{os.getpid()}-{next(_buckets)}"
    fs.mkdir(name)
    return f"s3://{name}"


def snapshot(fs: s3fs.S3FileSystem, url: str) -> dict[str, tuple[int, str]]:
    """Every object under `url`: name -> (size, ETag), to show a store was left unchanged."""
    root = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {name[len(root) + 1:]: (info["size"], info["ETag"])
            for name, info in fs.find(root, detail=True).items()}


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    """Eight short stdlib excerpts as JSON lines: several shards of 2 sequences."""
    path = tmp_path / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for name in ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "glob.py", "abc.py",
                     "heapq.py", "keyword.py"):
            text = (STDLIB / name).read_text(encoding="utf-8")
            f.write(json.dumps({"text": text[:400]}) + "\n")
    return path
