"""Experiments (tasks/experiments.py, flows/experiment.py): the grid, the plan, the comparison,
and a real experiment whose transfer runs share one feature cache."""

import json
import math

import pytest
import torch
from retrain.flows.cli import main
from retrain.tasks.experiments import (
    RunResult,
    best_run,
    comparison_table,
    parse_grid,
    parse_seeds,
    plan_runs,
)
from retrain.tasks.networks import build_network


def test_grid_values_take_the_type_of_their_option():
    grid = parse_grid(
        [
            "mode=transfer,finetune",
            "initial-learn-rate=1e-3, 1e-4",
            "max_epochs=2",
            "reflect=false",
            "split=0.6,0.2,0.2;0.8,0.1,0.1",
        ]
    )
    assert grid == {
        "mode": ["transfer", "finetune"],
        "initial_learn_rate": [1e-3, 1e-4],
        "max_epochs": [2],
        "reflect": [False],
        "split_fractions": ["0.6,0.2,0.2", "0.8,0.1,0.1"],
    }
    with pytest.raises(ValueError, match="not a run option; choose from"):
        parse_grid(["learning_rate=0.1"])
    with pytest.raises(ValueError, match="is not an int"):
        parse_grid(["max-epochs=two"])
    with pytest.raises(ValueError, match="--seeds"):
        parse_grid(["seed=1,2"])
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds("1,1")


def test_plan_is_every_combination_times_every_seed_with_one_split_and_shared_bodies(tmp_path):
    base = {"network": "squeezenet", "weights": "w.pth", "options": {"seed": 7, "max_epochs": 2}}
    grid = parse_grid(["network=squeezenet-caffe,resnet18", "mode=transfer,finetune"])
    runs = plan_runs(base, grid, [0, 1, 2], str(tmp_path), "data")
    assert len(runs) == 12
    assert {(r.combination["network"], r.combination["mode"], r.seed) for r in runs} == {
        (n, m, s) for n in ("squeezenet-caffe", "resnet18") for m in ("transfer", "finetune") for s in (0, 1, 2)
    }
    assert all(r.parameters["options"]["seed"] == r.seed and r.parameters["split_seed"] == 7 for r in runs)
    assert all(r.parameters["options"]["max_epochs"] == 2 for r in runs)
    folders = {r.combination["network"]: set() for r in runs}
    for r in runs:
        if r.combination["mode"] == "transfer":
            folders[r.combination["network"]].add(r.parameters["shared_features"]["folder"])
        else:
            assert "shared_features" not in r.parameters  # a fine-tuned body changes
    assert all(len(f) == 1 for f in folders.values())  # one cache per network, whatever the seed
    assert folders["resnet18"] != folders["squeezenet-caffe"]
    linked = plan_runs(base, parse_grid(["network=squeezenet-caffe@/w/caffe.pth,resnet18@none"]), [0], "s", "d")
    assert [(r.parameters["network"], r.parameters["weights"]) for r in linked] == [
        ("squeezenet-caffe", "/w/caffe.pth"),
        ("resnet18", "none"),
    ]
    assert [r.label for r in linked] == ["network=squeezenet-caffe@caffe.pth", "network=resnet18@none"]
    assert "shared_features" not in linked[1].parameters  # a random body is not shared
    unshared = plan_runs(base, grid, [0], str(tmp_path), "data", share_features=False)
    assert not any("shared_features" in r.parameters for r in unshared)


def test_the_table_averages_over_seeds_and_the_best_is_chosen_on_validation():
    results = [
        RunResult("a", {"mode": "a"}, 0, "r0", val_accuracy=0.8, test_accuracy=1.0, seconds=10),
        RunResult("a", {"mode": "a"}, 1, "r1", val_accuracy=0.6, test_accuracy=1.0, seconds=20),
        RunResult("b", {"mode": "b"}, 0, "r2", val_accuracy=0.9, test_accuracy=0.5, seconds=30),
        RunResult("b", {"mode": "b"}, 1, "r3", val_accuracy=0.7, test_accuracy=0.7, seconds=30),
        RunResult("b", {"mode": "b"}, 2, error="RuntimeError: out of memory"),
    ]
    table = comparison_table(results).set_index("combination")
    assert table.loc["a", "val_accuracy"] == pytest.approx(0.7)
    assert table.loc["a", "val_accuracy_sd"] == pytest.approx(math.sqrt(0.02))
    assert table.loc["b", "runs"] == 2 and table.loc["b", "failed"] == 1
    assert table.loc["b", "test_accuracy"] == pytest.approx(0.6) and table.loc["a", "seconds"] == pytest.approx(15)
    best = best_run(results, comparison_table(results))
    assert best.run_id == "r2"  # b's mean validation accuracy 0.8 beats a's 0.7, whatever the test set says


def test_an_experiment_runs_the_grid_and_its_transfer_runs_share_one_feature_cache(
    prefect_api, shapes_dir, tmp_path, capsys
):
    torch.manual_seed(0)
    model, _ = build_network("squeezenet-caffe", 1000, weights="none")
    weights = tmp_path / "body.pth"
    torch.save(model.state_dict(), weights)
    store = tmp_path / "store"
    status = main(
        [
            "experiment",
            shapes_dir,
            "--store",
            str(store),
            "--network",
            "squeezenet-caffe",
            "--weights",
            str(weights),
            "--grid",
            "initial-learn-rate=0.001",
            "--seeds",
            "0,1",
            "--max-epochs",
            "1",
            "--mini-batch-size",
            "6",
            "--split",
            "0.5,0.25,0.25",
            "--promote-best",
            "--json",
        ]
    )
    assert status == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = record["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["error"] is None and r["run_id"] for r in runs)
    assert sorted(r["feature_cache"] for r in runs) == ["built", "reused"]  # one body, one cache
    assert record["best"]["run_id"] in {r["run_id"] for r in runs}
    assert record["promotion"]["run_id"] == record["best"]["run_id"]
    (row,) = record["table"]
    assert row["runs"] == 2 and 0 <= row["test_accuracy"] <= 1
    folder = store / "experiments" / record["experiment_id"]
    assert {"experiment.json", "runs.csv", "table.csv", "accuracy_vs_time.png"} <= {p.name for p in folder.iterdir()}
    # the same split for both seeds: they are compared on the same test images
    splits = [(store / "runs" / r["run_id"] / "split.parquet").read_bytes() for r in runs]
    assert splits[0] == splits[1]
