"""Scoring never deletes or mis-reports (issue #20): an output folder holding other files is
refused before anything is scored, a failing output or store ends a job at its first failed
part with that failure, a full disk is named as such, an interrupted batch-predict step of a
retrain run resumes in the same run, and the Python API runs from a script without a
``__main__`` guard."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrain.tasks import scoring, storage
from retrain.tasks.scoring import partition
from tests.test_scoring import (  # noqa: F401 - prefect_logs: a fixture
    make_folder,
    prefect_logs,
    read_scores,
    real_score_partition,
)


@pytest.fixture(scope="module")
def model_file(random_model_file) -> str:
    return random_model_file


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- item 1: an output folder with files the job did not write ------------------------------------


def test_an_images_folder_as_output_is_refused_before_scoring_and_nothing_is_deleted(tmp_path, model_file, dask_client):
    images = tmp_path / "imgs"
    make_folder(images, per_class=2, bad=False)
    (images / "parts").mkdir()
    photo = (images / "circle" / "circle_000.jpg").read_bytes()
    (images / "parts" / "photo_1.jpg").write_bytes(photo)
    (images / "parts" / "photo_2.jpg").write_bytes(photo)
    (images / "parts" / "notes.txt").write_text("mine")
    (images / "parts" / "holiday").mkdir()
    (images / "parts" / "holiday" / "beach.jpg").write_bytes(photo)
    before = _files(images)
    with pytest.raises(scoring.ScoringError, match="inside the images folder"):
        scoring.score_job(model_file, str(images), str(images), client=dask_client)
    with pytest.raises(scoring.ScoringError, match="inside the images folder"):
        scoring.score_job(model_file, str(images), str(images / "scores"), client=dask_client)
    assert _files(images) == before and not (images / "scores").exists()


def test_retrain_score_refuses_its_images_folder_as_out_in_one_line_before_starting_anything(
    tmp_path, model_file, monkeypatch
):
    from retrain import early_api
    from retrain.tasks.scoring import cluster
    from tests.conftest import run_cli

    def not_now(*args):
        raise AssertionError("started before the output was checked")

    monkeypatch.setattr(early_api, "start_early_api", not_now)
    monkeypatch.setattr(cluster, "LocalClusterStart", not_now)
    images = tmp_path / "imgs"
    make_folder(images, per_class=1, bad=False)
    (images / "parts").mkdir()
    (images / "parts" / "notes.txt").write_text("mine")
    before = _files(images)
    status, result, err = run_cli(["score", model_file, str(images), "--out", str(images)])
    assert status == 2 and "inside the images folder" in result["error"], (status, result, err[-2000:])
    assert err.strip().splitlines()[-1] == f"retrain score: error: {result['error']}"
    assert _files(images) == before


def test_an_output_holding_other_files_is_refused_and_an_earlier_jobs_output_resumes(tmp_path, model_file, dask_client):
    images = tmp_path / "imgs"
    make_folder(images, per_class=2, bad=False)
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "notes.txt").write_text("mine")
    with pytest.raises(scoring.ScoringError, match=r"did not write \(parts/notes.txt\)"):
        scoring.score_job(model_file, str(images), str(out), client=dask_client, partition_size=2)
    assert _files(out) == {"parts/notes.txt": b"mine"}

    (out / "parts" / "notes.txt").unlink()
    first = scoring.score_job(model_file, str(images), str(out), client=dask_client, partition_size=2)
    assert first["processed"] == 6
    again = scoring.score_job(model_file, str(images), str(out), client=dask_client, partition_size=2)
    assert (again["processed"], again["partitions"], again["resumed_partitions"], again["unchanged"]) == (0, 0, 0, 6)
    assert len(read_scores(str(out))) == 6 and _files(out / "parts") == {}

    (out / "report.csv").write_text("someone's")
    with pytest.raises(scoring.ScoringError, match=r"did not write \(report.csv\)"):
        scoring.score_job(model_file, str(images), str(out), client=dask_client, partition_size=2)
    assert (out / "report.csv").read_text() == "someone's"


def test_consolidation_removes_only_files_named_as_parts(tmp_path, model_file, dask_client):
    images = tmp_path / "imgs"
    make_folder(images, per_class=2, bad=False)
    out = str(tmp_path / "out")
    scoring.score_job(model_file, str(images), out, client=dask_client, partition_size=2)
    plan = scoring.prepare_job(model_file, str(images), out, partition_size=2)
    stale = Path(out) / "parts" / "part-000007-0123456789ab.parquet"
    stale.write_bytes(b"an earlier plan's part")
    mine = Path(out) / "parts" / "keep.parquet"
    mine.write_bytes(b"not a part")  # put there after the job checked the folder
    scoring.consolidate(plan)
    assert not stale.exists() and mine.read_bytes() == b"not a part"


# ---- items 12 and 15: a failing output or store ---------------------------------------------------


def _fail_after_first(monkeypatch, error: BaseException, seen: Path, spare_first: bool = True) -> Path:
    """Make every part but the first (with ``spare_first``) fail with ``error``. Each attempt
    leaves a file in ``seen`` (the task reaches its worker as a copy: a list here would stay
    empty)."""
    seen.mkdir()

    def failing(model, files, url, *args):
        name = url.rsplit("/", 1)[-1]
        (seen / f"{name}-{len(list(seen.iterdir()))}").touch()
        if not (spare_first and name.startswith("part-000000-")):
            raise error
        return real_score_partition(model, files, url, *args)

    monkeypatch.setattr(partition, "score_partition", failing)
    return seen


def test_a_dead_store_ends_the_job_at_the_first_failed_part_with_that_failure(
    tmp_path, model_file, dask_client, monkeypatch
):
    images = tmp_path / "imgs"
    make_folder(images, per_class=4, bad=False)
    out = str(tmp_path / "out")
    dead = storage.StorageError(
        f"store failure: write_bytes {out}/parts/x failed 4 time(s); last error: ConnectionRefusedError"
    )
    seen = _fail_after_first(monkeypatch, dead, tmp_path / "seen")
    with pytest.raises(storage.StorageError, match="write_bytes .* failed 4 time"):
        scoring.score_job(model_file, str(images), out, client=dask_client, partition_size=1)
    attempts = sorted(p.name for p in seen.iterdir())
    assert len(attempts) <= 3, attempts  # of 12 partitions: one in flight per thread, one waiting
    assert len(list((Path(out) / "parts").glob("*.parquet"))) == 1


def test_a_lock_release_failing_after_the_job_failed_does_not_hide_the_first_failure(monkeypatch):
    def release_fails(url, recursive=False):
        raise storage.StorageError(f"store failure: remove {url} failed 4 time(s)")

    with pytest.raises(storage.StorageError, match="the first failure"):
        with scoring.lock_job("memory://dead/out", lease_s=60):
            monkeypatch.setattr(storage, "remove", release_fails)
            raise storage.StorageError("the first failure")


def test_a_full_output_disk_is_exit_3_naming_the_file_and_the_output(tmp_path, model_file, dask_client, monkeypatch):
    from retrain.failures import EXIT_STORE_FAILED, classify

    images = tmp_path / "imgs"
    make_folder(images, per_class=2, bad=False)
    out = str(tmp_path / "elsewhere" / "out")
    part = f"{out}/parts/part-000001-0123456789ab.parquet"
    _fail_after_first(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), part), tmp_path / "seen")
    with pytest.raises(OSError) as raised:
        scoring.score_job(model_file, str(images), out, client=dask_client, partition_size=2)
    assert raised.value.errno == errno.ENOSPC
    args = SimpleNamespace(command="score", score_out=out, store=str(tmp_path / "store"), json=False)
    message, status = classify(args, raised.value)
    assert status == EXIT_STORE_FAILED
    assert part in message and f"scores output {out}" in message and "store" not in message.replace("scores", "")


# ---- item 8: an interrupted batch-predict step of a retrain run ---------------------------------


@pytest.mark.usefixtures("prefect_logs")
def test_an_interrupted_batch_predict_step_resumes_in_the_same_run(shapes_dir, tmp_path, dask_client, monkeypatch):
    from retrain.flows.pipeline import retrain_flow
    from retrain.tasks.runs import list_runs
    from retrain.tasks.scoring import cluster, run

    # the job's local cluster: the in-process one (a test-sized stand-in for its processes)
    monkeypatch.setattr(run, "start_cluster", lambda *a: cluster._GivenCluster(dask_client.scheduler.address))
    folder = tmp_path / "to-score"
    make_folder(folder, per_class=2, bad=False)
    store = str(tmp_path / "store")
    settings = dict(
        data=shapes_dir,
        store=store,
        network="squeezenet-caffe",
        weights="none",
        options={"max_epochs": 1, "mini_batch_size": 8},
        promote=False,
        score_folder=str(folder),
    )
    with monkeypatch.context() as patch:
        gone = storage.StorageError("store failure: the scores' disk went away")
        _fail_after_first(patch, gone, tmp_path / "seen", spare_first=False)
        with pytest.raises(Exception, match="went away"):
            retrain_flow(**settings)
    [first] = list_runs(store)
    out = Path(store) / "runs" / first["run_id"] / "scores"
    assert (out / "job.json").exists() and not (out / "scores.parquet").exists()
    trained = (out.parent / "trained.pt").stat().st_mtime_ns

    summary = retrain_flow(**settings)  # the same command again
    assert [r["run_id"] for r in list_runs(store)] == [first["run_id"]] and summary["run_id"] == first["run_id"]
    assert summary["scores"] == str(out / "scores.parquet") and len(read_scores(str(out))) == 6
    assert _files(out / "parts") == {}  # a finished job keeps its rows in scores.parquet only
    assert (out.parent / "trained.pt").stat().st_mtime_ns == trained  # not trained again
    scored = storage.read_json(str(out / "summary.json"))
    assert scored["images"] == 6 and scored["model"] == summary["model"]


# ---- item 10: what outlives the command, and scripts without a __main__ guard ---------------------


@pytest.mark.services  # starts Prefect's temporary API (a uvicorn process), as the command does
@pytest.mark.usefixtures("prefect_logs")
def test_score_json_has_no_ui_url_when_no_server_outlives_the_command(tmp_path, model_file, dask_client, monkeypatch):
    from tests.test_scoring import run_cli

    if os.environ.get("PREFECT_API_URL"):
        pytest.skip("a Prefect server is configured: its UI outlives the command")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # no profile naming a server
    make_folder(tmp_path / "imgs", per_class=1, bad=False)
    code, result = run_cli(
        ["score", model_file, str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--json"]
        + ["--dask-address", dask_client.scheduler.address]
    )
    assert code == 0 and result["images"] == 3
    assert result["ui_url"] is None


@pytest.mark.services  # starts a local Dask cluster's worker processes
@pytest.mark.usefixtures("prefect_logs")
def test_the_python_api_runs_from_a_script_without_a_main_guard(tmp_path, model_file):
    from prefect.settings import PREFECT_API_URL

    make_folder(tmp_path / "imgs", per_class=1, bad=False)
    script = tmp_path / "score_them.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import json
            import retrain

            print("the script's body ran", flush=True)
            summary = retrain.score({model_file!r}, {str(tmp_path / "imgs")!r}, score_out={str(tmp_path / "out")!r}, dask_workers=1)
            print(json.dumps({{"images": summary["images"]}}), flush=True)
            """
        )
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL", "")}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("the script's body ran") == 1, done.stdout  # not again in each worker
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"images": 3}


@pytest.mark.usefixtures("prefect_logs")
def test_retrain_run_refuses_a_score_out_holding_other_files_before_training(shapes_dir, tmp_path):
    from retrain.flows.pipeline import retrain_flow

    folder = tmp_path / "to-score"
    make_folder(folder, per_class=1, bad=False)
    store = tmp_path / "store"
    with pytest.raises(scoring.ScoringError, match="inside the images folder"):
        retrain_flow(
            data=shapes_dir,
            store=str(store),
            network="squeezenet-caffe",
            weights="none",
            options={"max_epochs": 1},
            promote=False,
            score_folder=str(folder),
            score_out=str(folder / "scores"),
        )
    assert not (store / "runs").exists() and not (folder / "scores").exists()
