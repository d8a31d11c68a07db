"""The store: fsspec URLs, whole-file reads and atomic writes, a remote store's time bounds and
retries, the lock on a folder, and the layout of its folders. One module each:

- :mod:`.files`   URLs, reads, atomic writes, listings, the fences of leased folders
- :mod:`.remote`  a remote store's failures: requests bounded in time, retries, missing buckets
- :mod:`.lock`    one writer per folder: ``flock`` on a local disk, a fenced lease elsewhere
- :mod:`.layout`  the store's folders, one object per folder kind

Callers use the names below, as ``storage.X``.
"""

from retrain.tasks.storage.files import (
    TMP_MARKER,
    InvalidNameError,
    absolute,
    atomic_local_file,
    check_name,
    default_store,
    exists,
    isdir,
    join,
    list_files,
    ls,
    names_in,
    protocol_of,
    read_bytes,
    read_json,
    read_parquet,
    remove,
    sha256_of,
    to_url,
    write_bytes,
    write_json,
    write_parquet,
)
from retrain.tasks.storage.layout import ModelLayout, RunLayout, StoreLayout
from retrain.tasks.storage.lock import (
    LOCK_NAME,
    FolderLock,
    LockedError,
    lock_url,
    now,
)
from retrain.tasks.storage.remote import StorageError, access_refused, filesystem, is_local, retrying, transient

__all__ = [
    "LOCK_NAME",
    "TMP_MARKER",
    "FolderLock",
    "InvalidNameError",
    "LockedError",
    "ModelLayout",
    "RunLayout",
    "StorageError",
    "StoreLayout",
    "absolute",
    "access_refused",
    "atomic_local_file",
    "check_name",
    "default_store",
    "exists",
    "filesystem",
    "is_local",
    "isdir",
    "join",
    "list_files",
    "lock_url",
    "ls",
    "names_in",
    "now",
    "protocol_of",
    "read_bytes",
    "read_json",
    "read_parquet",
    "remove",
    "retrying",
    "sha256_of",
    "to_url",
    "transient",
    "write_bytes",
    "write_json",
    "write_parquet",
]
