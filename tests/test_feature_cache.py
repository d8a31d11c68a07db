"""Transfer mode on cached backbone features: same kind of model as the classic loop,
features computed once, and validation, early stopping, best model, checkpoints and resume all
still hold. Tiny generated images at 64 px keep it fast (the networks are convolutional)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from retrain.tasks.datastore import index_images
from retrain.tasks.evaluation import predict_scores
from retrain.tasks.networks import build_network, configure_trainable, get_spec, head_parameters
from retrain.tasks.preprocessing import Augmentation, load_images
from retrain.tasks.training.body_head import split_at_head
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.features import FEATURE_BATCH
from retrain.tasks.training.loop import train
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.training.steps import dropout_to_float

SIZE = (64, 64)
SPEC = get_spec("squeezenet-caffe")
AUGMENT = Augmentation(reflect=True, max_translation=8)


@pytest.fixture(scope="module")
def shapes_data(shapes_dir) -> TrainingData:
    """Half of each class to train on, the other half to validate on."""
    index = index_images(shapes_dir).images.sort_values("path").reset_index(drop=True)
    classes = sorted(index["label"].unique())
    images = load_images(list(index["path"]), SIZE)
    targets = torch.tensor([classes.index(label) for label in index["label"]])
    train_rows = torch.arange(len(index)) % 2 == 0
    return TrainingData(images[train_rows], targets[train_rows], images[~train_rows], targets[~train_rows])


def make_model(weights: str = "none", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _ = build_network(SPEC.name, 3, weights)
    return model


def run(data: TrainingData, weights: str = "none", **options) -> tuple[torch.nn.Module, object]:
    extra = {k: options.pop(k) for k in ("checkpoints", "on_validation", "feature_folder") if k in options}
    model = make_model(weights)
    defaults = dict(max_epochs=3, mini_batch_size=4, validation_frequency=2)
    outcome = train(
        model, SPEC, SPEC.preprocessing, data, "transfer", TrainingOptions(**{**defaults, **options}), AUGMENT, **extra
    )
    return model, outcome


@pytest.fixture(scope="module")
def cached_run(shapes_data) -> tuple[torch.nn.Module, object]:
    """:func:`run` with its defaults (features cached in memory), trained once for the tests
    that only read it."""
    return run(shapes_data)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["squeezenet-caffe", "resnet18", "mobilenet_v3_small"])
def test_split_at_head_is_the_model(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model, _ = build_network(name, 3, "none")
    model.eval()
    split = split_at_head(model, spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(split.rest(split.body(x)), model(x), atol=1e-5)
    configure_trainable(model, spec, "transfer")
    trainable = {id(p) for p in split.rest.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in head_parameters(model, spec)}
    assert not any(p.requires_grad for p in split.body.parameters())


def test_cache_and_classic_both_give_a_working_model(shapes_data, caffe_weights):
    results = {}
    for classic in (False, True):
        model, outcome = run(shapes_data, caffe_weights, max_epochs=4, classic_loop=classic)
        assert (outcome.feature_cache is None) == classic
        fresh = make_model("none", seed=1)
        fresh.load_state_dict(outcome.state_dict)  # a full state dict: body and head
        scores = predict_scores(fresh, shapes_data.val_images, SPEC.preprocessing)
        results[classic] = float((scores.argmax(1) == shapes_data.val_targets).float().mean())
        assert outcome.history["loss"].tail(3).mean() < outcome.history["loss"].head(3).mean()
    assert results[False] >= 0.75 and results[True] >= 0.75, results  # chance is 0.33


def test_the_body_stays_frozen_and_the_state_dict_reproduces_cached_validation(shapes_data, cached_run):
    initial = {k: v.clone() for k, v in make_model().state_dict().items()}
    model, outcome = cached_run
    head = {k for k in initial if k.startswith(SPEC.head_layer + ".")}
    assert head == {"classifier.1.weight", "classifier.1.bias"}
    for k, v in outcome.state_dict.items():
        assert torch.equal(v, initial[k]) == (k not in head), k
    # The best model's validation loss, computed on cached float16 features during training,
    # is what the full network gives on the validation images.
    fresh = make_model(seed=1)
    fresh.load_state_dict(outcome.state_dict)
    scores = predict_scores(fresh, shapes_data.val_images, SPEC.preprocessing)
    loss = float(torch.nn.functional.nll_loss(torch.log(scores.clamp_min(1e-12)), shapes_data.val_targets))
    assert loss == pytest.approx(outcome.final_val_loss, rel=1e-2, abs=1e-3)
    assert outcome.final_val_loss == pytest.approx(outcome.history["val_loss"].min())


def test_features_are_computed_once_not_every_epoch(shapes_data):
    counted = []
    for epochs in (2, 5):
        model = make_model()
        seen = [0]
        model.features.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + len(i[0])))
        train(
            model,
            SPEC,
            SPEC.preprocessing,
            shapes_data,
            "transfer",
            TrainingOptions(max_epochs=epochs, mini_batch_size=4, validation_frequency=1, feature_cache_views=2),
            AUGMENT,
        )
        counted.append(seen[0])
    n, m = len(shapes_data.train_targets), len(shapes_data.val_targets)
    padded = lambda k: -(-k // FEATURE_BATCH["cpu"]) * FEATURE_BATCH["cpu"]  # noqa: E731 (fixed batch shape)
    assert counted == [3 * padded(n) + padded(m)] * 2  # (views + 1) per training image, validation once


class Interrupted(Exception):
    pass


def interrupt_at(iteration: int):
    def on_validation(history: pd.DataFrame) -> None:
        if history["iteration"].iloc[-1] >= iteration:
            raise Interrupted  # before that iteration's checkpoint is written

    return on_validation


@pytest.mark.parametrize("memory_mb", [4096, 0], ids=["in-memory", "on-disk"])
def test_resume_gives_the_uninterrupted_result(shapes_data, tmp_path, memory_mb):
    options = dict(
        max_epochs=4,
        validation_frequency=3,
        checkpoint_frequency=2,
        checkpoint_frequency_unit="iteration",
        feature_cache_memory_mb=memory_mb,
    )
    _, whole = run(shapes_data, checkpoints=str(tmp_path / "a"), feature_folder=str(tmp_path / "fa"), **options)
    features = tmp_path / "fb"
    with pytest.raises(Interrupted):
        run(
            shapes_data,
            checkpoints=str(tmp_path / "b"),
            on_validation=interrupt_at(6),
            feature_folder=str(features),
            **options,
        )
    assert features.exists() == (memory_mb == 0)  # a cache on disk stays for the resumed run
    _, resumed = run(shapes_data, checkpoints=str(tmp_path / "b"), feature_folder=str(features), **options)
    assert resumed.resumed_from == 4
    assert resumed.feature_cache["reused"] == (memory_mb == 0)
    assert resumed.feature_cache["location"] == ("memory" if memory_mb else str(features))
    assert not features.exists()  # trained: the disk cache is deleted
    assert same_state(whole.state_dict, resumed.state_dict)
    columns = [c for c in whole.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(whole.history[columns], resumed.history[columns])
    assert whole.best_iteration == resumed.best_iteration


def test_disk_cache_trains_like_memory_cache(shapes_data, cached_run, tmp_path):
    _, memory = cached_run
    _, disk = run(shapes_data, feature_cache_memory_mb=0, feature_folder=str(tmp_path / "features"))
    _, temporary = run(shapes_data, feature_cache_memory_mb=0)  # no folder: a temporary one
    assert disk.feature_cache["location"] == str(tmp_path / "features")
    assert not (tmp_path / "features").exists()
    assert not os.path.exists(temporary.feature_cache["location"])
    assert same_state(memory.state_dict, disk.state_dict)
    assert same_state(memory.state_dict, temporary.state_dict)


def test_cache_honours_validation_frequency_early_stopping_and_best_model(shapes_data, tmp_path):
    settings = dict(max_epochs=30, validation_frequency=1, validation_patience=2, initial_learn_rate=0.05)
    _, outcome = run(shapes_data, **settings, checkpoints=str(tmp_path))
    total = 30 * (len(shapes_data.train_targets) // 4)
    assert outcome.stopped_early and outcome.iterations < total
    validated = outcome.history.dropna(subset=["val_loss"])
    assert len(validated) == outcome.iterations  # validation_frequency=1
    assert outcome.best_iteration == int(validated.loc[validated["val_loss"].idxmin(), "iteration"])
    bad = validated[validated["iteration"] > outcome.best_iteration]
    assert len(bad) == 2  # patience
    # A rerun of a run that stopped early does not train on, nor compute features again.
    _, again = run(shapes_data, **settings, checkpoints=str(tmp_path))
    assert again.resumed_from == outcome.iterations and again.feature_cache is None
    assert same_state(again.state_dict, outcome.state_dict)


def test_last_iteration_output_and_no_validation_data(shapes_data):
    data = TrainingData(
        shapes_data.train_images, shapes_data.train_targets, shapes_data.val_images[:0], shapes_data.val_targets[:0]
    )
    model, outcome = run(data, output_network="last-iteration")
    assert outcome.final_val_loss is None and outcome.feature_cache["val_images"] == 0
    assert same_state(outcome.state_dict, {k: v.cpu() for k, v in model.state_dict().items()})


def test_finetune_and_classic_loop_do_not_use_the_cache(shapes_data):
    model = make_model()
    outcome = train(
        model,
        SPEC,
        SPEC.preprocessing,
        shapes_data,
        "finetune",
        TrainingOptions(max_epochs=1, mini_batch_size=6),
        AUGMENT,
    )
    assert outcome.feature_cache is None and outcome.iterations == 2


def test_cache_views_option():
    assert TrainingOptions(max_epochs=1).cache_views(AUGMENT) == 0
    assert TrainingOptions(max_epochs=10).cache_views(AUGMENT) == 1
    assert TrainingOptions(max_epochs=30).cache_views(AUGMENT) == 2
    assert TrainingOptions(max_epochs=60).cache_views(AUGMENT) == 4
    assert TrainingOptions(max_epochs=500).cache_views(AUGMENT) == 8
    assert TrainingOptions(max_epochs=3, feature_cache_views=5).cache_views(AUGMENT) == 5
    assert TrainingOptions(feature_cache_views=5).cache_views(Augmentation(False, 0)) == 0
    for bad in (
        {"feature_cache_views": -1},
        {"feature_cache_views": 1.5},
        {"feature_cache_memory_mb": -1},
        {"classic_loop": "yes"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainingOptions(**bad).validate()


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_feature_dropout_keeps_and_scales_like_nn_dropout(p):
    torch.manual_seed(0)
    features = torch.rand(64, 7, 7, 128).add_(0.5).half()
    out = dropout_to_float(features.clone(), p)
    kept = out != 0
    assert out.dtype == torch.float32
    assert float(kept.float().mean()) == pytest.approx(1 - p, abs=0.01)
    assert torch.allclose(out[kept], features.float()[kept] / (1 - p), rtol=1e-3)
    assert torch.equal(dropout_to_float(features.clone(), 0.0), features.float())


def test_train_run_records_the_cache_writes_a_full_model_and_reports_each_validation(shapes_dir, tmp_path):
    from retrain.tasks.datastore import index_stage, split_stage
    from retrain.tasks.model_file import load_model_file
    from retrain.tasks.runs import RunConfig, start_run
    from retrain.tasks.training.stage import train_run

    config = RunConfig(
        data=shapes_dir,
        dataset=shapes_dir,
        network=SPEC.name,
        weights="none",
        mode="transfer",
        split=(0.7, 0.3, 0.0),
        options={"max_epochs": 2, "mini_batch_size": 8},
        augmentation=AUGMENT.to_dict(),
    )
    run_url, lock = start_run(str(tmp_path / "store"), config)
    lock.release()  # the run folder's lock: this test is its only writer
    index_stage(shapes_dir, run_url)
    split_stage(run_url, (0.7, 0.3, 0.0), 0)
    histories = []
    summary = train_run(run_url, on_validation=histories.append)
    assert summary["feature_cache"]["location"] == "memory" and summary["feature_cache"]["views"] == 1
    # the live-progress hook: the history so far after each validation (every 5 iterations, and the last)
    iterations = summary["iterations"]
    assert [len(h) for h in histories] == [i for i in range(1, iterations + 1) if i % 5 == 0 or i == iterations]
    assert histories[-1]["val_loss"].notna().iloc[-1] and histories[-1]["iteration"].iloc[-1] == iterations
    assert not os.path.exists(os.path.join(run_url, "features"))
    loaded = load_model_file(summary["trained"])  # the same self-describing file, body and head
    assert loaded.meta["training"]["options"]["classic_loop"] is False


@pytest.mark.parametrize("name,shape", [("resnet18", [512]), ("mobilenet_v3_small", [1024])])
def test_other_architectures_train_on_cached_vectors(shapes_data, name, shape):
    spec = get_spec(name)
    torch.manual_seed(0)
    model, _ = build_network(name, 3, "none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = train(
        model,
        spec,
        spec.preprocessing,
        shapes_data,
        "transfer",
        TrainingOptions(max_epochs=2, mini_batch_size=4),
        AUGMENT,
    )
    assert outcome.feature_cache["feature_shape"] == shape
    changed = {k for k, v in outcome.state_dict.items() if not torch.equal(v, before[k])}
    assert changed == {f"{spec.head_layer}.weight", f"{spec.head_layer}.bias"}
