"""Transfer features on a faster engine (tasks/training/feature_engine.py): the cache names its
engine and is keyed by it, int8 features stay close to float32 ones, and a head whose float32
validation accuracy falls behind its engine's is trained again on float32 features."""

from __future__ import annotations

import json
import os

import torch

from retrain.tasks.datastore import index_images
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.preprocessing import Augmentation, load_images
from retrain.tasks.training import feature_engine
from retrain.tasks.training.body_head import split_at_head
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.feature_files import FeaturePlan
from retrain.tasks.training.features import FeatureJob, build_feature_cache

SPEC = get_spec("squeezenet-caffe")
AUGMENT = Augmentation(reflect=True, max_translation=8)


def test_int8_features_are_recorded_keyed_apart_and_close_to_float32(shapes_dir, caffe_weights):
    index = index_images(shapes_dir).images.sort_values("path").reset_index(drop=True)
    images = load_images(list(index["path"]), (64, 64))
    targets = torch.zeros(len(index), dtype=torch.long)
    data = TrainingData(images[:16], targets[:16], images[16:], targets[16:])
    body = split_at_head(build_network(SPEC.name, 3, caffe_weights)[0].eval(), SPEC).body
    caches = {}
    for engine in ("torch", "onnx-int8"):
        cache = build_feature_cache(
            body, data, SPEC.preprocessing, AUGMENT, 0, 0, torch.device("cpu"), 2**30, engine=engine
        )
        assert cache.describe()["engine"] == engine
        caches[engine] = cache.train[0].float()
    reference, int8 = caches["torch"], caches["onnx-int8"]
    assert (int8 - reference).abs().mean() < 0.1 * reference.abs().mean()
    plan = FeaturePlan(16, len(targets) - 16, 0, 512)
    keys = [FeatureJob(body, data, SPEC.preprocessing, AUGMENT, plan, 0, e).key() for e in ("torch", "onnx-int8")]
    assert keys[0] != keys[1] and keys[0]["body"] == keys[1]["body"]


def test_a_failing_engine_falls_back_to_float32_and_is_remembered(shapes_dir, caffe_weights, tmp_path, monkeypatch):
    from retrain.tasks.datastore import index_stage, split_stage
    from retrain.tasks.model_file import load_model_file
    from retrain.tasks.runs import RunConfig, start_run
    from retrain.tasks.training.stage import train_run

    monkeypatch.setenv("RETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(feature_engine, "MIN_ENGINE_IMAGES", 0)
    monkeypatch.setattr(feature_engine, "candidates", lambda device: ["torch-bf16"])
    built = feature_engine.BodyEngine._build

    def channels_reversed(self):  # an engine whose features are not the float32 body's at all
        forward = built(self)
        return forward if self.engine == "torch" else (lambda x: forward(x).flip(1))

    monkeypatch.setattr(feature_engine.BodyEngine, "_build", channels_reversed)
    config = RunConfig(
        data=shapes_dir,
        dataset=shapes_dir,
        network=SPEC.name,
        weights=caffe_weights,
        mode="transfer",
        split=(0.5, 0.5, 0.0),
        options={"max_epochs": 3, "mini_batch_size": 4},
        augmentation=AUGMENT.to_dict(),
    )
    run_url, lock = start_run(str(tmp_path / "store"), config)
    lock.release()
    index_stage(shapes_dir, run_url)
    split_stage(run_url, (0.5, 0.5, 0.0), 0)
    summary = train_run(run_url)
    gate = summary["feature_cache"]["gate"]
    assert gate["engine"] == "torch-bf16" and not gate["passed"], gate
    assert gate["float32_val_accuracy"] < gate["engine_val_accuracy"] - feature_engine.GATE_POINTS
    assert summary["feature_cache"]["engine"] == "torch"  # trained again on float32 features
    assert load_model_file(summary["trained"]).meta["training"]["feature_engine"] == "torch"
    with open(os.path.join(tmp_path / "cache", feature_engine.VERDICTS)) as f:
        (key,) = json.load(f)
    body, engine, _ = key.split("|")
    assert engine == "torch-bf16"
    # the next run of this body here goes straight to float32
    assert feature_engine.choose_engine("auto", torch.device("cpu"), lambda: body, 10**6, 10) == "torch"
