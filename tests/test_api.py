"""The Python API is the one implementation of each command: ``retrain.evaluate / classify /
score / export`` and ``retrain evaluate / classify / score / export --json`` answer the same
(accuracy, engine, label, scores, files) for the same arguments."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import retrain
from retrain.tasks.datastore import index_images
from tests.conftest import run_cli
from tests.test_scoring import make_folder, prefect_logs  # noqa: F401 - prefect_logs is a fixture


@pytest.fixture(scope="module")
def run_model(tmp_path_factory, random_model_file, shapes_dir) -> str:
    """A run folder as the pipeline leaves it (model.pt beside split.parquet), so that engine
    ``auto`` validates the other engines on the run's images and may pick one of them."""
    folder = tmp_path_factory.mktemp("run")
    model = folder / "model.pt"
    model.write_bytes(Path(random_model_file).read_bytes())
    images = index_images(shapes_dir).images
    names = ["train"] * 12 + ["val"] * 6 + ["test"] * (len(images) - 18)
    images.assign(split=names).reset_index(drop=True).to_parquet(folder / "split.parquet")
    return str(model)


def test_evaluate_answers_the_same_accuracy_and_engine_as_the_command(run_model, shapes_dir, tmp_path):
    store = str(tmp_path / "store")
    answer = retrain.evaluate(run_model, shapes_dir, store=store)
    status, printed, _ = run_cli(["evaluate", run_model, shapes_dir, "--store", store])
    assert status == 0
    assert set(answer) == set(printed)
    for key in ("accuracy", "confusion", "per_class", "classes", "count", "engine", "engine_reason", "skipped"):
        assert answer[key] == printed[key], key
    assert answer["count"] == 24


def test_evaluate_with_a_named_engine_runs_that_engine_both_ways(random_model_file, shapes_dir, tmp_path):
    store = str(tmp_path / "store")
    answer = retrain.evaluate(random_model_file, shapes_dir, store=store, engine="torch")
    status, printed, _ = run_cli(["evaluate", random_model_file, shapes_dir, "--store", store, "--engine", "torch"])
    assert status == 0
    assert answer["engine"] == printed["engine"] == "torch"
    assert answer["engine_reason"] == printed["engine_reason"] == "float32 reference, as asked"
    assert answer["accuracy"] == printed["accuracy"] and answer["confusion"] == printed["confusion"]


def test_classify_answers_the_same_label_and_scores_as_the_command(random_model_file, shapes_dir, tmp_path):
    image = index_images(shapes_dir).images["path"].iloc[0]
    store = str(tmp_path / "store")
    answer = retrain.classify(random_model_file, image, store=store)
    status, printed, _ = run_cli(["classify", random_model_file, image, "--store", store])
    assert status == 0
    assert answer == printed
    assert answer["label"] in answer["scores"] and answer["score"] == max(answer["scores"].values())


def test_export_writes_and_checks_the_same_as_the_command(run_model, tmp_path):
    answer = retrain.export(run_model, str(tmp_path / "api.onnx"))
    status, printed, _ = run_cli(["export", run_model, "--out", str(tmp_path / "cli.onnx")])
    assert status == 0
    assert answer["output"].endswith("api.onnx") and printed["output"].endswith("cli.onnx")
    assert {k: v for k, v in answer.items() if k != "output"} == {k: v for k, v in printed.items() if k != "output"}
    assert answer["test_split"]["split"] == "test"  # the run's held-out images checked either way


@pytest.mark.usefixtures("prefect_logs")
def test_score_writes_the_same_scores_as_the_command(random_model_file, dask_client, tmp_path):
    make_folder(tmp_path / "images", per_class=1, bad=False)
    images, address = str(tmp_path / "images"), dask_client.scheduler.address
    summary = retrain.score(random_model_file, images, out=str(tmp_path / "api"), dask_address=address)
    status, printed, _ = run_cli(
        ["score", random_model_file, images, "--out", str(tmp_path / "cli"), "--dask-address", address]
    )
    assert status == 0
    for key in ("images", "scored", "failed", "engine", "engine_reason", "decoder", "ui_url"):
        assert summary[key] == printed[key], key
    columns = ["path", "label", "score"]
    assert pd.read_parquet(summary["output"])[columns].equals(pd.read_parquet(printed["output"])[columns])
