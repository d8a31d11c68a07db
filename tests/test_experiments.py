"""Experiments (tasks/experiments.py, flows/experiment.py): the grid, the plan, the comparison,
and a real experiment whose transfer runs share one feature cache."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from retrain import failures
from retrain.cli import main
from retrain.flows import experiment
from retrain.tasks import storage
from retrain.tasks.experiments import (
    RunResult,
    best_run,
    comparison_table,
    experiment_key,
    parse_grid,
    parse_seeds,
    plan_runs,
    run_id_in,
)
from retrain.tasks.networks import build_network
from retrain.tasks.samples import make_shapes_dataset
from tests import _services
from tests.conftest import run_cli, tiny_run_flags
from tests.test_faults import subprocess_env, wait_for


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


# ---- issue 20: nothing lost, nothing stale ---------------------------------------------------


def tiny_experiment(data: str, store, *more: str) -> list[str]:
    """``retrain experiment`` of two tiny runs (seeds 0 and 1) with random weights."""
    return ["experiment", data, "--store", str(store), *tiny_run_flags(), "--seeds", "0,1", *more]


def strict_json(text: str) -> dict:
    """The last line of ``text`` as JSON, refusing NaN and Infinity (JSON has neither)."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text.strip().splitlines()[-1], parse_constant=refuse)


def test_an_experiment_whose_runs_failed_exits_1_and_prints_valid_json(
    prefect_api, shapes_dir, tmp_path, monkeypatch, capsys
):
    def out_of_memory(**_parameters):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(experiment, "retrain_flow", out_of_memory)
    status = main([*tiny_experiment(shapes_dir, tmp_path / "store"), "--json"])
    captured = capsys.readouterr()
    assert status == 1, captured.err  # failures.EXIT_RUNS_FAILED
    record = strict_json(captured.out)
    assert [r["error"] for r in record["runs"]] == ["RuntimeError: out of memory"] * 2
    (row,) = record["table"]
    assert row["failed"] == 2 and row["val_accuracy"] is None and record["best"] is None
    assert "2 of 2 runs failed" in captured.err.strip().splitlines()[-1]


def test_a_store_failure_in_one_run_stops_the_experiment_with_status_3(
    prefect_api, shapes_dir, tmp_path, monkeypatch, capsys
):
    started = []

    def dead_store(**parameters):
        started.append(parameters["options"]["seed"])
        raise storage.StorageError("write_bytes s3://bucket/runs/x/run.json failed 4 time(s): Could not connect")

    monkeypatch.setattr(experiment, "retrain_flow", dead_store)
    status = main([*tiny_experiment(shapes_dir, tmp_path / "store"), "--seeds", "0,1,2", "--json"])
    captured = capsys.readouterr()
    assert status == failures.EXIT_STORE_FAILED, captured.err
    assert started == [0]  # no further run against a dead store
    assert "Could not connect" in captured.err.strip().splitlines()[-1]
    assert strict_json(captured.out)["type"] == "StorageError"


def test_the_experiment_id_comes_from_its_content_and_names_its_runs(tmp_path):
    base = {"network": "squeezenet", "weights": "none", "options": {"seed": 0, "max_epochs": 2}}
    grid = parse_grid(["mode=transfer,finetune"])
    plan = plan_runs(base, grid, [0, 1], str(tmp_path), "data")
    same = plan_runs(base, parse_grid(["mode=transfer,finetune"]), [0, 1], str(tmp_path), "data")
    assert experiment_key("data", plan) == experiment_key("data", same)
    assert experiment_key("data", plan) != experiment_key("other-data", plan)
    assert experiment_key("data", plan) != experiment_key("data", plan_runs(base, grid, [0, 2], str(tmp_path), "data"))
    ids = [run_id_in("e1", p) for p in plan]
    assert len(set(ids)) == 4 and all(i.startswith("e1-") for i in ids)
    assert ids == [run_id_in("e1", p) for p in same]  # the same runs, the same run folders
    # The same folder with other images: another experiment, and other run folders even under
    # one --experiment-id (a run is bound to its images).
    assert experiment_key("data", plan, "images-v1") != experiment_key("data", plan, "images-v2")
    assert run_id_in("e1", plan[0], "images-v1") != run_id_in("e1", plan[0], "images-v2")


