import pytest
import torch

from retrain.tasks.datastore import index_images
from retrain.tasks.evaluation import classify_with, evaluate_model, evaluate_predictions, predictions_table
from retrain.tasks.inference import build_predictor
from retrain.tasks.model_file import load_model_file


def test_metrics_from_known_predictions():
    classes = ["a", "b", "c"]
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "b", "a"]
    result = evaluate_predictions(true, pred, classes)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.confusion == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert result.per_class["a"]["precision"] == pytest.approx(2 / 3)
    assert result.per_class["a"]["recall"] == pytest.approx(2 / 3)
    assert result.per_class["b"]["precision"] == pytest.approx(2 / 3) and result.per_class["b"]["recall"] == 1
    assert result.per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert "confusion (rows: true, columns: predicted)" in result.confusion_text()


def test_predictions_table_takes_the_best_score():
    scores = torch.tensor([[0.1, 0.9], [0.7, 0.3]])
    table = predictions_table(["x.jpg", "y.jpg"], ["b", "b"], scores, ["a", "b"])
    assert table["label"].tolist() == ["b", "a"]
    assert table["score"].tolist() == pytest.approx([0.9, 0.7])
    assert list(table.columns) == ["path", "true_label", "label", "score", "score:a", "score:b"]


def test_evaluate_model_and_classify_on_images(random_model_file, shapes_dir):
    loaded = load_model_file(random_model_file)
    index = index_images(shapes_dir)
    result, table = evaluate_model(loaded, index.images)
    assert result.count == 24 and sum(map(sum, result.confusion)) == 24
    assert len(table) == 24 and table["score"].between(0, 1).all()
    first = table.iloc[0]
    one = classify_with(build_predictor(loaded, engine="torch"), first["path"])
    assert one.label == first["label"] and one.score == pytest.approx(first["score"], abs=1e-5)
    assert sum(one.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_evaluating_classes_the_model_does_not_know_is_refused(random_model_file, shapes_dir):
    loaded = load_model_file(random_model_file)
    images = index_images(shapes_dir).images.copy()
    images.loc[0, "label"] = "hexagon"
    with pytest.raises(ValueError, match="not trained on: hexagon"):
        evaluate_model(loaded, images)
