"""Drift on every scoring job (issue 23, item 2): the model file's reference profile, the
embeddings every engine gives from the same forward pass, the three tests and their verdict,
drift.json beside scores.parquet, and no verdict where there can be none."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from retrain.tasks import drift, scoring, storage
from retrain.tasks.evaluation import predict_images, reference_predictor
from retrain.tasks.export import onnx_bytes
from retrain.tasks.inference import build_predictor
from retrain.tasks.model_file import load_model_file, read_model_record, save_model_file
from retrain.tasks.preprocessing import load_images
from retrain.tasks.samples import make_shapes_dataset

CLASSES = ["circle", "square", "triangle"]


def _reference(rng: np.random.Generator, n: int = 200, shift: float = 0.0) -> dict:
    scores = torch.softmax(torch.from_numpy(rng.normal(size=(n, 3)) * 2 + shift).float(), 1)
    embeddings = torch.from_numpy(rng.normal(size=(n, 16))).float()
    return drift.reference_profile(scores, embeddings, CLASSES, "val+test")


def _job(rng: np.random.Generator, n: int, mix=(1, 1, 1), sharper: float = 1.0, moved: float = 0.0):
    labels = rng.choice(3, size=n, p=np.asarray(mix) / sum(mix))
    counts = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    logits = rng.normal(size=(n, 3)) * 2 * sharper
    confidence = torch.softmax(torch.from_numpy(logits), 1).max(1).values.numpy()
    embeddings = rng.normal(size=(n, 16)) + moved
    return counts, confidence, embeddings.astype(np.float32)


def test_each_test_flags_its_own_kind_of_change_and_a_like_sample_is_no_drift():
    rng = np.random.default_rng(0)
    reference = _reference(rng)
    same = drift.judge(reference, CLASSES, *_job(rng, 300, mix=reference["label_counts"]))
    assert same["drift"] is False and [t["name"] for t in same["tests"]] == ["class_mix", "confidence", "embedding"]
    assert all(t["p_value"] > t["threshold"] == pytest.approx(drift.ALPHA / 3) for t in same["tests"])

    def flagged(result: dict) -> list[str]:
        assert result["drift"] is True
        return [t["name"] for t in result["tests"] if t["drift"]]

    assert flagged(drift.judge(reference, CLASSES, *_job(rng, 300, mix=(8, 1, 1)))) == ["class_mix"]
    assert "confidence" in flagged(drift.judge(reference, CLASSES, *_job(rng, 300, sharper=4.0)))
    assert flagged(drift.judge(reference, CLASSES, *_job(rng, 300, moved=0.5))) == ["embedding"]
    assert "DRIFT" in drift.verdict_line(drift.judge(reference, CLASSES, *_job(rng, 300, moved=0.5)))


def test_no_verdict_without_a_reference_with_too_few_images_or_without_embeddings():
    rng = np.random.default_rng(1)
    reference = _reference(rng)
    old = drift.judge(None, CLASSES, *_job(rng, 300))
    assert old["drift"] is None and "no reference profile" in old["reason"] and old["images"] == 300
    few = drift.judge(reference, CLASSES, *_job(rng, drift.MIN_JOB_IMAGES - 1))
    assert few["drift"] is None and "too few images" in few["reason"] and few["tests"] == []
    small = drift.judge(_reference(rng, n=drift.MIN_REFERENCE_IMAGES - 1), CLASSES, *_job(rng, 300))
    assert small["drift"] is None and "reference holds" in small["reason"]
    counts, confidence, _ = _job(rng, 300)
    unembedded = drift.judge(reference, CLASSES, counts, confidence, None)
    assert [t["name"] for t in unembedded["tests"]] == ["class_mix", "confidence"]
    assert "no embedding test" in unembedded["reason"] and unembedded["tests"][0]["threshold"] == drift.ALPHA / 2


def test_mmd_permutation_p_value_is_small_for_a_shift_and_not_for_the_same_distribution():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 8, generator=generator), torch.randn(150, 8, generator=generator)
    assert drift.mmd_test(x, y, 200)[1] > 0.05
    statistic, p_value = drift.mmd_test(x, y + 0.6, 200)
    assert statistic > 0 and p_value == pytest.approx(1 / 201)


def test_every_engine_gives_the_embedding_from_the_same_forward_pass(random_model_file, shapes_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    loaded = load_model_file(random_model_file)
    paths = [str(p) for p in sorted(storage.list_files(shapes_dir))[:6]]
    scores, embeddings = predict_images(reference_predictor(loaded), paths)
    assert embeddings.shape == (6, 512)  # SqueezeNet: conv10's 512 input channels, pooled
    onnx_url = storage.write_bytes(str(tmp_path / "model.onnx"), onnx_bytes(loaded))
    exported = build_predictor(loaded, "onnx", onnx_url, device=torch.device("cpu"))
    onnx_scores, onnx_embeddings = exported.scores_and_embeddings(load_images(paths, loaded.preprocessing.input_size))
    torch.testing.assert_close(onnx_embeddings, embeddings, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(onnx_scores, scores, rtol=1e-3, atol=1e-4)


def _darkened(folder: str, out) -> str:
    for url in storage.list_files(folder):
        image = Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB")
        dark = Image.fromarray((np.asarray(image) * 0.3).astype(np.uint8)).filter(ImageFilter.GaussianBlur(4))
        buffer = io.BytesIO()
        dark.save(buffer, format="JPEG")
        storage.write_bytes(str(out / url[len(folder) :].lstrip("/")), buffer.getvalue())
    return str(out)


def test_a_scoring_job_writes_drift_json_against_the_model_files_reference(random_model_file, tmp_path, dask_client):
    # A model file with a reference profile taken as evaluation takes it: float32 torch on
    # held-out images (here 60 shapes drawn like the folder scored next, with another seed).
    held = make_shapes_dataset(str(tmp_path / "held"), per_class=20, size=64, seed=1)
    loaded = load_model_file(random_model_file)
    scores, embeddings = predict_images(reference_predictor(loaded), sorted(storage.list_files(held)))
    record = read_model_record(random_model_file)
    record["reference"] = drift.reference_profile(scores, embeddings, loaded.classes, "val+test")
    model = save_model_file(str(tmp_path / "model.pt"), record)

    like = make_shapes_dataset(str(tmp_path / "like"), per_class=20, size=64, seed=2)
    summary = scoring.score_job(model, like, str(tmp_path / "out-like"), engine="torch", client=dask_client)
    assert summary["drift"] == storage.read_json(str(tmp_path / "out-like" / "drift.json"))
    assert summary["drift"]["drift"] is False and summary["drift"]["images"] == 60
    assert summary["drift"]["embeddings"] == 60 and not storage.exists(str(tmp_path / "out-like" / "drift.png"))

    dark = _darkened(like, tmp_path / "dark")
    shifted = scoring.score_job(model, dark, str(tmp_path / "out-dark"), engine="torch", client=dask_client)
    assert shifted["drift"]["drift"] is True
    assert any(t["drift"] for t in shifted["drift"]["tests"] if t["name"] == "embedding")
    assert shifted["drift"]["plot"] == str(tmp_path / "out-dark" / "drift.png")  # the chart: where drift is
    assert sum(shifted["drift"]["confidence_histogram"]["job"]) == 60

    # a rerun scores nothing new: no verdict on no images, and no chart of an earlier verdict
    again = scoring.score_job(model, dark, str(tmp_path / "out-dark"), engine="torch", client=dask_client)
    assert again["drift"]["drift"] is None and "too few images" in again["drift"]["reason"]
    assert not storage.exists(str(tmp_path / "out-dark" / "drift.png"))

    # a model file from before reference profiles scores as before, with the reason
    old = scoring.score_job(random_model_file, like, str(tmp_path / "out-old"), engine="torch", client=dask_client)
    assert old["drift"]["drift"] is None and "no reference profile" in old["drift"]["reason"]
    assert old["images"] == 60
