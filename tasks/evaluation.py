"""Scores to labels, accuracy, the confusion matrix and per-class metrics.

Every prediction goes through :mod:`tasks.inference` (one preprocessing, one forward loop):
:func:`predict_scores` serves validation during training, :func:`evaluate_model` the test
split, ``retrain evaluate`` and the promotion gate, :func:`classify_with` ``retrain classify``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from retrain.tasks import storage
from retrain.tasks.datastore import held_out, is_held_out
from retrain.tasks.drift import reference_profile
from retrain.tasks.inference import Predictor, check_model, prepare_torch_model, torch_predictor
from retrain.tasks.model_file import LoadedModel, load_model_file
from retrain.tasks.preprocessing import ImageDecodeError, Preprocessing, load_image, load_images
from retrain.tasks.reports import confusion_chart

EVAL_CHUNK_IMAGES = 1024  # images decoded at once by evaluate_model (155 MB at 227 x 227)


def predict_scores(
    model: nn.Module,
    images: torch.Tensor,
    preprocessing: Preprocessing,
    device: torch.device | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Softmax scores (N x K, on the CPU) for a uint8 batch of images at the input size, from
    an in-memory model (training's validation); its training mode is restored after."""
    was_training = model.training
    try:
        return torch_predictor(model, preprocessing, [], device).scores(images, batch_size)
    finally:
        model.train(was_training)


@dataclass
class Evaluation:
    classes: list[str]
    accuracy: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    per_class: dict[str, dict[str, float]]  # precision, recall, f1, support
    count: int

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "confusion": self.confusion,
            "per_class": self.per_class,
            "classes": self.classes,
            "count": self.count,
        }

    def per_class_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"class": c, **m} for c, m in self.per_class.items()])

    def confusion_text(self) -> str:
        width = max(8, *(len(c) for c in self.classes)) + 1
        head = " " * width + "".join(f"{c[: width - 1]:>{width}}" for c in self.classes)
        rows = [f"{c:<{width}}" + "".join(f"{v:>{width}}" for v in row) for c, row in zip(self.classes, self.confusion)]
        return "\n".join(["confusion (rows: true, columns: predicted)", head, *rows])


def evaluate_predictions(true_labels: list[str], predicted_labels: list[str], classes: list[str]) -> Evaluation:
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(true_labels, predicted_labels):
        confusion[index[t], index[p]] += 1
    per_class = {}
    for i, c in enumerate(classes):
        tp = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        precision = float(tp / predicted) if predicted else 0.0
        recall = float(tp / actual) if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
    n = int(confusion.sum())
    return Evaluation(classes, float(np.trace(confusion) / n) if n else 0.0, confusion.tolist(), per_class, n)


def predictions_table(
    paths: list[str], true_labels: list[str] | None, scores: torch.Tensor, classes: list[str]
) -> pd.DataFrame:
    """One row per image: predicted label and its score, the true label when known, and the
    score of every class."""
    best = scores.argmax(dim=1)
    frame = pd.DataFrame(
        {
            "path": paths,
            "label": [classes[i] for i in best.tolist()],
            "score": scores.gather(1, best[:, None]).squeeze(1).tolist(),
        }
    )
    if true_labels is not None:
        frame.insert(1, "true_label", list(true_labels))
    for j, c in enumerate(classes):
        frame[f"score:{c}"] = scores[:, j].tolist()
    return frame


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


def classify_with(predictor: Predictor, image_url: str) -> Classification:
    """Label and score for one new image (MATLAB's ``scores2label(predict(net, I))``); an
    image that cannot be used raises :class:`ImageDecodeError` naming the file and why."""
    try:
        pixels = load_image(image_url, predictor.preprocessing.input_size, predictor.decoder)
    except IsADirectoryError:
        raise ImageDecodeError(
            f"{image_url} is a folder, not an image file (score a folder with `retrain score`)"
        ) from None
    scores = predictor.scores(pixels[None])[0]
    best = int(scores.argmax())
    classes = predictor.classes
    return Classification(classes[best], float(scores[best]), {c: float(s) for c, s in zip(classes, scores.tolist())})


