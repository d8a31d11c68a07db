"""Real services started as plain processes for the integration tests, the same services
infra/compose.yaml runs in containers: PostgreSQL, a Prefect server (with its UI) on it,
Prefect process workers, an S3 endpoint (moto's server standing in for MinIO) and a Dask
scheduler with workers. Each listens on 127.0.0.1 and a free port, and is stopped with its
whole process group when the test is done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
            raise RuntimeError(
                f"{proc.args[0]} exited ({proc.returncode}) before {url} answered:\n" + log.read_text()[-3000:]
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n" + log.read_text()[-3000:])


def wait_port(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60) -> None:
    """Until something accepts connections on 127.0.0.1:``port``; ``proc`` exiting first, or
    the timeout, raises with the end of its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit {proc.poll()}):\n" + log.read_text()[-3000:]) from None
            time.sleep(0.2)


def start(
    command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None, capture_stderr: bool = False
) -> subprocess.Popen:
    """``command`` in a process group of its own (so :func:`stop` and :func:`kill_group` end all
    it starts), its output appended to ``log``; ``capture_stderr``: stderr to a text pipe."""
    out = open(log, "ab")
    return subprocess.Popen(
        command,
        stdout=out,
        stderr=subprocess.PIPE if capture_stderr else subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=capture_stderr,
        env=env,
        cwd=cwd or PROJECT_ROOT,
        start_new_session=True,
    )


def retrain_argv(*args: str) -> list[str]:
    """The ``retrain`` program with ``args``, as a user runs it (from this checkout)."""
    return [sys.executable, "-m", "retrain.cli", *args]


def kill_group(proc: subprocess.Popen | int) -> None:
    """kill -9 a process :func:`start` started and everything it started; waits for a Popen."""
    try:
        os.killpg(proc if isinstance(proc, int) else proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if not isinstance(proc, int):
        proc.wait()


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


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


@contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL server; yields its SQLAlchemy/asyncpg URL, or None when the
    PostgreSQL server binaries (Debian's postgresql package) are not installed. As root it
    runs as the ``postgres`` user, which PostgreSQL insists on."""
    import pwd
    import tempfile

    initdb, server = _postgres_bin("initdb"), _postgres_bin("postgres")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            initdb = None
        as_user = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else []
        if not as_user:
            initdb = None
    if not (initdb and server):
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="retrain-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    port = free_port()
    log = root / "postgres.log"
    made = subprocess.run(
        [*as_user, initdb, "-D", str(root / "data"), "-U", "prefect", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if made.returncode != 0:  # e.g. no user to run it as: the caller falls back to SQLite
        print(f"PostgreSQL unavailable (initdb: {made.stderr.strip()[-300:]})")
        shutil.rmtree(root, ignore_errors=True)
        yield None
        return
    proc = subprocess.Popen(
        [
            *as_user,
            server,
            "-D",
            str(root / "data"),
            "-k",
            str(root),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, proc, log, "PostgreSQL")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def prefect_env(api_url: str, home: Path) -> dict[str, str]:
    """The environment of a process that talks to the test's Prefect server, and only to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_UI_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def prefect_server(workdir: Path, database_url: str | None = None) -> Iterator[dict]:
    """``prefect server start`` on 127.0.0.1, on ``database_url`` (PostgreSQL) or SQLite in
    ``workdir``; yields its URLs and the environment for its clients."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = prefect_env(api_url, home)
    log = workdir / "prefect-server.log"
    server_env = dict(env, PREFECT_API_DATABASE_CONNECTION_URL=database_url) if database_url else env
    proc = start([tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, server_env)
    started = time.perf_counter()
    try:
        wait_http(f"{api_url}/health", proc, log)
        yield {
            "api_url": api_url,
            "ui_url": f"http://127.0.0.1:{port}",
            "env": env,
            "log": log,
            "home": home,
            "started_s": time.perf_counter() - started,
            "database": "postgresql" if database_url else "sqlite",
        }
    finally:
        stop(proc)


def start_worker(pool: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return start([tool("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "2"], log, env)


@contextmanager
def moto_s3(workdir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1; yields its endpoint URL. ``env``: more
    environment for it (``INITIAL_NO_AUTH_ACTION_COUNT=0`` makes it check credentials)."""
    port = free_port()
    log = workdir / "moto.log"
    proc = start([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, {**os.environ, **(env or {})})
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def dask_cluster(workdir: Path, env: dict[str, str] | None = None, workers: int = 1) -> Iterator[str]:
    """``dask scheduler`` and ``dask worker`` processes; yields the scheduler address."""
    from distributed import Client

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start(
        [tool("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        workdir / "dask-scheduler.log",
        env,
    )
    worker = None
    try:
        wait_port(port, scheduler, workdir / "dask-scheduler.log", "dask scheduler")
        worker = start(
            [
                tool("dask"),
                "worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                str(workers),
                "--no-dashboard",
                "--host",
                "127.0.0.1",
            ],
            workdir / "dask-worker.log",
            env,
        )
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        if worker is not None:
            stop(worker)
        stop(scheduler)


def retrain_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``retrain ARGS`` in a new process, as a user runs it."""
    return subprocess.run(
        retrain_argv(*args),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )


@contextmanager
def local_retrain_server(workdir: Path) -> Iterator[dict]:
    """``retrain server start`` on a free port with its own PREFECT_HOME; yields its state
    and ``env``: an environment with that PREFECT_HOME and no PREFECT_API_URL, in which
    retrain commands find the server themselves. Stopped with ``retrain server stop``."""
    home = workdir / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    done = retrain_cli("server", "start", "--port", str(free_port()), "--json", env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"retrain server start failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    state = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        yield {**state, "env": env, "home": home, "started_s": time.perf_counter() - started}
    finally:
        retrain_cli("server", "stop", env=env)
