"""The store under faults (issue 20): a stalled S3 endpoint, a missing bucket, a full disk
while image shards are written, a lease taken over after a stall, a lock release that fails
after the job failed. Each must end in the first failure, named: what failed, where (file,
bucket, endpoint), within a bounded time, exit status 3, and never two writers finishing.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from retrain.tasks import storage
from tests import _services
from tests.conftest import run_cli, s3_environment


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# ---- a stalled endpoint -------------------------------------------------------------------------


@contextmanager
def stalled_endpoint() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (an S3 endpoint
    whose process is paused); yields its URL."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.services
def test_a_stalled_s3_endpoint_fails_runs_within_the_bounded_time_naming_the_endpoint(tmp_path):
    """1 s per request, 2 attempts: ``retrain runs`` ends with status 3 in seconds (it was
    silent for minutes: botocore's, s3fs's and retrain's retries multiplied)."""
    pytest.importorskip("s3fs")
    with stalled_endpoint() as endpoint:
        env = dict(
            os.environ,
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            RETRAIN_STORE_TIMEOUT="1",
            RETRAIN_STORE_RETRIES="2",
            RETRAIN_STORE_RETRY_DELAY="0.1",
            RETRAIN_LOG_DIR=str(tmp_path),
        )
        env.pop("AWS_PROFILE", None)
        started = time.monotonic()
        done = _services.retrain_cli("runs", "--store", "s3://retrain-store/store", env=env, timeout=90)
        seconds = time.monotonic() - started
    assert done.returncode == 3, (done.stdout[-2000:], done.stderr[-3000:])
    line = last_line(done.stderr)
    assert line.startswith("retrain runs: error: store failure:") and "failed 2 time(s)" in line, line
    assert f"endpoint {endpoint}" in line and "timeout" in line.lower(), line
    assert "attempt 2 of 2" in done.stderr  # the first retry is announced as it happens
    assert seconds < 45, seconds  # two 1 s attempts, plus the start-up of the command


def test_an_upload_to_a_stalled_s3_endpoint_fails_within_the_bounded_time(monkeypatch):
    """A PUT had no timeout at all: aiohttp waits for the "100 Continue" botocore asks for
    before it starts its read timeout (a scoring job sat 11 min on one connection)."""
    s3fs = pytest.importorskip("s3fs")
    outcome: list[BaseException | None] = []

    def upload() -> None:
        try:
            storage.write_bytes("s3://stalled/scores/part-000000.parquet", b"x" * 1000)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            outcome.append(exc)

    with stalled_endpoint() as endpoint:
        s3_environment(
            monkeypatch,
            endpoint,
            RETRAIN_STORE_TIMEOUT="0.5",
            RETRAIN_STORE_RETRIES="2",
            RETRAIN_STORE_RETRY_DELAY="0.1",
        )
        worker = threading.Thread(target=upload, daemon=True)  # a hang must not hang the suite
        worker.start()
        worker.join(30)
        s3fs.S3FileSystem.clear_instance_cache()
    assert outcome, "the upload to a stalled endpoint still hangs after 30 s"
    assert isinstance(outcome[0], storage.StorageError), repr(outcome[0])
    assert "failed 2 time(s)" in str(outcome[0]) and f"endpoint {endpoint}" in str(outcome[0])


# ---- a lock release that fails after the job failed ---------------------------------------------


def test_a_failed_lock_release_after_a_failure_keeps_the_first_error(monkeypatch, caplog):
    """A dead store fails the publish, then the lease's release: the publish failure is what
    the command reports (it said "remove .../.lock failed"); the release failure is logged."""
    folder = f"memory://release-{os.urandom(3).hex()}/runs/r1"

    def dead_store(url, *args, **kwargs):
        raise storage.StorageError(f"store failure: remove {url} failed 4 time(s)")

    for form in ("finally", "with"):
        lock = storage.FolderLock(folder).acquire()
        monkeypatch.setattr(storage, "remove", dead_store)
        with caplog.at_level("WARNING", logger="retrain.storage"), pytest.raises(storage.StorageError) as err:
            if form == "finally":
                try:
                    raise storage.StorageError("store failure: write_bytes .../model.pt failed 4 time(s)")
                finally:
                    lock.release()
            else:
                with lock:
                    raise storage.StorageError("store failure: write_bytes .../model.pt failed 4 time(s)")
        assert "model.pt" in str(err.value), (form, err.value)
        assert any("releasing the lock" in r.message and ".lock" in r.message for r in caplog.records), form
        monkeypatch.undo()
        caplog.clear()
        storage.remove(folder, recursive=True)


# ---- a lease taken over after a stall ------------------------------------------------------------


def test_a_writer_that_lost_its_lease_stops_instead_of_finishing():
    """Writer A holds the lease on a model's folder, stalls past it (no renewals), and B takes
    it over: A's next write there and its release raise, A leaves B's lease alone, B finishes
    (there were two promote entries: both finished)."""
    folder = f"memory://fence-{os.urandom(3).hex()}/store/models/shapes"
    first = storage.FolderLock(folder, lease_s=0.5).acquire()
    first._stop.set()  # A stalls: its renewals stop
    first._refresher.join()
    time.sleep(0.6)
    second = storage.FolderLock(folder, lease_s=0.5).acquire()  # the lease lapsed: B takes it over
    entry = storage.join(folder, "history", "a.json")
    with pytest.raises(storage.StorageError, match=r"lost the lock on .*models/shapes before writing .*a\.json"):
        storage.write_json(entry, {"run_id": "a"})
    assert not storage.exists(entry)
    with pytest.raises(storage.StorageError, match=r"lost the lock .* before releasing it: pid \d+ on"):
        first.release()
    assert storage.read_json(second.url)["token"] == second.token  # B's lease is still there
    storage.write_json(storage.join(folder, "history", "b.json"), {"run_id": "b"})
    second.release()
    assert not storage.exists(second.url)
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(folder)] == ["b.json"]
    storage.remove(folder.split("/store")[0], recursive=True)


