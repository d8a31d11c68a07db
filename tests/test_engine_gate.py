"""The engine gate's images and rule (tasks/engine_gate.py): label agreement measured on every
image the run has (not a handful of held-out ones), each image decoded once for all engines,
too few images refused, and a record written by an older rule made again; the retraining
flow validates the model it publishes, so that scoring only reads the verdict."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retrain.tasks import engine_gate, inference, storage
from retrain.tasks.datastore import held_out, index_images, is_held_out
from retrain.tasks.model_file import load_model_file
from retrain.tasks.scoring.job import inspect_model


def _uniform_jpeg(path: Path) -> str:
    """A flat grey image: the one the planted engine gets wrong (its input has no variation)."""
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (120, 120, 120)).save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue())
    return str(path)


def _run_beside(folder: Path, model_file: str, split: pd.DataFrame) -> tuple[str, str]:
    """A run folder as the pipeline leaves it: model.pt and split.parquet side by side."""
    folder.mkdir(parents=True)
    model = folder / "model.pt"
    model.write_bytes(Path(model_file).read_bytes())
    split.to_parquet(folder / "split.parquet")
    return str(model), storage.sha256_of(str(model))


def _split(images: pd.DataFrame, train: int, val: int) -> pd.DataFrame:
    names = ["train"] * train + ["val"] * val + ["test"] * (len(images) - train - val)
    return images.assign(split=names).reset_index(drop=True)


def _disagrees_on_flat_images(real):
    """``build_predictor`` whose onnx-int8 predictor gives another label to a flat image (and
    float32's label to every other): a quantized model that is wrong on one training image."""

    def build(loaded, engine="torch", onnx_url=None, device=None, decoder="exact"):
        predictor = real(loaded, engine, onnx_url, device, decoder)
        if engine == "onnx-int8":
            forward = predictor.forward

            def wrong_on_flat(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                logits, embeddings = forward(x)
                flat = x.flatten(2).std(2).amax(1) < 2  # every channel constant
                return torch.where(flat[:, None], logits.roll(1, dims=1), logits), embeddings

            predictor.forward = wrong_on_flat
        return predictor

    return build


def _quick_gate(mp: pytest.MonkeyPatch) -> None:
    """No real quantization (int8 = the float32 ONNX file) and no speed runs: int8 'fastest',
    so that only its verdict can keep ``auto`` from picking it."""
    mp.setattr(engine_gate, "quantize_int8", lambda data, calibration: data)
    mp.setattr(engine_gate, "forward_rate", lambda predictor: 1000.0 if predictor.engine == "onnx-int8" else 10.0)


def _counting_loader(real, counts: dict):
    def counted(data: bytes, size, decoder: str = "exact") -> torch.Tensor:
        key = (decoder, hashlib.sha256(data).hexdigest())
        counts[key] = counts.get(key, 0) + 1
        return real(data, size, decoder)

    return counted


@pytest.fixture(scope="module")
def shapes(shapes_dir) -> pd.DataFrame:
    return index_images(shapes_dir).images[["path", "label"]].reset_index(drop=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, random_model_file, shapes) -> dict:
    """One gate run on 25 images: the 24 shapes (8 train, 8 val, 8 test) and a flat grey
    training image that the int8 engine labels differently. int8 is float32 ONNX here (an
    identity 'quantizer'), so the flat image is its only disagreement."""
    root = tmp_path_factory.mktemp("planted")
    flat = pd.DataFrame({"path": [_uniform_jpeg(root / "flat.jpg")], "label": ["circle"], "split": ["train"]})
    split = pd.concat([flat, _split(shapes, 8, 8)], ignore_index=True)
    model, sha = _run_beside(root / "run", random_model_file, split)
    counts: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        _quick_gate(mp)
        mp.setattr(engine_gate, "build_predictor", _disagrees_on_flat_images(engine_gate.build_predictor))
        mp.setattr(engine_gate, "load_image", _counting_loader(engine_gate.load_image, counts))
        choice = engine_gate.choose_engine(model, sha, "auto")
    folder = Path(engine_gate.engines_dir(model, sha))
    record = json.loads((folder / "validation.json").read_text())
    return {"model": model, "sha": sha, "choice": choice, "record": record, "counts": counts, "split": split}


def test_agreement_is_measured_on_every_image_of_the_run_not_only_the_held_out(planted):
    record, choice = planted["record"], planted["choice"]
    int8 = record["engines"]["onnx-int8"]
    # the flat image is a training image: the held-out 16 alone would have passed int8
    assert int8["images"] == 25 and int8["disagreements"] == 1 and not int8["passed"]
    assert int8["allowed_disagreements"] == 0  # 24/25 = 96 %, below 99.5 %
    assert int8["held_out_images"] == 16  # accuracy stays judged on the held-out part
    assert record["images"] == {"total": 25, "train": 9, "val": 8, "test": 8}
    assert record["engines"]["onnx"]["passed"] and record["engines"]["onnx"]["images"] == 25
    assert choice.engine != "onnx-int8"


def test_each_image_is_decoded_once_for_all_engines(planted):
    exact = [n for (decoder, _), n in planted["counts"].items() if decoder == "exact"]
    scaled = [n for (decoder, _), n in planted["counts"].items() if decoder == "scaled"]
    assert len(exact) == 25 and set(exact) == {1}  # calibration images included: they are in the set
    assert len(scaled) == 25 and set(scaled) == {1}  # the scaled decoder's own check


def test_the_scaled_check_decodes_again_only_what_it_decodes_its_own_way(tmp_path, random_model_file, monkeypatch):
    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)).resize((400, 400))
    paths = [str(tmp_path / "photo.jpg"), str(tmp_path / "photo.png")]
    photo.save(paths[0], "JPEG", quality=95)
    photo.save(paths[1], "PNG")
    counts: dict = {}
    monkeypatch.setattr(engine_gate, "load_image", _counting_loader(engine_gate.load_image, counts))
    reference = inference.build_predictor(load_model_file(random_model_file), "torch", device=torch.device("cpu"))
    scores, scaled = engine_gate._gate_scores({"torch": reference}, paths, {})
    assert sorted(decoder for decoder, _ in counts) == ["exact", "exact", "scaled"]  # the JPEG's own way only
    assert set(counts.values()) == {1}
    assert torch.allclose(scaled[1], scores["torch"][1], atol=1e-6)  # the PNG: the exact pixels


