"""Batch scoring (tasks/scoring/, flows/score.py, `retrain score`) on tiny generated images:
bad files become rows with an error, parts are resumable after a kill -9, one job per output
at a time, and the same code runs on a local cluster and on a separately started one."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from retrain.tasks import inference, scoring, storage
from retrain.tasks.model_file import ModelFileError, save_model_file
from retrain.tasks.preprocessing import load_image
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.scoring.job import run_record
from tests._services import kill_group

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


def png_bytes(mode: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 128) if mode == "RGBA" else 7).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, per_class: int = 4, bad: bool = True) -> dict[str, str | None]:
    """Shapes in nested class folders plus bad files; returns file -> expected error word."""
    make_shapes_dataset(str(root), per_class=per_class, size=40, seed=3)
    expected: dict[str, str | None] = {str(p): None for p in root.rglob("*.jpg")}
    if bad:
        good = (root / "circle" / "circle_000.jpg").read_bytes()
        files = {
            "bad/corrupt.jpg": (good[:200] + b"\x00" * 300 + good[500:], None),  # may decode: any outcome but a crash
            "bad/truncated.jpg": (good[: len(good) // 2], "truncated"),
            "bad/empty.jpg": (b"", "empty"),
            "bad/text named.jpg": (b"hello, I am not an image\n", "not a readable image"),
            "odd/ünïcode alpha.png": (png_bytes("RGBA"), None),
            "odd/grey.png": (png_bytes("L"), None),
            "odd/anim.gif": (_gif(), None),
        }
        for name, (data, error) in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            expected[str(path)] = error
        (root / "notes.txt").write_text("not scored: no image extension")
        (root / ".hidden.jpg").write_bytes(good)
    return expected


def _gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("P", (20, 20), i) for i in (1, 60)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def read_scores(out: str):
    return pq.read_table(scoring.JobLayout(out).scores).to_pandas()


@pytest.fixture(scope="module")
def model_file(random_model_file) -> str:
    """The shared random-weights model for the CLASSES (tests/conftest.py)."""
    return random_model_file


# ---- listing and partitions -------------------------------------------------------------------


def test_listing_folder_recursively_and_list_file(tmp_path):
    expected = make_folder(tmp_path / "images")
    listing = scoring.list_images(str(tmp_path / "images"))
    assert listing.paths == sorted(expected) and len(listing.paths) == 12 + 7
    assert listing.ignored == [str(tmp_path / "images" / "notes.txt")]  # hidden files: neither

    (tmp_path / "list.txt").write_text(
        "# two images and one that is gone\nimages/square/square_001.jpg\n\n"
        f"{tmp_path}/images/circle/circle_000.jpg\nimages/missing.jpg\n"
        "images/square/square_001.jpg\n"
    )
    listed = scoring.list_images(str(tmp_path / "list.txt"))
    assert [Path(p).name for p in listed.paths] == ["circle_000.jpg", "missing.jpg", "square_001.jpg"]
    with pytest.raises(FileNotFoundError):
        scoring.list_images(str(tmp_path / "nowhere"))


def test_partition_names_depend_only_on_the_sorted_files():
    files = [f"/data/img_{i:03d}.jpg" for i in range(10)]
    parts = scoring.partitions(files, 4, salt="m")
    assert [len(p.paths) for p in parts] == [4, 4, 2]
    assert scoring.partitions(list(reversed(files)), 4, salt="m") == parts  # order of listing: no matter
    changed = scoring.partitions(files[:9] + ["/data/img_zzz.jpg"], 4, salt="m")
    assert [p.name for p in changed[:2]] == [p.name for p in parts[:2]] and changed[2].name != parts[2].name
    assert scoring.partitions(files, 4, salt="other model")[0].name != parts[0].name


# ---- scoring a partition ------------------------------------------------------------------------


def test_partition_scoring_gives_one_row_per_file_and_errors_for_bad_ones(tmp_path, model_file):
    from retrain.tasks.evaluation import predict_scores
    from retrain.tasks.model_file import load_model_file

    expected = make_folder(tmp_path / "images")
    paths = sorted(expected) + [str(tmp_path / "images" / "vanished.jpg")]
    expected[paths[-1]] = "not found"
    inference.clear_cache()
    loads = inference.LOADS["count"]
    out = str(tmp_path / "part.parquet")
    model = scoring.WorkerModel(model_file, storage.sha256_of(model_file))
    result = scoring.score_partition(model, paths, out, mini_batch_size=3, k=2)
    table = pq.read_table(out).to_pandas()
    assert list(table["path"]) == paths and result.images == len(paths)
    for path, error in expected.items():
        row = table[table["path"] == path].iloc[0]
        if error is None and "corrupt" not in path:
            assert pd.isna(row["error"]) and row["label"] in CLASSES, (path, row["error"])
            assert len(row["top_labels"]) == 2 and row["top_labels"][0] == row["label"]
            assert row["top_scores"][0] == pytest.approx(row["score"]) and row["top_scores"][0] >= row["top_scores"][1]
        elif error is not None:
            assert pd.isna(row["label"]) and row["top_labels"] is None and error in row["error"], (path, row["error"])
    assert result.failed == int(table["error"].notna().sum()) >= 4

    # the same preprocessing and scores as evaluation / classify (the model file's own)
    good = [p for p in paths if expected.get(p) is None and "corrupt" not in p]
    loaded = load_model_file(model_file)
    pixels = torch.stack([load_image(storage.read_bytes(p), loaded.preprocessing.input_size) for p in good])
    reference = predict_scores(loaded.model, pixels, loaded.preprocessing)
    mine = table.set_index("path").loc[good]
    assert list(mine["label"]) == [CLASSES[i] for i in reference.argmax(1).tolist()]
    assert torch.allclose(torch.tensor(mine["score"].to_numpy()), reference.max(1).values, atol=1e-4)

    # a second partition in this process reuses the loaded model; an existing part is kept
    again = scoring.score_partition(model, good[:2], str(tmp_path / "p2.parquet"))
    assert again.images == 2 and inference.LOADS["count"] == loads + 1
    rescored = scoring.score_partition(model, paths, out)
    assert rescored.skipped and rescored.images == len(paths)
    # such a part was written after planning (by a lost attempt of the same run): its images
    # count as this run's, like those of the parts scored afresh
    record = run_record(SimpleNamespace(done=set()), [again, rescored], seconds=2.0)
    assert record["processed"] == 2 + len(paths) and record["resumed_partitions"] == 0


def test_models_that_do_not_fit_are_refused(tmp_path, model_file):
    record = torch.load(model_file, weights_only=True)
    wrong_classes = dict(record, classes=CLASSES + ["hexagon"])
    save_model_file(str(tmp_path / "four.pt"), wrong_classes)
    with pytest.raises(ModelFileError, match="do not fit"):
        scoring.inspect_model(str(tmp_path / "four.pt"))
    tiny = dict(record, input_size=[16, 16], preprocessing=dict(record["preprocessing"], input_size=[16, 16]))
    save_model_file(str(tmp_path / "tiny.pt"), tiny)
    with pytest.raises(ModelFileError, match="input size 16x16 does not fit"):
        scoring.inspect_model(str(tmp_path / "tiny.pt"))
    mismatch = dict(record, input_size=[224, 224])
    save_model_file(str(tmp_path / "mismatch.pt"), mismatch)
    with pytest.raises(ModelFileError, match="does not match"):
        scoring.inspect_model(str(tmp_path / "mismatch.pt"))
    make_folder(tmp_path / "images", per_class=1, bad=False)
    with pytest.raises(scoring.ScoringError, match="top-k"):
        scoring.prepare_job(model_file, str(tmp_path / "images"), str(tmp_path / "out"), top_k=4)

    # an output that holds another model's scores is refused, not mixed
    scoring.prepare_job(model_file, str(tmp_path / "images"), str(tmp_path / "out"))
    other = dict(record, metrics={"retrained": True})
    save_model_file(str(tmp_path / "other.pt"), other)
    with pytest.raises(scoring.ScoringError, match="another model"):
        scoring.prepare_job(str(tmp_path / "other.pt"), str(tmp_path / "images"), str(tmp_path / "out"))


# ---- the job: resume, lock -----------------------------------------------------------------------


def test_job_resumes_only_missing_parts_and_keeps_one_row_per_image(tmp_path, model_file, dask_client):
    expected = make_folder(tmp_path / "images")
    out = str(tmp_path / "out")
    first = scoring.score_job(
        model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=5, mini_batch_size=4
    )
    assert first["images"] == len(expected) and first["processed"] == len(expected)
    assert first["scored"] + first["failed"] == len(expected) and first["ignored"] == 1
    assert first["partitions"] == 4 and sum(first["labels"].values()) == first["scored"]
    assert {f["path"] for f in first["failures"]} >= {p for p, e in expected.items() if e}
    frame = read_scores(out)
    assert list(frame["path"]) == sorted(expected)

    parts = sorted((Path(out) / "parts").iterdir())
    parts[1].unlink()
    (Path(out) / "scores.parquet").unlink()
    (Path(out) / "parts" / "part-000099-debris.parquet.tmp-0a1b2c3d").write_bytes(b"half")
    again = scoring.score_job(
        model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=5, mini_batch_size=4
    )
    assert again["processed"] == 5 and again["resumed_partitions"] == 3
    columns = ["path", "label", "error"]
    assert read_scores(out)[columns].equals(frame[columns])
    assert sorted(p.name for p in (Path(out) / "parts").iterdir()) == [p.name for p in parts]  # debris gone

    # a part damaged on disk is removed by the consolidation, which says to rerun; the rerun redoes it
    parts[2].write_bytes(b"PAR1 not really")
    with pytest.raises(scoring.ScoringIncompleteError, match="unreadable"):
        scoring.consolidate(scoring.prepare_job(model_file, str(tmp_path / "images"), out, partition_size=5))
    assert not parts[2].exists()
    assert (
        scoring.score_job(
            model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=5, mini_batch_size=4
        )["processed"]
        == 5
    )

    # a new image: only its partition (the last) is scored again, still one row per image
    (tmp_path / "images" / "zz_new.jpg").write_bytes((tmp_path / "images" / "square" / "square_000.jpg").read_bytes())
    third = scoring.score_job(
        model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=5, mini_batch_size=4
    )
    assert third["images"] == len(expected) + 1 and third["processed"] == 5
    frame = read_scores(out)
    assert frame["path"].is_unique and len(frame) == len(expected) + 1


def test_a_failing_partition_fails_the_job_but_keeps_the_others(tmp_path, model_file, dask_client, monkeypatch):
    make_folder(tmp_path / "images", per_class=3, bad=False)
    out = str(tmp_path / "out")
    from retrain.tasks.scoring import partition

    real = partition.score_partition

    def crash_on_second(model, paths, part, *args):
        if "part-000001-" in part:
            raise MemoryError("worker ran out of memory")
        return real(model, paths, part, *args)

    monkeypatch.setattr(partition, "score_partition", crash_on_second)
    with pytest.raises(scoring.ScoringIncompleteError, match="1 of 3 partitions failed .*MemoryError"):
        scoring.score_job(model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=4)
    assert len(list((Path(out) / "parts").glob("*.parquet"))) == 2 and not Path(scoring.JobLayout(out).scores).exists()
    monkeypatch.setattr(partition, "score_partition", real)
    summary = scoring.score_job(model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=4)
    assert summary["processed"] == 4 and summary["resumed_partitions"] == 2 and len(read_scores(out)) == 9


def test_second_job_on_the_same_output_is_refused_until_the_first_ends(tmp_path, model_file, dask_client):
    make_folder(tmp_path / "images", per_class=2, bad=False)
    out = str(tmp_path / "out")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom retrain.tasks.scoring import lock_job\n"
            "lock_job(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)",
            out,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(scoring.ScoringLockedError, match=f"pid {holder.pid}"):
            scoring.score_job(model_file, str(tmp_path / "images"), out, client=dask_client)
        assert not Path(scoring.JobLayout(out).scores).exists()
        threading.Timer(1.0, lambda: os.kill(holder.pid, signal.SIGKILL)).start()  # dies holding it
        summary = scoring.score_job(
            model_file, str(tmp_path / "images"), out, client=dask_client, lock_wait_s=60
        )  # waits, then runs
    finally:
        holder.kill()
        holder.wait()
    assert summary["images"] == 6 and len(read_scores(out)) == 6
    assert not Path(scoring.JobLayout(out).lock).exists()


def test_lease_lock_on_a_remote_store():
    first = scoring.lock_job("memory://leases/out", lease_s=60).acquire()
    with pytest.raises(scoring.ScoringLockedError):
        scoring.lock_job("memory://leases/out", lease_s=60).acquire()
    first.release()
    with scoring.lock_job("memory://leases/out", lease_s=60):
        pass
    stale = {"host": "gone", "pid": 1, "token": "old", "since": "then", "heartbeat": time.time() - 3600}
    storage.write_json(scoring.JobLayout("memory://leases/out").lock, stale)
    with scoring.lock_job("memory://leases/out", lease_s=60):  # a lease not renewed is taken over
        assert storage.read_json(scoring.JobLayout("memory://leases/out").lock)["token"] != "old"


KILL_SCRIPT = """
import sys
from retrain.tasks.scoring import score_job

