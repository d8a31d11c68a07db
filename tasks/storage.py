"""fsspec URLs, the store layout and atomic writes.

Every location in retrain is an fsspec URL: a plain local path, ``file://``, ``memory://``,
``s3://``... The store is one root URL with a layout that explains itself::

    datasets/<name>/<content-hash>/files/...     extracted data set (same zip -> same folder)
    runs/<run-id>/run.json                       configuration, fingerprint, status
    runs/<run-id>/split.parquet                  the image index with its train/val/test split
    runs/<run-id>/checkpoints/iter-<n>.pt        training checkpoints (resume from the newest)
    runs/<run-id>/features/                      transfer mode's cached backbone features when
                                                 too large for memory (kept for a resume,
                                                 removed once trained)
    shards/<key>/shard-<n>.npy                   a data set's images decoded at an input size
                                                 (tasks/training/shards.py), shared by runs
    runs/<run-id>/model.pt                       the published, self-describing model
    runs/<run-id>/{metrics.json,history.csv,*.png}

Writers go through :func:`write_bytes` (temporary name, then move; one atomic PUT on an object
store), so a reader never sees a half-written file, and an interrupted run leaves only
``*.tmp-*`` debris that is ignored.

On a remote store (S3, GCS, ...) every read and write here is retried with exponential backoff
when it fails in a way that may pass (connection refused or reset, timeouts, 5xx answers):
``$RETRAIN_STORE_RETRIES`` attempts in all (default 4), the first wait
``$RETRAIN_STORE_RETRY_DELAY`` seconds (default 1), doubling. Then :class:`StorageError` says
which URL failed, how often and why. A missing file or a refused permission fails at once.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

DEFAULT_STORE = "retrain-store"
TMP_MARKER = ".tmp-"
DEFAULT_RETRIES = 4  # attempts in all, for a remote store
DEFAULT_RETRY_DELAY = 1.0  # seconds before the second attempt; doubles, at most MAX_RETRY_DELAY
MAX_RETRY_DELAY = 30.0
# Object stores whose single PUT is atomic: see write_bytes.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})

log = logging.getLogger("retrain.storage")
T = TypeVar("T")


class StorageError(OSError):
    """The store kept failing (unreachable, timing out, answering errors) after retries."""


# Failures that will not pass by trying again: retrying them only delays the clear error.
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError, StorageError)
# Client libraries of remote filesystems whose own exceptions are not OSError subclasses
# (botocore's EndpointConnectionError, aiohttp's ClientConnectorError, ...).
_REMOTE_CLIENT_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "urllib3",
    "requests",
    "google",
    "azure",
    "gcsfs",
    "adlfs",
    "s3fs",
)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a store failure that may pass (what :func:`retrying` retries)."""
    if not isinstance(exc, Exception) or isinstance(exc, _PERMANENT):
        return False
    name = type(exc).__name__
    if "Credential" in name or "ParamValidation" in name or "NoSuchBucket" in name:
        return False  # configuration, not weather
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    return type(exc).__module__.split(".")[0] in _REMOTE_CLIENT_MODULES


