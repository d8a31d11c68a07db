"""The retrain flow end to end on tiny generated images, through the CLI as a user runs it."""

import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from retrain.answers import decision_answer
from retrain.cli import main
from retrain.flows.pipeline import retrain_flow
from retrain.tasks.runs import read_run
from tests.conftest import last_json, tiny_run_flags
from tests.test_api import assert_vocabulary

FAST = tiny_run_flags(max_epochs=2, validation_frequency=2)


def test_run_evaluate_classify_through_the_cli(prefect_api, shapes_dir, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["run", shapes_dir, "--store", store, "--json", "--seed", "1", *FAST]) == 0
    result = last_json(capsys)
    for key in ("run_id", "model_url", "classes", "test_accuracy", "val_accuracy", "seconds"):
        assert key in result
    assert result["classes"] == ["circle", "square", "triangle"]
    assert_vocabulary(result) and result["images"] == sum(result["class_images"].values()) == 24
    run = Path(result["run_url"])
    for name in (
        "run.json",
        "index.parquet",
        "skipped.csv",
        "split.parquet",
        "montage.png",
        "network.txt",
        "history.csv",
        "progress.png",
        "trained.pt",
        "metrics.json",
        "confusion.png",
        "predictions.parquet",
        "model.pt",
        "summary.json",
    ):
        assert (run / name).exists(), name
    assert list((run / "checkpoints").glob("iter-*.pt"))
    assert read_run(str(run))["status"] == "completed"
    assert "conv10" in (run / "network.txt").read_text()
    recorded = json.loads((run / "summary.json").read_text())
    assert decision_answer(recorded["promotion"]) == result["promotion"] and result["promotion"]["promoted"]

    record = torch.load(result["model_url"], weights_only=True)  # self-describing, safe to load
    assert record["classes"] == result["classes"] and record["network"] == "squeezenet-caffe"
    assert round(record["metrics"]["test_accuracy"], 4) == result["test_accuracy"]
    assert record["training"]["mode"] == "transfer" and record["training"]["options"]["seed"] == 1

    assert main(["evaluate", result["model_url"], shapes_dir, "--json"]) == 0
    evaluation = last_json(capsys)
    assert set(evaluation) >= {"data_accuracy", "per_class", "confusion"}
    assert sum(map(sum, evaluation["confusion"])) == 24

    image = str(Path(shapes_dir) / "square" / "square_000.jpg")
    assert main(["classify", result["run_id"], image, "--store", store, "--json"]) == 0
    one = last_json(capsys)
    assert one["label"] in result["classes"] and 0 <= one["score"] <= 1

    assert main(["classify", result["model_url"], image]) == 0  # for people: "label (score)"
    assert capsys.readouterr().out.strip().startswith(one["label"])


def test_interrupted_run_resumes_from_its_checkpoint(prefect_api, shapes_dir, tmp_path, monkeypatch):
    import retrain.tasks.training.loop as training

    store = str(tmp_path / "store")
    options = {"max_epochs": 3, "mini_batch_size": 8, "checkpoint_frequency": 1}
    real_save = training.save_checkpoint
    saved = []

    def crash_after_first_checkpoint(*args, **kwargs):
        if saved:
            raise KeyboardInterrupt("power cut")
        saved.append(real_save(*args, **kwargs))
        return saved[-1]

    monkeypatch.setattr(training, "save_checkpoint", crash_after_first_checkpoint)
    kwargs = dict(
        data=shapes_dir, store=store, network="squeezenet-caffe", weights="none", options=options, promote=False
    )
    with pytest.raises(KeyboardInterrupt, match="power cut"):
        retrain_flow(**kwargs)
    runs = list((Path(store) / "runs").iterdir())
    assert len(runs) == 1 and read_run(str(runs[0]))["status"] == "failed"
    monkeypatch.setattr(training, "save_checkpoint", real_save)

    summary = retrain_flow(**kwargs)
    assert summary["run_id"] == runs[0].name  # the same run, resumed
    assert summary["resumed_from"] == 2 and summary["iterations"] == 6
    assert read_run(summary["run"])["status"] == "completed"
    again = retrain_flow(**kwargs)  # a finished run is not resumed: a new run starts
    assert again["run_id"] != summary["run_id"]


def test_bad_data_stops_with_a_clear_error_and_json(prefect_api, shapes_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "lonely").mkdir()
    shutil.copy(data / "circle" / "circle_000.jpg", data / "lonely" / "x.jpg")
    (data / "circle" / "circle_000.jpg").unlink()
    assert main(["run", str(data), "--store", str(tmp_path / "store"), "--json", *FAST]) == 2
    captured = capsys.readouterr()
    assert "'lonely' has 1 image" in json.loads(captured.out.strip().splitlines()[-1])["error"]
    assert "lonely" in captured.err


def test_default_network_offline_names_the_local_weights_option(prefect_api, shapes_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert main(["run", shapes_dir, "--store", str(tmp_path / "store"), "--json"]) == 2
    error = last_json(capsys)["error"]
    assert "--weights" in error and "squeezenet-caffe" in error


def test_bad_option_is_refused_before_any_work(prefect_api, shapes_dir, tmp_path, capsys):
    assert main(["run", shapes_dir, "--store", str(tmp_path / "store"), "--json", "--mini-batch-size", "0"]) == 2
    assert "mini_batch_size" in last_json(capsys)["error"]
    assert not (tmp_path / "store" / "runs").exists()


def test_network_and_runs_commands(capsys, tmp_path):
    assert main(["network", "--json"]) == 0
    assert "squeezenet-caffe" in last_json(capsys)["networks"]
    assert main(["network", "squeezenet", "--classes", "5", "--json"]) == 0
    info = last_json(capsys)
    assert info["head_layer"] == "conv10" and info["input_size"] == [224, 224]
    assert main(["runs", "--store", str(tmp_path), "--json"]) == 0
    assert last_json(capsys) == {"runs": []}