# ---- a missing bucket ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["runs"], ["models"], ["rollback", "shapes"], ["classify", "s3://{bucket}/store/runs/r1/model.pt", "{image}"]],
    ids=["runs", "models", "rollback", "classify"],
)
def test_a_missing_bucket_is_status_3_naming_the_bucket_and_endpoint(moto, monkeypatch, tmp_path, command):
    """``runs`` and ``models`` listed nothing ({"runs": []}, status 0); elsewhere the message
    did not name the bucket."""
    s3_environment(monkeypatch, moto, RETRAIN_STORE_RETRIES="2", RETRAIN_STORE_RETRY_DELAY="0.02")
    bucket = f"missing-{os.urandom(3).hex()}"
    image = tmp_path / "x.jpg"
    image.write_bytes(b"not read: the model comes first")
    args = [part.format(bucket=bucket, image=image) for part in command]
    status, result, err = run_cli([*args, "--store", f"s3://{bucket}/store"])
    assert status == 3, (result, err[-3000:])
    line = last_line(err)
    assert f"bucket {bucket} does not exist at {moto}" in line, line
    assert "Traceback" not in err


# ---- a full disk while image shards are written --------------------------------------------------


def test_a_full_disk_while_writing_an_image_shard_names_the_shard(tiny_disk):
    """A 9 MB shard on a 6 MiB disk: numpy's save said "9274680 requested and 6283264
    written", no errno, no file; now ENOSPC naming the shard, status 3, no temporary file."""
    from retrain.failures import EXIT_STORE_FAILED, classify
    from retrain.tasks.training.row_files import write_npy

    url = str(tiny_disk / "store" / "shards" / "k" / "shard-000000.npy")
    with pytest.raises(OSError) as err:
        write_npy(url, np.zeros((60, 3, 227, 227), dtype=np.uint8))
    assert err.value.errno == errno.ENOSPC and err.value.filename == url, repr(err.value)
    args = SimpleNamespace(command="run", store=str(tiny_disk / "store"), json=True, out=None, score_out=None)
    message, status = classify(args, err.value)
    assert status == EXIT_STORE_FAILED and message.startswith(f"store full: no space left on device writing {url}")
    assert not list((tiny_disk / "store" / "shards" / "k").iterdir())  # no temporary file left
