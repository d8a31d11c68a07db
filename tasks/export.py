"""Export a model file to ONNX or TorchScript (MATLAB's ``exportONNXNetwork``), the int8
quantization of an ONNX model, and the checks every ONNX file passes before it is loaded.

An exported ONNX file describes itself like a model file: its metadata holds the class names,
the input size, the preprocessing (as JSON) and the resize (``retrain.resize``), and its batch
axis is dynamic. The network's input is the normalised float batch (N x 3 x H x W, in the
channel order the preprocessing names); the outputs are one logit per class (``logits``, the
first) and the image's embedding (``embedding``: the pooled input of the head layer, from the
same pass), which scoring's drift test compares with the model's reference (tasks/drift.py).

Exported ``with_preprocessing``, the graph does what retrain's loader and normalisation do
(tasks/preprocessing.py) itself: its input is decoded pixels, uint8 RGB, N x H x W x 3 at any H
and W (one size per call); it resizes them to the input size (ONNX ``Resize``, opset 18:
bilinear, antialiased, on uint8 like torchvision), puts the channels in the network's order,
normalises, and returns softmax probabilities (``probabilities``) and the embedding. A client
then needs only a JPEG decoder.

ONNX files are data, not code, but they can name "external data" files: a path that leaves
the model's folder (``../../etc/passwd``, an absolute path) would make a loader read any file.
:func:`check_onnx` refuses those, and anything the ONNX checker rejects, before a session is
ever created.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import warnings

import numpy as np
import torch

from retrain.tasks import storage
from retrain.tasks.model_file import LoadedModel, ModelFileError
from retrain.tasks.networks import WithEmbedding
from retrain.tasks.preprocessing import InputAffine, load_images

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
RESIZE_OPSET = 18  # Resize's antialias attribute arrived in opset 18
INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME = "input", "logits", "embedding"
PIXELS_NAME, PROBABILITIES_NAME = "images", "probabilities"  # the graph with preprocessing


def resize_description(size: tuple[int, int]) -> str:
    """How retrain's loader (tasks/preprocessing.py ``_resize``) brings an image to ``size``."""
    return f"bilinear, antialiased, aspect ratio not kept, to {size[0]}x{size[1]} (HxW), on uint8 pixels"


def onnx_metadata(loaded: LoadedModel, sha256: str | None = None) -> dict[str, str]:
    meta = {
        "retrain.format": "retrain.onnx/2",
        "retrain.network": loaded.spec.name,
        "retrain.classes": json.dumps(list(loaded.classes)),
        "retrain.input_size": json.dumps(list(loaded.preprocessing.input_size)),
        "retrain.preprocessing": json.dumps(loaded.preprocessing.to_dict()),
        "retrain.resize": resize_description(loaded.preprocessing.input_size),
    }
    if sha256:
        meta["retrain.model_sha256"] = sha256
    return meta


