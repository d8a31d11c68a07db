"""A remote store's failures: each request bounded in time, retried while the failure may pass.

On a remote store (S3, GCS, ...) every read and write of the store is retried with exponential
backoff when it fails in a way that may pass (connection refused or reset, timeouts, 5xx
answers): ``$RETRAIN_STORE_RETRIES`` attempts in all (default 4), the first wait
``$RETRAIN_STORE_RETRY_DELAY`` seconds (default 1), doubling. Then :class:`StorageError` says
which URL failed, how often, why and at which endpoint. A missing file or a refused permission
fails at once; a missing bucket is named, with its endpoint. These retries are the only ones:
the S3 client itself tries each request once, and gives up on connecting or on an answer that
stops coming after ``$RETRAIN_STORE_TIMEOUT`` seconds (default 15), so a stalled endpoint fails a
command within about attempts x timeout + the waits (67 s by default), the first retry logged.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec.core import url_to_fs

DEFAULT_RETRIES = 4  # attempts in all, for a remote store
DEFAULT_RETRY_DELAY = 1.0  # seconds before the second attempt; doubles, at most MAX_RETRY_DELAY
MAX_RETRY_DELAY = 30.0
DEFAULT_TIMEOUT = 15.0  # seconds to connect, and for each read of an answer, in one request
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


def request_timeout() -> float:
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
    timeout = request_timeout()
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


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    options = _client_options(str(url))
    fs, path = url_to_fs(url, **options)
    if options:
        fs.retries = 1  # s3fs's attempts per request; retrying() makes the others
    return fs, path
