"""Store URLs and their files: every location is an fsspec URL (a plain local path,
``file://``, ``memory://``, ``s3://``...), read and written whole, through the retries of
:mod:`.remote`.

Writers go through :func:`write_bytes` (temporary name, then move; one atomic PUT on an object
store), so a reader never sees a half-written file, and an interrupted run leaves only
``*.tmp-*`` debris that is ignored.

A folder held under a lease (:mod:`.lock`) is fenced: before each write or removal below it,
:func:`write_bytes` and :func:`remove` ask the lease's holder in this process to check that the
lease is still its own, so a writer that stalled and lost it stops instead of finishing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.exceptions import FSTimeoutError

from retrain.tasks.storage.remote import (
    ATOMIC_PUT_PROTOCOLS,
    filesystem,
    is_local,
    request_timeout,
    require_bucket,
    retrying,
)

DEFAULT_STORE = "retrain-store"
TMP_MARKER = ".tmp-"
MIN_UPLOAD_RATE = 2**20  # bytes per second an upload is given (see _upload)


class InvalidNameError(ValueError):
    """A user-given name that becomes a folder in the store (run id, experiment id, model
    name) that could leave its folder or make an odd path."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, what: str = "name", error: type[ValueError] = InvalidNameError) -> str:
    """``name`` when it is safe as one folder of the store (no ``/``, no leading dot, so
    never ``..``); else ``error`` with a one-line message naming ``what`` it is."""
    if not _NAME.fullmatch(name or ""):
        raise error(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (it names a folder in the store)")
    return name


def default_store() -> str:
    """The embedded default store: ``$RETRAIN_STORE`` or ``./retrain-store``."""
    return os.environ.get("RETRAIN_STORE", DEFAULT_STORE)


def join(url: str, *parts: str) -> str:
    """Join URL path segments with ``/`` (fsspec URLs always use forward slashes)."""
    url = str(url)
    for part in parts:
        url = url.rstrip("/") + "/" + str(part).lstrip("/")
    return url


def protocol_of(url: str) -> str:
    fs, _ = filesystem(url)
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path inside ``fs`` back into a URL other processes can open."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def absolute(url: str) -> str:
    """A local path made absolute (so it means the same in any worker); other URLs unchanged."""
    if "://" in url and not url.startswith("file://"):
        return url
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


@retrying
def exists(url: str) -> bool:
    fs, path = filesystem(url)
    found = fs.exists(path)
    if not found:
        require_bucket(url, "exists")
    return found


@retrying
def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    found = fs.isdir(path)
    if not found:
        require_bucket(url, "isdir")
    return found


@retrying
def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


@retrying
def write_bytes(url: str, data: bytes) -> str:
    """Write atomically: to a temporary sibling, then move into place.

    On an object store (S3, GCS, Azure) a PUT is atomic already (an object appears whole or
    not at all, a multipart upload only when completed), so the object is written in one
    request; a temporary key and a copy would cost six more requests (listings, copy, delete),
    each a chance to fail, and leave debris when a failure comes between them. The bucket
    must exist. A write below a fenced folder checks its lease first (see the module notes)."""
    check_fences(url)
    if is_local(url):
        with atomic_local_file(url) as f:
            f.write(data)
        return url
    fs, path = filesystem(url)
    if protocol_of(url) in ATOMIC_PUT_PROTOCOLS:
        _upload(fs, path, data)
        return url
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:  # best effort: a store that just failed may fail this too; debris is ignored
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:
            pass
        raise
    return url


def _upload(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """One PUT of ``data``, given at most ``2 x $RETRAIN_STORE_TIMEOUT`` plus the body at
    ``MIN_UPLOAD_RATE``: aiohttp starts its read timeout only once a body is sent, and waits
    for the "100 Continue" botocore asks for on each PUT without any, so a stalled endpoint
    held an upload for ever (a scoring job sat 11 min on one connection)."""
    if not isinstance(fs, AsyncFileSystem):
        fs.pipe_file(path, data)
        return
    deadline = 2 * request_timeout() + len(data) / MIN_UPLOAD_RATE
    try:
        fs.pipe_file(path, data, timeout=deadline)  # fsspec's own deadline on the call
    except FSTimeoutError as exc:
        raise TimeoutError(f"the endpoint did not take {len(data)} bytes within {deadline:.0f} s") from exc


@contextlib.contextmanager
def atomic_local_file(url: str) -> Iterator[BinaryIO]:
    """A file to write ``url``'s content into, on a local disk: a temporary sibling, moved into
    place when the block ends (atomic on POSIX, even over an existing file), removed when it
    fails. A full disk fails with ENOSPC naming ``url``, the file being written, whatever wrote
    it. Write through this file's ``write``: numpy's ``save`` into a real file (``tofile``)
    reports a full disk as "N requested and M written", without errno or file."""
    _, path = filesystem(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not exc.filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url) from exc
        raise


# Folders held under a lease by this process (.lock): (folder URL/, the
# holder's check, which raises when the lease is no longer its own).
_fences: list[tuple[str, Callable[[str], None]]] = []
_fences_lock = threading.Lock()


def fence(folder: str, check: Callable[[str], None], on: bool = True) -> None:
    """Have ``check(url)`` called before each write or removal below ``folder`` (``on``
    False: no longer). A lease taken over while its holder stalled would otherwise let both
    holders finish."""
    entry = (folder.rstrip("/") + "/", check)
    with _fences_lock:
        if entry in _fences:
            _fences.remove(entry)
        if on:
            _fences.append(entry)


def check_fences(url: str) -> None:
    """Run the check of every fenced folder that ``url`` lies below (see :func:`fence`)."""
    if not _fences:
        return
    with _fences_lock:
        checks = [check for folder, check in _fences if str(url).startswith(folder)]
    for check in checks:
        check(url)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url).decode("utf-8"))


def write_json(url: str, obj: Any) -> str:
    return write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def write_parquet(url: str, frame) -> str:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return write_bytes(url, buffer.getvalue())


def read_parquet(url: str):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(url)))


@retrying
def list_files(url: str) -> list[str]:
    """Every file below ``url`` (recursively) as URLs, sorted; unfinished ``*.tmp-*`` are skipped."""
    fs, path = filesystem(url)
    found = fs.find(path)
    if not found:
        require_bucket(url, "list_files")
    return sorted(to_url(fs, p) for p in found if TMP_MARKER not in posixpath.basename(p))


@retrying
def ls(url: str) -> list[str]:
    """The entries directly inside folder ``url``, as URLs, sorted; none when it is missing."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        require_bucket(url, "ls")
        return []
    return sorted(to_url(fs, p) for p in fs.ls(path, detail=False))


@retrying
def names_in(url: str) -> set[str]:
    """The names of the entries directly inside folder ``url``, listed afresh (other processes
    write there); none when it is missing."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        require_bucket(url, "names_in")
        return set()
    return {posixpath.basename(p) for p in fs.ls(path, detail=False)}


@retrying
def remove(url: str, recursive: bool = False) -> None:
    check_fences(url)
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


@retrying
def sha256_of(url: str, chunk_size: int = 1 << 20) -> str:
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
