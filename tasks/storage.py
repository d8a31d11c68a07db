"""fsspec URLs, the store layout and atomic writes.

Every location in retrain is an fsspec URL: a plain local path, ``file://``, ``memory://``,
``s3://``... The store is one root URL with a layout that explains itself::

    datasets/<name>/<content-hash>/files/...     extracted data set (same zip -> same folder)
    runs/<run-id>/run.json                       configuration, fingerprint, status
    runs/<run-id>/split.parquet                  the image index with its train/val/test split
    runs/<run-id>/checkpoints/iter-<n>.pt        training checkpoints (resume from the newest)
    runs/<run-id>/model.pt                       the published, self-describing model
    runs/<run-id>/{metrics.json,history.csv,*.png}

Writers go through :func:`write_bytes` (temporary name, then move), so a reader never sees a
half-written file, and an interrupted run leaves only ``*.tmp-*`` debris that is ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

DEFAULT_STORE = "retrain-store"
TMP_MARKER = ".tmp-"


def default_store() -> str:
    """The embedded default store: ``$RETRAIN_STORE`` or ``./retrain-store``."""
    return os.environ.get("RETRAIN_STORE", DEFAULT_STORE)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    fs, path = url_to_fs(url)
    return fs, path


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
        url = url[len("file://"):]
    return os.path.abspath(os.path.expanduser(url))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> str:
    """Write atomically: to a temporary sibling, then move into place."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        if protocol_of(url) in ("file", "local"):
            os.replace(tmp, path)  # atomic on POSIX, even over an existing file
        else:
            fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return url


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


def list_files(url: str) -> list[str]:
    """Every file below ``url`` (recursively) as URLs, sorted; unfinished ``*.tmp-*`` are skipped."""
    fs, path = filesystem(url)
    found = fs.find(path)
    return sorted(to_url(fs, p) for p in found if TMP_MARKER not in posixpath.basename(p))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def sha256_of(url: str, chunk_size: int = 1 << 20) -> str:
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---- the store layout: one function per place, so a layout change touches one spot ----

def dataset_dir(store: str, name: str, content_hash: str) -> str:
    return join(store, "datasets", name, content_hash[:16])


def run_dir(store: str, run_id: str) -> str:
    return join(store, "runs", run_id)


def runs_dir(store: str) -> str:
    return join(store, "runs")