def access_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is a remote store refusing these credentials (wrong, missing, or not
    allowed there): a store failure to report with its endpoint, not a request to refuse."""
    name = type(exc).__name__
    text = str(exc)
    return (
        isinstance(exc, PermissionError)
        or "Credential" in name
        or any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"))
    )


def _endpoint_of(url: str) -> str:
    """The endpoint a remote URL is reached through, for messages."""
    try:
        fs, _ = filesystem(url)
        endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
    except Exception:
        endpoint = None
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint or f"the default {url.split('://', 1)[0]} endpoint"


def _access_error(operation: str, url: str, exc: BaseException) -> StorageError:
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    return StorageError(
        f"store failure: access refused: {operation} {url} (bucket {bucket} at {_endpoint_of(url)}): "
        f"{type(exc).__name__}: {exc}; check the store's credentials (AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, for S3) and that they may use that bucket, then rerun the same command"
    )


def _retry_settings() -> tuple[int, float]:
    try:
        attempts = max(1, int(os.environ.get("RETRAIN_STORE_RETRIES", DEFAULT_RETRIES)))
        delay = max(0.0, float(os.environ.get("RETRAIN_STORE_RETRY_DELAY", DEFAULT_RETRY_DELAY)))
    except ValueError:
        attempts, delay = DEFAULT_RETRIES, DEFAULT_RETRY_DELAY
    return attempts, delay


def retrying(operation: Callable[..., T]) -> Callable[..., T]:
    """Retry ``operation(url, ...)`` on a remote store while it fails transiently (see the
    module notes); on a local disk call it once. The one place retries live."""

    @functools.wraps(operation)
    def wrapper(url: str, *args, **kwargs) -> T:
        if is_local(url):
            return operation(url, *args, **kwargs)
        attempts, delay = _retry_settings()
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                return operation(url, *args, **kwargs)
            except Exception as exc:
                if not transient(exc):
                    if access_refused(exc) and not isinstance(exc, StorageError):
                        raise _access_error(operation.__name__, url, exc) from exc
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                if attempt == attempts:
                    raise StorageError(
                        f"store failure: {operation.__name__} {url} failed {attempts} time(s) over "
                        f"{time.monotonic() - started:.1f} s; last error: {reason}"
                    ) from exc
                wait = min(delay * 2 ** (attempt - 1), MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)
                log.warning(
                    "%s %s failed (%s); attempt %d of %d in %.1f s",
                    operation.__name__,
                    url,
                    reason,
                    attempt + 1,
                    attempts,
                    wait,
                )
                _forget_listings(url)
                time.sleep(wait)
        raise AssertionError("unreachable")

    return wrapper


def is_local(url: str) -> bool:
    """A path on this machine (a plain path or file://), where retries do not help."""
    url = str(url)
    return "://" not in url or url.startswith(("file://", "local://"))


def _forget_listings(url: str) -> None:
    """Drop the filesystem's cached listings: after a failure they may be stale."""
    try:
        fs, _ = filesystem(url)
        fs.invalidate_cache()
    except Exception:
        pass


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
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


@retrying
def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


@retrying
def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


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
    must exist."""
    fs, path = filesystem(url)
    if protocol_of(url) in ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
        return url
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
    except BaseException as exc:
        try:  # best effort: a store that just failed may fail this too; debris is ignored
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not exc.filename:  # say where
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url) from exc
        raise
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


@retrying
def list_files(url: str) -> list[str]:
    """Every file below ``url`` (recursively) as URLs, sorted; unfinished ``*.tmp-*`` are skipped."""
    fs, path = filesystem(url)
    found = fs.find(path)
    return sorted(to_url(fs, p) for p in found if TMP_MARKER not in posixpath.basename(p))


@retrying
def ls(url: str) -> list[str]:
    """The entries directly inside folder ``url``, as URLs, sorted; none when it is missing."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return []
    return sorted(to_url(fs, p) for p in fs.ls(path, detail=False))


@retrying
def names_in(url: str) -> set[str]:
    """The names of the entries directly inside folder ``url``, listed afresh (other processes
    write there); none when it is missing."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return {posixpath.basename(p) for p in fs.ls(path, detail=False)} if fs.isdir(path) else set()


@retrying
def remove(url: str, recursive: bool = False) -> None:
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


# ---- the store layout: one object per folder kind names its files once ----------------------
# (The scoring job folder, scores/<job-id>/, has its own in tasks/scoring.)


class RunLayout:
    """``runs/<run-id>/``: every file of a run folder, by what it holds."""

    def __init__(self, url: str):
        self.url = url
        self.run_json = join(url, "run.json")  # what was asked for, fingerprint, status
        self.index = join(url, "index.parquet")  # every usable image and its label
        self.skipped = join(url, "skipped.csv")  # the files that are not, and why
        self.montage = join(url, "montage.png")
        self.split = join(url, "split.parquet")  # the index with its train/val/test split
        self.network = join(url, "network.txt")  # the network summary
        self.checkpoints = join(url, "checkpoints")
        self.features = join(url, "features")  # transfer mode's feature cache when too large for memory
        self.history = join(url, "history.csv")
        self.progress = join(url, "progress.png")
        self.trained = join(url, "trained.pt")  # the trained network, before its test metrics
        self.training = join(url, "training.json")  # what training did (training.json)
        self.predictions = join(url, "predictions.parquet")  # the held-out images' predictions
        self.metrics = join(url, "metrics.json")
        self.confusion = join(url, "confusion.png")
        self.mistakes = join(url, "mistakes.png")  # the top-loss test images (tasks/explain.py)
        self.gradcam = join(url, "gradcam.png")  # Grad-CAM overlays for a sample of test images
        self.model = join(url, "model.pt")  # the published model
        self.summary = join(url, "summary.json")
        self.promotion = join(url, "promotion.json")  # the promotion gate's decision on this run
        self.scores = join(url, "scores")  # default output of the run's batch-predict step

    @property
    def run_id(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))


class DatasetLayout:
    """``datasets/<name>/<content-hash>/``: an extracted zip and its manifest (written last)."""

    def __init__(self, url: str):
        self.url = url
        self.files = join(url, "files")
        self.manifest = join(url, "manifest.json")


class ModelLayout:
    """``models/<name>/``: the promoted run and every decision taken on the name."""

    def __init__(self, url: str):
        self.url = url
        self.current = join(url, "current.json")  # the promoted run
        self.history = join(url, "history")  # one <utc-time>-<run-id>.json per decision
        self.lock = join(url, "promotion.lock")  # held while a decision is taken


class StoreLayout:
    """The store root: where each kind of folder lives."""

    def __init__(self, store: str):
        self.url = store
        self.datasets = join(store, "datasets")
        self.runs = join(store, "runs")
        self.models = join(store, "models")
        self.scores = join(store, "scores")
        self.shards = join(store, "shards")  # decoded images, one folder per data set content and input size

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(join(self.runs, run_id))

    def dataset(self, name: str, content_hash: str) -> DatasetLayout:
        return DatasetLayout(join(self.datasets, name, content_hash[:16]))

    def model(self, name: str) -> ModelLayout:
        return ModelLayout(join(self.models, name))
