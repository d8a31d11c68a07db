"""One writer per folder at a time: an exclusive lock on a folder of the store while a job
writes there — a run folder (tasks/runs.py), a model's promotion folder (tasks/promotion.py),
a scoring job's output (tasks/scoring), a feature cache shared by runs (tasks/feature_sharing.py).

On a local disk it is ``fcntl.flock`` on ``<folder>/.lock``: the kernel drops it when the holder
exits, even by kill -9, so a crashed job never blocks its rerun. Elsewhere (S3...) it is a
lease: the file names its holder and is refreshed every ``lease_s / 4`` seconds; one not
refreshed for ``lease_s`` is taken over (best effort: object stores have no atomic
create-if-absent through fsspec). A lease is fenced: its token is checked before each renewal,
each write below the folder (:func:`.files.fence`) and the release, so a holder that stalled
past its lease and was taken over raises :class:`LeaseLostError` instead of finishing beside
the new holder, and never removes the new holder's lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

# The store's files through the package, not its modules: what replaces one of them there (a
# store that fails, in a test) is what the lock reads and writes with too.
from retrain.tasks import storage
from retrain.tasks.storage.files import fence
from retrain.tasks.storage.remote import StorageError

LOCK_NAME = ".lock"  # the lock's file, in the folder it locks

log = logging.getLogger("retrain.storage")


class LockedError(ValueError):
    """Another process holds the folder's lock (a refusal: the caller may wait, or write elsewhere)."""


class LeaseLostError(StorageError):
    """Another writer took over this process's lease on a folder (after a stall longer than
    the lease): what this process would still write there would mix with the new holder's."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lock_url(folder: str) -> str:
    """The lock's file of ``folder``."""
    return storage.join(folder, LOCK_NAME)


class FolderLock:
    """An exclusive lock on ``folder`` while a job writes to it (see the module's doc), waiting
    up to ``wait_s`` seconds for another holder to let go. ``refusal(who)`` makes the error
    for a folder still held by another (``who``: the holder, in words); by default a
    :class:`LockedError`."""

    def __init__(
        self,
        folder: str,
        wait_s: float = 0.0,
        lease_s: float = 120.0,
        refusal: Callable[[str], Exception] | None = None,
    ):
        self.folder, self.url, self.wait_s, self.lease_s = folder, lock_url(folder), wait_s, lease_s
        self.refusal = refusal
        self.local = storage.protocol_of(folder) in ("file", "local")
        self.token, self.since = uuid.uuid4().hex, now()
        self._fd: int | None = None
        self._made_folders: list[str] = []  # folders this lock created, innermost first
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._lost: dict | None = None  # the lease file as found once another holds it

    def _holder(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "since": self.since,
            "heartbeat": time.time(),
        }

    def _refused(self, holder: dict | None) -> Exception:
        who = f" (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})" if holder else ""
        if not self.local:  # a lease: a holder killed without releasing it loses it in time
            who += f" (a holder that died loses the lock {self.lease_s:.0f} s after its last heartbeat)"
        if self.refusal is not None:
            return self.refusal(who)
        return LockedError(f"another process is writing to {self.folder}{who}; wait for it to finish")

    def acquire(self) -> FolderLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try_local() if self.local else self._try_lease()
            if holder is None:
                return self
            if time.monotonic() >= deadline:
                raise self._refused(holder)
            time.sleep(0.5)

    def _try_local(self) -> dict | None:
        import fcntl

        path = self.url[len("file://") :] if self.url.startswith("file://") else self.url
        folder = os.path.dirname(path)
        while not os.path.isdir(folder):
            self._made_folders.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            except ValueError:
                holder = None
            os.close(fd)
            return holder or {}
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file as we opened it: try again on the new one
            os.close(fd)
            return self._try_local()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._holder()).encode(), 0)
        self._fd = fd
        return None

    def _try_lease(self) -> dict | None:
        if storage.exists(self.url):
            try:
                holder = storage.read_json(self.url)
            except Exception:
                holder = {}
            if holder.get("token") != self.token and time.time() - float(holder.get("heartbeat", 0)) < self.lease_s:
                return holder
        storage.write_json(self.url, self._holder())
        time.sleep(0.2)  # a racer writing at the same moment: the last writer wins, the other sees it
        if storage.read_json(self.url).get("token") != self.token:
            return storage.read_json(self.url)
        fence(self.folder, self._check)
        self._refresher = threading.Thread(target=self._refresh, daemon=True, name="store-lock-lease")
        self._refresher.start()
        return None

    def _refresh(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if self._still_mine():  # renewing a lease another took over would take it back
                    storage.write_json(self.url, self._holder())
                else:
                    return
            except Exception:  # the store failing: the next renewal, or a write, will tell
                pass

    def _still_mine(self, read: Callable[[str], bytes] | None = None) -> bool:
        """Whether the lease file still holds this lock's token (remembers a loss); ``read``
        reads it (by default with the store's retries)."""
        if self._lost is None:
            try:
                holder = json.loads((read or storage.read_bytes)(self.url))
            except FileNotFoundError:
                holder = {}
            if holder.get("token") != self.token:
                self._lost = holder
        return self._lost is None

    def _check(self, url: str) -> None:
        """The fence (:func:`.files.fence`): before a write or removal of ``url`` below the folder.
        The lease is read once, without the store's retries: when the store fails that read,
        the write it guards fails too, and its own error is the one to report."""
        if url == self.url:
            return
        try:
            mine = self._still_mine(read=storage.read_bytes.__wrapped__)
        except Exception:
            return
        if not mine:
            raise self._lost_error(f"writing {url}")

    def _lost_error(self, doing: str) -> LeaseLostError:
        holder = self._lost or {}
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
            if holder.get("token")
            else "another writer, which has since released it,"
        )
        return LeaseLostError(
            f"store failure: lost the lock on {self.folder} before {doing}: {who} took it over after this process "
            f"went {self.lease_s:.0f} s without renewing its lease (the store or this process stalled); "
            "stopped so that one writer finishes, not two: rerun the same command"
        )

    def release(self) -> None:
        """Let go of the lock. A release that fails while the caller is failing already (the
        store that failed the job fails this too) is logged, never raised over that first
        failure; a lease lost to another holder is left to it (raised when nothing else is)."""
        failing = sys.exc_info()[1]  # called from a ``finally`` or ``__exit__`` of a failure
        try:
            self._release(once=failing is not None)
        except Exception as exc:
            if failing is None:
                raise
            log.warning("releasing the lock on %s failed too (%s: %s)", self.folder, type(exc).__name__, exc)

    def _release(self, once: bool = False) -> None:
        """``once``: one try of each store call, not the store's retries (the job failed: a
        dead store would double the wait for its error; a lease left behind lapses)."""
        if self._fd is not None:
            path = self.url[len("file://") :] if self.url.startswith("file://") else self.url
            try:
                os.unlink(path)  # while still holding it; a waiter then retries on a new file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
            for folder in self._made_folders:  # a job refused before it wrote anything leaves no
                try:  # empty folder behind
                    os.rmdir(folder)
                except OSError:  # not empty: the job's files
                    break
        elif self._refresher is not None:
            self._stop.set()
            self._refresher.join(timeout=5)
            self._refresher = None
            fence(self.folder, self._check, on=False)
            read, remove = storage.read_bytes, storage.remove
            if once:
                read, remove = getattr(read, "__wrapped__", read), getattr(remove, "__wrapped__", remove)
            if not self._still_mine(read):
                raise self._lost_error("releasing it")
            remove(self.url)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
