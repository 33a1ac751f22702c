"""A store that fails while a run reads it: the S3 server is stopped mid-run (a real stop, not
a mocked error), and the run ends with one line naming the shard's URL and what to do, exit
code 2, and its work kept: a checkpoint of the last completed step, from which `--resume`,
once the server is back, finishes equal to a run never interrupted.

The server here is this module's own, in a process of its own, so stopping it leaves the
other tests' server alone; started again, it is given back the objects it held.
`AWS_MAX_ATTEMPTS=1` turns botocore's retries off, so a failure is reported at once instead
of after the ~10 s of retries a user's run waits.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs
from safetensors.torch import load_file

from kdpipe.schemas.cache import Cache, open_cache
from kdpipe.schemas.errors import StorageError
from kdpipe.schemas.remote_cache import RemoteShards
from kdpipe.schemas.run_layout import RunLayout
from kdpipe.trainer import checkpoint as ckpt
from kdpipe.trainer import train as train_module

from ..conftest import run_cli

pytestmark = pytest.mark.slow

STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "tie_word_embeddings": True}


class Server:
    """moto's S3 server in a process of its own, on a fixed port of 127.0.0.1, that can be
    stopped (killed: what a store that goes away looks like to a reader) and started again.

    Not moto's in-process `ThreadedMotoServer`: the loader's worker processes are forked
    and would keep its listening socket open, so a stopped server would leave their requests
    hanging (a read timeout, not a refused connection). A new process starts with no bucket,
    so `start(restore=...)` puts back the objects copied out of one before."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, restore: tuple[Path, str] | None = None) -> None:
        """Start the server; `restore`: (a local copy of a bucket, the bucket) to put back."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.process.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.1)
        if restore is not None:
            copy, bucket = restore
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(bucket)
            fs.put(f"{copy}/", bucket, recursive=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A running server of this test's own, set in the environment as a user's endpoint is."""
    server = Server()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    server.start()
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def cache(server: Server, tiny_teacher_dir: Path, corpus_file: Path,
          capsys: pytest.CaptureFixture[str]) -> str:
    """A cache of shards of 2 sequences in the bucket `kdpipe-fails`."""
    s3fs.S3FileSystem().mkdir("kdpipe-fails")
    url = "s3://kdpipe-fails/cache"
    code, _, err = run_cli(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--data",
                            str(corpus_file), "--out", url, "--top-k", "8", "--max-length",
                            "48", "--shard-size", "2", "--batch-size", "4", "--no-progress"],
                           capsys)
    assert code == 0, err
    return url


def train_args(cache: str, student: Path, out: Path, workers: int) -> list[str]:
    """Two epochs of 4 sequences a step, none held out."""
    return ["train-student", "--cache", cache, "--student-config", str(student), "--out",
            str(out), "--epochs", "2", "--batch-size", "4", "--eval-fraction", "0",
            "--loader-workers", str(workers), "--no-progress"]


