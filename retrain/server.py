"""The local Prefect server behind ``retrain server start|stop|status``.

Without a server, every flow run starts Prefect's temporary API (seconds of start-up per
command) and its UI goes away with the process. ``start`` runs the process ``prefect server
start --background`` runs (uvicorn on Prefect's app: API, services, UI) in its own process
group, with its database (SQLite) and its log in PREFECT_HOME; a state file there
(``retrain-server.json``) says where it listens.
:func:`use_local_server` is the check the ``retrain`` command makes at start: when
PREFECT_API_URL is not set, it reads the state file, checks the process and the port, and
points PREFECT_API_URL at the server. It imports nothing from Prefect, so it costs
milliseconds.

With no server running, the first ``run``, ``score`` or ``experiment`` starts one itself
(:func:`start_for_command`, announced in one line): it comes up while the command imports,
the command's flow runs on it, and later commands use it and its resident process instead of
each paying Prefect's temporary API and the imports (measured on 2 cores: 10-16 s a command).
``RETRAIN_AUTO_SERVER=0``, PREFECT_API_URL or a profile's API opt out. Idle, the two
processes hold ~750 MiB and ~3 % of a core (Prefect's services), so a server started this
way stops itself after ``RETRAIN_SERVER_IDLE_MINUTES`` (default 30) with no command using it
(``IdleStop`` in retrain/resident.py watches). One that ``retrain server start``
started, or made its own, runs until ``retrain server stop``.
"""

from __future__ import annotations

import fcntl
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
AUTO_ENV = "RETRAIN_AUTO_SERVER"  # 0: no server started by a command
IDLE_ENV = "RETRAIN_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 30.0
CLIENTS_DIR = "retrain-clients"  # one file per process using the server: <pid> holding its start time
LOCK_FILE = "retrain-server.lock"


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


def use_local_server(environ: dict | None = None, register: bool = True) -> str | None:
    """Point PREFECT_API_URL (and the UI's URL) at the local server when none is set and
    it runs; returns the API URL it set, or None (a server chosen by the user, or none up).
    ``register``: this process counts as using it (:func:`register_client`) while it runs."""
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
    if register:
        register_client(home)
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
    (with ``already_running`` when one was up already, ``seconds`` the start took). A server
    a command started (idle timeout) becomes this one: it runs until ``stop``."""
    home = home or prefect_home()
    with _start_lock(home):
        if (state := running(home)) is not None:
            state = _without_idle_timeout(home, state)
            if resident_enabled() and resident_pid(home) is None:
                start_resident(home)
            return {**state, "already_running": True, "seconds": 0.0}
        if (stale := read_state(home)) is not None and pid_alive(stale["pid"]):
            starting = _without_idle_timeout(home, stale)  # another `start` or a command is bringing it up
        else:
            if not 0 < port < 65536:
                raise ValueError(f"port must be between 1 and 65535, not {port}")
            if port_answers(host, port):
                raise ServerError(f"port {port} is in use by another program; choose another with --port")
            starting = _launch(home, host, port, idle_timeout_s=None)
    up = _wait_until_up(starting, home, timeout)
    if resident_enabled() and resident_pid(home) is None:
        start_resident(home)
    return up


def _without_idle_timeout(home: Path, state: dict) -> dict:
    """The server made the user's own: it no longer stops when idle."""
    if state.get("idle_timeout_s") is not None:
        state = {k: v for k, v in state.items() if k != "idle_timeout_s"}
        _write_state(home, state)
    return state


def _launch(home: Path, host: str, port: int, idle_timeout_s: float | None) -> dict:
    """Start the server's process, detached, and write its state file; returns the state at
    once (the API answers seconds later: :func:`_wait_until_up`). The process is the one
    ``prefect server start --background`` runs (uvicorn on Prefect's app, with its services
    and UI), without the seconds its command line takes to import first."""
    import importlib.util

    home.mkdir(parents=True, exist_ok=True)
    state_path(home).unlink(missing_ok=True)
    api_url = f"http://{_connect_host(host)}:{port}/api"
    log = home / LOG_FILE
    database = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=database,
        PREFECT_UI_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT__SERVER_FINAL="1",
    )
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
    with open(log, "ab") as out:
        out.write(f"\n---- retrain server start {datetime.now(timezone.utc).isoformat()} ----\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory"]
            + ["prefect.server.api.server:create_app", "--host", host, "--port", str(port)],
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
    if idle_timeout_s is not None:
        state["idle_timeout_s"] = idle_timeout_s
    _write_state(home, state)  # at once, so that `stop` and other commands find a server that is still starting
    return state


class _start_lock:
    """One process at a time decides whether to start the server of ``home`` (an exclusive
    lock on a file there): two commands started together start one server, not two."""

    def __init__(self, home: Path):
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / LOCK_FILE

    def __enter__(self):
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def auto_start_enabled(environ=os.environ) -> bool:
    """Whether a command may start the local server: not with ``RETRAIN_AUTO_SERVER=0``, nor
    when the user chose an API (PREFECT_API_URL or the active profile's) or turned Prefect's
    local API off (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false``)."""
    if environ.get(AUTO_ENV, "1") == "0" or environ.get("PREFECT_API_URL"):
        return False
    if environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() == "false":
        return False
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    return not _profile_sets_api_url(home, environ)


