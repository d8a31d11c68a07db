"""The resident process (retrain/resident.py): commands run in a fork of a process that has
imported everything already, with the caller's terminal, folder, environment and exit status.

The quick tests check when a command may run there (code and import-time settings); the
services test starts the local server (which starts the resident process) and runs real
commands through it: a training run equal to the same run in its own process, a refused
input, a setting that sends the command back to its caller, Ctrl-C and a killed caller, and
``server stop`` leaving nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrain import resident, server
from tests._services import PROJECT_ROOT, local_retrain_server, retrain_cli
from tests.conftest import tiny_run_flags


def test_a_command_runs_in_the_resident_process_only_with_its_code_and_import_time_settings():
    fingerprint = resident.code_fingerprint()
    assert fingerprint == resident.code_fingerprint() and sys.executable in fingerprint
    assert "retrain/resident.py:" in fingerprint and "retrain/server.py:" in fingerprint

    env = {"PREFECT_API_URL": "http://127.0.0.1:1/api", "DASK_X": "1", "HOME": "/root", "PATH": "/bin"}
    settings = resident.import_time_environment(env)
    assert settings == {"PREFECT_API_URL": "http://127.0.0.1:1/api", "DASK_X": "1"}, "HOME and PATH may differ"

    same = {"fingerprint": fingerprint, "env": {**env, "PATH": "/usr/bin"}}
    assert resident._why_not(same, fingerprint, settings) is None
    older = resident._why_not({**same, "fingerprint": "x"}, fingerprint, settings)
    assert older["stale"] is True and "code changed" in older["refused"]
    other = resident._why_not({**same, "env": {**env, "OMP_NUM_THREADS": "1"}}, fingerprint, settings)
    assert "OMP_NUM_THREADS" in other["refused"] and not other.get("stale")


def test_retrain_resident_0_starts_none_and_delegates_nothing(tmp_path, monkeypatch):
    from retrain import server

    monkeypatch.setenv("RETRAIN_RESIDENT", "0")
    monkeypatch.setattr(server, "running", lambda home: {"pid": 1, "api_url": "http://127.0.0.1:1/api"})
    monkeypatch.setattr(server, "start_resident", lambda home: pytest.fail("a resident process was started"))
    assert server.start(home=tmp_path)["already_running"] and not server.resident_enabled()
    Path(resident.socket_path(tmp_path)).touch()  # even with a socket there
    assert resident.delegate(["runs"], tmp_path) is None


def test_a_long_prefect_home_gets_a_private_short_socket_path(tmp_path):
    long_home = tmp_path / ("x" * 120)
    path = resident.socket_path(long_home)
    assert len(path.encode()) < 108 and path.startswith(f"/tmp/retrain-{os.getuid()}/")
    assert oct(os.stat(Path(path).parent).st_mode & 0o777) == "0o700"
    assert resident.socket_path(Path("/tmp/h")) == "/tmp/h/retrain-resident.sock"


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _log(home: Path) -> str:
    return (home / server.RESIDENT_LOG_FILE).read_text()


def _resident_forks(log: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in log.splitlines() if ": retrain " in line and " pid " in line]


def _popen(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "retrain.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return stat[0] != "Z"


@pytest.mark.services
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks processes through /proc")
def test_commands_run_in_the_resident_process_as_they_would_in_their_own(tmp_path, shapes_dir):
    with local_retrain_server(tmp_path) as srv:
        env, home = srv["env"], Path(srv["home"])
        pid = _wait_for(lambda: server.resident_pid(home), 120, "the resident process")
        _wait_for(lambda: "ready at" in _log(home), 180, "the resident process's imports")
        assert (
            json.loads(retrain_cli("server", "status", "--json", env=env).stdout.splitlines()[-1])["resident_pid"]
            == pid
        )

        run = ["run", shapes_dir, "--store", str(tmp_path / "store"), *tiny_run_flags(2), "--seed", "3", "--json"]
        there = retrain_cli(*run, "--run-id", "there", env=env)
        assert there.returncode == 0, there.stderr[-3000:]
        assert _resident_forks(_log(home))[-1].startswith("retrain run "), "it ran in the resident process"
        here = retrain_cli(*run, "--run-id", "here", env={**env, "RETRAIN_RESIDENT": "0"})
        assert here.returncode == 0, here.stderr[-3000:]
        assert len(_resident_forks(_log(home))) == 1, "RETRAIN_RESIDENT=0 runs it in its own process"
        a, b = (json.loads(done.stdout.strip().splitlines()[-1]) for done in (there, here))
        assert a["run_id"] == "there" and b["run_id"] == "here"
        assert (a["test_accuracy"], a["val_accuracy"], a["iterations"]) == (
            b["test_accuracy"],
            b["val_accuracy"],
            b["iterations"],
        )
        assert a["ui_url"].startswith(srv["ui_url"]), "the run is in the local server, with its link"

        refused = retrain_cli("classify", str(tmp_path / "no-model.pt"), shapes_dir, env=env)
        assert refused.returncode == 2 and "retrain classify: error:" in refused.stderr, refused.stderr
        assert _resident_forks(_log(home))[-1].startswith("retrain classify "), "its output reached the caller"

        other = retrain_cli("classify", str(tmp_path / "no-model.pt"), shapes_dir, env={**env, "DASK_X": "1"})
        assert other.returncode == 2 and "runs in the caller" in _log(home) and "DASK_X" in _log(home)

        # Ctrl-C in the caller's terminal reaches the command; a killed caller ends its command
        long_run = ["run", shapes_dir, "--store", str(tmp_path / "store2"), *tiny_run_flags(200), "--json"]
        for how in (signal.SIGINT, signal.SIGKILL):
            forks_before = len(_resident_forks(_log(home)))
            caller = _popen(long_run, env)
            _wait_for(lambda: len(_resident_forks(_log(home))) > forks_before, 60, "the fork")
            fork = int(_log(home).rsplit(" pid ", 1)[1].split(":", 1)[0])
            time.sleep(3)
            caller.send_signal(how)
            out, err = caller.communicate(timeout=120)
            if how == signal.SIGINT:
                assert caller.returncode == 130 and "retrain run: error: interrupted" in err, err[-2000:]
            _wait_for(lambda: not _alive(fork), 120, "the command to end")
            assert f"pid {fork}: exited 130" in _wait_for(
                lambda: f"pid {fork}: exited" in _log(home) and _log(home), 30, "its status"
            )

        # code changed since it started: that command runs in its caller, which starts a fresh
        # resident process (from its own environment, PREFECT_API_URL set) for the next ones
        older_code = "from retrain import cli, resident; resident.code_fingerprint = lambda: 'older'; cli.entry()"
        caller = subprocess.run(
            [sys.executable, "-c", older_code, "classify", str(tmp_path / "no-model.pt"), shapes_dir],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert caller.returncode == 2 and "code changed" in _log(home), caller.stderr[-2000:]
        _wait_for(lambda: not _alive(pid), 30, "the stale resident process to exit")
        fresh = _wait_for(lambda: server.resident_pid(home), 60, "a fresh resident process")
        _wait_for(lambda: _log(home).count("ready at") == 2, 180, "its imports")
        forks_before = len(_resident_forks(_log(home)))
        again = retrain_cli("classify", str(tmp_path / "no-model.pt"), shapes_dir, env=env)
        assert again.returncode == 2 and len(_resident_forks(_log(home))) == forks_before + 1, _log(home)[-2000:]

        stopped = retrain_cli("server", "stop", "--json", env=env)
        assert json.loads(stopped.stdout.splitlines()[-1])["stopped"] is True
        assert not _alive(fresh), "the resident process ends with the server"
        assert not os.path.exists(resident.socket_path(home))


def test_a_command_waits_only_for_a_resident_process_that_is_importing(tmp_path, monkeypatch):
    path = resident.socket_path(tmp_path)
    assert resident._ready_soon(tmp_path, path) is False, "none importing: the command runs itself at once"
    (tmp_path / resident.IMPORTING_FILE).touch()  # left by one that was killed while importing
    assert resident._ready_soon(tmp_path, path) is False
    monkeypatch.setattr(server, "resident_pid", lambda home: 123)  # one alive
    (tmp_path / resident.IMPORTING_FILE).write_text(str(os.getpid()))
    assert resident._ready_soon(tmp_path, path) is False, "it imports once a command that still runs ends"
    (tmp_path / resident.IMPORTING_FILE).write_text("")  # importing: its socket appears
    monkeypatch.setattr(resident.time, "sleep", lambda s: Path(path).touch())
    assert resident._ready_soon(tmp_path, path) is True
