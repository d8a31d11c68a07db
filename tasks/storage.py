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
    indexes/<content-key>/<root>/index.parquet   a data set's image index, before a run is
                                                 chosen for it (runs are bound to its key)
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
which URL failed, how often, why and at which endpoint. A missing file or a refused permission
fails at once; a missing bucket is named, with its endpoint. These retries are the only ones:
the S3 client itself tries each request once, and gives up on connecting or on an answer that
stops coming after ``$RETRAIN_STORE_TIMEOUT`` seconds (default 15), so a stalled endpoint fails a
command within about attempts x timeout + the waits (67 s by default), the first retry logged.

A folder held under a lease (tasks/scoring/lock.py) is fenced: before each write or removal
below it, :func:`write_bytes` and :func:`remove` ask the lease's holder in this process to check
that the lease is still its own, so a writer that stalled and lost it stops instead of finishing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError

DEFAULT_STORE = "retrain-store"
TMP_MARKER = ".tmp-"
DEFAULT_RETRIES = 4  # attempts in all, for a remote store
DEFAULT_RETRY_DELAY = 1.0  # seconds before the second attempt; doubles, at most MAX_RETRY_DELAY
MAX_RETRY_DELAY = 30.0
DEFAULT_TIMEOUT = 15.0  # seconds to connect, and for each read of an answer, in one request
MIN_UPLOAD_RATE = 2**20  # bytes per second an upload is given (see _upload)
# Object stores whose single PUT is atomic: see write_bytes.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})

log = logging.getLogger("retrain.storage")
T = TypeVar("T")


class StorageError(OSError):
    """The store kept failing (unreachable, timing out, answering errors) after retries."""


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
    return StorageError(
        f"store failure: access refused: {operation} {url} (bucket {_bucket_of(url)} at {_endpoint_of(url)}): "
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


def _timeout() -> float:
    try:
        return max(0.1, float(os.environ.get("RETRAIN_STORE_TIMEOUT", DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def _client_options(url: str) -> dict:
    """What bounds one request of a remote filesystem in time, and leaves retrying to
    :func:`retrying`: botocore's own attempts (5) times s3fs's (5) times retrain's made a paused
    endpoint silent for minutes before the first notice, and a command wait half an hour.
    (s3fs's own attempts are set in :func:`filesystem`: an attribute, not an option.)"""
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    timeout = _timeout()
    return {
        "config_kwargs": {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"mode": "standard", "total_max_attempts": 1},
        },
    }


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
                    if isinstance(exc, FileNotFoundError) and _says_no_bucket(exc):
                        raise _missing_bucket(operation.__name__, url) from exc
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                if attempt == attempts:
                    raise StorageError(
                        f"store failure: {operation.__name__} {url} failed {attempts} time(s) over "
                        f"{time.monotonic() - started:.1f} s (endpoint {_endpoint_of(url)}); last error: {reason}"
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


# Buckets seen to exist, by endpoint: a bucket is looked up once per process.
_buckets_found: set[tuple[str, str]] = set()


def _bucket_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def _says_no_bucket(exc: BaseException) -> bool:
    """Whether a "not found" is about the bucket (S3's NoSuchBucket), not a file in it."""
    text = f"{exc} {exc.__cause__!r}"
    return "NoSuchBucket" in text or "bucket does not exist" in text


def _missing_bucket(operation: str, url: str) -> StorageError:
    return StorageError(
        f"store failure: bucket {_bucket_of(url)} does not exist at {_endpoint_of(url)} ({operation} {url}); "
        "create it, or check the store URL and the endpoint (AWS_ENDPOINT_URL for S3)"
    )


def require_bucket(url: str, operation: str) -> None:
    """Raise :class:`StorageError` naming the bucket and its endpoint when ``url``'s bucket
    does not exist: called where a file, folder or listing came back missing, which a missing
    bucket gives too (an empty list of runs with status 0). One look-up per bucket and process."""
    if url.split("://", 1)[0] not in ATOMIC_PUT_PROTOCOLS:
        return
    key = (_endpoint_of(url), _bucket_of(url))
    if key in _buckets_found:
        return
    fs, _ = filesystem(url)
    try:
        fs.info(key[1])
    except FileNotFoundError:
        raise _missing_bucket(operation, url) from None
    except PermissionError:  # keys that may use the bucket's objects but not see the bucket
        return
    _buckets_found.add(key)


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
    options = _client_options(str(url))
    fs, path = url_to_fs(url, **options)
    if options:
        fs.retries = 1  # s3fs's attempts per request; retrying() makes the others
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
    deadline = 2 * _timeout() + len(data) / MIN_UPLOAD_RATE
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


# Folders held under a lease by this process (tasks/scoring/lock.py): (folder URL/, the
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
        self.indexes = join(store, "indexes")  # a data set's image index before a run is chosen for it

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(join(self.runs, run_id))

    def dataset(self, name: str, content_hash: str) -> DatasetLayout:
        return DatasetLayout(join(self.datasets, name, content_hash[:16]))

    def model(self, name: str) -> ModelLayout:
        return ModelLayout(join(self.models, name))