def idle_minutes(environ=os.environ) -> float:
    raw = environ.get(IDLE_ENV) or str(DEFAULT_IDLE_MINUTES)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{IDLE_ENV} must be a number of minutes, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{IDLE_ENV} must be more than 0 minutes, not {raw!r}")
    return value


# The commands that start the server when none runs: their flow runs then stay in its UI.
# Not `deploy`: deployments need a server that is always up, which `retrain server start` gives.
AUTO_START_COMMANDS = frozenset({"run", "score", "experiment"})


def start_for_command(command: str, environ=os.environ) -> str | None:
    """For a command about to run flows with no API set and no local server up: start the
    local server (and its resident process) in the background, say so in one line on
    stderr, and point PREFECT_API_URL at it; returns its API URL (None: opted out). The
    command does not wait here: its imports and the server's start overlap, and
    :func:`wait_for_local_server` waits before the first flow run."""
    if command not in AUTO_START_COMMANDS or not auto_start_enabled(environ):
        return None
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    idle_s = idle_minutes(environ) * 60
    with _start_lock(home):
        state = read_state(home)
        if state is None or not pid_alive(state["pid"]):  # else up, or starting for another command
            port = DEFAULT_PORT if not port_answers(DEFAULT_HOST, DEFAULT_PORT) else _free_port()
            state = _launch(home, DEFAULT_HOST, port, idle_timeout_s=idle_s)
            # The resident process's imports (8-20 s of a core, measured) wait for this command's
            # end: alongside, they would take a core from its work (a scoring job's two workers).
            start_resident(home, watch_only=not resident_enabled(), after=os.getpid())
            print(
                f"retrain: started a local Prefect server for this and later commands (UI {state['ui_url']}); "
                f"it stops after {idle_s / 60:g} idle minutes or with `retrain server stop`; "
                f"{AUTO_ENV}=0 runs each command on its own",
                file=sys.stderr,
                flush=True,
            )
    environ["PREFECT_API_URL"] = state["api_url"]
    environ.setdefault("PREFECT_UI_URL", state["ui_url"])
    register_client(home)
    return state["api_url"]


def wait_for_local_server(environ=os.environ, timeout: float = START_TIMEOUT_S) -> None:
    """Before the first flow run: when PREFECT_API_URL is the local server's and it is still
    starting (a command started it moments ago), wait until its API answers. One health
    request when it is up."""
    home = Path(environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    state = read_state(home)
    if state is None or environ.get("PREFECT_API_URL") != state["api_url"] or _healthy(state["api_url"]):
        return
    _wait_until_up(state, home, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((DEFAULT_HOST, 0))
        return s.getsockname()[1]


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot): with the pid, names one process."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def register_client(home: Path, pid: int | None = None) -> None:
    """Note that process ``pid`` (this one) uses the server: it is not idle while that runs."""
    pid = pid or os.getpid()
    folder = home / CLIENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(pid)).write_text(_start_time(pid) or "")


def clients_alive(home: Path) -> int:
    """How many registered processes still run; the files of those that ended are removed."""
    alive = 0
    for entry in (home / CLIENTS_DIR).glob("*"):
        try:
            started = entry.read_text()
        except OSError:
            continue
        if entry.name.isdigit() and _start_time(int(entry.name)) == started and started:
            alive += 1
        else:
            entry.unlink(missing_ok=True)
    return alive


def resident_enabled() -> bool:
    """``RETRAIN_RESIDENT=0``: no resident process; every command runs in its own process
    (a benchmark that measures each command's memory and CPU, say)."""
    return os.environ.get("RETRAIN_RESIDENT", "1") != "0"


def start_resident(home: Path, watch_only: bool = False, after: int | None = None) -> int:
    """Start the resident process (retrain/resident.py) for the server in ``home``, in the
    background: it is ready seconds later, and commands run in their own process until then.
    ``watch_only``: it only stops a server a command started once it is idle (no imports).
    ``after``: it imports once process ``after`` (the command that started the server) ends."""
    options = ["--watch-only"] if watch_only else []
    options += ["--after", str(after)] if after else []
    with open(home / RESIDENT_LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "retrain.resident", str(home), *options],
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
    if (pid := resident_pid(home)) is None or pid == os.getpid():  # the resident process stopping an idle server
        return
    deadline = time.monotonic() + timeout
    while resident_pid(home) is not None and time.monotonic() < deadline:
        pid_alive(pid)  # reaps it when this process started it
        time.sleep(0.05)
    if resident_pid(home) is not None:
        _signal_group(pid, signal.SIGKILL)
        while resident_pid(home) is not None and pid_alive(pid):
            time.sleep(0.05)


def _wait_until_up(state: dict, home: Path, timeout: float) -> dict:
    started = time.monotonic()
    while not _healthy(state["api_url"]):
        exited = not pid_alive(state["pid"])  # reaps it when this process started it
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