def test_rerunning_an_experiment_reuses_its_finished_runs_and_resumes_the_interrupted_one(
    prefect_api, shapes_dir, tmp_path
):
    store = tmp_path / "store"
    status, first, err = run_cli(tiny_experiment(shapes_dir, store))
    assert status == 0, err
    finished, interrupted = (store / "runs" / r["run_id"] for r in first["runs"])
    # the second run as Ctrl-C leaves it: marked failed, its model not published
    record = json.loads((interrupted / "run.json").read_text())
    (interrupted / "run.json").write_text(json.dumps({**record, "status": "failed", "error": "KeyboardInterrupt: "}))
    (interrupted / "model.pt").unlink()
    trained_at = (finished / "training.json").stat().st_mtime_ns

    status, again, err = run_cli(tiny_experiment(shapes_dir, store))  # the same command, no id given
    assert status == 0, err
    assert again["experiment_id"] == first["experiment_id"]
    assert [r["run_id"] for r in again["runs"]] == [r["run_id"] for r in first["runs"]]
    assert sorted(p.name for p in (store / "runs").iterdir()) == sorted(r["run_id"] for r in first["runs"])
    assert (finished / "training.json").stat().st_mtime_ns == trained_at  # reused, not trained again
    assert json.loads((finished / "run.json").read_text())["resumed"] == 0
    resumed = json.loads((interrupted / "run.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed"] == 1 and (interrupted / "model.pt").exists()
    assert [r["val_accuracy"] for r in again["runs"]] == [r["val_accuracy"] for r in first["runs"]]


# ---- issue 20, item 10: how a command ends when its reader goes away or Ctrl-C lands -----------


@pytest.mark.parametrize(
    "args", [["network"], ["network", "squeezenet-caffe", "--all-layers"], ["runs", "--json"], ["--help"]]
)
def test_output_to_a_closed_pipe_ends_quietly(args, tmp_path):
    """``retrain ... | head -1``: the reader is gone before the command writes."""
    env = {**os.environ, "RETRAIN_STORE": str(tmp_path / "store"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _services.retrain_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
    )
    proc.stdout.close()  # as `head -1` does once it has its line
    err = proc.stderr.read().decode(errors="replace")
    assert proc.wait(timeout=120) in (0, failures.EXIT_BROKEN_PIPE), err
    assert "Traceback" not in err and "store failure" not in err and "BrokenPipe" not in err, err


def test_an_interrupt_prefect_turns_into_another_error_is_still_status_130(
    prefect_api, shapes_dir, tmp_path, monkeypatch, capsys
):
    """Ctrl-C while Prefect creates the evaluate task's run: its crash handling then fails with
    ValueError("Task run is not set"), the KeyboardInterrupt as its context."""
    from prefect import task_engine

    create = task_engine._create_task_run_locally

    def interrupted_at_evaluate(task, *args, **kwargs):
        if task.name == "evaluate":
            raise KeyboardInterrupt
        return create(task, *args, **kwargs)

    monkeypatch.setattr(task_engine, "_create_task_run_locally", interrupted_at_evaluate)
    status = main(["run", shapes_dir, "--store", str(tmp_path / "store"), *tiny_run_flags(), "--no-promote", "--json"])
    captured = capsys.readouterr()
    assert status == failures.EXIT_INTERRUPTED, captured.err
    assert "interrupted" in captured.err.strip().splitlines()[-1]


def test_an_interrupt_that_lands_in_a_finalizer_still_ends_the_command_with_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the garbage collector runs a ``__del__`` (RowFiles' at the end of training):
    Python prints "Exception ignored" and goes on; the run then trained on and exited 0."""
    from retrain.tasks import runs

    class Finalized:
        def __del__(self):
            raise KeyboardInterrupt

    def list_runs(store: str) -> list[dict]:
        Finalized()  # collected at once: Ctrl-C lands in its __del__
        time.sleep(0.5)  # the rest of the command
        return []

    monkeypatch.setattr(runs, "list_runs", list_runs)
    # Ctrl-C as a fresh command process gets it: whatever SIGINT handler an earlier test's
    # library left in this process is not the command's.
    earlier = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = main(["runs", "--store", str(tmp_path), "--json"])
    finally:
        signal.signal(signal.SIGINT, earlier)
    captured = capsys.readouterr()
    assert status == failures.EXIT_INTERRUPTED, captured
    assert "Exception ignored" not in captured.err


@pytest.mark.services  # it interrupts processes
def test_ctrl_c_at_any_moment_of_a_run_is_status_130(prefect_api, tmp_path):
    """SIGINT to ``retrain run`` while it indexes, trains and evaluates."""
    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, per_class=12, size=64, seed=1)
    env = subprocess_env(prefect_api, tmp_path)
    moments = {"indexing": "run.json", "training": "checkpoints/iter-*.pt", "evaluating": "trained.pt"}
    for moment, pattern in moments.items():
        store, log = tmp_path / moment, tmp_path / f"{moment}.log"
        args = ["run", data, "--store", str(store), *tiny_run_flags(max_epochs=2), "--no-promote"]
        args += ["--mode", "finetune", "--checkpoint-frequency", "1", "--checkpoint-frequency-unit", "iteration"]
        proc = _services.start(_services.retrain_argv(*args), log, env)
        try:
            wait_for(lambda: next(store.glob(f"runs/*/{pattern}"), None), proc, log, poll=0.01)
            proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                _services.kill_group(proc)
        text = log.read_text(errors="replace")
        assert status == failures.EXIT_INTERRUPTED, f"{moment}: exit {status}\n{text[-3000:]}"
        assert "interrupted" in text.strip().splitlines()[-1], text[-3000:]


@pytest.mark.services  # it interrupts processes
@pytest.mark.parametrize("parallel", ["1", "2"])
def test_ctrl_c_stops_an_experiment_within_seconds(parallel, prefect_api, tmp_path):
    """SIGINT reaches the runs in progress: they stop mid-training, no other run starts."""
    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, per_class=12, size=64, seed=1)
    store = tmp_path / "store"
    args = ["experiment", data, "--store", str(store), *tiny_run_flags(max_epochs=50), "--seeds", "0,1,2,3"]
    args += ["--parallel", parallel]
    args += ["--mode", "finetune", "--checkpoint-frequency", "1", "--checkpoint-frequency-unit", "iteration"]
    log = tmp_path / "experiment.log"
    proc = _services.start(_services.retrain_argv(*args), log, subprocess_env(prefect_api, tmp_path))
    try:
        wait_for(lambda: len(list(store.glob("runs/*/checkpoints/iter-*.pt"))) >= 2, proc, log, poll=0.05)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=120)
        waited = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            _services.kill_group(proc)
    text = log.read_text(errors="replace")
    assert status == failures.EXIT_INTERRUPTED, text[-3000:]
    assert waited < 30, f"{waited:.0f} s from Ctrl-C to exit"
    runs = [json.loads(p.read_text()) for p in store.glob("runs/*/run.json")]
    assert 1 <= len(runs) <= int(parallel) and all(r["status"] != "completed" for r in runs), runs


def test_an_experiment_on_a_split_without_validation_or_test_part_runs_to_the_end(
    prefect_api, shapes_dir, tmp_path, capsys
):
    """Like `retrain run --split 1,0,0` (tests/test_stale_runs.py): no held-out accuracy is a
    dash in the table and "none" for the best run, not a crash after every run trained."""
    status = main([*tiny_experiment(shapes_dir, tmp_path / "store", "--split", "1,0,0")])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    assert "best: " in captured.out and "(val none (no validation part))" in captured.out, captured.out
    record = storage.read_json(next((tmp_path / "store" / "experiments").glob("*/experiment.json")).as_posix())
    (row,) = record["table"]
    assert row["runs"] == 2 and row["failed"] == 0 and row["test_accuracy"] is None
    assert "torch.cat()" not in captured.err  # no held-out image to explain: skipped, not an error
