"""Label issues at training time (tasks/label_issues.py): the K-fold + cleanlab verdict on
features made for it, and the run's wiring: label_issues.csv, label-issues.png, the summary's
count, --exclude-label-issues, --no-label-issues, too few images per class."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from retrain.cli import build_parser
from retrain.tasks import storage
from retrain.tasks.label_issues import (
    COLUMNS,
    EXCLUDED,
    find_run_label_issues,
    flag_label_issues,
)
from retrain.tasks.request import RunRequest
from retrain.tasks.runs import RunConfig
from tests.conftest import run_cli, tiny_run_flags


def test_flipped_labels_are_the_top_suspects():
    """Three well separated classes, 5 % of the labels flipped: the flipped ones, and only
    they, are flagged, worst first, with their true class suggested."""
    rng = np.random.default_rng(0)
    n, classes = 300, ["a", "b", "c"]
    truth = rng.integers(0, 3, n)
    features = 1.5 * rng.normal(size=(3, 64))[truth] + rng.normal(size=(n, 64))
    flipped = rng.choice(n, 15, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + 1) % 3
    paths = [f"img{i}.jpg" for i in range(n)]

    issues = flag_label_issues(paths, given, features, classes)

    assert list(issues.columns) == COLUMNS
    assert set(issues["path"]) == {paths[i] for i in flipped}
    assert list(issues["rank"]) == list(range(1, 16)) and issues["label_quality"].is_monotonic_increasing
    truth_of = dict(zip(paths, np.asarray(classes)[truth]))
    assert (issues["suggested_label"] == issues["path"].map(truth_of)).all()


def test_under_five_images_per_class_skips_with_a_reason(tmp_path):
    run = storage.RunLayout(str(tmp_path / "runs" / "r1"))
    config = RunRequest(network="squeezenet-caffe", weights="none").check(fetch_weights=False)
    storage.write_json(run.run_json, {"config": config.to_record()})
    rows = [(f"/x/{c}{i}.jpg", c, "train" if i < 3 else "val") for c in ("cat", "dog") for i in range(4)]
    storage.write_parquet(run.split, pd.DataFrame(rows, columns=["path", "label", "split"]))

    found = find_run_label_issues(run.url)

    assert found["label_issues"] is None
    assert found["skipped"].startswith("under 5 training and validation images in class cat (4), dog (4)")
    assert not Path(run.label_issues).exists()


def test_label_issue_flags_and_fingerprint():
    parse = build_parser("run").parse_args
    assert parse(["run"]).label_issues == "find"
    assert parse(["run", "--exclude-label-issues"]).label_issues == "exclude"
    assert parse(["run", "--no-label-issues"]).label_issues == "off"
    config = RunRequest(network="squeezenet-caffe", weights="none").check(fetch_weights=False)
    off = RunConfig.from_record({**config.to_record(), "label_issues": "off"})
    excluding = RunConfig.from_record({**config.to_record(), "label_issues": "exclude"})
    assert off.fingerprint() == config.fingerprint() != excluding.fingerprint()  # only excluding changes the model


def test_run_excluding_label_issues(prefect_api, tmp_path):
    """A run with --exclude-label-issues writes the CSV and the plot, counts them in its
    summary, and trains without the flagged images."""
    from retrain.tasks.samples import make_shapes_dataset

    data = make_shapes_dataset(str(tmp_path / "shapes"), per_class=10, size=48, seed=2)
    store = str(tmp_path / "store")
    status, result, err = run_cli(["run", data, "--store", store, "--exclude-label-issues", *tiny_run_flags()])
    assert status == 0, err

    run = Path(result["run_url"])
    issues = pd.read_csv(run / "label_issues.csv")
    assert list(issues.columns) == COLUMNS
    assert result["label_issues"] == len(issues) > 0
    assert (run / "label-issues.png").exists()
    split = pd.read_parquet(run / "split.parquet")
    excluded = split[split["split"] == EXCLUDED]
    assert result["label_issues_excluded"] == len(excluded) == len(issues)
    assert set(excluded["path"]) == set(issues["path"])
    training = json.loads((run / "training.json").read_text())
    assert training["train_images"] + training["val_images"] == (split["split"].isin(["train", "val"])).sum()
    assert json.loads((run / "summary.json").read_text())["label_issues"] == len(issues)


def test_transfer_training_hands_over_its_cached_features_pooled():
    """What the label-issues step fits on in transfer mode is the feature cache's view 0 and
    validation features, pooled: the same as a pass of the network over the images."""
    import torch

    from retrain.tasks.label_issues import pooled_head_inputs
    from retrain.tasks.networks import build_network, get_spec
    from retrain.tasks.preprocessing import Augmentation
    from retrain.tasks.training.data import TrainingData
    from retrain.tasks.training.loop import train
    from retrain.tasks.training.options import TrainingOptions

    spec = get_spec("squeezenet-caffe")
    torch.manual_seed(0)
    model, _ = build_network(spec.name, 3, "none")
    images = torch.randint(0, 256, (12, 3, *spec.preprocessing.input_size), dtype=torch.uint8)
    data = TrainingData(images[:9], torch.arange(9) % 3, images[9:], torch.arange(3))
    options = TrainingOptions(max_epochs=1, mini_batch_size=4, execution_environment="cpu")
    outcome = train(model, spec, spec.preprocessing, data, "transfer", options, Augmentation(), pooled_features=True)
    model.load_state_dict(outcome.state_dict)

    handed = np.concatenate(outcome.pooled_features)
    direct = pooled_head_inputs(model, spec, spec.preprocessing, images, torch.device("cpu"))
    assert handed.shape == direct.shape == (12, 512)
    assert np.allclose(handed, direct, rtol=1e-2, atol=1e-3 * np.abs(direct).max())  # float16 cache
