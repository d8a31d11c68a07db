"""The resident process: ``retrain`` commands without paying for their imports each time.

A ``retrain`` command spends seconds before its first useful line: importing torch,
torchvision, Prefect, Dask and pandas (3-10 s on a 2-core machine). ``retrain server start``
therefore starts, beside the Prefect server, one more process that imports all of that once
and waits on a Unix socket in PREFECT_HOME. A command that finds it hands over its
arguments, working folder, environment and terminal (its stdin, stdout and stderr file
descriptors, passed over the socket); the resident process forks, and the fork runs the
command with the same code (:func:`retrain.cli.main`), prints to the caller's
terminal, and its exit status becomes the caller's. The caller forwards Ctrl-C and other
signals to the fork; a caller that dies takes its command with it (the fork is interrupted,
as by Ctrl-C: runs resume on the next call).

The command runs in the calling process instead (never wrong, only slower) when there is no
resident process, when ``RETRAIN_RESIDENT=0``, when the caller's Python differs, when the code
changed since the resident process started (it then exits, and the next ``retrain server
start`` or command starts a fresh one), or when a setting read at import time differs (the
environment variables of Prefect, Dask, the thread pools, the allocator and the loader).

The resident process has one thread: forking a process while other Python threads run can
leave the fork holding a lock nobody will release. It multiplexes with ``select``.

It also ends a server that a command started (retrain/server.py, ``idle_timeout_s`` in its
state) once no command has used it for that long: no fork running and no registered process
alive (``--watch-only``: that alone, for ``RETRAIN_RESIDENT=0``).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SOCKET_NAME = "retrain-resident.sock"
# There until it is ready, holding the pid of the command whose end its imports wait for (if any):
# a command may wait for it once that one has ended.
IMPORTING_FILE = "retrain-resident.importing"
IMPORT_WAIT_S = 60.0  # how long a command waits for a resident process that is importing
# Environment variables that take effect when a module is imported or a library is loaded:
# where the caller's differ from the resident process's, its imported state would be wrong.
IMPORT_TIME_PREFIXES = (
    "PREFECT_",
    "DASK_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "NVIDIA_",
    "ORT_",
    "LD_",
    "MALLOC_",
    "PYTHONPATH",
    "PYTHONHASHSEED",
)
_HEADER = struct.Struct("!I")
IDLE_CHECK_S = 5.0  # how often the idle stop looks at the server's users


def socket_path(home: Path) -> str:
    """The socket's path: in PREFECT_HOME, or (when that path is too long for a Unix socket,
    108 bytes) in a private folder named after it."""
    path = str(home / SOCKET_NAME)
    if len(path.encode()) < 100:
        return path
    import hashlib

    private = Path(f"/tmp/retrain-{os.getuid()}")
    private.mkdir(mode=0o700, exist_ok=True)
    return str(private / f"{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]}.sock")


def code_fingerprint() -> str:
    """What identifies the code a command would run: the interpreter and the size and time
    of every file of the retrain package (a few milliseconds for ~80 files)."""
    import retrain
    import retrain.flows
    import retrain.tasks

    parts = [sys.executable]
    for folder in {*retrain.__path__, *retrain.flows.__path__, *retrain.tasks.__path__}:
        for root, _dirs, files in os.walk(folder):
            for name in sorted(files):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(root, name))
                    parts.append(f"{root}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(sorted(parts))


def import_time_environment(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(IMPORT_TIME_PREFIXES)}


# ---- the caller's side ----------------------------------------------------------------------


def delegate(argv: list[str], home: Path) -> int | None:
    """Run ``retrain ARGV`` in the resident process; its exit status, or None when the
    command should run here (no resident process, or it cannot run this one)."""
    from retrain.server import resident_enabled

    if not resident_enabled():
        return None
    path = socket_path(home)
    if not os.path.exists(path) and not _ready_soon(home, path):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    with conn:
        request = json.dumps(
            {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fingerprint": code_fingerprint()}
        ).encode()
        try:
            socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
            reader = conn.makefile("rb")
            first = json.loads(reader.readline() or b"{}")
        except (OSError, ValueError):
            return None
        if "pid" not in first:
            if first.get("stale"):
                from retrain.server import start_resident

                start_resident(home)  # a fresh one for the next command; this one runs here
            return None
        return _wait_for(first["pid"], reader)


def _ready_soon(home: Path, path: str) -> bool:
    """Whether a resident process that is importing now answers within IMPORT_WAIT_S: it
    began before this command, so it is ready before this command's own imports would be,
    and they would only slow each other (2 cores: a second command right after the one that
    started the server)."""
    from retrain.server import _start_time, resident_pid

    marker = home / IMPORTING_FILE
    deadline = time.monotonic() + IMPORT_WAIT_S
    while marker.exists() and not os.path.exists(path) and time.monotonic() < deadline:
        try:
            after = marker.read_text()
        except OSError:
            after = ""
        if resident_pid(home) is None or (after.isdigit() and _start_time(int(after)) is not None):
            return False  # none, or it waits for a command that still runs (a long training, say)
        time.sleep(0.05)
    return os.path.exists(path)


def _wait_for(pid: int, reader) -> int:
    """Forward the signals a user sends to this process to the command's, until it ends."""

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    while True:
        try:
            line = reader.readline()
        except InterruptedError:
            continue
        if not line:  # the resident process went away (killed): so did the command
            print("retrain: error: the resident process ended during the command", file=sys.stderr)
            return 1
        message = json.loads(line)
        if "status" in message:
            return message["status"]


