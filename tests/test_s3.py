"""The whole path on S3: retrain -> promote -> batch score, with ``s3://`` URLs for the data,
the store and the scores, against moto's standalone S3 server started on 127.0.0.1.

No change to the code is needed for another endpoint: botocore (under s3fs) reads
``AWS_ENDPOINT_URL``, as it would for MinIO or any S3-compatible store in a real deployment.
The Dask workers of the scoring flow are separate processes; they inherit the environment.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from retrain.tasks import promotion, storage
from retrain.tasks.samples import make_shapes_dataset
from tests.conftest import s3_environment, zip_folder

s3fs = pytest.importorskip("s3fs")


@pytest.fixture
def s3_endpoint(moto, monkeypatch):
    s3_environment(monkeypatch, moto)
    yield moto
    s3fs.S3FileSystem.clear_instance_cache()


def test_retrain_promote_and_score_on_s3(tmp_path, tmp_path_factory, s3_endpoint, shapes_dir, prefect_api, monkeypatch):
    from retrain.flows.pipeline import retrain_flow

    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    fs = s3fs.S3FileSystem()
    for bucket in ("retrain-data", "retrain-store", "retrain-out"):
        fs.mkdir(bucket)
    zipped = tmp_path_factory.mktemp("upload") / "shapes.zip"  # not in tmp_path: nothing local is expected there
    archive = zip_folder(Path(shapes_dir), zipped, top=Path(shapes_dir).name)
    fs.pipe("retrain-data/sets/shapes.zip", archive.read_bytes())
    timings = {}

    t = time.perf_counter()
    summary = retrain_flow(
        data="s3://retrain-data/sets/shapes.zip",
        store="s3://retrain-store/store",
        network="squeezenet-caffe",
        weights="none",
        mode="scratch",
        options={"max_epochs": 1, "mini_batch_size": 8, "seed": 0},
    )
    timings["retrain"] = time.perf_counter() - t
    run_url = summary["run"]
    assert run_url.startswith("s3://retrain-store/store/runs/")
    for name in (
        "run.json",
        "split.parquet",
        "model.pt",
        "metrics.json",
        "promotion.json",
        "confusion.png",
        "progress.png",
        "montage.png",
    ):
        assert storage.exists(storage.join(run_url, name)), name
    assert storage.exists("s3://retrain-store/store/datasets/shapes")  # extracted on S3, not locally
    assert summary["promotion"]["promoted"]
    current = promotion.read_current("s3://retrain-store/store", summary["promotion"]["model"])
    assert current["run_id"] == summary["run_id"] and current["model_url"].startswith("s3://")

    from retrain.flows.score import score_flow
    from tests._services import dask_cluster

    new_images = str(tmp_path / "new")
    make_shapes_dataset(new_images, per_class=4, size=48, seed=7)
    fs.put(new_images, "retrain-data/new", recursive=True)
    t = time.perf_counter()
    # a Dask scheduler and worker as separate processes, as in infra/compose.yaml; the worker
    # reaches S3 through the same environment
    with dask_cluster(tmp_path / "dask", dict(os.environ)) as address:
        timings["dask start"] = time.perf_counter() - t
        t = time.perf_counter()
        scored = score_flow(
            model=current["model_url"],
            images="s3://retrain-data/new",
            out="s3://retrain-out/scores/shapes-new",
            store="s3://retrain-store/store",
            dask_address=address,
        )
        timings["score"] = time.perf_counter() - t
    assert scored["images"] == scored["scored"] == 12 and scored["failed"] == 0
    assert scored["output"].startswith("s3://retrain-out/scores/shapes-new")
    table = storage.read_parquet(scored["output"])
    assert len(table) == 12 and set(table["label"]) <= {"circle", "square", "triangle"}
    assert all(p.startswith("s3://retrain-data/new/") for p in table["path"])

    local = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("new", "dask"))
    assert not local, local  # nothing of the run was written locally
    print("\n" + json.dumps({"timings_s": {k: round(v, 1) for k, v in timings.items()}}))
