"""The local Prefect server behind ``retrain server start|stop|status``.

Without a server, every flow run starts Prefect's temporary API (seconds of start-up per
command) and its UI goes away with the process. ``start`` runs ``prefect server start`` in
the background, in its own process group, with its database (SQLite) and its log in
PREFECT_HOME; a state file there (``retrain-server.json``) says where it listens.
:func:`use_local_server` is the check the ``retrain`` command makes at start: when
PREFECT_API_URL is not set, it reads the state file, checks the process and the port, and
points PREFECT_API_URL at the server. It imports nothing from Prefect, so it costs
milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200  # Prefect's own default: the address its documentation shows
STATE_FILE = "retrain-server.json"
LOG_FILE = "retrain-server.log"
RESIDENT_LOG_FILE = "retrain-resident.log"
RESIDENT_PID_FILE = "retrain-resident.pid"
START_TIMEOUT_S = 180.0  # the first start creates the database (migrations: ~10-20 s on 2 busy cores)
STOP_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """The server could not be started or stopped (the message says why and what to do)."""


def prefect_home() -> Path:
    """Prefect's home folder, as Prefect resolves it: $PREFECT_HOME or ~/.prefect."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_path(home: Path | None = None) -> Path:
    return (home or prefect_home()) / STATE_FILE


