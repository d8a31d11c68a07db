"""The Prefect API as something that can go away: checked before a command uses it, watched
while the command runs, its client's retries bounded, its failures recognised.

A run keeps its work in the store, not in Prefect: when the API goes away the command gives
up within ``$RETRAIN_API_GRACE_SECONDS`` (default 90 s) of the outage, the store keeps what was
done, and the same command run again once the API is back resumes. Without a bound, Prefect's
client retries each call up to 5 times with 2, 4, 8, 16, 32 s waits, call after call (the
state of the task, then of the flow, then the crash report): about 4 minutes, then raw httpx
tracebacks.

Standard library only (httpx is imported where an exception is already in hand): the CLI checks
the API before importing Prefect, so a server that is down is reported in seconds.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

GRACE_ENV = "RETRAIN_API_GRACE_SECONDS"
DEFAULT_GRACE_S = 90.0  # the bound: give up at most 2 minutes after the API went away
CHECK_TIMEOUT_S = 5.0  # one health request before a command


class OrchestratorError(RuntimeError):
    """The Prefect API cannot be reached (before a command, or for longer than the grace)."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(
            f"orchestrator unreachable: the Prefect API at {url} {reason}; what is in the store is kept: "
            "start the server (or point PREFECT_API_URL at a running one) and rerun the same command to resume"
        )


def grace_seconds(environ=os.environ) -> float:
    """How long a command keeps going after the API stopped answering: ``$RETRAIN_API_GRACE_SECONDS``."""
    raw = environ.get(GRACE_ENV)
    if raw is None or raw == "":
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{GRACE_ENV} must be a number of seconds, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{GRACE_ENV} must be more than 0 seconds, not {raw!r}")
    return value


def bound_client_retries(grace_s: float, environ=os.environ) -> None:
    """Fit Prefect's client retries into the grace (the user's own PREFECT_* settings win):
    as many retries as the backoff 2 + 4 + ... fits into a quarter of it (at least one), and a
    request timeout of half of it (15 to 60 s: a busy server's answers may take seconds), so that
    one failing call gives up inside it."""
    retries, waited = 1, 2
    while waited + 2 ** (retries + 1) <= grace_s / 4 and retries < 5:
        retries += 1
        waited += 2**retries
    environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", str(retries))
    environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", f"{max(15.0, min(60.0, grace_s / 2)):g}")