def test_the_gate_and_evaluation_hold_out_by_one_rule():
    split = pd.DataFrame({"path": list("abcdef"), "label": ["x"] * 6, "split": ["train", "val", "test"] * 2})
    assert engine_gate._held_out_mask(split).tolist() == is_held_out(split).tolist() == [False, True, True] * 2
    rows, which = held_out(split)  # evaluation: the test part, of the held-out ones
    assert which == "test" and list(rows["path"]) == ["c", "f"]
    rows, which = held_out(split[split["split"] != "test"])
    assert which == "val" and list(rows["path"]) == ["b", "e"]


def test_too_few_images_cannot_establish_agreement(tmp_path, random_model_file, shapes, monkeypatch):
    _quick_gate(monkeypatch)  # int8 is float32 ONNX here: it agrees on every image, and is still refused
    small = _split(shapes.iloc[:12], 6, 3)
    model, sha = _run_beside(tmp_path / "run", random_model_file, small)
    choice = engine_gate.choose_engine(model, sha, "auto")
    record = json.loads(Path(engine_gate.engines_dir(model, sha), "validation.json").read_text())
    assert record["engines"]["onnx-int8"]["disagreements"] == 0
    for engine, verdict in record["engines"].items():
        assert verdict["images"] == 12
        assert verdict["passed"] == (engine == "torch"), engine
        if engine != "torch":
            assert verdict["allowed_disagreements"] is None
    assert not record["decoders"]["scaled"]["passed"]
    assert choice.engine == "torch" and choice.decoder == "exact"
    assert "12 images" in choice.reason and str(engine_gate.MIN_GATE_IMAGES) in choice.reason


@pytest.mark.parametrize(
    ("images", "allowed"), [(0, None), (19, None), (20, 0), (75, 0), (199, 0), (200, 1), (245, 1), (1000, 5)]
)
def test_allowed_disagreements(images, allowed):
    assert engine_gate.allowed_disagreements(images) == allowed


