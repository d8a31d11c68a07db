"""The engine transfer mode's frozen body computes its features on, and the gate that keeps it.

The body's pass over every training image and cached view is the slow part of transfer mode,
so it runs on the fastest engine this hardware offers (the names are tasks/inference.py's):

- ``torch``: float32 PyTorch, the reference; always allowed.
- ``onnx-int8``: a CPU with ONNX Runtime: the body exported to ONNX and statically quantized
  (QDQ, tasks/export.py ``quantize_int8``), calibrated on the run's own training images.
- ``torch-bf16``: a CPU with AVX-512 BF16 or AMX (a bfloat16 copy of the body), or a CUDA GPU
  with bf16 (autocast).
- ``torch-fp16``: a CUDA GPU without bf16 (float16 autocast).

Measured on SqueezeNet's body (batches of 16 at 227 px, 2-core Xeon with AVX-512 VNNI, BF16
and AMX): float32 ~130 images/s, torch-bf16 ~240, onnx-int8 ~540; hence that order.

The gate: the head trains on the engine's features; the published network then runs a float32
body (evaluation and scoring), so it is validated in float32 on the validation images, and its
accuracy may be at most GATE_POINTS below what the head reached on the engine's validation
features. Otherwise the features are computed again in float32 and the head trained again
(tasks/training/stage.py). A run without validation images cannot be gated: float32.

Only failures are remembered (per body weights, engine and hardware, in
``$RETRAIN_CACHE/feature-engines.json``): a failure costs a second training, and a body that
loses accuracy on an engine will lose it on the next data set too. A pass is checked again
every run: the check is one float32 pass over the validation images (a small part of the
feature work), and a pass on one data set proves nothing on the next.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable

import torch
from torch import nn

from retrain.tasks.inference import hardware_key, supported_engines
from retrain.tasks.preprocessing import Preprocessing
from retrain.tasks.training.row_files import cache_root

log = logging.getLogger("retrain.training")

FLOAT32 = "torch"
GATE_POINTS = 0.005  # at most half a point of validation accuracy lost against float32 features
# Below this many body passes (training images x views + validation images) float32 is
# fastest overall: the int8 engine's export and calibration take ~5-10 s and the gate's float32
# pass over the validation images costs what it saves (at ~6 ms saved per image, the int8
# engine breaks even near a thousand images).
MIN_ENGINE_IMAGES = 2000
CALIBRATION_IMAGES = 64  # training images (view 0) the int8 quantization is calibrated on
VERDICTS = "feature-engines.json"


def candidates(device: torch.device) -> list[str]:
    """The reduced-precision engines for the body on ``device``, fastest first."""
    offered = supported_engines(device)
    if device.type == "cuda":
        return ["torch-bf16"] if "torch-bf16" in offered else ["torch-fp16"]
    return [engine for engine in ("onnx-int8", "torch-bf16") if engine in offered]


def choose_engine(
    requested: str, device: torch.device, body_digest: Callable[[], str], images: int, validation_images: int
) -> str:
    """The engine the features are computed on (``images`` body passes): float32 when asked
    (``requested`` "torch"), for fewer than MIN_ENGINE_IMAGES, when there are no validation
    images to gate it on, or when every faster engine failed the gate before for this body
    here; else the fastest one."""
    if requested == FLOAT32 or images < MIN_ENGINE_IMAGES or validation_images == 0:
        return FLOAT32
    failed = _read_verdicts()
    digest = body_digest()
    for engine in candidates(device):
        if _verdict_key(digest, engine, device) not in failed:
            return engine
    return FLOAT32


def _verdicts_path() -> str:
    return os.path.join(cache_root(), VERDICTS)


def _verdict_key(body_digest: str, engine: str, device: torch.device) -> str:
    return f"{body_digest}|{engine}|{hardware_key(device)}"


def _read_verdicts() -> dict:
    try:
        with open(_verdicts_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def remember_failure(body_digest: str, engine: str, device: torch.device, gate: dict) -> None:
    """Later runs of this body here skip ``engine`` (atomically replaced: runs may share it)."""
    verdicts = _read_verdicts()
    verdicts[_verdict_key(body_digest, engine, device)] = gate
    os.makedirs(cache_root(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_root(), prefix=VERDICTS)
    with os.fdopen(fd, "w") as f:
        json.dump(verdicts, f, indent=1)
    os.replace(tmp, _verdicts_path())


# ---- the body on an engine -------------------------------------------------------------------------


class BodyEngine:
    """The frozen ``body`` on ``engine``: normalised float32 batch (channels_last) -> float32
    features. Built on first use (the int8 export and calibration take seconds, which a reused
    cache does not need); ``calibration`` gives the int8 engine its uint8 training images."""

    def __init__(
        self,
        body: nn.Module,
        engine: str,
        device: torch.device,
        preprocessing: Preprocessing,
        calibration: Callable[[], torch.Tensor] | None = None,
        onnx_data: bytes | None = None,
    ):
        self.body, self.engine, self.device, self.preprocessing = body, engine, device, preprocessing
        self.calibration, self._onnx_data = calibration, onnx_data
        self._forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            self._forward = self._build()
        return self._forward(x)

    def _build(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.engine == FLOAT32:
            return self.body
        if self.engine in ("torch-bf16", "torch-fp16"):
            dtype = torch.bfloat16 if self.engine == "torch-bf16" else torch.float16
            if self.device.type == "cuda":  # autocast keeps the normalisations in float32

                def autocast_forward(x: torch.Tensor) -> torch.Tensor:
                    with torch.autocast("cuda", dtype=dtype):
                        return self.body(x)

                return autocast_forward
            # On the CPU a bf16 copy of the weights: autocast would convert them every batch.
            low = copy.deepcopy(self.body).to(dtype).to(memory_format=torch.channels_last)
            return lambda x: low(x.to(dtype))
        if self.engine == "onnx-int8":
            return _onnx_forward(self.onnx_data())
        raise ValueError(f"no feature engine {self.engine!r}")

    def onnx_data(self) -> bytes:
        """The body as int8 ONNX (exported and calibrated once)."""
        if self._onnx_data is None:
            from retrain.tasks.export import quantize_int8

            images = self.calibration() if self.calibration is not None else None
            if images is None or not len(images):
                raise ValueError("the int8 feature engine needs training images to calibrate on")
            batches = [
                self.preprocessing.normalize(images[s : s + 16]).contiguous().cpu().numpy()
                for s in range(0, len(images), 16)
            ]
            self._onnx_data = quantize_int8(_body_onnx(self.body, tuple(images.shape[2:])), batches)
        return self._onnx_data


def _body_onnx(body: nn.Module, size: tuple[int, int]) -> bytes:
    """The float32 body as ONNX for images of ``size`` (the training images'), dynamic batch
    axis (the input name quantize_int8 feeds)."""
    from retrain.tasks.export import INPUT_NAME, ONNX_OPSET

    cpu_body = copy.deepcopy(body).eval().to("cpu", memory_format=torch.contiguous_format)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            cpu_body,
            (torch.zeros(1, 3, *size),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=["features"],
            dynamic_axes={INPUT_NAME: {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def _onnx_forward(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward pass through ONNX Runtime, the session made by tasks/inference.py (its checks)."""
    from retrain.tasks.inference import onnx_session

    with tempfile.TemporaryDirectory(prefix="retrain-feature-int8-") as tmp:
        path = os.path.join(tmp, "body-int8.onnx")
        with open(path, "wb") as f:
            f.write(data)
        session = onnx_session(path)
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device).contiguous(memory_format=torch.channels_last)

    return forward


# ---- the gate --------------------------------------------------------------------------------------


def float32_accuracy(
    model: nn.Module,
    images,
    targets: torch.Tensor,
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int = 16,
) -> float:
    """The whole network's accuracy in float32 on ``images`` (uint8, a tensor or image shards),
    as evaluation runs it: what the engine's features are judged against."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(targets), batch_size):
                batch = images[start : start + batch_size].to(device)
                x = preprocessing.normalize(batch).contiguous(memory_format=torch.channels_last)
                predicted = model(x).argmax(1).cpu()
                correct += int((predicted == targets[start : start + batch_size].cpu()).sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(targets))


def gate(engine: str, engine_accuracy: float, float32_accuracy: float, images: int) -> dict:
    """The verdict on ``engine``'s features: passed when float32 features lose at most
    GATE_POINTS of validation accuracy against them."""
    return {
        "engine": engine,
        "val_images": images,
        "engine_val_accuracy": round(engine_accuracy, 6),
        "float32_val_accuracy": round(float32_accuracy, 6),
        "max_drop": GATE_POINTS,
        "passed": float32_accuracy >= engine_accuracy - GATE_POINTS - 1e-9,
    }
