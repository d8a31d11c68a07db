"""Prefect's temporary API, started at the first moment instead of at the first flow run.

Without a configured server, Prefect starts a temporary one (a uvicorn process) when the first
flow runs, and waits for it: 5 s on an idle 2-core machine, far more on a busy one, queued after
every import of the command. Started here as the command begins, it comes up while the command
imports torch and Prefect and while Dask's workers start; the flow then finds it through
``PREFECT_API_URL``. The process is the one Prefect itself would run (``prefect.server.api.server:
create_app`` under uvicorn, UI off) and is stopped when the command exits; a command killed
(SIGTERM, SIGKILL) runs no exit handler, so the kernel ends it then (``PR_SET_PDEATHSIG``).

Nothing here imports Prefect: importing it in a second thread while the main thread imports it
too deadlocks on Python's module locks.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from retrain.server import _profile_sets_api_url  # one reading of Prefect's profiles


def api_configured(environ=os.environ) -> bool:
    """Whether a Prefect API is chosen: PREFECT_API_URL (set by the user, or by
    ``tasks.server`` for a running local server) or the active profile's."""
    if environ.get("PREFECT_API_URL"):
        return True
    return _profile_sets_api_url(Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser(), environ)


def die_with_parent():
    """A ``preexec_fn`` for a child process that must not outlive this one: the kernel sends it
    SIGTERM when this process ends, however it ends (Linux; elsewhere None: no such call).
    Without it, a killed command left its temporary API running, adopted by pid 1."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child after fork
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call: no signal would come
            os._exit(1)

    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EarlyApi:
    """The API process starting; :meth:`wait` before the first flow runs."""

    def __init__(self, timeout_s: float):
        spec = importlib.util.find_spec("prefect")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(Path(spec.origin).parent.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            preexec_fn=die_with_parent(),
        )
        atexit.register(self.stop)
        self.timeout_s = timeout_s
        self._up = threading.Event()  # set by the health poll; it ends when the process does
        threading.Thread(target=self._poll, name="prefect-api-health", daemon=True).start()

    def _poll(self) -> None:
        while self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self._up.set()
                        return
            except OSError:
                pass
            time.sleep(0.1)

    def wait(self) -> str | None:
        """The API's URL once it answers. None when its process exited (the flow then starts
        Prefect's own, as without this); RuntimeError, like Prefect's, when it is still not up
        after the start-up timeout (counted from now: it has been starting all along, and
        starting a second one on a machine that slow would only queue behind it)."""
        if self._up.wait(self.timeout_s):
            return self.url
        if self.process.poll() is not None:
            return None
        self.stop()
        raise RuntimeError(
            f"Prefect's temporary API did not start within {self.timeout_s:.0f} s; raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or point PREFECT_API_URL at a running server"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            drain_prefect_workers()
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def drain_prefect_workers(timeout_s: float = 5.0) -> None:
    """Send what Prefect's events and log workers still hold while the temporary API is up,
    for at most ``timeout_s`` each. Left queued, they retry against the stopped API: at the
    exit of the command, or, in a process that goes on (tests, a notebook), until a later
    drain of every worker, which then waits for them (minutes of "All connection attempts
    failed" after a scoring job of hundreds of partitions)."""
    if "prefect" not in sys.modules:  # no flow ran: nothing queued
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout_s)


def start_early_api() -> EarlyApi | None:
    """Start the temporary API now unless a server is configured (then None)."""
    if api_configured() or os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() == "false":
        return None
    return EarlyApi(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