def read_state(home: Path | None = None) -> dict | None:
    try:
        return json.loads(state_path(home).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_state(home: Path, state: dict) -> None:
    path = state_path(home)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a Linux process from /proc, None where there is no /proc entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    return fields[0], int(fields[2])


def pid_alive(pid: int) -> bool:
    """A live process (not a zombie) that is a Prefect server: a recycled pid is not ours."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that has exited: reap it
            return False
    except ChildProcessError:
        pass  # not our child (the usual case: an earlier `retrain server start` started it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] == "Z":
        return False
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection((_connect_host(host), port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _connect_host(host: str) -> str:
    """Where a client on this machine connects to a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def running(home: Path | None = None) -> dict | None:
    """The state of the local server when it runs and its port answers, else None."""
    state = read_state(home)
    if state and pid_alive(state["pid"]) and port_answers(state["host"], state["port"]):
        return state
    return None


def _profile_sets_api_url(home: Path, environ) -> bool:
    """Whether the active Prefect profile names an API (then the user chose one: keep it)."""
    path = Path(environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    try:
        text = path.read_text()
    except OSError:
        return False
    try:
        import tomllib
    except ImportError:  # Python 3.10 has no TOML reader: any profile naming an API counts
        return "PREFECT_API_URL" in text
    try:
        profiles = tomllib.loads(text)
    except ValueError:
        return False
    active = environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return "PREFECT_API_URL" in profiles.get("profiles", {}).get(active, {})


def use_local_server(environ: dict | None = None) -> str | None:
    """Point PREFECT_API_URL (and the UI's URL) at the local server when none is set and
    it runs; returns the API URL it set, or None (a server chosen by the user, or none up)."""
    environ = os.environ if environ is None else environ
    if environ.get("PREFECT_API_URL"):
        return None
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    state = running(home)
    if state is None:
        return None
    if _profile_sets_api_url(home, environ):
        return None
    environ["PREFECT_API_URL"] = state["api_url"]
    environ.setdefault("PREFECT_UI_URL", state["ui_url"])
    return state["api_url"]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _log_tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start(
    port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, home: Path | None = None, timeout: float = START_TIMEOUT_S
) -> dict:
    """Start the server in the background and wait until its API answers; returns its state
    (with ``already_running`` when one was up already, ``seconds`` the start took)."""
    home = home or prefect_home()
    if (state := running(home)) is not None:
        if resident_enabled() and resident_pid(home) is None:
            start_resident(home)
        return {**state, "already_running": True, "seconds": 0.0}
    if (stale := read_state(home)) is not None and pid_alive(stale["pid"]):
        return _wait_until_up(stale, home, None, timeout)  # another `start` is bringing it up
    state_path(home).unlink(missing_ok=True)
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, not {port}")
    if port_answers(host, port):
        raise ServerError(f"port {port} is in use by another program; choose another with --port")
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{_connect_host(host)}:{port}/api"
    log = home / LOG_FILE
    database = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database,
        PREFECT_UI_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    with open(log, "ab") as out:
        out.write(f"\n---- retrain server start {datetime.now(timezone.utc).isoformat()} ----\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop ends it and all it started
        )
    state = {
        "pid": proc.pid,
        "host": host,
        "port": port,
        "api_url": api_url,
        "ui_url": api_url.removesuffix("/api"),
        "log": str(log),
        "database": database.split("///", 1)[-1] if database.startswith("sqlite") else "(PostgreSQL)",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_state(home, state)  # at once, so that `stop` finds a server that is still starting
    up = _wait_until_up(state, home, proc, timeout)
    if resident_enabled():
        start_resident(home)
    return up


def resident_enabled() -> bool:
    """``RETRAIN_RESIDENT=0``: no resident process; every command runs in its own process
    (a benchmark that measures each command's memory and CPU, say)."""
    return os.environ.get("RETRAIN_RESIDENT", "1") != "0"


def start_resident(home: Path) -> int:
    """Start the resident process (retrain/resident.py) for the server in ``home``, in the
    background: it is ready seconds later, and commands run in their own process until then."""
    with open(home / RESIDENT_LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "retrain.resident", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outside the caller's terminal group: its Ctrl-C is not for it
        )
    (home / RESIDENT_PID_FILE).write_text(str(proc.pid))  # now: a `stop` right after this start finds it
    return proc.pid


def resident_pid(home: Path) -> int | None:
    """The resident process's pid while it runs."""
    try:
        pid = int((home / RESIDENT_PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"retrain.resident" in cmdline else None  # a recycled pid is not ours


def _stop_resident(home: Path, timeout: float = 5.0) -> None:
    """It exits by itself within a fraction of a second once the server is gone; else it is killed."""
    if (pid := resident_pid(home)) is None:
        return
    deadline = time.monotonic() + timeout
    while resident_pid(home) is not None and time.monotonic() < deadline:
        pid_alive(pid)  # reaps it when this process started it
        time.sleep(0.05)
    if resident_pid(home) is not None:
        _signal_group(pid, signal.SIGKILL)
        while resident_pid(home) is not None and pid_alive(pid):
            time.sleep(0.05)


def _wait_until_up(state: dict, home: Path, proc: subprocess.Popen | None, timeout: float) -> dict:
    started = time.monotonic()
    while not _healthy(state["api_url"]):
        exited = proc.poll() is not None if proc is not None else not pid_alive(state["pid"])
        if exited or time.monotonic() - started > timeout:
            if not exited:
                stop(home)
            state_path(home).unlink(missing_ok=True)
            why = "exited" if exited else f"did not answer within {timeout:.0f} s"
            raise ServerError(
                f"the Prefect server {why}; its log ({state['log']}) ends:\n{_log_tail(Path(state['log']))}"
            )
        time.sleep(0.2)
    return {**state, "already_running": False, "seconds": round(time.monotonic() - started, 2)}


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies left for their parent excepted)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[1] == pgid and stat[0] != "Z":
            return True
    return False


def stop(home: Path | None = None, timeout: float = STOP_TIMEOUT_S) -> dict:
    """Stop the server and every process it started; returns what was stopped."""
    home = home or prefect_home()
    state = read_state(home)
    if state is None:
        return {"stopped": False, "running": False}
    pid = state["pid"]
    if pid_alive(pid):
        _signal_group(pid, signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        deadline = time.monotonic() + timeout
        while _group_alive(pid) and time.monotonic() < deadline:
            pid_alive(pid)  # reaps it when this process started it
            time.sleep(0.1)
        if _group_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _group_alive(pid) and time.monotonic() < deadline + 10:
                pid_alive(pid)
                time.sleep(0.1)
        stopped = True
    else:
        stopped = False  # stale state: the process had gone already
    _stop_resident(home)
    state_path(home).unlink(missing_ok=True)
    return {"stopped": stopped, "running": False, "pid": pid, "api_url": state["api_url"]}


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:  # started with its own session: its group is its own
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def status(home: Path | None = None) -> dict:
    """Whether the local server runs, and where (API, UI, log, database)."""
    home = home or prefect_home()
    state = running(home)
    if state is None:
        return {"running": False, "home": str(home), "state_file": str(state_path(home))}
    return {"running": True, "home": str(home), **state, "resident_pid": resident_pid(home)}
