"""Image shards and feature extraction at scale (issue 12): images decoded once into shards in
the store and streamed from there; transfer mode's features computed part by part, in process
or on Dask, with the same result; a kill -9 during shard preparation or during distributed
feature extraction resumes from the shards already written and ends where an uninterrupted
run ends.

Shards and feature parts are made small here (a few images each) so tiny data sets have many."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retrain.tasks import storage
from retrain.tasks.datastore import index_images, index_stage, split_stage
from retrain.tasks.model_file import load_model_file
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.preprocessing import Augmentation, load_images
from retrain.tasks.runs import RunConfig, start_run
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.training import features as features_module
from retrain.tasks.training.body_head import split_at_head
from retrain.tasks.training.data import TrainingData, load_training_data
from retrain.tasks.training.feature_cluster import ClusterBody
from retrain.tasks.training.features import build_feature_cache
from retrain.tasks.training.loop import train
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.training.shards import ShardImages, ShardSet, plan_shards, prepare_shards, shard_job
from tests.conftest import CAFFE_WEIGHTS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SPEC = get_spec("squeezenet-caffe")
SIZE = (64, 64)
AUGMENT = Augmentation(reflect=True, max_translation=8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    """3 classes x 16 images (48 px)."""
    return make_shapes_dataset(str(tmp_path_factory.mktemp("many") / "shapes"), per_class=16, size=48, seed=2)


def indexed(folder: str):
    images = index_images(folder).images.sort_values("path").reset_index(drop=True)
    return images, sorted(images["label"].unique())


def test_shards_hold_the_decoded_images_are_keyed_by_content_and_resume(shapes, tmp_path):
    images, _ = indexed(shapes)
    paths = list(images["path"])
    store = str(tmp_path / "store")
    plan = plan_shards(store, paths, images["digest"], SIZE, shard_images=5)
    assert plan.shards == 10 and plan.shard_range(9) == (45, 48)
    first = prepare_shards(plan)
    assert first["prepared"] == 10 and first["reused"] == 0
    shards = ShardSet(plan)
    everything = ShardImages(shards, np.arange(len(paths)))
    assert torch.equal(everything[:], load_images(paths, SIZE))  # the pixels load_images gives
    order = torch.tensor([7, 3, 4, 5, 47, 0])  # any order, runs within a shard and across shards
    assert torch.equal(everything[order], load_images([paths[i] for i in order], SIZE))
    assert torch.equal(everything[12], load_images([paths[12]], SIZE)[0])

    # The same content in another run, split or mode: the same shards, nothing prepared.
    again = plan_shards(store, paths, list(images["digest"]), SIZE, shard_images=5)
    assert again.folder == plan.folder and prepare_shards(again)["prepared"] == 0
    # Other content, or another input size: other shards.
    changed = list(images["digest"])
    changed[3] = "0" * 40
    assert plan_shards(store, paths, changed, SIZE, shard_images=5).key != plan.key
    assert plan_shards(store, paths, images["digest"], (32, 32), shard_images=5).key != plan.key

    # What a killed preparation leaves: some shards, a manifest not yet written, debris.
    folder = Path(plan.folder)
    (folder / "manifest.json").unlink()
    for i in (2, 6):
        (folder / plan.shard_name(i)).unlink()
    (folder / (plan.shard_name(6) + storage.TMP_MARKER + "dead")).write_bytes(b"half a shard")
    missing = shard_job(plan).missing(storage.names_in(plan.folder))
    assert [p.name for p in missing] == [plan.shard_name(2), plan.shard_name(6)]
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.npy")}
    resumed = prepare_shards(plan)
    assert resumed["prepared"] == 2 and resumed["reused"] == 8
    assert all((folder / name).stat().st_mtime_ns == t for name, t in before.items())  # kept, not rewritten
    assert torch.equal(ShardImages(ShardSet(plan), np.arange(len(paths)))[:], load_images(paths, SIZE))


def tensor_and_shard_data(folder: str, store: str, size=SIZE) -> tuple[TrainingData, TrainingData]:
    images, classes = indexed(folder)
    split = images.copy()
    split["split"] = np.where(np.arange(len(split)) % 3 == 0, "val", "train")
    split = split.sample(frac=1, random_state=0)  # the split's order is the training order
    return load_training_data(split, classes, size), load_training_data(split, classes, size, store=store)


def run_train(data: TrainingData, mode: str = "transfer", **options) -> tuple[dict, object]:
    torch.manual_seed(0)
    model, _ = build_network(SPEC.name, 3, "none")
    opts = TrainingOptions(**{"max_epochs": 3, "mini_batch_size": 4, "validation_frequency": 2, **options})
    outcome = train(model, SPEC, SPEC.preprocessing, data, mode, opts.validate(), AUGMENT)
    return outcome.state_dict, outcome


@pytest.mark.parametrize(
    "mode,options",
    [
        ("transfer", {}),
        ("transfer", {"feature_cache_memory_mb": 0}),
        ("transfer", {"classic_loop": True}),
        ("finetune", {"max_epochs": 1}),
    ],
    ids=["transfer-memory", "transfer-feature-shards", "transfer-classic", "finetune"],
)
def test_training_from_shards_equals_training_from_tensors(shapes, tmp_path, monkeypatch, mode, options):
    """The same pixels in the same order and the same random stream: the same weights."""
    monkeypatch.setattr(features_module, "FEATURE_PART", 32)
    tensors, sharded = tensor_and_shard_data(shapes, str(tmp_path / "store"))
    assert isinstance(sharded.train_images, ShardImages) and sharded.shards["shards"] >= 1
    a, outcome_a = run_train(tensors, mode, **options)
    b, outcome_b = run_train(sharded, mode, **options)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert outcome_a.history["loss"].tolist() == outcome_b.history["loss"].tolist()


def frozen_body():
    torch.manual_seed(0)
    model, _ = build_network(SPEC.name, 3, "none")
    model.to(memory_format=torch.channels_last)
    return model, split_at_head(model, SPEC).body


def test_features_on_dask_equal_the_features_in_process(shapes, tmp_path, monkeypatch, dask_client):
    monkeypatch.setattr(features_module, "FEATURE_PART", 32)
    _, data = tensor_and_shard_data(shapes, str(tmp_path / "store"))
    model, body = frozen_body()
    common = (body, data, SPEC.preprocessing, AUGMENT, 2, 7, torch.device("cpu"))
    local = build_feature_cache(*common, memory_bytes=2**30)
    cluster = ClusterBody(lambda: dask_client, model, SPEC.name, 3)
    folder = str(tmp_path / "features")
    remote = build_feature_cache(*common, memory_bytes=2**30, folder=folder, cluster=cluster)
    assert remote.describe()["where"] == "dask" and remote.describe()["parts"] == 2  # 32 training, 16 validation images
    n, m = len(data.train_targets), len(data.val_targets)
    views = torch.arange(3).repeat_interleave(n)
    indices = torch.arange(n).repeat(3)
    assert torch.equal(local.train_batch(views, indices), remote.train_batch(views, indices))
    assert torch.equal(torch.cat(list(local.val_batches(5))), torch.cat(list(remote.val_batches(5))))
    assert torch.cat(list(remote.val_batches(7))).shape[0] == m
    # one buffer for every batch (validation's way): the same values, each batch until the next
    reused = [batch.clone() for batch in remote.val_batches(5, reuse=True)]
    assert torch.equal(torch.cat(reused), torch.cat(list(local.val_batches(5))))
    # A second build finds the finished shards and reuses them.
    again = build_feature_cache(*common, memory_bytes=2**30, folder=folder, cluster=cluster)
    assert again.reused and torch.equal(again.train_batch(views, indices), local.train_batch(views, indices))
    for cache in (local, remote, again):
        cache.close()


# ---- kill -9 during shard preparation and during distributed feature extraction ---------------------

TRAIN_SCRIPT = """
import json, sys
from retrain.tasks.training.stage import train_run