def test_large_runs_are_sampled_held_out_first_with_calibration_from_the_sample(tmp_path):
    def split_of(train: int, held: int) -> pd.DataFrame:
        names = ["train"] * train + ["val", "test"] * (held // 2)
        paths = [f"/data/{i:05d}.jpg" for i in range(len(names))]
        return pd.DataFrame({"path": paths, "label": ["a", "b"] * (len(names) // 2), "split": names})

    for train, held in ((1680, 720), (400, 3000), (600, 300)):
        run = tmp_path / f"run-{train}-{held}"
        run.mkdir()
        split_of(train, held).to_parquet(run / "split.parquet")
        images, calibration = engine_gate.gate_images(str(run / "model.pt"))
        total = train + held
        assert len(images) == min(total, engine_gate.AGREEMENT_IMAGES) and images["path"].is_unique
        in_sample = images[images["split"] == "train"]["path"]
        expected_held = min(held, engine_gate.AGREEMENT_IMAGES - engine_gate.CALIBRATION_IMAGES)
        assert (images["split"] != "train").sum() == expected_held
        assert len(calibration) == engine_gate.CALIBRATION_IMAGES and set(calibration) <= set(in_sample)
    # the same run gives the same images (seeded), so a record can be remade and compared
    again, _ = engine_gate.gate_images(str(tmp_path / "run-1680-720" / "model.pt"))
    first, _ = engine_gate.gate_images(str(tmp_path / "run-1680-720" / "model.pt"))
    assert list(again["path"]) == list(first["path"])


def _stale_record(folder: Path, sha: str, **changes) -> None:
    """What the previous gate (version 3) left: int8 passed on 8 held-out images."""
    verdict = {"images": 8, "agreement": 1.0, "max_score_difference": 0.01, "passed": True}
    record = {
        "gate_version": 3,
        "model_sha256": sha,
        "files": {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"},
        "engines": {"torch": verdict, "onnx": verdict, "onnx-int8": verdict},
        "decoders": {"scaled": verdict},
        "speeds": {inference.hardware_key(torch.device("cpu")): {"torch": 1.0, "onnx": 2.0, "onnx-int8": 9.0}},
        "validated": True,
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.json").write_text(json.dumps(record))


def test_a_record_of_an_older_rule_is_made_again_before_score_trusts_it(tmp_path, random_model_file, planted):
    """``retrain score`` (engine auto) takes its engine from inspect_model -> choose_engine."""
    model, sha = _run_beside(tmp_path / "run", random_model_file, planted["split"])
    folder = Path(engine_gate.engines_dir(model, sha))
    _stale_record(folder, sha)
    with pytest.MonkeyPatch.context() as mp:
        _quick_gate(mp)
        mp.setattr(engine_gate, "build_predictor", _disagrees_on_flat_images(engine_gate.build_predictor))
        info = inspect_model(model, "auto")
        record = json.loads((folder / "validation.json").read_text())
        assert record["rule"] == engine_gate.gate_rule() and record["engines"]["onnx-int8"]["images"] == 25
        assert info.engine.engine != "onnx-int8" and not record["engines"]["onnx-int8"]["passed"]
        forced = engine_gate.choose_engine(model, sha, "onnx-int8")  # the new record answers
        # the same version number with another rule (a changed threshold, say) is no more trusted
        _stale_record(folder, sha, gate_version=engine_gate.GATE_VERSION, rule={**engine_gate.gate_rule(), "images": 8})
        assert engine_gate.existing_record(model, sha, torch.device("cpu")) is None
        assert "FAILED" in forced.reason and "1 of 25" in forced.reason


def test_record_lists_the_rule_and_the_sample(planted):
    record = planted["record"]
    assert record["gate_version"] == engine_gate.GATE_VERSION and record["rule"] == engine_gate.gate_rule()
    assert np.isclose(record["engines"]["onnx"]["agreement"], 1.0)


@pytest.mark.validates_engines
def test_the_flow_validates_its_model_so_that_scoring_only_reads_the_verdict(prefect_api, shapes_dir, tmp_path):
    """A run killed after publishing, before its engines were validated: the same command
    finishes that run (validating on training's decoded pixels, decoding none again); scoring
    then reads the verdict; a model with no record (published before this step) validates on
    first use."""
    from retrain.flows import pipeline

    kwargs = dict(
        data=shapes_dir,
        store=str(tmp_path / "store"),
        network="squeezenet-caffe",
        weights="none",
        options={"max_epochs": 1, "mini_batch_size": 8},
        promote=False,
        label_issues="off",
    )

    def power_cut(run_url: str) -> dict:
        raise KeyboardInterrupt("power cut")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "validate", power_cut)
        with pytest.raises(KeyboardInterrupt, match="power cut"):
            pipeline.retrain_flow(**kwargs)
    (run,) = (tmp_path / "store" / "runs").iterdir()
    model = str(run / "model.pt")
    sha = storage.sha256_of(model)
    validation = Path(engine_gate.engines_dir(model, sha), "validation.json")
    assert Path(model).exists() and not validation.exists()

    counts: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        _quick_gate(mp)  # int8 'fastest' and passing (it is float32 ONNX here)
        mp.setattr(engine_gate, "load_image", _counting_loader(engine_gate.load_image, counts))
        summary = pipeline.retrain_flow(**kwargs)
    engines = summary["engines"]
    assert summary["run_id"] == run.name and engines["validation_url"] == str(validation) and validation.exists()
    assert engines["auto"] == engines["passed"][0] == "onnx-int8" and "torch" in engines["passed"]
    assert json.loads((run / "summary.json").read_text())["engines"] == engines
    assert json.loads(validation.read_text())["images"]["total"] == 24
    assert not [key for key in counts if key[0] == "exact"]  # read back from the run's image shards

    made = validation.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_gate, "validate_engines", lambda *a, **k: pytest.fail("scoring validated again"))
        assert inspect_model(model, "auto").engine.engine == engines["auto"]
    assert validation.stat().st_mtime_ns == made

    shutil.rmtree(validation.parent.parent)  # as a model published before the flow validated
    with pytest.MonkeyPatch.context() as mp:
        _quick_gate(mp)
        assert inspect_model(model, "auto").engine.engine == "onnx-int8" and validation.exists()