# ---- the resident process -------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message}", flush=True)


def _preload() -> None:
    """What commands import: loaded once here, shared by every fork (copy on write). Not
    onnxruntime: importing it starts a native thread, which a fork must not inherit."""
    import dask.distributed  # noqa: F401
    import fastapi  # noqa: F401  (what Prefect serializes a flow's parameters with)
    import pandas  # noqa: F401
    import prefect  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import pyarrow.acero  # noqa: F401  (scoring's listing diff)
    import scipy.stats  # noqa: F401  (scoring's drift tests: ~0.5-1.5 s to import)
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import retrain.commands  # noqa: F401
    import retrain.flows.pipeline  # noqa: F401
    import retrain.flows.score  # noqa: F401
    import retrain.tasks.inference  # noqa: F401
    import retrain.tasks.scoring.run  # noqa: F401
    import retrain.tasks.training.loop  # noqa: F401


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    if len(data) < _HEADER.size:
        raise ValueError("short request")
    (size,) = _HEADER.unpack(data[: _HEADER.size])
    body = data[_HEADER.size :]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("request cut short")
        body += chunk
    conn.settimeout(None)
    return json.loads(body), fds


def _why_not(request: dict, fingerprint: str, environment: dict[str, str]) -> dict | None:
    if request.get("fingerprint") != fingerprint:
        return {"refused": "the code changed since the resident process started", "stale": True}
    theirs = import_time_environment(request.get("env", {}))
    if theirs != environment:
        differ = sorted(k for k in {*theirs, *environment} if theirs.get(k) != environment.get(k))
        return {"refused": f"settings read at import time differ: {', '.join(differ)}"}
    return None


def _run_forked(request: dict, fds: list[int]) -> None:
    """In the fork: become the caller's command, then exit with its status."""
    status = 1
    try:
        os.setsid()  # `retrain server stop` ends the server, not the commands running
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["retrain", *request["argv"]]
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        from retrain.cli import finish, main

        finish(main(request["argv"], watch_api=True))  # exits; like the program, it watches the API
    except SystemExit as exc:  # argparse's own exit
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - the fork must never return into the server loop
        import traceback

        traceback.print_exc()
        print(f"retrain: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(status)


class IdleStop:
    """Whether a server that a command started has been idle for its ``idle_timeout_s``: no
    command running in a fork here and no process registered as its user still alive. Read
    from its state at each look, so a ``retrain server start`` that makes it its own ends
    the countdown."""

    def __init__(self, home: Path):
        self.home = home
        self.last_busy = time.monotonic()
        self.next_look = 0.0

    def due(self, forks_running: bool) -> bool:
        from retrain.server import clients_alive, read_state

        now = time.monotonic()
        if now < self.next_look:
            return False
        self.next_look = now + IDLE_CHECK_S
        timeout = (read_state(self.home) or {}).get("idle_timeout_s")
        if timeout is None or forks_running or clients_alive(self.home):
            self.last_busy = now
            return False
        return now - self.last_busy >= timeout

    def stop_server(self) -> None:
        from retrain.server import stop

        _log(f"no command used the server for {time.monotonic() - self.last_busy:.0f} s; stopping it")
        stop(self.home)


class Resident:
    """The accept loop: one fork per command; statuses sent back as the forks end."""

    def __init__(self, home: Path, server_pid: int):
        self.home = home
        self.server_pid = server_pid
        self.path = socket_path(home)
        self.fingerprint = code_fingerprint()
        self.environment = import_time_environment(os.environ)
        self.selector = selectors.DefaultSelector()
        self.commands: dict[int, socket.socket] = {}  # fork pid -> its caller's connection
        self.exits: dict[int, int] = {}  # fork pid -> a pidfd, readable once that fork ends
        self.idle = IdleStop(home)

    def bind(self) -> socket.socket | None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
            return None  # another resident process answers here already
        except OSError:
            pass
        finally:
            probe.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # the socket: its owner alone may connect
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_mask)
        listener.listen(16)
        return listener

    def serve(self) -> None:
        listener = self.bind()
        if listener is None:
            _log(f"another resident process answers at {self.path}; exiting")
            return
        from retrain.server import pid_alive

        (self.home / IMPORTING_FILE).unlink(missing_ok=True)
        _log(f"ready at {self.path} (pid {os.getpid()})")
        self.selector.register(listener, selectors.EVENT_READ)
        try:
            while pid_alive(self.server_pid):  # it ends with the server it serves
                for key, _ in self.selector.select(timeout=0.2):
                    if key.fileobj is listener:
                        if self.accept(listener) == "stale":
                            return
                    elif key.data != "exit":
                        self.caller_gone(key.fileobj)
                self.reap()
                if self.idle.due(bool(self.commands)):
                    self.idle.stop_server()
            _log("the server stopped; exiting")
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)

    def accept(self, listener: socket.socket) -> str | None:
        conn, _ = listener.accept()
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        fds: list[int] = []
        try:
            if uid != os.getuid():
                raise PermissionError(f"caller uid {uid} is not this process's")
            request, fds = _read_request(conn)
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        except (OSError, ValueError) as exc:
            _log(f"refused a caller: {exc}")
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        refusal = _why_not(request, self.fingerprint, self.environment)
        if refusal is not None:
            _log(f"runs in the caller: retrain {' '.join(request['argv'])}: {refusal['refused']}")
            conn.sendall(json.dumps(refusal).encode() + b"\n")
            for fd in fds:
                os.close(fd)
            conn.close()
            return "stale" if refusal.get("stale") else None
        pid = os.fork()
        if pid == 0:
            conn.close()
            self.selector.close()
            for fd in self.exits.values():
                os.close(fd)
            _run_forked(request, fds)
        for fd in fds:
            os.close(fd)
        self.watch_exit(pid)
        _log(f"pid {pid}: retrain {' '.join(request['argv'])} (in {request['cwd']})")
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        self.commands[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ)
        return None

    def watch_exit(self, pid: int) -> None:
        """Wake the loop the moment the fork ends (a pidfd, Linux 5.3+), so its caller hears
        its status at once; without one, the loop's 0.2 s poll finds it (0.1 s later on average)."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return
        self.exits[pid] = fd
        self.selector.register(fd, selectors.EVENT_READ, "exit")

    def caller_gone(self, conn: socket.socket) -> None:
        """A caller's connection became readable: it sends nothing, so it closed (killed)."""
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        if data:
            return
        self.selector.unregister(conn)
        for pid, c in list(self.commands.items()):
            if c is conn:
                _log(f"pid {pid}: its caller went away; interrupting it")
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    def reap(self) -> None:
        while self.commands:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status = os.waitstatus_to_exitcode(wait_status)
            status = 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell says
            conn = self.commands.pop(pid, None)
            if (fd := self.exits.pop(pid, None)) is not None:
                self.selector.unregister(fd)
                os.close(fd)
            _log(f"pid {pid}: exited {status}")
            if conn is None:
                continue
            try:
                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            except OSError:
                pass
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()


