"""Real services started as plain processes for the integration tests: a Prefect server (with
its UI), Prefect process workers and moto's S3 server, each on 127.0.0.1 and a free port,
each stopped with its whole process group when the test is done."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """A command of this virtual environment (prefect, moto_server), else from PATH."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered:\n"
                               + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n" + log.read_text()[-3000:])


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=cwd or PROJECT_ROOT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process we started and everything it started (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


def prefect_env(api_url: str, home: Path) -> dict[str, str]:
    """The environment of a process that talks to the test's Prefect server, and only to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api_url, PREFECT_UI_API_URL=api_url, PREFECT_HOME=str(home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="5",
               PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
    return env


@contextmanager
def prefect_server(workdir: Path) -> Iterator[dict]:
    """``prefect server start`` on 127.0.0.1 (SQLite in ``workdir``); yields its URLs and the
    environment for its clients."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = prefect_env(api_url, home)
    log = workdir / "prefect-server.log"
    proc = start([tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env)
    try:
        wait_http(f"{api_url}/health", proc, log)
        yield {"api_url": api_url, "ui_url": f"http://127.0.0.1:{port}", "env": env, "log": log,
               "home": home}
    finally:
        stop(proc)


def start_worker(pool: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return start([tool("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                  "--limit", "2"], log, env)


@contextmanager
def moto_s3(workdir: Path) -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    log = workdir / "moto.log"
    proc = start([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, dict(os.environ))
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
