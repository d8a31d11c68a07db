"""Nothing stale, nothing escaping (issue 20): a run is bound to the content of its data, run
ids and other names stay inside the store, and splits without a validation or test part work
end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrain.tasks import storage
from retrain.tasks.runs import RunConfig, start_run
from tests.conftest import run_cli, tiny_run_flags

# ---- names that become folders of the store -----------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"), [("--run-id", "../../escaped"), ("--run-id", ".hidden"), ("--model-name", "../m")]
)
def test_run_names_that_would_leave_the_store_are_refused_before_anything_is_written(shapes_dir, tmp_path, flag, value):
    store = tmp_path / "S" / "inner"
    status, result, err = run_cli(["run", shapes_dir, "--store", str(store), flag, value, *tiny_run_flags()])
    assert status == 2, err
    assert value in result["error"] and "letters, digits" in result["error"]
    assert err.strip().splitlines()[-1].startswith("retrain run: error:")
    assert not (tmp_path / "S").exists() and not (tmp_path / "escaped").exists()


def test_experiment_id_that_would_leave_the_store_is_refused(shapes_dir, tmp_path):
    store = tmp_path / "S" / "inner"
    status, result, err = run_cli(
        ["experiment", shapes_dir, "--store", str(store), "--experiment-id", "../../x", *tiny_run_flags()]
    )
    assert status == 2, err
    assert "experiment id" in result["error"]
    assert not (tmp_path / "S").exists()


def test_start_run_refuses_a_run_id_outside_runs(shapes_dir, tmp_path):
    config = RunConfig(shapes_dir, shapes_dir, "squeezenet-caffe", "none", "transfer", (0.7, 0.15, 0.15), {}, {})
    with pytest.raises(storage.InvalidNameError, match="run id"):
        start_run(str(tmp_path / "store"), config, run_id="../escaped")
    assert not list(Path(tmp_path).rglob("run.json"))


# ---- splits without a validation or test part ----------------------------------------------------


@pytest.mark.parametrize(("split", "absent"), [("0.8,0,0.2", "validation"), ("1,0,0", "test")])
def test_a_split_without_a_validation_or_test_part_runs_to_the_end(prefect_api, shapes_dir, tmp_path, split, absent):
    store = tmp_path / "store"
    args = ["run", shapes_dir, "--store", str(store), "--split", split, "--seed", "1", *tiny_run_flags()]
    status, result, err = run_cli(args)
    assert status == 0, err
    assert result["promotion"]["model_name"].startswith("shapes")  # the gate's turn came after publishing
    assert result["promotion"]["promoted"] == (absent == "validation")  # 1,0,0 holds nothing out to judge on
    summary = storage.read_json(str(Path(result["run_url"]) / "summary.json"))
    part = "val" if absent == "validation" else "test"
    assert summary[f"{part}_accuracy"] is None
    from retrain.tasks.reports import run_summary_markdown

    assert f"none (no {absent} part)" in run_summary_markdown(summary)
    again_status, again, err = run_cli(args)  # a finished run: a new run, not a failed one resumed
    assert again_status == 0, err
    assert storage.read_json(str(Path(result["run_url"]) / "run.json"))["status"] == "completed"


# ---- a run is bound to its data's content --------------------------------------------------------

STALE_FLAGS = tiny_run_flags(max_epochs=2, validation_frequency=2)


def change_data(data: Path, how: str, spare: str) -> None:
    """Change the data set in place: a class folder removed, images moved between classes,
    or a class added (``spare``: a generated shapes set with other images)."""
    import shutil

    if how == "class removed":
        shutil.rmtree(data / "triangle")
    elif how == "images moved":
        for image in sorted((data / "circle").iterdir())[:3]:
            image.rename(data / "square" / image.name)
    else:
        shutil.copytree(Path(spare) / "circle", data / "ring")


def interrupt_after_first_checkpoint(run: Path) -> None:
    """What a run killed during its second epoch leaves: the first epoch's checkpoint, no
    outputs after it, status failed (as flows/pipeline.py records it)."""
    for name in ("trained.pt", "training.json", "model.pt", "metrics.json", "summary.json", "predictions.parquet"):
        (run / name).unlink(missing_ok=True)
    checkpoints = sorted((run / "checkpoints").glob("iter-*.pt"))
    for later in checkpoints[1:]:
        later.unlink()
    storage.write_json(str(run / "run.json"), {**storage.read_json(str(run / "run.json")), "status": "failed"})


@pytest.fixture(scope="module")
def spare_shapes(tmp_path_factory) -> str:
    from retrain.tasks.samples import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("spare") / "shapes"), per_class=8, size=48, seed=7)


@pytest.fixture(scope="module")
def finished_on_data(prefect_api, shapes_dir, tmp_path_factory) -> tuple[Path, Path, dict]:
    """One finished run, trained once for the tests that change its data: (the data folder,
    the store holding the run, the run's answer). Each test copies the store and puts the data
    back as it was trained on (the run is bound to the data's URL, so the folder stays put)."""
    import shutil

    root = tmp_path_factory.mktemp("finished-on-data")
    data, store = root / "data", root / "store"
    shutil.copytree(shapes_dir, data)
    status, first, err = run_cli(["run", str(data), "--store", str(store), "--no-promote", *STALE_FLAGS])
    assert status == 0, err
    return data, store, first


@pytest.mark.parametrize("how", ["class removed", "images moved", "class added"])
def test_a_rerun_on_changed_data_trains_a_new_run_after_a_finished_or_interrupted_one(
    prefect_api, shapes_dir, spare_shapes, finished_on_data, tmp_path, how
):
    import shutil

    data, trained, first = finished_on_data
    shutil.rmtree(data)  # the data as the first run saw it (an earlier test changed it)
    shutil.copytree(shapes_dir, data)
    finished, interrupted = tmp_path / "finished", tmp_path / "interrupted"
    shutil.copytree(trained, finished)
    shutil.copytree(trained, interrupted)
    interrupt_after_first_checkpoint(interrupted / "runs" / first["run_id"])
    change_data(data, how, spare_shapes)
    classes = sorted(p.name for p in data.iterdir())
    for store in (finished, interrupted):
        status, again, err = run_cli(["run", str(data), "--store", str(store), "--no-promote", *STALE_FLAGS])
        assert status == 0, err
        assert again["run_id"] != first["run_id"], f"{store.name}: reused the run made from the old data"
        assert again["classes"] == classes
        summary = storage.read_json(str(Path(again["run_url"]) / "summary.json"))
        assert summary["resumed_from"] is None  # trained from the start, not from the old data's checkpoint
        split = storage.read_parquet(str(Path(again["run_url"]) / "split.parquet"))
        assert sorted(split["label"].unique()) == classes
        moved = split[split["path"].str.contains("/square/circle_")]
        assert (moved["label"] == "square").all()


def test_an_explicit_run_id_of_a_run_made_from_other_data_is_refused_naming_fresh(
    prefect_api, shapes_dir, spare_shapes, tmp_path
):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    store = str(tmp_path / "store")
    args = ["run", str(data), "--store", store, "--run-id", "myrun", "--no-promote", *STALE_FLAGS]
    status, first, err = run_cli(args)
    assert status == 0, err
    shutil.rmtree(data / "triangle")
    status, result, err = run_cli(args)
    assert status == 2, err
    # A published model is never replaced under its run id (it may be current for a model name).
    assert "myrun" in result["error"] and "--run-id" in result["error"] and "data" in result["error"]
    assert len(err.strip().splitlines()[-1]) < 400  # one line
    status, result, err = run_cli([*args, "--fresh"])
    assert status == 2 and "published model" in result["error"], err
    assert storage.read_json(f"{store}/runs/myrun/summary.json")["classes"] == first["classes"]  # untouched
    # A run that never published (interrupted at its first checkpoint) names --fresh, which starts it over.
    interrupt_after_first_checkpoint(Path(store) / "runs" / "myrun")
    status, result, err = run_cli(args)
    assert status == 2 and "--fresh" in result["error"], err
    status, fresh, err = run_cli([*args, "--fresh"])  # the run started over on this data
    assert status == 0, err
    assert fresh["run_id"] == "myrun" and fresh["classes"] == ["circle", "square"]
    status, one, err = run_cli(
        ["classify", "myrun", str(Path(shapes_dir) / "triangle" / "triangle_000.jpg"), "--store", store]
    )
    assert status == 0, err
    assert one["label"] in ("circle", "square")


def test_checkpoints_and_a_trained_model_are_reused_only_on_their_own_split(shapes_dir, tmp_path):
    """The training stage's own guard (a run's split can change under it only through an
    old run folder or a hand edit): a checkpoint made on another split is not resumed, a
    model trained on another split is not taken for trained."""
    from retrain.tasks.datastore import index_stage, split_stage
    from retrain.tasks.training.stage import train_run

    options = {"max_epochs": 2, "mini_batch_size": 8, "validation_frequency": 2}
    # {}: the default augmentation
    config = RunConfig(shapes_dir, shapes_dir, "squeezenet-caffe", "none", "transfer", (0.7, 0.3, 0.0), options, {})
    run_url, lock = start_run(str(tmp_path / "store"), config)
    lock.release()  # this test is the run folder's only writer
    run = Path(run_url)
    index_stage(shapes_dir, run_url)
    split_stage(run_url, (0.7, 0.3, 0.0), 0)
    first = train_run(run_url)
    assert first["resumed_from"] is None

    split_stage(run_url, (0.7, 0.3, 0.0), 1)  # the same images, another split
    retrained = train_run(run_url)
    assert retrained["resumed_from"] is None and retrained["split_key"] != first["split_key"]

    (run / "trained.pt").unlink()  # interrupted after the first epoch's checkpoint, then the split changed
    (run / "training.json").unlink()
    for later in sorted((run / "checkpoints").glob("iter-*.pt"))[1:]:
        later.unlink()
    split_stage(run_url, (0.7, 0.3, 0.0), 2)
    again = train_run(run_url)
    assert again["resumed_from"] is None and again["iterations"] == first["iterations"]