def _server_up(home: Path) -> dict | None:
    """The server's state once its API answers (a command may have started it moments ago:
    wait for it), None when none runs or starts."""
    from retrain.server import START_TIMEOUT_S, pid_alive, read_state, running

    deadline = time.monotonic() + START_TIMEOUT_S
    while (state := running(home)) is None and time.monotonic() < deadline:
        if (starting := read_state(home)) is None or not pid_alive(starting["pid"]):
            return None
        time.sleep(0.2)
    return state


def watch(home: Path) -> None:
    """``--watch-only``: the idle stop of a server a command started, and nothing else."""
    from retrain.server import pid_alive

    state = _server_up(home)
    if state is None:
        return
    idle = IdleStop(home)
    while pid_alive(state["pid"]):
        if idle.due(forks_running=False):
            idle.stop_server()
            return
        time.sleep(IDLE_CHECK_S)


def _wait_for_exit(pid: int) -> None:
    """Until process ``pid`` has ended (a pid reused since counts as ended)."""
    from retrain.server import _start_time

    started = _start_time(pid)
    while started is not None and _start_time(pid) == started:
        time.sleep(0.2)


def serve(home: Path, after: int | None = None) -> None:
    marker = home / IMPORTING_FILE
    marker.write_text(str(after or ""))
    try:
        _serve(home, after)
    finally:
        marker.unlink(missing_ok=True)


def _serve(home: Path, after: int | None) -> None:
    from retrain.server import use_local_server

    state = _server_up(home)
    if state is None:
        _log(f"no local server runs in {home}; exiting")
        return
    if after:
        _wait_for_exit(after)  # the command that started the server: the imports would slow it
    started = time.perf_counter()
    # PREFECT_API_URL as every command sets it: here, or already by the command that started
    # this process (one that started the server, or found the previous resident process's code
    # changed). Not registered as the server's user: that would keep it from ever being idle.
    if use_local_server(register=False) is None and os.environ.get("PREFECT_API_URL") != state["api_url"]:
        _log(f"PREFECT_API_URL names another API than the local server's ({state['api_url']}); exiting")
        return
    resident = Resident(home, state["pid"])  # the fingerprint first: the code as it is when the imports begin
    _preload()
    _log(f"imported in {time.perf_counter() - started:.1f} s")
    resident.serve()


if __name__ == "__main__":
    options = sys.argv[2:]
    if "--watch-only" in options:
        watch(Path(sys.argv[1]))
    else:
        serve(Path(sys.argv[1]), int(options[options.index("--after") + 1]) if "--after" in options else None)