def evaluate_model(
    loaded: LoadedModel,
    images: pd.DataFrame,
    batch_size: int = 64,
    device: torch.device | None = None,
    predictor: Predictor | None = None,
) -> tuple[Evaluation, pd.DataFrame]:
    """Predict every image of an index (columns path, label) and score the predictions, with
    ``predictor`` (an engine chosen by the caller) or float32 torch. Labels the model does not
    know are refused: accuracy over them would mean nothing."""
    unknown = sorted(set(images["label"]) - set(loaded.classes))
    if unknown:
        raise ValueError(
            f"the data has classes the model was not trained on: {', '.join(unknown)} "
            f"(model classes: {', '.join(loaded.classes)})"
        )
    if predictor is None:
        check_model(loaded, "the model")
        predictor = reference_predictor(loaded, device)
    scores, _ = predict_images(predictor, list(images["path"]), batch_size)
    table = predictions_table(list(images["path"]), list(images["label"]), scores, loaded.classes)
    return evaluate_predictions(list(table["true_label"]), list(table["label"]), loaded.classes), table


def reference_predictor(loaded: LoadedModel, device: torch.device | None = None) -> Predictor:
    """Float32 torch on the model's device, giving embeddings too: what evaluation judges with."""
    device = device or next(loaded.model.parameters()).device
    return torch_predictor(
        prepare_torch_model(loaded.model, device),
        loaded.preprocessing,
        loaded.classes,
        head_layer=loaded.spec.head_layer,
    )


def predict_images(
    predictor: Predictor, paths: list[str], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax scores and embeddings (None where the engine gives none) of image files,
    decoded a chunk at a time, so memory does not grow with the number of images; a chunk is
    a whole number of batches, so the forward passes are the ones one batch would make."""
    chunk = batch_size * max(1, EVAL_CHUNK_IMAGES // batch_size)
    size, decoder = predictor.preprocessing.input_size, predictor.decoder
    parts = [
        predictor.scores_and_embeddings(load_images(paths[s : s + chunk], size, decoder), batch_size)
        for s in range(0, len(paths), chunk)
    ]
    if not parts:
        return torch.empty((0, len(predictor.classes))), None
    embeddings = [e for _, e in parts]
    return torch.cat([s for s, _ in parts]), None if any(e is None for e in embeddings) else torch.cat(embeddings)


def evaluate_run(run_url: str) -> dict:
    """The evaluate stage: the trained network on the run's held-out images, in one pass: its
    test split (or val, without one) gives ``predictions.parquet``, ``metrics.json`` and
    ``confusion.png``; all of them (val and test) the drift reference profile, ``reference.pt``
    (tasks/drift.py), which publishing puts in the model file. Returns the metrics."""
    layout = storage.RunLayout(run_url)
    loaded = load_model_file(layout.trained)
    split = storage.read_parquet(layout.split)
    test, _ = held_out(split)
    held = split[is_held_out(split)]
    scores, embeddings = predict_images(reference_predictor(loaded), list(held["path"]))
    is_test = torch.from_numpy(held.index.isin(test.index))
    table = predictions_table(list(test["path"]), list(test["label"]), scores[is_test], loaded.classes)
    result = evaluate_predictions(list(table["true_label"]), list(table["label"]), loaded.classes)
    storage.write_parquet(layout.predictions, table)
    confusion_url = confusion_chart(result.confusion, result.classes, layout.confusion, title="Test set")
    metrics = {
        "test_accuracy": result.accuracy if result.count else None,  # a split with no held-out part
        "test_images": result.count,
        "val_accuracy": loaded.meta["metrics"].get("val_accuracy"),
        "per_class": result.per_class,
        "confusion": result.confusion,
        "classes": result.classes,
        "confusion_chart": confusion_url,
    }
    parts = "+".join(sorted(held["split"].unique()))
    profile = reference_profile(scores, embeddings, loaded.classes, parts)
    buffer = io.BytesIO()
    torch.save(profile, buffer)
    storage.write_bytes(layout.reference, buffer.getvalue())
    storage.write_json(layout.metrics, metrics)
    return metrics
