"""Runs of an experiment that share a frozen body share one feature cache (tasks/feature_sharing.py),
also on an object store: the store's lock on the shared folder is a lease there, so two runs
that reach the cache at once build it once, the second reusing what the first built.

Against moto's S3 server; the image shards, the feature shards and the lease are all on S3,
and the features are computed on Dask (in process), as a run with a cluster computes them."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from retrain.tasks import storage
from retrain.tasks.datastore import index_images
from retrain.tasks.feature_sharing import feature_lock, shared_feature_folder
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.preprocessing import Augmentation
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.training import features as features_module
from retrain.tasks.training.body_head import split_at_head
from retrain.tasks.training.data import load_training_data
from retrain.tasks.training.feature_cluster import ClusterBody
from retrain.tasks.training.features import build_feature_cache
from tests.conftest import s3_environment

s3fs = pytest.importorskip("s3fs")

SPEC = get_spec("squeezenet-caffe")
SIZE = (64, 64)
AUGMENT = Augmentation(reflect=True, max_translation=8)
STORE = "s3://retrain-store/store"


@pytest.fixture
def s3_store(tmp_path, monkeypatch):
    from tests._services import moto_s3

    with moto_s3(tmp_path) as endpoint:
        s3_environment(monkeypatch, endpoint)
        s3fs.S3FileSystem().mkdir("retrain-store")
        yield STORE
        s3fs.S3FileSystem.clear_instance_cache()


def test_the_feature_lock_is_the_stores_lease_on_an_object_store():
    """Where ``flock`` cannot reach (S3, here the memory filesystem), the lock on a shared
    folder is a lease in it: a second holder waits for the first, then takes it."""
    folder = f"memory://share-{os.urandom(3).hex()}/store/features/abc"
    inside: list[str] = []
    overlaps: list[list[str]] = []
    holders: list[int] = []
    start = threading.Barrier(2)

    def run(name: str) -> None:
        start.wait()
        with feature_lock(folder):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(list(inside))
            holders.append(storage.read_json(storage.lock_url(folder))["pid"])  # the lease, in the folder
            time.sleep(0.5)
            inside.remove(name)

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not overlaps and not inside and holders == [os.getpid()] * 2
    assert not storage.exists(storage.lock_url(folder))  # released


@pytest.mark.services
def test_two_runs_sharing_a_feature_cache_on_s3_build_it_once(tmp_path, s3_store, monkeypatch, dask_client):
    monkeypatch.setattr(features_module, "FEATURE_PART", 32)  # 32 training + 16 validation images: 2 parts
    images = index_images(make_shapes_dataset(str(tmp_path / "shapes"), per_class=16, size=48, seed=2)).images
    split = images.sort_values("path").reset_index(drop=True)
    split["split"] = np.where(np.arange(len(split)) % 3 == 0, "val", "train")
    data = load_training_data(split, sorted(split["label"].unique()), SIZE, store=s3_store)  # image shards on S3
    torch.manual_seed(0)
    model, _ = build_network(SPEC.name, 3, "none")
    model.to(memory_format=torch.channels_last)
    body = split_at_head(model, SPEC).body
    folder = shared_feature_folder(s3_store, data="shapes", network=SPEC.name, views=2)
    assert folder.startswith("s3://")

    start = threading.Barrier(2)
    caches, errors = [], []

    def run() -> None:  # what each run's training loop does with a shared cache (tasks/training/loop.py)
        try:
            start.wait()  # both reach the cache at the same moment
            with feature_lock(folder):
                cache = build_feature_cache(
                    body,
                    data,
                    SPEC.preprocessing,
                    AUGMENT,
                    2,
                    7,
                    torch.device("cpu"),
                    0,
                    folder,
                    cluster=ClusterBody(lambda: dask_client, model, SPEC.name, 3),
                )
            caches.append(cache)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert len(caches) == 2

    # Built once: one run computed every part on Dask, the other found the finished cache.
    built = [c for c in caches if not c.reused]
    reused = [c for c in caches if c.reused]
    assert len(built) == 1 and len(reused) == 1, [c.describe() for c in caches]
    assert built[0].describe()["where"] == "dask" and built[0].describe()["computed"] == 2
    names = {url.rsplit("/", 1)[-1] for url in storage.list_files(folder)}
    assert names == {"plan.json", "manifest.json", "train-000000.npy", "val-000000.npy"}  # the lease is gone
    assert not storage.exists(storage.lock_url(folder))

    # Both runs train on the same features.
    n = len(data.train_targets)
    views, indices = torch.arange(3).repeat_interleave(n), torch.arange(n).repeat(3)
    a, b = caches
    assert torch.equal(a.train_batch(views, indices), b.train_batch(views, indices))
    assert torch.equal(torch.cat(list(a.val_batches(5))), torch.cat(list(b.val_batches(5))))
    for cache in caches:
        cache.close()
