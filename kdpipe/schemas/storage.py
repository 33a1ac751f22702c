"""Where a cache, a corpus or a curriculum lives: a local path or a URL of an object store.

Every flag that takes a path also takes a URL (`s3://`, `gs://`, `file://`, any protocol
fsspec knows). `location(value, flag)` decides which once, so a URL is never taken for a
local path (`Path("s3://b/c")` would silently be the local folder `s3:/b/c`). `file://` URLs
are local paths. A remote location is a `Store`: an fsspec file system and a root inside it.

The protocol libraries (s3fs, gcsfs, huggingface_hub) are optional extras, imported by fsspec
only when a URL of theirs is used; a missing one is a one-line ConfigError naming the extra.
Credentials and endpoints come only from those libraries' own environment and configuration
files (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`,
...): kdpipe takes none as a flag and logs none.

Object stores have no atomic rename, so a `Store` writes an object once under its final name
and reads it back to verify it (`put_file`); the commit protocol built on it is described in
docs/cache-format.md ("Caches in object storage").
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kdpipe.schemas.errors import ConfigError, KdpipeError, StorageError
from kdpipe.schemas.io import sha256_file

log = logging.getLogger(__name__)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
BLOCK_BYTES = 4 << 20  # hashing and copying block; hashlib releases the GIL on large blocks
READAHEAD_BYTES = 16 << 20  # what a streamed shard reads ahead of the row group asked for

# protocol -> the kdpipe extra that installs its fsspec implementation
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf"}
# protocols whose first path component is a bucket that must exist before anything is written
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs"}


def is_url(value: str | Path) -> bool:
    """Whether `value` is a URL (`scheme://...`) rather than a local path."""
    return isinstance(value, str) and _URL.match(value) is not None


def location(value: str | Path, flag: str) -> Path | Store:
    """A local Path, or the `Store` of a URL (`file://` URLs are local paths).

    Raises ConfigError for a protocol fsspec does not know or whose package is missing,
    naming `flag` and the extra to install.
    """
    if not is_url(value):
        return Path(os.path.expanduser(str(value)))
    url = str(value).rstrip("/")
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("file", "local"):
        return Path(url.split("://", 1)[1])
    _filesystem(url, protocol, flag)  # a missing package is reported here, naming the flag
    return Store(url=url, protocol=protocol, root=_strip(url))


def _strip(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def _filesystem(url: str, protocol: str, flag: str) -> Any:
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(
            f"{flag} {url}: unknown storage protocol {protocol}://; kdpipe reads local paths, "
            "s3:// (pip install 'kdpipe[s3]'), gs:// (pip install 'kdpipe[gcs]') and any "
            "protocol fsspec knows, with its package installed") from None
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'kdpipe[{extra}]'" if extra else f"install the package ({exc})"
        raise ConfigError(f"{flag} {url}: {protocol}:// URLs need an fsspec implementation "
                          f"that is not installed: {hint}") from None
    return cls()  # options (endpoint, credentials) from the library's environment and config


@dataclass(frozen=True)
class Store:
    """A folder in a remote file system: `url` as given, `root` its path inside `fs`."""

    url: str
    protocol: str
    root: str

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self) -> Any:
        """The protocol's fsspec file system in this process. Not held by the Store: s3fs
        and gcsfs refuse to be used in a forked child (the loader's worker processes), and
        fsspec's instance cache makes a new one per process and reuses it within one."""
        import fsspec

        return fsspec.filesystem(self.protocol)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def files(self) -> dict[str, int]:
        """Every object under the folder: name relative to it -> size in bytes ({} when
        there is none), as the store holds it now: another process may have written since."""
        with store_errors(self):
            self.fs.invalidate_cache(self.root)
            if not self.fs.exists(self.root):
                return {}
            found = self.fs.find(self.root, detail=True)
        prefix = self.root + "/"
        return {name[len(prefix):]: int(info["size"]) for name, info in found.items()
                if name.startswith(prefix) and info.get("type", "file") == "file"}

    def is_file(self, name: str) -> bool:
        with store_errors(self):
            self.fs.invalidate_cache(self.path(name))
            return bool(self.fs.isfile(self.path(name)))

    def read_bytes(self, name: str) -> bytes:
        with store_errors(self):
            return bytes(self.fs.cat_file(self.path(name)))

    def open(self, name: str) -> IO[bytes]:
        """Stream an object, reading ahead `READAHEAD_BYTES` past each read. Opening it fails
        as a StorageError naming its URL; its reads raise the library's exceptions (read them
        inside `store_errors(store, reading=URL)`)."""
        with store_errors(self, reading=f"{self.url}/{name}"):
            return self.fs.open(self.path(name), "rb", block_size=READAHEAD_BYTES,
                                cache_type="readahead")

    def _blocks(self, name: str) -> Iterator[bytes]:
        """The object's bytes in blocks of `BLOCK_BYTES`, streamed. Only the store's reads are
        inside `store_errors`: what the caller does with a block (a local write that finds
        the disk full) keeps its own errors."""
        url = f"{self.url}/{name}"
        with store_errors(self, reading=url):
            stream = self.fs.open(self.path(name), "rb", block_size=BLOCK_BYTES)
        with stream:
            while True:
                with store_errors(self, reading=url):
                    block = stream.read(BLOCK_BYTES)
                if not block:
                    return
                yield block

    def sha256(self, name: str) -> str:
        """Hex sha256 of an object, streamed."""
        digest = hashlib.sha256()
        for block in self._blocks(name):
            digest.update(block)
        return digest.hexdigest()

    def get_file(self, name: str, dest: Path, sha256: str | None = None) -> bool:
        """Download an object to `dest` via a temporary sibling renamed when complete (two
        processes filling one folder at once both end with a whole file). With `sha256`, the
        bytes are checked first: False (and nothing written) when they differ."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        # one temporary per process and thread: two loader threads may fetch one shard
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for block in self._blocks(name):
                    digest.update(block)
                    out.write(block)
            if sha256 is not None and digest.hexdigest() != sha256:
                return False
            os.replace(tmp, dest)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, name: str) -> None:
        """Write `local` to the object `name` once, then read it back and compare sha256s:
        an object store has no rename, so an object is only trusted once a manifest lists it,
        and it is listed only after this check. Raises StorageError when the copy differs."""
        with store_errors(self):
            self.fs.put_file(str(local), self.path(name))
        if self.sha256(name) != sha256_file(local):
            raise StorageError(f"{self.url}/{name}: the uploaded object differs from "
                               f"{local}; re-run the same command to rewrite it")

    def put_bytes(self, data: bytes, name: str) -> None:
        with store_errors(self):
            self.fs.pipe_file(self.path(name), data)

    def remove(self, name: str) -> None:
        with store_errors(self):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

    def check_bucket(self, flag: str) -> None:
        """Raise StorageError unless the bucket exists (s3fs would create a missing one on
        the first write, with the account's defaults)."""
        protocol = self.url.split("://", 1)[0].lower()
        if protocol not in _BUCKET_PROTOCOLS:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            with store_errors(self):  # `exists` would take an unreachable store for no bucket
                self.fs.info(bucket)
        except FileNotFoundError:
            raise StorageError(
                f"{flag} {self.url}: bucket {bucket!r} does not exist (or these credentials "
                "cannot see it); create it first or fix the URL") from None


def _kind(exc: BaseException) -> str | None:
    """What went wrong talking to a store, from the exception and those it came from."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                    "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return "credentials"
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ServerDisconnectedError", "ConnectionError", "ConnectionRefusedError"):
            return "unreachable"
        if isinstance(current, OSError) and current.errno in (errno.ECONNREFUSED,
                                                               errno.EHOSTUNREACH,
                                                               errno.ETIMEDOUT):
            return "unreachable"
        if isinstance(current, PermissionError) or name == "AccessDenied":
            return "denied"
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def store_errors(store: Store, reading: str | None = None) -> Iterator[None]:
    """Turn a missing credential, a refused access or an unreachable endpoint into one
    StorageError naming the URL. The libraries retry a failed connection a bounded number of
    times first (s3fs: 5 tries with backoff, a few seconds in all).

    `reading`: the URL of an object being read (a shard streamed mid-run). Then any failure
    of the store's libraries or of the connection (an `OSError`, or an exception of botocore,
    aiohttp, s3fs, gcsfs or fsspec) is a StorageError naming that URL and its reason, and
    what to do: by then the libraries have retried, and their traceback tells the user no
    more than the one line.
    """
    try:
        yield
    except KdpipeError:
        raise
    except Exception as exc:
        kind = _kind(exc)
        url = reading or store.url
        if kind == "credentials":
            raise StorageError(
                f"{url}: no valid credentials for this store; set them as its library "
                "reads them (S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
                "GCS: GOOGLE_APPLICATION_CREDENTIALS): see docs/storage.md") from None
        if kind == "unreachable":
            raise StorageError(
                f"{url}: the store cannot be reached ({type(exc).__name__} after the "
                "library's retries); check the network and the endpoint (AWS_ENDPOINT_URL for "
                "an S3-compatible store), then re-run the same command") from None
        if kind == "denied":
            raise StorageError(f"{url}: access denied ({exc}); check the credentials' "
                               "permissions on this bucket") from None
        if reading is not None and _from_store(exc):
            raise StorageError(
                f"{url}: reading failed ({_reason(exc)}); check the store, then re-run the "
                "same command") from None
        raise


_STORE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "fsspec", "google",
                  "huggingface_hub", "requests", "urllib3")


def _from_store(exc: BaseException) -> bool:
    """Whether `exc` is a failure of the connection or of a store's library (not, say, a
    bug of kdpipe's or a Parquet decoding error, which keep their own handling)."""
    if isinstance(exc, FileNotFoundError):  # a one-line error of its own (cli.USER_ERRORS)
        return False
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORE_MODULES


def _reason(exc: BaseException) -> str:
    """The exception in a few words on one line: its type and the start of its message."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 100 else text[:97] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def file_location(value: str | Path, flag: str) -> Path | tuple[Store, str]:
    """A local file's Path, or (the store of its folder, its name) for a URL."""
    where = location(str(value).rstrip("/") if is_url(value) else value, flag)
    if isinstance(where, Path):
        return where
    parent, _, name = where.url.rpartition("/")
    folder = location(parent, flag)
    if isinstance(folder, Path) or not name:
        raise ConfigError(f"{flag} {value}: a URL of a file needs a folder and a name")
    return folder, name


def node_folder(store: Store, local_cache: str | Path | None, kind: str) -> Path:
    """A node-local folder for what this process keeps of `store`: `LOCAL_CACHE/kind/<16 hex
    digits of the URL's sha256>`, shared by the processes of the node; or, without
    --local-cache, a temporary folder of this process, removed when it ends."""
    if local_cache is None:
        return temporary_folder(f"kdpipe-{kind}-")
    folder = Path(local_cache) / kind / hashlib.sha256(store.url.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def temporary_folder(prefix: str) -> Path:
    """A new temporary folder, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def local_copy(value: str | Path, flag: str) -> Path:
    """A local file to read `value` from: the path itself, or for a URL a verified download
    into a temporary folder removed when the process ends (curricula: one row per
    sequence, small next to a cache)."""
    where = file_location(value, flag)
    if isinstance(where, Path):
        return where
    store, name = where
    if not store.is_file(name):
        raise FileNotFoundError(f"{flag} {value}: no such object")
    folder = temporary_folder("kdpipe-file-")
    store.get_file(name, folder / name)
    return folder / name


def upload(local: Path, value: str, flag: str) -> None:
    """Write the finished local file `local` to the URL `value` (written once, then read
    back and checked: `Store.put_file`)."""
    where = file_location(value, flag)
    assert not isinstance(where, Path), "upload() takes a URL"
    store, name = where
    store.check_bucket(flag)
    store.put_file(local, name)


def file_exists(value: str | Path, flag: str) -> bool:
    """Whether the file at a path or URL exists."""
    where = file_location(value, flag)
    if isinstance(where, Path):
        return where.exists()
    return where[0].is_file(where[1])