def error_line(err: str) -> str:
    """The one error line of a failed command (log lines may precede it; no traceback)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("kdpipe: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.parametrize("workers", [0, 1])
def test_store_stopped_mid_run_saves_a_checkpoint_that_resumes_exactly(
        server: Server, cache: str, tmp_path: Path, workers: int,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    whole = tmp_path / "whole"
    code, _, err = run_cli(train_args(cache, student, whole, workers), capsys)
    assert code == 0, err

    held = tmp_path / "held"
    s3fs.S3FileSystem().get("kdpipe-fails/", f"{held}/", recursive=True)
    real_after_step = train_module.after_step

    def store_goes_away(run: Any, *args: Any, **kwargs: Any) -> None:
        real_after_step(run, *args, **kwargs)
        if run.state.step == 2:  # the loader streams the shards of epoch 1 meanwhile
            server.stop()

    monkeypatch.setattr(train_module, "after_step", store_goes_away)
    stopped = tmp_path / "stopped"
    code, _, err = run_cli(train_args(cache, student, stopped, workers), capsys)
    line = error_line(err)
    assert code == 2, err
    assert f"kdpipe: error: {cache}/" in line and ".parquet: the store cannot be reached" in line
    # The batches the loader had read before the server went are still trained on.
    found = re.search(r"training stopped after step (\d+) of \d+ and saved checkpoint (\S+): "
                      r"add --resume to continue from it$", line)
    assert found is not None and int(found[1]) >= 2, line
    assert ckpt.list_checkpoints(stopped) == [Path(found[2])]
    assert Path(found[2]).name == f"step-{int(found[1]):06d}"
    assert not (stopped / "final").exists()

    monkeypatch.setattr(train_module, "after_step", real_after_step)
    server.start(restore=(held, "kdpipe-fails"))
    code, _, err = run_cli([*train_args(cache, student, stopped, workers), "--resume"], capsys)
    assert code == 0, err
    assert losses(stopped) == losses(whole)
    expected = load_file(whole / "final" / "model.safetensors")
    resumed = load_file(stopped / "final" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(expected[k].equal(resumed[k]) for k in expected)


@pytest.mark.parametrize("local_cache", [False, True])
def test_store_stopped_mid_evaluate_is_one_line(
        server: Server, cache: str, tmp_path: Path, local_cache: bool,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Streamed (the server goes before the second shard is opened), or copied into
    --local-cache (it goes before the second shard is downloaded: a reader with a local cache
    downloads every shard it lacks before its first batch)."""
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    run = tmp_path / "run"
    code, _, err = run_cli(["train-student", "--cache", cache, "--student-config",
                            str(student), "--out", str(run), "--max-steps", "1",
                            "--batch-size", "4", "--no-progress"], capsys)
    assert code == 0, err

    owner, name = (RemoteShards, "_fetch") if local_cache else (Cache, "open_shard")
    real = getattr(owner, name)
    calls = itertools.count(1)

    def store_goes_away(self: Any, shard: Any) -> Any:
        if next(calls) == 2:
            server.stop()
        return real(self, shard)

    monkeypatch.setattr(owner, name, store_goes_away)
    node = ["--local-cache", str(tmp_path / "node")] if local_cache else []
    code, _, err = run_cli(["evaluate", "--student", str(run / "final"), "--cache", cache,
                            "--batch-size", "2", "--no-progress", *node], capsys)
    line = error_line(err)
    assert code == 2, err
    assert re.match(rf"kdpipe: error: {cache}/shard-\d+\.parquet: the store cannot be reached "
                    r"\(\w+ after the library's retries\); .*then re-run the same command$",
                    line), line
    assert not any(".tmp-" in path.name for path in tmp_path.rglob("*"))  # no torn copy


def test_a_read_of_an_open_shard_fails_as_one_error(server: Server, cache: str) -> None:
    """The store goes after a shard's stream is open and before its bytes are read (the
    shards above are small enough for pyarrow's first read, of the footer, to take them
    whole): pyarrow hands up the library's error, and `Cache.reading` names the shard."""
    opened = open_cache(cache)
    shard = opened.manifest.shards[0]
    assert opened.remote is not None
    stream = opened.remote.open(shard)
    server.stop()
    with pytest.raises(StorageError, match=rf"^{cache}/{shard.file}: the store cannot be "
                                           r"reached \(EndpointConnectionError"), \
            opened.reading(shard):
        pq.ParquetFile(stream).read_row_group(0)


def test_under_torchrun_nothing_is_saved(tmp_path: Path) -> None:
    """`save` is collective and the other ranks did not see the failure: the line names the
    last checkpoint instead (none yet, then one), and nothing is written."""
    layout = RunLayout(tmp_path)
    run = SimpleNamespace(state=SimpleNamespace(step=5), total_steps=9, layout=layout,
                          run_dir=tmp_path, dist=SimpleNamespace(enabled=True))
    failure = StorageError("s3://b/c/shard-00001.parquet: the store cannot be reached")
    message = str(train_module.stopped_by_store(run, failure))  # type: ignore[arg-type]
    assert message == (f"{failure}; training stopped after step 5 of 9 with no checkpoint "
                       "saved (under torchrun the other ranks did not see the failure): none "
                       "to resume from yet")
    kept = layout.checkpoint(4)
    kept.mkdir(parents=True)
    for name in (ckpt.TRAINER_STATE_NAME, ckpt.TRAINING_STATE_NAME):
        (kept / name).write_text("{}")
    message = str(train_module.stopped_by_store(run, failure))  # type: ignore[arg-type]
    assert message.endswith(f"did not see the failure): add --resume to continue from {kept}")
    assert ckpt.list_checkpoints(tmp_path) == [kept]
