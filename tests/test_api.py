"""The Python API is the one implementation of each command: ``retrain.evaluate / classify /
score / export`` and ``retrain evaluate / classify / score / export --json`` answer the same
(accuracy, engine, label, scores, files) for the same arguments, in one vocabulary
(docs/reference.md)."""

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
    for key in ("data_accuracy", "confusion", "per_class", "classes", "images", "engine", "engine_reason", "skipped"):
        assert answer[key] == printed[key], key
    assert answer["images"] == 24 == sum(c["images"] for c in answer["per_class"].values())
    assert_vocabulary(answer)


def test_evaluate_with_a_named_engine_runs_that_engine_both_ways(random_model_file, shapes_dir, tmp_path):
    store = str(tmp_path / "store")
    answer = retrain.evaluate(random_model_file, shapes_dir, store=store, engine="torch")
    status, printed, _ = run_cli(["evaluate", random_model_file, shapes_dir, "--store", store, "--engine", "torch"])
    assert status == 0
    assert answer["engine"] == printed["engine"] == "torch"
    assert answer["engine_reason"] == printed["engine_reason"] == "float32 reference, as asked"
    assert answer["data_accuracy"] == printed["data_accuracy"] and answer["confusion"] == printed["confusion"]


def test_classify_answers_the_same_label_and_scores_as_the_command(random_model_file, shapes_dir, tmp_path):
    image = index_images(shapes_dir).images["path"].iloc[0]
    store = str(tmp_path / "store")
    answer = retrain.classify(random_model_file, image, store=store)
    status, printed, _ = run_cli(["classify", random_model_file, image, "--store", store])
    assert status == 0
    assert answer == printed
    assert answer["label"] in answer["scores"] and answer["score"] == max(answer["scores"].values())


def test_export_writes_and_checks_the_same_as_the_command(run_model, tmp_path):
    answer = retrain.export(run_model, str(tmp_path / "api.onnx"), format="onnx")
    status, printed, _ = run_cli(["export", run_model, "--out", str(tmp_path / "cli.onnx")])
    assert status == 0
    assert answer["out"].endswith("api.onnx") and printed["out"].endswith("cli.onnx")
    assert {k: v for k, v in answer.items() if k != "out"} == {k: v for k, v in printed.items() if k != "out"}
    assert answer["test_split"]["split"] == "test"  # the run's held-out images checked either way


@pytest.mark.usefixtures("prefect_logs")
def test_score_writes_the_same_scores_as_the_command(random_model_file, dask_client, tmp_path):
    make_folder(tmp_path / "images", per_class=1, bad=False)
    images, address = str(tmp_path / "images"), dask_client.scheduler.address
    with pytest.warns(DeprecationWarning, match="use score_out="):  # the old keyword, for one release
        summary = retrain.score(random_model_file, images, out=str(tmp_path / "api"), dask_address=address)
    status, printed, _ = run_cli(
        ["score", random_model_file, images, "--score-out", str(tmp_path / "cli"), "--dask-address", address]
    )
    assert status == 0
    for key in ("images", "scored", "failed", "engine", "engine_reason", "decoder", "ui_url"):
        assert summary[key] == printed[key], key
    assert (summary["score_out"], printed["score_out"]) == (str(tmp_path / "api"), str(tmp_path / "cli"))
    assert_vocabulary(summary) and assert_vocabulary(printed)
    columns = ["path", "label", "score"]
    assert pd.read_parquet(summary["scores_url"])[columns].equals(pd.read_parquet(printed["scores_url"])[columns])


# Keys of the old vocabulary (docs/reference.md), in no answer of run, evaluate or score: a model's file is
# model_url, a promoted name model_name; an accuracy <split>_accuracy; a number of images images.
OLD_KEYS = {"model", "run", "counts", "count", "accuracy", "output", "out", "scores", "support"}
OLD_KEYS |= {"candidate_score", "current_score", "current_run"}
KEYED_BY_CLASS = {"labels", "class_images", "per_class"}  # their keys are class names


def assert_vocabulary(answer: dict, key: str = "") -> bool:
    """No old key anywhere in ``answer`` (nested too), and its floats rounded: accuracies and
    scores to 4 decimals, images/s to 1, seconds to 2."""
    if isinstance(answer, dict):
        for k, v in answer.items():
            assert key in KEYED_BY_CLASS or k not in OLD_KEYS, f"old key {k!r} in {answer}"
            assert_vocabulary(v, k)
    elif isinstance(answer, list):
        for v in answer:
            assert_vocabulary(v, key)
    elif isinstance(answer, float):
        places = 2 if key == "seconds" else 1 if key.startswith("images_per_second") else None
        places = 4 if key.endswith(("accuracy", "score")) else places
        assert places is None or answer == round(answer, places), (key, answer)
    return True
