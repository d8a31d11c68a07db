"""`retrain export`: an ONNX file that describes itself and that ONNX Runtime alone scores
like the torch model; TorchScript; ONNX files with external data outside their folder refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retrain.tasks.datastore import index_images
from retrain.tasks.export import check_pixels_export, checked_onnx_source
from retrain.tasks.model_file import ModelFileError, load_model_file
from retrain.tasks.preprocessing import load_image
from tests.conftest import run_cli


def test_onnx_round_trip_with_onnxruntime_alone(tmp_path, random_model_file, shapes_dir):
    import onnxruntime as ort

    out = str(tmp_path / "exported" / "model.onnx")
    code, result, _ = run_cli(["export", random_model_file, "--format", "onnx", "--out", out])
    assert code == 0 and result["format"] == "onnx" and result["out"] == out
    loaded = load_model_file(random_model_file)
    assert result["classes"] == loaded.classes

    # only onnxruntime and the file's own metadata from here: what a user without retrain has
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["retrain.classes"])
    prep = json.loads(meta["retrain.preprocessing"])
    size = json.loads(meta["retrain.input_size"])
    assert classes == loaded.classes and size == [227, 227] and prep["channel_order"] == "BGR"
    assert meta["retrain.resize"].startswith("bilinear, antialiased, aspect ratio not kept, to 227x227")
    paths = list(index_images(shapes_dir).images["path"])
    images = torch.stack([load_image(Path(p).read_bytes(), tuple(size)) for p in paths]).float()
    x = images.flip(1) if prep["channel_order"] == "BGR" else images
    x = (x * prep["scale"] - torch.tensor(prep["mean"]).view(1, 3, 1, 1)) / torch.tensor(prep["std"]).view(1, 3, 1, 1)
    logits = np.concatenate([session.run(None, {"input": x[i : i + 7].numpy()})[0] for i in range(0, len(x), 7)])
    with torch.inference_mode():
        reference = loaded.model.eval()(loaded.preprocessing.normalize(images.to(torch.uint8)))
    assert [classes[i] for i in logits.argmax(1)] == [loaded.classes[i] for i in reference.argmax(1).tolist()]
    assert np.abs(logits - reference.numpy()).max() < 1e-3


def test_torchscript_export_gives_the_same_logits(tmp_path, random_model_file):
    out = str(tmp_path / "model.ts")
    code, result, _ = run_cli(["export", random_model_file, "--format", "torchscript", "--out", out])
    assert code == 0 and result["format"] == "torchscript"
    extra = {"retrain.json": ""}
    scripted = torch.jit.load(out, _extra_files=extra)
    metadata = json.loads(extra["retrain.json"])
    assert json.loads(metadata["retrain.classes"]) == result["classes"]
    assert metadata["retrain.resize"].startswith("bilinear, antialiased, aspect ratio not kept, to 227x227")
    x = torch.randn(3, 3, 227, 227)
    with torch.inference_mode():
        assert torch.allclose(scripted(x), load_model_file(random_model_file).model.eval()(x), atol=1e-4)


def _with_external_data(folder: Path, location: str) -> Path:
    """A valid small ONNX model whose one initializer keeps its data in ``location``."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_onnx_files_with_external_data_outside_their_folder_are_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(4, 7, dtype=np.float32).tobytes())
    for location in ("../secret.bin", str(secret), "sub/../../secret.bin"):
        evil = _with_external_data(tmp_path / "models", location)
        with pytest.raises(ModelFileError, match="outside the model's folder"):
            checked_onnx_source(str(evil))
    # inside its folder: loaded, by path so ONNX Runtime finds it
    (tmp_path / "models" / "weights.bin").write_bytes(secret.read_bytes())
    fine = _with_external_data(tmp_path / "models", "weights.bin")
    assert checked_onnx_source(str(fine)) == str(fine)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    with pytest.raises(ModelFileError):
        checked_onnx_source(str(garbage))


def test_onnx_with_preprocessing_takes_decoded_pixels_of_any_size(tmp_path, random_model_file, shapes_dir):
    """The graph resizes, reorders and normalises uint8 RGB pixels itself: on images of two
    sizes, ONNX Runtime alone gives the torch predictor's labels and probabilities on
    retrain's loader's pixels."""
    import onnxruntime as ort
    from PIL import Image

    from retrain.tasks.inference import build_predictor

    out = str(tmp_path / "pixels.onnx")
    code, result, _ = run_cli(["export", random_model_file, "--with-preprocessing", "--out", out])
    assert code == 0 and result["out"] == out
    loaded = load_model_file(random_model_file)
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["retrain.resize"].startswith("bilinear, antialiased, aspect ratio not kept, to 227x227")
    assert [o.name for o in session.get_outputs()] == ["probabilities", "embedding"]
    predictor = build_predictor(loaded, "torch", device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    for height, width in ((300, 410), (120, 90)):  # larger than the input, and smaller (upscaled)
        # smooth images, like photos: noise would make every 1-level rounding difference count
        small = rng.integers(0, 256, (3, height // 10 + 1, width // 10 + 1, 3), dtype=np.uint8)
        pixels = np.stack([np.asarray(Image.fromarray(s).resize((width, height), Image.BICUBIC)) for s in small])
        probabilities, embedding = session.run(None, {"images": pixels})
        reference = predictor.scores(torch.stack([load_image(_png(p), (227, 227)) for p in pixels]))
        assert probabilities.shape == (3, 3) and embedding.shape[0] == 3
        assert (probabilities.argmax(1) == reference.argmax(1).numpy()).all()
        assert np.abs(probabilities - reference.numpy()).max() < 1e-3
    # the check `retrain export` reports for a run's test split: retrain's decoder, files of any size
    check = check_pixels_export(loaded, out, list(index_images(shapes_dir).images["path"])[:6])
    assert check["same_labels"] == check["images"] == 6 and check["max_score_difference"] < 1e-3


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    from tests.conftest import encode

    return encode(Image.fromarray(pixels), "PNG")