if __name__ == "__main__":
    model, images, out = sys.argv[1:4]
    score_job(model, images, out, workers=1, partition_size=2, mini_batch_size=2)
"""


@pytest.mark.services
def test_kill_9_mid_run_then_rerun_gives_exactly_one_row_per_image(tmp_path, model_file, dask_client):
    expected = make_folder(tmp_path / "images", per_class=12)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    script = tmp_path / "score_job.py"
    script.write_text(KILL_SCRIPT)
    log = open(tmp_path / "job.log", "wb")
    job = subprocess.Popen(
        [sys.executable, str(script), model_file, images, out],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    parts = Path(out) / "parts"
    total = (len(expected) + 1) // 2
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if parts.is_dir() and len(list(parts.glob("*.parquet"))) >= 2:
                break
            time.sleep(0.02)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        os.kill(job.pid, signal.SIGKILL)  # kill -9 of the scoring run
        job.wait()
        done_at_kill = len(list(parts.glob("*.parquet")))
        _wait_group_gone(job.pid)  # its Dask worker notices its parent died and exits
    finally:
        kill_group(job.pid)
        log.close()
    assert 2 <= done_at_kill < total, (done_at_kill, total)
    assert not Path(scoring.JobLayout(out).scores).exists()

    summary = scoring.score_job(model_file, images, out, client=dask_client, partition_size=2, mini_batch_size=2)
    frame = read_scores(out)
    assert len(frame) == len(expected) == summary["images"]
    assert frame["path"].is_unique and set(frame["path"]) == set(expected)
    assert summary["resumed_partitions"] >= done_at_kill and summary["processed"] < len(expected)
    assert not [p for p in parts.iterdir() if storage.TMP_MARKER in p.name]


@pytest.mark.services
def test_a_job_runs_on_the_local_cluster_its_caller_started_and_leaves_it_to_the_caller(tmp_path, model_file):
    """`retrain score` starts a local cluster before its flow (beside Prefect's API) and hands
    it to the flow; the job scores on it and leaves it running: its starter closes it (also when
    the flow fails before using it)."""
    from retrain.tasks.scoring.cluster import LocalClusterStart

    given = LocalClusterStart(1)
    try:
        expected = make_folder(tmp_path / "images", per_class=1, bad=False)
        out = str(tmp_path / "out")
        summary = scoring.score_job(model_file, str(tmp_path / "images"), out, cluster=given, partition_size=2)
        assert summary["images"] == summary["processed"] == len(expected)
        assert given.address().startswith("tcp://")
        # Its workers drop the heartbeat traceback a scheduler closed under them would print
        # (partition.dask_setup), and only that record.
        from distributed import Client

        with Client(given.address()) as client:  # still running after the job
            kept = client.run(_worker_logs_after_scheduler_loss)
        assert list(kept.values()) == [[False, True]]
    finally:
        given.close()


def _worker_logs_after_scheduler_loss() -> list[bool]:
    """In a worker: whether its logger lets the lost-scheduler heartbeat and another error through."""
    import logging

    log = logging.getLogger("distributed.worker")
    messages = ["Failed to communicate with scheduler during heartbeat.", "other"]
    return [bool(log.filter(log.makeRecord(log.name, logging.ERROR, __file__, 1, m, (), None))) for m in messages]


@pytest.mark.services
def test_a_dask_worker_killed_mid_job_still_gives_exactly_one_row_per_image(tmp_path, model_file):
    """kill -9 of one worker process while the job runs: its nanny starts a new one, Dask runs
    the lost task again, and the same job ends with every image once."""
    from distributed import Client, LocalCluster

    expected = make_folder(tmp_path / "images", per_class=8)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    parts = Path(out) / "parts"
    killed: list[int] = []

    def kill_one_worker_after_the_first_part(client) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (parts.is_dir() and list(parts.glob("*.parquet"))):
            time.sleep(0.02)
        pid = next(iter(client.run(os.getpid).values()))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        killer = threading.Thread(target=kill_one_worker_after_the_first_part, args=(client,), daemon=True)
        killer.start()
        summary = scoring.score_job(model_file, images, out, client=client, partition_size=2, mini_batch_size=2)
        killer.join(timeout=60)
    assert killed, "no worker was killed: the job ended before its first part was seen"
    frame = read_scores(out)
    assert len(frame) == len(expected) == summary["images"] and frame["path"].is_unique
    assert set(frame["path"]) == set(expected) and summary["processed"] == len(expected)


def _wait_group_gone(pid_group: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid_group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# ---- the flow and the command line --------------------------------------------------------------


@pytest.fixture
def dask_processes(tmp_path):
    """A `dask scheduler` and a `dask worker` (one process, one thread) on 127.0.0.1, started
    as separate processes (tests/_services.py) and stopped after the test."""
    from tests._services import dask_cluster

    with dask_cluster(tmp_path / "dask") as address:
        yield address


@pytest.fixture
def prefect_logs(prefect_api):
    """Prefect's console log handler binds the sys.stderr of the moment it is set up; set up
    during a test that captures output (capsys), it is left writing to a closed stream, and a
    flow with log_prints then fails. Point it at an open stream before flows run here."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            handler.setStream(sys.stderr)
            if hasattr(handler, "console"):
                handler.console.file = sys.stderr
    return prefect_api


def run_cli(args: list[str]) -> tuple[int, dict]:
    """``retrain ARGS`` in process; its return code and the JSON object of its last line
    (stdout redirected here rather than with capsys, see ``prefect_logs``)."""
    from contextlib import redirect_stdout

    from retrain.cli import main

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(args)
    return code, json.loads(buffer.getvalue().strip().splitlines()[-1])


def test_cli_on_a_separately_started_dask_cluster(prefect_logs, tmp_path, model_file, dask_processes):
    from distributed import Client

    expected = make_folder(tmp_path / "images")
    out = str(tmp_path / "out")
    args = [
        "score",
        model_file,
        str(tmp_path / "images"),
        "--out",
        out,
        "--dask-address",
        dask_processes,
        "--partition-size",
        "4",
        "--mini-batch-size",
        "8",
        "--top-k",
        "2",
        "--json",
    ]
    code, result = run_cli(args)
    assert code == 0
    assert set(result) >= {"images", "scored", "failed", "seconds", "images_per_second", "output", "engine"}
    assert result["engine"] == "torch" and "no held-out" in result["engine_reason"]  # no run beside the model
    assert result["images"] == len(expected) == result["scored"] + result["failed"]
    assert result["output"] == scoring.JobLayout(out).scores and result["images_per_second"] > 0
    frame = read_scores(out)
    assert len(frame) == len(expected) and frame["top_labels"].dropna().map(len).eq(2).all()
    with Client(dask_processes) as client:  # 5 partitions, one model load in that worker
        loads = client.run(lambda: __import__("retrain.tasks.inference").tasks.inference.LOADS["count"])
    assert list(loads.values()) == [1]

    code, again = run_cli(args)  # again: everything is there already
    assert code == 0
    assert again["processed"] == 0 and again["resumed_partitions"] == 5 and again["images"] == len(expected)

    code, failed = run_cli(["score", str(tmp_path / "no-model.pt"), str(tmp_path / "images"), "--json"])
    assert code == 2 and "no model file" in failed["error"]


def test_retrain_flow_ends_with_batch_predict_on_a_local_cluster(prefect_logs, shapes_dir, tmp_path):
    from retrain.flows.pipeline import retrain_flow
    from retrain.flows.score import score_flow

    expected = make_folder(tmp_path / "to-score", per_class=3)
    store = str(tmp_path / "store")
    environ = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}
    summary = retrain_flow(
        data=shapes_dir,
        store=store,
        network="squeezenet-caffe",
        weights="none",
        options={"max_epochs": 1, "mini_batch_size": 8},
        promote=False,
        score_folder=str(tmp_path / "to-score"),
    )
    out = str(Path(summary["run"]) / "scores")
    assert summary["scores"] == scoring.JobLayout(out).scores
    frame = read_scores(out)
    assert len(frame) == len(expected) and frame["path"].is_unique
    scored = storage.read_json(scoring.JobLayout(out).summary)
    assert scored["model"] == summary["model"] and scored["images"] == len(expected)
    # the local cluster's workers had their own environment; this process keeps its own
    assert {k: os.environ.get(k) for k in environ} == environ

    # the flow again, by run id, into the same output: nothing left to score
    again = score_flow(model=summary["run_id"], images=str(tmp_path / "to-score"), out=out, store=store)
    assert again["processed"] == 0 and again["resumed_partitions"] == again["partitions"]
    _assert_artifacts("score-summary", "score-progress", "score-labels")


def _assert_artifacts(*keys: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
    assert {a.key for a in found} >= set(keys)


def test_early_prefect_api_is_not_started_where_a_server_is_configured(monkeypatch, tmp_path):
    from retrain.early_api import api_configured, start_early_api

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    assert start_early_api() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://team:4200/api"\n[profiles.ephemeral]\n'
    )
    assert api_configured() and start_early_api() is None
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert not api_configured()
