"""The inference path (tasks/inference.py) and the engine gate (tasks/engine_gate.py): one
model check for every command, engines that agree with float32 torch, and a gate that never
picks an engine that disagrees."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from retrain.tasks import engine_gate, inference, storage
from retrain.tasks.datastore import index_images
from retrain.tasks.model_file import ModelFileError, load_model_file, save_model_file
from retrain.tasks.preprocessing import load_image
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def held_out(shapes_dir) -> pd.DataFrame:
    return index_images(shapes_dir).images[["path", "label"]].reset_index(drop=True)


def test_onnx_engines_give_the_torch_labels(random_model_file, held_out):
    loaded = load_model_file(random_model_file)
    pixels = torch.stack([load_image(Path(p).read_bytes(), (227, 227)) for p in held_out["path"]])
    reference = inference.build_predictor(loaded, "torch").scores(pixels)
    folder = str(Path(random_model_file).parent / "engines-test")
    record = engine_gate.validate_engines(
        random_model_file,
        storage.sha256_of(random_model_file),
        images=held_out,
        calibration=list(held_out["path"]),
        folder=folder,
    )
    onnx = inference.build_predictor(load_model_file(random_model_file), "onnx", f"{folder}/model.onnx")
    scores = onnx.scores(pixels, batch_size=5)  # batches of 5 and a last of 4: the batch axis is dynamic
    assert (scores.argmax(1) == reference.argmax(1)).all()
    assert (scores - reference).abs().max() < 1e-4
    assert record["engines"]["onnx"]["passed"] and record["engines"]["onnx"]["agreement"] == 1.0
    assert "onnx-int8" in record["engines"] and Path(folder, "model-int8.onnx").exists()
    passed = {engine for engine, verdict in record["engines"].items() if verdict["passed"]}
    assert set(record["speeds"][inference.hardware_key(torch.device("cpu"))]) == passed >= {"torch", "onnx"}
    # bf16 is offered only where the hardware computes it (not emulated, 15x slower)
    assert ("torch-bf16" in inference.supported_engines(torch.device("cpu"))) == inference.cpu_has_bf16()


def _negated(onnx_data: bytes, calibration) -> bytes:
    """A 'quantized' model whose logits are negated: every top label differs from float32's."""
    import onnx
    from onnx import helper

    proto = onnx.load_from_string(onnx_data)
    out = proto.graph.output[0]  # the logits (the second output is the embedding)
    last = next(node for node in proto.graph.node if out.name in node.output)
    last.output[list(last.output).index(out.name)] = "before_negation"
    proto.graph.node.append(helper.make_node("Neg", ["before_negation"], [out.name]))
    return proto.SerializeToString()


def test_gate_refuses_a_quantized_model_that_disagrees(tmp_path, random_model_file, held_out, monkeypatch):
    model = tmp_path / "run" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(Path(random_model_file).read_bytes())
    sha = storage.sha256_of(str(model))
    monkeypatch.setattr(engine_gate, "quantize_int8", _negated)
    held = {"images": held_out, "calibration": list(held_out["path"])}

    auto = engine_gate.choose_engine(str(model), sha, "auto", **held)
    record = json.loads((tmp_path / "run" / "model.engines" / sha[:16] / "validation.json").read_text())
    verdict = record["engines"]["onnx-int8"]
    assert verdict["agreement"] == 0.0 and not verdict["passed"]
    assert record["engines"]["onnx"]["passed"] and record["model_sha256"] == sha
    assert auto.engine != "onnx-int8"  # never the failed one, however fast
    forced = engine_gate.choose_engine(str(model), sha, "onnx-int8")  # the kept record answers now
    assert forced.engine == "onnx-int8" and "FAILED validation" in forced.reason
    with pytest.raises(inference.EngineError, match="cannot run"):
        if inference.cpu_has_bf16():
            pytest.skip("this CPU computes bf16: no engine to refuse")
        engine_gate.choose_engine(str(model), sha, "torch-bf16")


def test_auto_without_held_out_images_runs_float32_torch(random_model_file):
    choice = engine_gate.choose_engine(random_model_file, storage.sha256_of(random_model_file), "auto")
    assert choice.engine == "torch" and choice.decoder == "exact" and "no held-out" in choice.reason


def test_scaled_jpeg_decoding_is_close_to_exact_and_falls_back_for_other_formats(shapes_dir):
    from PIL import Image

    big = Image.open(next(Path(shapes_dir).rglob("*.jpg"))).convert("RGB").resize((900, 700))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=95)
    exact = load_image(buffer.getvalue(), (227, 227)).float()
    scaled = load_image(buffer.getvalue(), (227, 227), "scaled").float()
    assert scaled.shape == exact.shape and (scaled - exact).abs().mean() < 4  # of 255
    png = io.BytesIO()
    big.save(png, "PNG")
    assert torch.equal(load_image(png.getvalue(), (227, 227), "scaled"), load_image(png.getvalue(), (227, 227)))


def test_nan_weights_are_refused_by_classify_evaluate_and_score(tmp_path, random_model_file, shapes_dir, monkeypatch):
    """One model check, in the inference path's loading: every command refuses the model."""
    from retrain.tasks import scoring

    record = torch.load(random_model_file, weights_only=True)
    state = dict(record["state_dict"])
    state["features.0.weight"] = state["features.0.weight"].clone()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    bad = str(tmp_path / "nan.pt")
    save_model_file(bad, dict(record, state_dict=state))
    image = str(next(Path(shapes_dir).rglob("*.jpg")))
    monkeypatch.setenv("RETRAIN_STORE", str(tmp_path / "store"))
    for args in (
        ["classify", bad, image],
        ["evaluate", bad, shapes_dir],
        ["evaluate", bad, shapes_dir, "--engine", "onnx"],
    ):
        status, result, _ = run_cli(args)
        assert status == 2 and "not finite" in result["error"], (args, result)
    with pytest.raises(ModelFileError, match="not finite"):
        scoring.score_job(bad, shapes_dir, str(tmp_path / "out"), client=object())  # refused before Dask is used
    assert not (tmp_path / "out").exists()
