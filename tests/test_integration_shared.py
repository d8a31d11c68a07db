"""The seed's workflow on the real data and weights in ../shared (skipped where absent)."""

from pathlib import Path

import pytest

from retrain.cli import main
from tests.conftest import HYMENOPTERA, MERCH_ZIP, last_json, need

pytestmark = pytest.mark.integration


def caffe_run(data: str, store: str, weights: str, *flags: str) -> list[str]:
    """``retrain run`` of the Caffe SqueezeNet with its real weights, --json."""
    return ["run", data, "--store", store, "--network", "squeezenet-caffe", "--weights", weights, *flags, "--json"]


def test_merchdata_transfer_learning_with_the_caffe_squeezenet(prefect_api, caffe_weights, tmp_path, capsys):
    zip_path = need(MERCH_ZIP)
    store = str(tmp_path / "store")
    assert main(caffe_run(str(zip_path), store, caffe_weights, "--seed", "0")) == 0
    result = last_json(capsys)
    assert len(result["classes"]) == 5 and all(n == 15 for n in result["class_images"].values())
    assert result["test_accuracy"] >= 0.9  # MATLAB reports 1.0; one image is 10 points here
    cap = next((Path(result["run_url"]).parent.parent / "datasets").rglob("MathWorks Cap/*.jpg"))
    assert main(["classify", result["run_id"], str(cap), "--store", store, "--json"]) == 0
    assert last_json(capsys)["label"] == "MathWorks Cap"


def test_hymenoptera_train_then_evaluate_on_val(prefect_api, caffe_weights, tmp_path, capsys):
    root = need(HYMENOPTERA)
    store = str(tmp_path / "store")
    assert (
        main(caffe_run(str(root / "train"), store, caffe_weights, "--split", "0.85,0.15,0", "--max-epochs", "3")) == 0
    )
    result = last_json(capsys)
    assert result["images"] == 245  # the GIF and "ant photos.jpg" included
    assert main(["evaluate", result["model_url"], str(root / "val"), "--json"]) == 0
    evaluation = last_json(capsys)
    assert sum(map(sum, evaluation["confusion"])) == 153
    assert evaluation["data_accuracy"] >= 0.8