def onnx_bytes(loaded: LoadedModel, sha256: str | None = None) -> bytes:
    """The model as ONNX (dynamic batch axis, metadata; logits and embedding), in memory."""
    import onnx

    proto = _network_proto(loaded, ONNX_OPSET)
    _describe(
        proto, onnx_metadata(loaded, sha256), f"retrain export of {loaded.spec.name} for {len(loaded.classes)} classes"
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _describe(proto, metadata: dict[str, str], doc: str) -> None:
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = doc


def _network_proto(loaded: LoadedModel, opset: int):
    """The network as an ONNX ModelProto: normalised float input, logits and embedding."""
    import onnx

    model = WithEmbedding(loaded.model.eval().to("cpu", memory_format=torch.contiguous_format), loaded.spec.head_layer)
    example = torch.zeros(1, 3, *loaded.preprocessing.input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, EMBEDDING_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, EMBEDDING_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,  # the dynamo exporter needs onnxscript and takes 10x longer for the same graph
        )
    return onnx.load_from_string(buffer.getvalue())


def onnx_with_preprocessing_bytes(loaded: LoadedModel, sha256: str | None = None) -> bytes:
    """The model as ONNX that takes decoded pixels (uint8 RGB, N x H x W x 3, any H and W) and
    returns probabilities and the embedding: retrain's resize, channel order and normalisation
    are nodes in front of the network, softmax one behind it, in memory."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = _network_proto(loaded, RESIZE_OPSET)
    graph = proto.graph
    prep = loaded.preprocessing
    affine = InputAffine.of(prep, torch.device("cpu"))
    constants = {
        "retrain_channels": np.array(affine.channels, dtype=np.int64),
        "retrain_size": np.array(prep.input_size, dtype=np.int64),
        "retrain_mul": affine.mul.numpy().astype(np.float32),
        "retrain_add": affine.add.numpy().astype(np.float32),
    }
    front = [
        helper.make_node("Transpose", [PIXELS_NAME], ["retrain_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Gather", ["retrain_nchw", "retrain_channels"], ["retrain_ordered"], axis=1),
        # On uint8, as torchvision resizes retrain's uint8 images; exclude_outside renormalises the
        # filter at the borders as torch does (without it, edge pixels differed by up to 12 levels;
        # with it, 0.1 % of pixels by 1 level on hymenoptera photos, from integer rounding).
        helper.make_node(
            "Resize",
            ["retrain_ordered", "", "", "retrain_size"],
            ["retrain_resized"],
            mode="linear",
            antialias=1,
            exclude_outside=1,
            coordinate_transformation_mode="half_pixel",
            axes=[2, 3],
        ),
        helper.make_node("Cast", ["retrain_resized"], ["retrain_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["retrain_float", "retrain_mul"], ["retrain_scaled"]),
        helper.make_node("Add", ["retrain_scaled", "retrain_add"], [INPUT_NAME]),
    ]
    back = [helper.make_node("Softmax", [OUTPUT_NAME], [PROBABILITIES_NAME], axis=1)]
    nodes = [*front, *graph.node, *back]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    pixels = helper.make_tensor_value_info(PIXELS_NAME, TensorProto.UINT8, ["batch", "height", "width", 3])
    probabilities = helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, ["batch", len(loaded.classes)])
    inputs = [pixels, *(i for i in graph.input if i.name != INPUT_NAME)]
    outputs = [probabilities if o.name == OUTPUT_NAME else o for o in graph.output]
    del graph.input[:], graph.output[:]
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    metadata = {
        **onnx_metadata(loaded, sha256),
        "retrain.format": "retrain.onnx-pixels/1",
        "retrain.input": "decoded pixels: uint8 RGB, N x H x W x 3, any H and W (one size per call), "
        "EXIF orientation applied; resized, reordered and normalised inside the graph",
        "retrain.outputs": json.dumps([PROBABILITIES_NAME, EMBEDDING_NAME]),
    }
    _describe(
        proto,
        metadata,
        f"retrain export of {loaded.spec.name} for {len(loaded.classes)} classes: uint8 RGB pixels in, probabilities out",
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def torchscript_bytes(loaded: LoadedModel) -> bytes:
    model = loaded.model.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(1, 3, *loaded.preprocessing.input_size)
    with torch.inference_mode():
        traced = torch.jit.trace(model, example, check_trace=False)
    extra = {"retrain.json": json.dumps({k: v for k, v in onnx_metadata(loaded).items()})}
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files=extra)
    return buffer.getvalue()


def export_model(
    loaded: LoadedModel, out: str, fmt: str, sha256: str | None = None, with_preprocessing: bool = False
) -> str:
    """Write ``loaded`` to ``out`` in ``fmt`` (onnx or torchscript), atomically;
    ``with_preprocessing`` (onnx only): the graph that takes decoded pixels."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if with_preprocessing and fmt != "onnx":
        raise ValueError("with_preprocessing (--with-preprocessing) needs the onnx format")
    if fmt == "torchscript":
        data = torchscript_bytes(loaded)
    else:
        data = onnx_with_preprocessing_bytes(loaded, sha256) if with_preprocessing else onnx_bytes(loaded, sha256)
    return storage.write_bytes(out, data)


def check_export(loaded: LoadedModel, onnx_url: str, image_urls: list[str]) -> dict:
    """ONNX Runtime on the exported file against the torch model on ``image_urls`` (a run's
    test split): how many labels agree and the largest score difference."""
    from retrain.tasks.inference import build_predictor

    pixels = load_images(list(image_urls), loaded.preprocessing.input_size)
    reference = build_predictor(loaded, "torch", device=torch.device("cpu")).scores(pixels)
    return _agreement(reference, build_predictor(loaded, "onnx", onnx_url, device=torch.device("cpu")).scores(pixels))


def _agreement(reference: torch.Tensor, exported: torch.Tensor) -> dict:
    return {
        "images": len(reference),
        "same_labels": int((reference.argmax(1) == exported.argmax(1)).sum()),
        "max_score_difference": float((reference - exported).abs().max()),
    }


def check_pixels_export(loaded: LoadedModel, onnx_url: str, image_urls: list[str]) -> dict:
    """ONNX Runtime alone on an export with preprocessing, fed each image's decoded pixels at
    their own size (one image per call), against the torch model on retrain's loader's pixels:
    how many labels agree and the largest probability difference."""
    from retrain.tasks.inference import build_predictor, onnx_session
    from retrain.tasks.preprocessing import decode_image

    reference = build_predictor(loaded, "torch", device=torch.device("cpu")).scores(
        load_images(list(image_urls), loaded.preprocessing.input_size)
    )
    session = onnx_session(onnx_url)
    exported = []
    for url in image_urls:
        image = decode_image(storage.read_bytes(url))  # 3 x H x W -> the input, 1 x H x W x 3
        pixels = np.ascontiguousarray(image.permute(1, 2, 0)[None].numpy())
        exported.append(torch.from_numpy(session.run([PROBABILITIES_NAME], {PIXELS_NAME: pixels})[0]))
    return _agreement(reference, torch.cat(exported))


# ---- checks before loading an ONNX file -------------------------------------------------------


def check_onnx(proto, folder: str | None, source: str, path: str | None = None) -> None:
    """Refuse external data that leaves ``folder`` (or any external data when the file has no
    local folder) and anything the ONNX checker rejects (``path``: the local file, which the
    checker needs to find external data)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        if folder is None:
            raise ModelFileError(f"{source}: refused: tensor {tensor.name} keeps its data in an external file")
        normal = posixpath.normpath(location.replace("\\", "/"))
        resolved = os.path.realpath(os.path.join(folder, normal))
        inside = os.path.commonpath([resolved, os.path.realpath(folder)]) == os.path.realpath(folder)
        if os.path.isabs(location) or normal.startswith("..") or not inside:
            raise ModelFileError(
                f"{source}: refused: tensor {tensor.name} names external data {location!r} outside the model's folder"
            )
    try:
        onnx.checker.check_model(path if path else proto)
    except Exception as exc:
        raise ModelFileError(f"{source}: not a valid ONNX model: {str(exc).splitlines()[0]}") from None


def checked_onnx_source(url: str) -> bytes | str:
    """What ONNX Runtime should load for ``url``, after :func:`check_onnx`: the bytes, or the
    local path when the file keeps (checked) external data beside it."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ModelFileError(f"ONNX file not found: {url}") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:
        raise ModelFileError(f"{url}: not an ONNX file ({type(exc).__name__})") from None
    external = any(uses_external_data(t) for t in _get_all_tensors(proto))
    local = storage.is_local(url)
    path = url[len("file://") :] if url.startswith("file://") else url
    check_onnx(proto, os.path.dirname(os.path.abspath(path)) if local else None, url, path if external else None)
    return path if external else data


# ---- int8: static quantization calibrated on the run's training images -------------------------


def quantize_int8(onnx_data: bytes, calibration: list[np.ndarray]) -> bytes:
    """Static QDQ int8 quantization (uint8 activations, int8 per-channel weights) of an ONNX
    model, calibrated on ``calibration`` (network-input batches). Returns the quantized model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="retrain-int8-") as tmp:
        source, prepared, quantized = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(source, "wb") as f:
            f.write(onnx_data)
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_static(
            prepared,
            quantized,
            Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=_float_stem(prepared),
        )
        with open(quantized, "rb") as f:
            return f.read()


# The stem sees raw pixel values, and its error feeds every later layer: with every convolution
# quantized, a hymenoptera SqueezeNet agreed with float32 torch on 95.9 % of its held-out images;
# with the first two left in float32, on 100 %, at the same speed (ONNX Runtime fuses the rest).
FLOAT_STEM_CONVOLUTIONS = 2


def _float_stem(onnx_path: str) -> list[str]:
    """Names of the first convolutions in graph order, which stay in float32."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type == "Conv"][:FLOAT_STEM_CONVOLUTIONS]
