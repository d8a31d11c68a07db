"""The local Prefect server (retrain/server.py, ``retrain server start|stop|status``).

The quick tests check how a command decides to use the server (state file, process, port,
the user's own API setting) with stand-ins: a listening socket and a sleeping process whose
command line names Prefect. The services test starts the real server, checks status, a
second start, and that stop leaves no process behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrain import server
from retrain.cli import main
from tests._services import local_retrain_server, retrain_cli


@pytest.fixture
def listening():
    """A socket that accepts connections on 127.0.0.1: a stand-in for the server's port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def prefect_named_process():
    """A live process whose command line says prefect, as the server's does."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "prefect", "server"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_state(home: Path, pid: int, port: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    state = {"pid": pid, "host": "127.0.0.1", "port": port, "api_url": api, "ui_url": api[:-4], "log": "x"}
    (home / server.STATE_FILE).write_text(json.dumps(state))


def test_a_command_uses_the_local_server_only_when_it_runs_and_no_api_is_set(
    tmp_path, listening, prefect_named_process
):
    home = tmp_path / "home"
    env = {"PREFECT_HOME": str(home)}
    assert server.use_local_server(env) is None and "PREFECT_API_URL" not in env  # no state file

    write_state(home, prefect_named_process, listening)
    assert server.use_local_server(env) == f"http://127.0.0.1:{listening}/api"
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{listening}/api"
    assert env["PREFECT_UI_URL"] == f"http://127.0.0.1:{listening}"

    chosen = {"PREFECT_HOME": str(home), "PREFECT_API_URL": "https://api.example/api"}
    assert server.use_local_server(chosen) is None and chosen["PREFECT_API_URL"] == "https://api.example/api"

    (home / "profiles.toml").write_text(
        'active = "cloud"\n[profiles.cloud]\nPREFECT_API_URL = "https://api.example/api"\n'
    )
    assert server.use_local_server(env := {"PREFECT_HOME": str(home)}) is None and "PREFECT_API_URL" not in env


def test_a_stale_state_is_not_a_running_server(tmp_path, listening, prefect_named_process):
    home = tmp_path / "home"
    write_state(home, prefect_named_process, _closed_port())
    assert server.running(home) is None, "the port does not answer"
    assert server.status(home)["running"] is False

    dead = subprocess.Popen([sys.executable, "-c", "pass", "prefect"])
    dead.wait()
    write_state(home, dead.pid, listening)
    assert server.running(home) is None, "the process has gone"

    write_state(home, os.getpid(), listening)  # alive, but not a Prefect server (a reused pid)
    assert server.running(home) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_cli_refuses_a_port_in_use_and_reports_none_running(tmp_path, monkeypatch, listening, capsys):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    assert main(["server", "start", "--port", str(listening)]) == 2
    assert f"port {listening} is in use" in capsys.readouterr().err
    assert main(["server", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["running"] is False
    assert main(["server", "stop"]) == 0
    assert "no Prefect server was running" in capsys.readouterr().out


def _processes_in_group(pgid: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[2]) == pgid and stat[0] != "Z":
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, ValueError):
                continue
    return found


@pytest.mark.services
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_server_start_status_stop_leaves_no_process(tmp_path):
    with local_retrain_server(tmp_path) as srv:
        env = srv["env"]
        assert srv["already_running"] is False and srv["api_url"].startswith("http://127.0.0.1:")
        assert _processes_in_group(srv["pid"]), "the server runs in its own process group"
        assert Path(srv["home"], "prefect.db").exists(), "its database lives in PREFECT_HOME"

        status = retrain_cli("server", "status", env=env)
        assert status.returncode == 0 and "Prefect server running since" in status.stdout
        assert srv["ui_url"] in status.stdout and str(srv["pid"]) in status.stdout

        again = json.loads(retrain_cli("server", "start", "--json", env=env).stdout.splitlines()[-1])
        assert again["already_running"] is True and again["pid"] == srv["pid"]

        stopped = retrain_cli("server", "stop", "--json", env=env)
        assert json.loads(stopped.stdout.splitlines()[-1])["stopped"] is True
        assert _processes_in_group(srv["pid"]) == []
        assert server.resident_pid(Path(srv["home"])) is None, "the resident process ends with the server"
        assert not Path(srv["home"], server.STATE_FILE).exists()

        status = json.loads(retrain_cli("server", "status", "--json", env=env).stdout.splitlines()[-1])
        assert status["running"] is False
        assert "no Prefect server was running" in retrain_cli("server", "stop", env=env).stdout


def test_classify_answers_without_importing_prefect_or_dask(tmp_path, random_model_file, shapes_dir):
    """The check for a local server and classify itself stay out of Prefect and Dask (each
    import costs seconds, and Prefect would start its temporary API)."""
    image = sorted(Path(shapes_dir, "circle").iterdir())[0]
    code = (
        "import sys; from retrain.cli import main; "
        f"status = main(['classify', {random_model_file!r}, {str(image)!r}, '--json']); "
        "print(sorted(m for m in ('prefect', 'dask', 'distributed') if m in sys.modules)); sys.exit(status)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PREFECT_HOME": str(tmp_path)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *_, answer, imported = done.stdout.strip().splitlines()
    assert json.loads(answer)["label"] in ("circle", "square", "triangle")
    assert imported == "[]"


def test_a_command_starts_the_server_only_for_flows_and_when_nothing_opts_out(tmp_path, monkeypatch):
    home = tmp_path / "home"
    env = {"PREFECT_HOME": str(home)}
    assert server.auto_start_enabled(env)
    assert not server.auto_start_enabled({**env, "RETRAIN_AUTO_SERVER": "0"})
    assert not server.auto_start_enabled({**env, "PREFECT_API_URL": "https://api.example/api"})
    assert not server.auto_start_enabled({**env, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"})
    home.mkdir()
    (home / "profiles.toml").write_text('active = "c"\n[profiles.c]\nPREFECT_API_URL = "https://api.example/api"\n')
    assert not server.auto_start_enabled(env)

    monkeypatch.setattr(server, "_launch", lambda *a, **k: pytest.fail("a server was started"))
    for command in ("classify", "evaluate", "deploy", "runs"):  # quick commands, and one that needs a lasting server
        assert server.start_for_command(command, {"PREFECT_HOME": str(tmp_path / "other")}) is None


def test_a_mistyped_command_starts_no_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RETRAIN_AUTO_SERVER", "1")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "_launch", lambda *a, **k: pytest.fail("a server was started"))
    assert main(["run", str(tmp_path / "no-such-data"), "--store", str(tmp_path / "store")]) == 2
    assert "no-such-data" in capsys.readouterr().err


def test_a_server_is_idle_once_the_processes_that_used_it_have_ended(tmp_path):
    from retrain.resident import IdleStop

    home = tmp_path / "home"
    server.register_client(home)  # this process: alive
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    server.register_client(home, done.pid)
    done.wait()
    (home / server.CLIENTS_DIR / str(os.getpid() + 10**7)).write_text("1")  # a pid that never was
    assert server.clients_alive(home) == 1 and sorted(os.listdir(home / server.CLIENTS_DIR)) == [str(os.getpid())]

    write_state(home, 1, 1)
    idle = IdleStop(home)
    assert not idle.due(forks_running=False), "started by `retrain server start`: no idle timeout"
    state = json.loads((home / server.STATE_FILE).read_text())
    (home / server.STATE_FILE).write_text(json.dumps({**state, "idle_timeout_s": 0}))
    idle.next_look = 0
    assert not idle.due(forks_running=False), "this process still uses it"
    (home / server.CLIENTS_DIR / str(os.getpid())).unlink()
    idle.next_look = 0
    assert not idle.due(forks_running=True), "a command runs in the resident process"
    idle.next_look = 0
    assert idle.due(forks_running=False)


def test_the_temporary_api_process_ends_with_a_killed_command():
    """A command killed by SIGKILL runs no exit handler: the kernel ends its child."""
    from retrain.early_api import die_with_parent

    if die_with_parent() is None:
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    code = (
        "import subprocess, sys, time; from retrain.early_api import die_with_parent; "
        "p = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent()); print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while server._proc_stat(child) not in (None, ("Z", child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (server._proc_stat(child) or ("gone",))[0] in ("gone", "Z"), "the child outlived its killed parent"


@pytest.mark.services
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_the_first_command_starts_the_server_that_later_ones_use_until_stopped(tmp_path, shapes_dir):
    from tests.conftest import tiny_run_flags

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != server.AUTO_ENV}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    run = ["run", shapes_dir, "--store", str(tmp_path / "store"), *tiny_run_flags(1), "--json"]
    try:
        first = retrain_cli(*run, env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        announced = [line for line in first.stderr.splitlines() if "started a local Prefect server" in line]
        assert len(announced) == 1 and "retrain server stop" in announced[0] and "RETRAIN_AUTO_SERVER=0" in announced[0]
        state = server.running(home)
        assert state is not None and state["idle_timeout_s"] == 30 * 60, "it outlives the command, until idle"
        assert json.loads(first.stdout.splitlines()[-1])["ui_url"].startswith(state["ui_url"])

        status = retrain_cli("server", "status", "--json", env=env)  # later commands find it as this one does
        assert json.loads(status.stdout.splitlines()[-1])["pid"] == state["pid"]
    finally:
        stopped = retrain_cli("server", "stop", "--json", env=env)
    assert json.loads(stopped.stdout.splitlines()[-1])["stopped"] is True
    assert _processes_in_group(state["pid"]) == [] and server.resident_pid(home) is None
