"""Explanations (tasks/explain.py): top losses, Grad-CAM, and classify --explain."""

import json
import os
import shutil

import pandas as pd
import torch
from PIL import Image
from torch import nn

from retrain.cli import main
from retrain.tasks.datastore import index_images
from retrain.tasks.evaluation import evaluate_model
from retrain.tasks.explain import explain_run, find_cam_layer, grad_cam, top_losses
from retrain.tasks.model_file import load_model_file


def test_top_losses_ranks_by_the_loss_of_the_true_class():
    predictions = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "true_label": ["cat", "cat", "dog", "dog"],
            "label": ["cat", "dog", "dog", "cat"],
            "score": [0.9, 0.6, 0.55, 0.99],
            "score:cat": [0.9, 0.4, 0.45, 0.99],
            "score:dog": [0.1, 0.6, 0.55, 0.01],
        }
    )
    worst = top_losses(predictions, count=3)
    assert list(worst["path"]) == ["d", "b", "c"]  # true-class scores 0.01, 0.4, 0.55
    assert worst["loss"].iloc[0] == torch.tensor(0.01, dtype=torch.float64).log().neg().item()


class RedDetector(nn.Module):
    """Class 0 = "red here": a 1x1 conv that sees only red, pooled, into a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].bias.zero_()
            self.features[0].weight[0, 0] = 1.0  # channel 0: red
            self.features[0].weight[1, 1] = 1.0  # channel 1: green
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_grad_cam_puts_the_evidence_where_the_red_square_is():
    model = RedDetector()
    assert find_cam_layer(model, (32, 32)) == "features"
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 4:12, 20:28] = 1.0  # red square, top right
    x[0, 1, 24:30, 2:8] = 0.2  # a little green, bottom left
    result = grad_cam(model, x, "features")
    assert result.predicted == [0] and result.scores[0] > 0.5
    heat = result.heatmaps[0]
    assert heat.shape == (32, 32) and heat.max() == 1.0
    assert heat[4:12, 20:28].mean() > 0.9 and heat[24:30, 2:8].max() < 0.05  # green is evidence against "red"
    # explaining the other class shows the green patch instead
    other = grad_cam(model, x, "features", target=[1]).heatmaps[0]
    assert other[24:30, 2:8].mean() > 0.9 and other[4:12, 20:28].max() < 0.05


def test_every_run_folder_gets_mistakes_and_gradcam(random_model_file, shapes_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(random_model_file, run / "trained.pt")
    _, table = evaluate_model(load_model_file(random_model_file), index_images(shapes_dir).images)
    table.to_parquet(run / "predictions.parquet")
    result = explain_run(str(run), mistakes=4, sample=5)
    assert result["images"] == len(table) and result["wrong"] == int((table["label"] != table["true_label"]).sum())
    for name in ("mistakes.png", "gradcam.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.width > 400


def test_classify_explain_writes_the_overlay(random_model_file, shapes_dir, tmp_path, capsys):
    image = os.path.join(shapes_dir, "circle", sorted(os.listdir(os.path.join(shapes_dir, "circle")))[0])
    out = tmp_path / "why.png"
    assert main(["classify", random_model_file, image, "--explain", str(out), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["explanation"] == str(out) and answer["label"] in ("circle", "square", "triangle")
    with Image.open(out) as overlay:
        assert overlay.format == "PNG"
