"""Arrays of fixed-shape rows in ``.npy`` files: image shards (tasks/training/shards.py) and
feature shards (tasks/training/feature_files.py) alike. A file is written atomically; rows are
read with positioned reads (``os.preadv``) straight into the caller's buffer, so the operating
system's page cache holds the files, not the process; a file in a store that is not a local
disk is copied into a local cache folder first (``$RETRAIN_CACHE``, default ``~/.cache/retrain``).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import threading
import uuid

import numpy as np

from retrain.tasks import storage


def cache_root() -> str:
    """Where shards of a store that is not a local disk are copied to be read."""
    return os.environ.get("RETRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "retrain")


def write_npy(url: str, array: np.ndarray) -> str:
    """An ``.npy`` file written atomically: on a local disk straight into a temporary file
    that is then renamed (no copy of the array in memory); elsewhere as one write."""
    if storage.is_local(url):
        array = np.ascontiguousarray(array)
        with storage.atomic_local_file(url) as f:
            # The header, then the rows through the file's own write: np.save's tofile reports
            # a full disk as a bare short write ("N requested and M written"), no errno, no file.
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
            f.write(memoryview(array.reshape(-1)).cast("B"))
        return url
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return storage.write_bytes(url, buffer.getvalue())


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the ``.npy`` file open in ``f``, which is left at the
    first byte of its data."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


class RowFiles:
    """Fixed-size rows of a list of ``.npy`` files (C order), read with positioned reads.

    ``files[k]`` is a local path; row ``r`` of file ``k`` lies at its header's end plus
    ``r * row_bytes``. File descriptors open on first use; a pickled copy opens its own (for
    worker processes)."""

    def __init__(self, files: list[str], row_shape: tuple[int, ...], dtype: np.dtype):
        self.files = list(files)
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._fds: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()  # the batch prefetcher's thread and the loop's read too

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _open(self, k: int) -> tuple[int, int]:
        found = self._fds.get(k)
        if found is not None:
            return found
        with self._lock:
            return self._fds.get(k) or self._open_locked(k)

    def _open_locked(self, k: int) -> tuple[int, int]:
        with open(self.files[k], "rb") as f:
            shape, fortran, dtype = read_npy_header(f)
            if fortran or np.dtype(dtype) != self.dtype or tuple(shape[-len(self.row_shape) :]) != self.row_shape:
                raise ValueError(f"{self.files[k]}: {shape} {dtype} does not hold rows of {self.row_shape}")
            offset = f.tell()
        found = (os.open(self.files[k], os.O_RDONLY), offset)
        self._fds[k] = found
        return found

    def read_into(self, out: np.ndarray, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Row ``rows[j]`` of file ``files[j]`` into ``out[j]``; consecutive rows of one file
        are read at once."""
        n = len(rows)
        flat = out.reshape(n, -1).view(np.uint8) if n else out
        j = 0
        while j < n:
            k, r = int(files[j]), int(rows[j])
            run = 1
            while j + run < n and files[j + run] == k and rows[j + run] == r + run:
                run += 1
            fd, offset = self._open(k)
            view = memoryview(flat[j : j + run]).cast("B")
            position, want = offset + r * self.row_bytes, run * self.row_bytes
            done = 0
            while done < want:
                got = os.preadv(fd, [view[done:]], position + done)
                if got <= 0:
                    raise OSError(f"{self.files[k]}: short read at row {r} (file truncated?)")
                done += got
            j += run
        return out

    def close(self) -> None:
        for fd, _ in list(self._fds.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()


def local_copy(url: str, folder: str) -> str:
    """A local path holding the file at ``url``: the path itself on a local disk, else a copy
    in ``folder`` (made once, atomically)."""
    if storage.is_local(url):
        return storage.absolute(url)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, posixpath.basename(url))
    if not os.path.exists(target):
        _download(url, target)
    return target


@storage.retrying
def _download(url: str, target: str) -> None:
    fs, path = storage.filesystem(url)
    tmp = f"{target}{storage.TMP_MARKER}{uuid.uuid4().hex[:8]}"
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
