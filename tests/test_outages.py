"""Faults of a real deployment (issue 15): the orchestrator (Prefect API), the Dask scheduler,
the disk and the store's credentials going away, and load (four scoring jobs on one cluster,
the same run started twice).

What must hold, for each: one exit status per failure class (2 refused, 3 store, 4 orchestrator,
5 compute cluster), a last line ``retrain <cmd>: error: ...`` naming what failed and what to do,
no traceback on the terminal, what was in the store kept, and the same command run again
resuming. Kills of `retrain` itself and a flaky S3 are in test_faults.py; a Dask worker killed
mid-job is in test_scoring.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dask
import pytest

from retrain import orchestrator
from retrain.tasks import storage
from retrain.tasks.samples import make_shapes_dataset
from tests import _services
from tests._services import kill_group
from tests.conftest import run_cli, s3_environment, tiny_run_flags

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def refused_port_url() -> str:
    """An API URL where nothing listens."""
    return f"http://127.0.0.1:{_services.free_port()}/api"


def last_line(stderr: str) -> str:
    """The last line a command printed on stderr (shown with ``pytest -s``: the fault table)."""
    line = stderr.strip().splitlines()[-1]
    print(f"\nlast line: {line}")
    return line


def session_api(prefect_api) -> str:
    """The session's Prefect API URL, for `retrain` processes started here."""
    if prefect_api:
        return prefect_api
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def cli_env(api_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        RETRAIN_LOG_DIR=str(tmp_path / "logs"),
        **extra,
    )
    return env


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``retrain ARGS`` as a user runs it (the program, with its API watch): stdout to ``log``,
    stderr kept for the test to read."""
    return _services.start(_services.retrain_argv(*args), log, env, capture_stderr=True)


def start_and_wait(args: list[str], env: dict[str, str], log: Path, condition, what: str) -> subprocess.Popen:
    """:func:`start_cli`, then :func:`wait_until` ``condition`` (killed when it never comes)."""
    proc = start_cli(args, env, log)
    try:
        wait_until(condition, proc, what=what)
    except BaseException:
        kill_group(proc)
        raise
    return proc


def wait_until(condition, proc: subprocess.Popen | None = None, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command ended ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def logs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RETRAIN_LOG_DIR", str(tmp_path / "logs"))
    return tmp_path / "logs"


# ---- the orchestrator ----------------------------------------------------------------------------


def test_prefect_api_down_before_a_run_or_a_score_is_said_in_seconds_with_status_4(
    tmp_path, shapes_dir, random_model_file, monkeypatch, logs
):
    url = refused_port_url()
    monkeypatch.setenv("PREFECT_API_URL", url)
    store = tmp_path / "store"
    started = time.monotonic()
    status, result, err = run_cli(["run", shapes_dir, "--store", str(store), *tiny_run_flags()])
    assert status == 4 and result["status"] == 4, (result, err)
    assert last_line(err).startswith("retrain run: error: orchestrator unreachable: the Prefect API at " + url)
    assert "rerun the same command" in last_line(err) and "Traceback" not in err
    assert "Traceback" in Path(result["log"]).read_text()  # the details went to the log file
    assert not store.exists()  # refused before anything was written
    status, result, err = run_cli(["score", random_model_file, shapes_dir, "--out", str(tmp_path / "scores")])
    assert status == 4 and url in result["error"] and last_line(err).startswith("retrain score: error: orchestrator")
    assert time.monotonic() - started < 60  # in seconds, not after Prefect's retries (minutes)


def test_client_retries_fit_into_the_grace_and_the_users_settings_win():
    env: dict[str, str] = {}
    orchestrator.bound_client_retries(90, env)
    retries = int(env["PREFECT_CLIENT_MAX_RETRIES"])
    assert 1 <= retries and sum(2**i for i in range(1, retries + 1)) <= 90 / 4
    assert float(env["PREFECT_API_REQUEST_TIMEOUT"]) == 45
    env = {"PREFECT_CLIENT_MAX_RETRIES": "7"}
    orchestrator.bound_client_retries(10, env)
    assert env["PREFECT_CLIENT_MAX_RETRIES"] == "7" and float(env["PREFECT_API_REQUEST_TIMEOUT"]) == 15
    assert orchestrator.grace_seconds({}) == orchestrator.DEFAULT_GRACE_S <= 120
    with pytest.raises(ValueError, match="RETRAIN_API_GRACE_SECONDS"):
        orchestrator.grace_seconds({"RETRAIN_API_GRACE_SECONDS": "soon"})


def test_a_flow_run_ends_without_joining_its_stopped_heartbeat_thread(monkeypatch):
    """Prefect's sync engine joined the heartbeat thread, which looks at its stop event once a
    second: each flow run's end waited up to 1 s. After prepare_for_flows it is not joined,
    and the stopped thread still ends by itself, sending no more heartbeats."""
    import logging

    from prefect import flow_engine

    monkeypatch.setattr(flow_engine, "_send_heartbeats", flow_engine._send_heartbeats)  # restored after
    orchestrator.prepare_for_flows()
    orchestrator.prepare_for_flows()  # once is enough: not wrapped twice
    assert flow_engine._send_heartbeats.joins_on_exit is False

    sent, joined = [], []

    class Engine:  # what the heartbeat context reads of a flow run engine
        heartbeat_seconds, flow_run = 30, None
        logger = logging.getLogger("test")

        def _build_heartbeat_event_template(self):
            return None, None

        def _emit_flow_run_heartbeat(self, resource, related):
            sent.append(threading.current_thread())

    real_join = threading.Thread.join
    monkeypatch.setattr(threading.Thread, "join", lambda self, *a, **k: joined.append(self) or real_join(self, *a, **k))
    with flow_engine._send_heartbeats(Engine()):
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
    (thread,) = sent  # one heartbeat, at the start
    assert thread not in joined
    real_join(thread, timeout=5)
    assert not thread.is_alive() and len(sent) == 1


def test_the_api_watch_gives_up_within_the_grace_and_not_while_the_api_answers(tmp_path):
    """The watch of a refused URL calls back within grace + one probe interval (+ slack); the
    watch of an API that answers never does."""
    lost: list[tuple[float, orchestrator.OrchestratorError]] = []
    started = time.monotonic()
    watch = orchestrator.ApiWatch(refused_port_url(), 2.0, lambda e: lost.append((time.monotonic(), e))).start()
    wait_until(lambda: lost, timeout=60, what="the watch to give up")
    watch.stop()
    assert lost[0][0] - started < 2.0 + 2 * watch.interval + watch.probe_timeout + 10
    assert "has not answered for" in str(lost[0][1]) and "rerun the same command" in str(lost[0][1])

    import http.server

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answered: list = []
        watch = orchestrator.ApiWatch(f"http://127.0.0.1:{server.server_address[1]}/api", 1.0, answered.append)
        watch.start()
        time.sleep(3 * watch.interval + 1.5)
        watch.stop()
        assert not answered and watch.down_since is None
    finally:
        server.shutdown()


@pytest.mark.services
def test_prefect_api_killed_mid_run_gives_up_within_the_grace_and_the_rerun_resumes(
    tmp_path, shapes_dir, prefect_api, logs, monkeypatch
):
    """A real `prefect server`, killed while `retrain run` trains: the command ends with status 4
    within the grace (20 s here) plus slack, its last line names the API; the checkpoints stay;
    the same command against a running API resumes the run and finishes it."""
    store = tmp_path / "store"
    args = ["run", shapes_dir, "--store", str(store), *tiny_run_flags(max_epochs=8), "--mode", "finetune"]
    args += ["--checkpoint-frequency", "1", "--checkpoint-frequency-unit", "iteration", "--no-promote"]
    with _services.prefect_server(tmp_path) as server:
        env = cli_env(server["api_url"], tmp_path, RETRAIN_API_GRACE_SECONDS="20")
        first_checkpoint = lambda: list(store.glob("runs/*/checkpoints/iter-*.pt"))  # noqa: E731
        proc = start_and_wait([*args, "--json"], env, tmp_path / "run.log", first_checkpoint, "the first checkpoint")
    killed = time.monotonic()  # the server is stopped (its process group terminated)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    gave_up_s = time.monotonic() - killed
    assert proc.returncode == 4, err[-3000:]
    assert last_line(err).startswith(
        f"retrain run: error: orchestrator unreachable: the Prefect API at {server['api_url']}"
    )
    assert "Traceback" not in err
    assert gave_up_s < 20 + 90, gave_up_s  # the grace, an interval and a probe, and slack for a loaded machine
    run = next(store.glob("runs/*"))
    kept = sorted(p.name for p in (run / "checkpoints").glob("iter-*.pt"))
    print(f"gave up {gave_up_s:.1f} s after the API was stopped; checkpoints kept: {kept}")
    assert kept and storage.read_json(str(run / "run.json"))["status"] in ("running", "failed")

    monkeypatch.setenv("PREFECT_API_URL", session_api(prefect_api))
    status, summary, err = run_cli(args)  # the same command, the API back
    assert status == 0, err[-3000:]
    record = storage.read_json(str(run / "run.json"))
    assert summary["run_url"] == str(run) and record["status"] == "completed" and record["resumed"] == 1
    trained = storage.read_json(str(run / "summary.json"))
    if (run / "checkpoints" / f"iter-{trained['iterations']:08d}.pt").name in kept:
        # Training had reached its last iteration before the command gave up (a fast machine
        # trains the 16 iterations within the grace): the rerun resumes after training, or from
        # that last checkpoint when the API went away before the train stage wrote its model.
        assert trained["resumed_from"] in (None, trained["iterations"])
    else:
        assert trained["resumed_from"] >= int(kept[0][5:13])


def score_images(root: Path, count: int) -> list[str]:
    per_class = -(-count // 3)
    make_shapes_dataset(str(root), per_class=per_class, size=32, seed=5)
    return sorted(str(p) for p in root.rglob("*.jpg"))


@pytest.mark.services
def test_prefect_api_killed_mid_score_keeps_the_parts_and_the_rerun_resumes(
    tmp_path, random_model_file, prefect_api, logs, monkeypatch
):
    images = score_images(tmp_path / "images", 60)
    out = tmp_path / "scores"
    args = ["score", random_model_file, str(tmp_path / "images"), "--out", str(out), "--workers", "1"]
    args += ["--partition-size", "2", "--mini-batch-size", "2"]
    with _services.prefect_server(tmp_path) as server:
        env = cli_env(server["api_url"], tmp_path, RETRAIN_API_GRACE_SECONDS="20")
        first_part = lambda: list(out.glob("parts/*.parquet"))  # noqa: E731
        proc = start_and_wait([*args, "--json"], env, tmp_path / "score.log", first_part, "the first part")
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode == 4, err[-3000:]
    assert last_line(err).startswith(
        f"retrain score: error: orchestrator unreachable: the Prefect API at {server['api_url']}"
    )
    assert "Traceback" not in err
    kept = {p.name for p in out.glob("parts/*.parquet")}
    print(f"parts kept: {len(kept)} of {-(-len(images) // 2)}")
    assert kept and not list(out.glob("parts/*.tmp-*"))

    monkeypatch.setenv("PREFECT_API_URL", session_api(prefect_api))
    status, summary, err = run_cli(args)
    assert status == 0, err[-3000:]
    assert summary["resumed_partitions"] >= len(kept) and summary["images"] == len(images)
    frame = storage.read_parquet(summary["scores_url"])
    assert len(frame) == len(images) and frame["path"].is_unique


# ---- the compute cluster -------------------------------------------------------------------------


@pytest.mark.services
def test_dask_scheduler_killed_mid_score_is_status_5_and_a_new_scheduler_scores_only_the_rest(
    tmp_path, random_model_file, prefect_api, logs
):
    images = score_images(tmp_path / "images", 150)
    out = tmp_path / "scores"
    port = _services.free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    scheduler = _services.start(
        [_services.tool("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        tmp_path / "scheduler.log",
        env,
    )
    worker = None
    try:
        _services.wait_port(port, scheduler, tmp_path / "scheduler.log", "dask scheduler")
        worker = _services.start(
            [_services.tool("dask"), "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
            tmp_path / "worker.log",
            env,
        )

        def kill_scheduler_after_the_first_part() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not list(out.glob("parts/*.parquet")):
                time.sleep(0.01)
            os.killpg(scheduler.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_scheduler_after_the_first_part, daemon=True)
        killer.start()
        args = ["score", random_model_file, str(tmp_path / "images"), "--out", str(out)]
        args += ["--partition-size", "1", "--mini-batch-size", "1"]
        status, result, err = run_cli([*args, "--dask-address", address])
        killer.join(timeout=60)
    finally:
        if worker is not None:
            _services.stop(worker)
        _services.stop(scheduler)
    assert status == 5, (result, err[-3000:])
    line = last_line(err)
    assert line.startswith(f"retrain score: error: compute cluster lost: {address}"), line
    assert "score the missing partitions" in line and "store failure" not in line and "Traceback" not in err
    kept = {p.name for p in out.glob("parts/*.parquet")}
    print(f"parts kept: {len(kept)} of {len(images)}")
    assert 1 <= len(kept) < len(images) and not (out / "scores.parquet").exists()

    with _services.dask_cluster(tmp_path / "second") as second:
        status, summary, err = run_cli([*args, "--dask-address", second])
    assert status == 0, err[-3000:]
    assert summary["resumed_partitions"] >= len(kept)
    assert summary["processed"] == len(images) - summary["resumed_partitions"]  # only the missing ones
    frame = storage.read_parquet(summary["scores_url"])
    assert len(frame) == len(images) and frame["path"].is_unique


def test_a_dask_scheduler_that_does_not_answer_is_status_5(tmp_path, random_model_file, prefect_api, logs):
    address = f"tcp://127.0.0.1:{_services.free_port()}"
    score_images(tmp_path / "images", 3)
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):  # Dask's setting, not a 30 s wait
        status, result, err = run_cli(
            [
                "score",
                random_model_file,
                str(tmp_path / "images"),
                "--out",
                str(tmp_path / "o"),
                "--dask-address",
                address,
            ]
        )
    assert status == 5 and result["type"] == "ClusterLostError", (result, err[-2000:])
    assert last_line(err).startswith(f"retrain score: error: compute cluster unreachable: {address}")


@pytest.mark.services
def test_four_scoring_jobs_at_once_on_one_cluster_each_give_one_row_per_image(tmp_path, random_model_file, prefect_api):
    images = score_images(tmp_path / "images", 24)
    with _services.dask_cluster(tmp_path / "cluster", workers=2) as address:
        env = cli_env(session_api(prefect_api), tmp_path)
        procs = []
        for i in range(4):
            out = tmp_path / f"scores-{i}"
            args = ["score", random_model_file, str(tmp_path / "images"), "--out", str(out), "--dask-address", address]
            procs.append(start_cli([*args, "--partition-size", "3", "--json"], env, tmp_path / f"score-{i}.log"))
        try:
            errors = [proc.communicate(timeout=600)[1] for proc in procs]
        finally:
            for proc in procs:
                kill_group(proc)
    for i, (proc, err) in enumerate(zip(procs, errors)):
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads((tmp_path / f"score-{i}.log").read_text().strip().splitlines()[-1])
        frame = storage.read_parquet(summary["scores_url"])
        assert len(frame) == len(images) == summary["images"] and frame["path"].is_unique
        assert set(frame["path"]) == set(images)


# ---- the run folder: one writer ------------------------------------------------------------------


@pytest.mark.services
def test_the_same_run_started_twice_is_refused_and_a_killed_first_does_not_block_the_rerun(
    tmp_path, shapes_dir, prefect_api, logs, monkeypatch
):
    store = tmp_path / "store"
    args = ["run", shapes_dir, "--store", str(store), *tiny_run_flags(max_epochs=4), "--no-promote"]
    args += ["--checkpoint-frequency", "1", "--checkpoint-frequency-unit", "iteration"]
    api = session_api(prefect_api)
    first = start_cli(args, cli_env(api, tmp_path), tmp_path / "first.log")
    try:
        wait_until(lambda: list(store.glob("runs/*/checkpoints/iter-*.pt")), first, what="the first checkpoint")
        os.killpg(first.pid, signal.SIGSTOP)  # held mid-run, lock and all, however fast this machine is
        run = next(store.glob("runs/*"))
        monkeypatch.setenv("PREFECT_API_URL", api)
        status, result, err = run_cli(args)  # the same command while the first runs
        assert status == 2 and result["type"] == "RunLockedError", (result, err[-2000:])
        line = last_line(err)
        assert line.startswith(f"retrain run: error: run {run.name} is already running (pid {first.pid}"), line
        assert "--fresh" in line and "Traceback" not in err
        assert first.poll() is None  # the first is untouched
        record = storage.read_json(str(run / "run.json"))
        assert record["resumed"] == 0 and record["status"] == "running"  # the refused one wrote nothing
    finally:
        kill_group(first)  # kill -9: its lock goes with it
    status, summary, err = run_cli(args)
    assert status == 0, err[-3000:]
    record = storage.read_json(str(run / "run.json"))
    assert summary["run_url"] == str(run) and record["resumed"] == 1 and record["status"] == "completed"
    assert not (run / ".lock").exists()


def test_a_run_folder_lock_on_an_object_store_refuses_a_second_writer_and_lapses():
    from retrain.tasks.runs import RunLockedError, lock_run

    url = f"memory://locks-{os.urandom(3).hex()}/runs/r1"
    first = lock_run(url).acquire()
    with pytest.raises(RunLockedError, match=r"run r1 is already running .*heartbeat"):
        lock_run(url).acquire()
    first._stop.set()  # the holder dies: no more heartbeats
    first._refresher.join()
    lapsing = lock_run(url)
    lapsing.lease_s = 0.5
    time.sleep(0.6)
    lapsing.acquire().release()  # taken over once the lease lapsed


# ---- the disk and the credentials ----------------------------------------------------------------


def test_the_free_space_check_states_its_margin_in_units_that_show_it(tmp_path, shapes_dir, monkeypatch, logs):
    import shutil

    from tests.conftest import zip_folder

    data = zip_folder(Path(shapes_dir), tmp_path / "shapes.zip")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    status, result, err = run_cli(["run", str(data), "--store", str(tmp_path / "store"), *tiny_run_flags()])
    assert status == 2, (result, err[-2000:])
    message = result["error"]
    assert "needs 0.250 GiB (0.000 GiB expanded + 0.250 GiB margin" in message, message
    assert "has 0.010 GiB free" in message


@pytest.mark.services
def test_a_full_store_is_status_3_naming_the_file_and_leaves_no_temporary_files(
    tiny_disk, shapes_dir, prefect_api, logs
):
    """The store on a 6 MiB disk: the first checkpoint (about 12 MB) does not fit."""
    store = tiny_disk / "store"
    args = ["run", shapes_dir, "--store", str(store), *tiny_run_flags(), "--mode", "finetune"]
    status, result, err = run_cli([*args, "--checkpoint-frequency", "1", "--checkpoint-frequency-unit", "iteration"])
    assert status == 3, (result, err[-3000:])
    line = last_line(err)
    assert line.startswith("retrain run: error: store full: no space left on device writing " + str(store)), line
    assert "rerun the same command" in line and "Traceback" not in err
    run = next(store.glob("runs/*"))
    assert (run / "split.parquet").exists()  # what was written before stays
    assert not [p for p in store.rglob("*") if storage.TMP_MARKER in p.name]
    record = storage.read_json(str(run / "run.json"))
    assert record["status"] == "failed" and "No space left" in record["traceback"]


@pytest.mark.services
def test_wrong_s3_credentials_are_status_3_naming_the_bucket_and_endpoint(tmp_path, monkeypatch, logs):
    """moto's S3 server checking credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): keys it does not
    know are refused with 403 InvalidAccessKeyId."""
    pytest.importorskip("s3fs")
    with _services.moto_s3(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        s3_environment(monkeypatch, endpoint, AWS_ACCESS_KEY_ID="wrong", AWS_SECRET_ACCESS_KEY="wrong")
        started = time.monotonic()
        status, result, err = run_cli(["runs", "--store", "s3://retrain-store/store"])
    assert status == 3, (result, err[-3000:])
    line = last_line(err)
    assert line.startswith("retrain runs: error: store failure: access refused:"), line
    assert f"bucket retrain-store at {endpoint}" in line and "AWS_ACCESS_KEY_ID" in line and "Traceback" not in err
    assert time.monotonic() - started < 60  # refused at once: credentials are not weather


def test_help_lists_the_exit_statuses(capsys):
    from retrain.cli import main

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    for status in ("2 ", "3 ", "4 ", "5 ", "130"):
        assert f"\n  {status}" in text
    assert "RETRAIN_API_GRACE_SECONDS" in text