if __name__ == "__main__":
    summary = train_run(sys.argv[1], cluster=json.loads(sys.argv[2]))
    print(json.dumps({k: summary[k] for k in ("val_loss", "val_accuracy", "feature_cache", "image_shards")}))
"""


def make_run(store: Path, data: str, seed: int = 0) -> str:
    weights = str(CAFFE_WEIGHTS) if CAFFE_WEIGHTS.exists() else "none"
    config = RunConfig(
        data=data,
        dataset=data,
        network=SPEC.name,
        weights=weights,
        mode="transfer",
        split=(0.7, 0.3, 0.0),
        options={"max_epochs": 2, "mini_batch_size": 8, "seed": seed, "feature_cache_memory_mb": 0},
        augmentation={"reflect": True, "max_translation": 30},
    )
    run_url, lock = start_run(str(store), config)
    lock.release()  # the training processes below are the run's only writers
    index_stage(data, run_url)
    split_stage(run_url, (0.7, 0.3, 0.0), seed)
    return run_url


def environment(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"RETRAIN_SHARD_IMAGES": "4", "RETRAIN_FEATURE_PART": "32", **extra})
    return env


def start_training(script: Path, run_url: str, cluster: dict, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), run_url, json.dumps(cluster)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its Dask workers too: one kill -9 of the group ends them all
    )


def train_in_process(run_url: str, monkeypatch) -> dict:
    """The uninterrupted baseline, in this process (the same small shards and parts)."""
    from retrain.tasks.training import shards as shards_module
    from retrain.tasks.training.stage import train_run

    monkeypatch.setattr(shards_module, "SHARD_IMAGES", 4)
    monkeypatch.setattr(features_module, "FEATURE_PART", 32)
    return train_run(run_url)


def finish_training(script: Path, run_url: str, cluster: dict, env: dict, log: Path) -> dict:
    proc = start_training(script, run_url, cluster, env, log)
    assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-4000:]
    return json.loads(log.read_text().strip().splitlines()[-1])


def kill_when(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended ({proc.returncode}) before the kill:\n" + log.read_text(errors="replace")[-3000:]
            )
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("timed out waiting to kill:\n" + log.read_text(errors="replace")[-3000:])


def assert_same_training(resumed_run: str, baseline_run: str, resumed: dict, baseline: dict) -> float:
    assert resumed["val_accuracy"] == baseline["val_accuracy"]
    assert resumed["val_loss"] == pytest.approx(baseline["val_loss"], abs=1e-6)
    a = load_model_file(storage.RunLayout(resumed_run).trained).model.state_dict()
    b = load_model_file(storage.RunLayout(baseline_run).trained).model.state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    return diff


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """3 classes x 32 images of 320 px: decoding takes long enough to kill in the middle."""
    return make_shapes_dataset(str(tmp_path_factory.mktemp("photos") / "shapes"), per_class=32, size=320, seed=3)


@pytest.mark.services  # kills processes
def test_kill_9_during_shard_preparation_then_rerun_ends_like_an_uninterrupted_run(photos, tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = environment()
    landed = False
    for attempt in range(3):  # a fresh store each time: the kill may come too late
        store = tmp_path / f"store-{attempt}"
        run_url = make_run(store, photos)
        log = tmp_path / f"killed-{attempt}.log"
        proc = start_training(script, run_url, {}, env, log)
        kill_when(lambda: len(list(store.glob("shards/*/shard-*.npy"))) >= 2, proc, log)
        written = len(list(store.glob("shards/*/shard-*.npy")))
        if written < 24:  # 96 images, 4 a shard
            landed = True
            break
    assert landed, "the kill never landed inside the shard preparation in 3 tries"
    assert not list(store.glob("shards/*/manifest.json"))
    resumed = finish_training(script, run_url, {}, env, tmp_path / "rerun.log")
    assert resumed["image_shards"]["reused"] == written and resumed["image_shards"]["prepared"] == 24 - written
    baseline_url = make_run(tmp_path / "baseline", photos)
    baseline = train_in_process(baseline_url, monkeypatch)
    assert baseline["image_shards"]["prepared"] == 24
    diff = assert_same_training(run_url, baseline_url, resumed, baseline)
    print(json.dumps({"shards_before_kill": written, "max_weight_difference": diff, "val_loss": resumed["val_loss"]}))


@pytest.mark.services  # kills processes, starts Dask worker processes
def test_kill_9_during_distributed_feature_extraction_resumes_from_the_written_parts(photos, tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = environment()
    cluster = {"workers": 2}
    parts = 4  # 66 training images in 3 parts of 32, 30 validation images in 1
    landed = False
    for attempt in range(3):  # a fresh store each time: the kill may come too late
        run_url = make_run(tmp_path / f"store-{attempt}", photos)
        features = Path(storage.RunLayout(run_url).features)
        log = tmp_path / f"killed-{attempt}.log"
        proc = start_training(script, run_url, cluster, env, log)
        kill_when(lambda: len(list(features.glob("*-*.npy"))) >= 1, proc, log)
        written = len(list(features.glob("*-*.npy")))
        if written < parts:
            landed = True
            break
    assert landed, "the kill never landed inside the feature extraction in 3 tries"
    assert not (features / "manifest.json").exists() and (features / "plan.json").exists()
    resumed = finish_training(script, run_url, cluster, env, tmp_path / "rerun.log")
    cache = resumed["feature_cache"]
    assert cache["where"] == "dask" and cache["parts"] == parts and cache["computed"] == parts - written
    assert resumed["image_shards"]["prepared"] == 0  # all there before the kill
    assert not features.exists()  # trained: the run's feature shards are deleted
    # The uninterrupted baseline runs in process: distributed == in process, as well.
    baseline_url = make_run(tmp_path / "baseline", photos)
    baseline = train_in_process(baseline_url, monkeypatch)
    assert baseline["feature_cache"]["where"] == "in process"
    diff = assert_same_training(run_url, baseline_url, resumed, baseline)
    print(json.dumps({"parts_before_kill": written, "max_weight_difference": diff, "val_loss": resumed["val_loss"]}))