def configured_api_url(environ=os.environ) -> str | None:
    """The API the user chose: PREFECT_API_URL, else the active Prefect profile's (None: Prefect
    will run a temporary API of its own, which goes away only with the command)."""
    if environ.get("PREFECT_API_URL"):
        return environ["PREFECT_API_URL"]
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    try:
        import tomllib

        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError, ImportError):
        return None
    active = environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def why_unreachable(url: str, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """None when ``<url>/health`` answers 200; else what went wrong, in words."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"answered {response.status} to a health check"
    except urllib.error.HTTPError as exc:
        return f"answered {exc.code} to a health check"
    except urllib.error.URLError as exc:
        reason = exc.reason
        return f"did not answer ({reason.strerror if isinstance(reason, OSError) and reason.strerror else reason})"
    except (OSError, ValueError) as exc:  # a timeout, a malformed URL
        return f"did not answer ({type(exc).__name__}: {exc or 'timed out'})"


def check_api(url: str, within_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise :class:`OrchestratorError` unless the API answers within ``within_s`` seconds
    (a server that is just starting gets that long)."""
    deadline = time.monotonic() + within_s
    while True:
        reason = why_unreachable(url, timeout=max(1.0, deadline - time.monotonic()))
        if reason is None:
            return
        if time.monotonic() >= deadline:
            raise OrchestratorError(url, reason)
        time.sleep(0.5)


def is_api_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the Prefect API failing: httpx could not connect,
    timed out, lost the connection, or got a 5xx answer after Prefect's retries."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__.split(".")[0]
        if module == "httpx":
            import httpx

            if isinstance(exc, httpx.TransportError):
                return True
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500:
                return True
        if isinstance(exc, OrchestratorError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def failure_of(exc: BaseException, url: str | None) -> OrchestratorError:
    """The :class:`OrchestratorError` that says what ``exc`` (an API failure) means."""
    if isinstance(exc, OrchestratorError):
        return exc
    cause = exc
    while cause is not None and type(cause).__module__.split(".")[0] != "httpx":
        cause = cause.__cause__ or cause.__context__
    cause = cause or exc
    request_url = None
    try:
        request_url = str(cause.request.url)  # httpx errors know their request
    except (AttributeError, RuntimeError):
        pass
    where = url or (request_url.split("/api/", 1)[0] + "/api" if request_url else "(unknown URL)")
    return OrchestratorError(where, f"stopped answering ({type(cause).__name__}: {cause})")


class ApiWatch:
    """A daemon thread that asks ``<url>/health`` every few seconds while a command runs; once
    the API has not answered for ``grace_s`` seconds it calls ``on_lost`` with the
    :class:`OrchestratorError` (the CLI then ends the command: nothing waits on the API longer).
    A probe waits up to half the grace (5 to 20 s) for an answer: on a busy machine a slow
    answer is an answer. So ``on_lost`` comes at most grace + one interval (5 s) + one probe
    (20 s) after the API went away: under 2 minutes for the default grace of 90 s."""

    def __init__(self, url: str, grace_s: float, on_lost: Callable[[OrchestratorError], None]):
        self.url, self.grace_s, self.on_lost = url, grace_s, on_lost
        self.interval = max(0.5, min(5.0, grace_s / 6))
        self.probe_timeout = max(5.0, min(20.0, grace_s / 2))
        self.down_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="prefect-api-watch", daemon=True)

    def start(self) -> ApiWatch:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            probed = time.monotonic()
            reason = why_unreachable(self.url, timeout=self.probe_timeout)
            if reason is None:
                self.down_since = None
                continue
            if self.down_since is None:
                self.down_since = probed  # it did not answer from (at the latest) the probe's start
            down_s = time.monotonic() - self.down_since
            if down_s >= self.grace_s and not self._stop.is_set():
                self.on_lost(OrchestratorError(self.url, f"has not answered for {down_s:.0f} s (last: {reason})"))
                return

    def stop(self) -> None:
        self._stop.set()


class _WithoutTraceback:
    """A console formatter that leaves a record's traceback out (the record keeps it for the
    API's log handler, i.e. the run's record in the UI)."""

    def __init__(self, inner):
        self.inner = inner

    def format(self, record) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

    def __getattr__(self, name):
        return getattr(self.inner, name)


def prepare_for_flows() -> None:
    """What a command does before it runs flows (after importing Prefect): console lines
    without tracebacks, and flow runs that end without waiting for their heartbeat thread;
    a local server that a command started moments ago answers first."""
    from retrain.server import wait_for_local_server

    wait_for_local_server()
    _console_without_tracebacks()
    _flow_runs_end_without_joining_heartbeats()


def _flow_runs_end_without_joining_heartbeats() -> None:
    """Prefect's sync flow engine (3.9, ``flow_engine._send_heartbeats``) stops a flow run's
    heartbeat thread by setting an event the thread looks at once a second, then joins it: the
    end of every flow run (a retrain run's and its train subflow's) waited up to 1 s, 0.5 s on
    average, for nothing (measured: 0.79 s of the 0.88 s between a run's last line and its
    command's end). A stopped heartbeat thread sends nothing more and is a daemon, so Prefect's
    async engine does not join it (``join_on_exit=False``); the sync one here does the same.
    Left as it is where that parameter is missing (another Prefect)."""
    import inspect

    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None or getattr(original, "joins_on_exit", True) is False:
        return
    if "join_on_exit" not in inspect.signature(original).parameters:
        return

    def send_heartbeats(engine, join_on_exit: bool = True):
        return original(engine, join_on_exit=False)

    send_heartbeats.joins_on_exit = False
    flow_engine._send_heartbeats = send_heartbeats


def _console_without_tracebacks() -> None:
    """Prefect's console log lines without tracebacks: a failed task or flow is said in one
    line there, and the command's last line says what failed; the tracebacks go to the API
    (the run's record in the UI) and the command's log file."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
