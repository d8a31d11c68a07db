"""One writer per folder at a time: an exclusive lock on a scoring job's output, a run folder
(tasks/runs.py), a model's promotion folder (tasks/promotion.py).

On a local disk it is ``fcntl.flock`` on ``<out>/.lock``: the kernel drops it when the holder
exits, even by kill -9, so a crashed job never blocks its rerun. Elsewhere (S3...) it is a
lease: the file names its holder and is refreshed every ``lease_s / 4`` seconds; one not
refreshed for ``lease_s`` is taken over (best effort: object stores have no atomic
create-if-absent through fsspec).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from retrain.tasks import storage
from retrain.tasks.scoring.layout import JobLayout, ScoringLockedError


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobLock:
    """An exclusive lock on a folder while a job writes to it (see the module's doc).
    ``refusal(who)`` makes the error for a folder held by another (``who``: the holder, in
    words); by default a :class:`ScoringLockedError` about a scoring output."""

    def __init__(
        self,
        out: str,
        wait_s: float = 0.0,
        lease_s: float = 120.0,
        refusal: Callable[[str], Exception] | None = None,
    ):
        self.out, self.url, self.wait_s, self.lease_s = out, JobLayout(out).lock, wait_s, lease_s
        self.refusal = refusal
        self.local = storage.protocol_of(out) in ("file", "local")
        self.token, self.since = uuid.uuid4().hex, now()
        self._fd: int | None = None
        self._made_folders: list[str] = []  # folders this lock created, innermost first
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

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
        return ScoringLockedError(
            f"another scoring job is writing to {self.out}{who}; wait for it to finish, or score into another --out"
        )

    def acquire(self) -> JobLock:
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
        self._refresher = threading.Thread(target=self._refresh, daemon=True, name="score-lock-lease")
        self._refresher.start()
        return None

    def _refresh(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                storage.write_json(self.url, self._holder())
            except Exception:
                pass

    def release(self) -> None:
        if self._fd is not None:
            path = self.url[len("file://") :] if self.url.startswith("file://") else self.url
            try:
                os.unlink(path)  # while still holding it; a waiter then retries on a new file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
            for folder in self._made_folders:  # a job refused before it wrote anything leaves no
                try:  # empty --out behind
                    os.rmdir(folder)
                except OSError:  # not empty: the job's files
                    break
        elif self._refresher is not None:
            self._stop.set()
            self._refresher.join(timeout=5)
            self._refresher = None
            storage.remove(self.url)

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
