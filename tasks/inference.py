"""The one path from a model file to labels and scores: checks, engine, preprocessing,
batched forward passes, scores -> labels.

``classify``, ``evaluate``, the promotion gate, training's validation and the scoring workers
all predict through a :class:`Predictor`, so they can never disagree on preprocessing.

Engines (what runs the forward pass):

- ``torch``: float32 PyTorch, channels_last; the reference every other engine is checked against.
- ``torch-bf16``: PyTorch under bfloat16 autocast; offered only where the hardware computes in
  bf16 (a CUDA GPU that supports it, a CPU with AVX-512 BF16 or AMX). On a CPU without it, bf16
  is emulated and runs ~15x slower than float32 (measured on AVX2: 3 against 44 images/s).
- ``onnx``: ONNX Runtime, float32, on the model exported by :mod:`tasks.export`.
- ``onnx-int8``: ONNX Runtime on a statically quantized (QDQ) model calibrated on the run's own
  training images.

Which engine may run is decided by :mod:`tasks.engine_gate` (each reduced-precision engine is
validated once per model against ``torch`` on the run's images); this module runs the one it is given.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from retrain.tasks import storage
from retrain.tasks.model_file import LoadedModel, ModelFileError, model_from_record, read_model_record
from retrain.tasks.networks import WithEmbedding, resolve_device
from retrain.tasks.preprocessing import InputAffine, Preprocessing
from retrain.tasks.vocabulary import ENGINE_CHOICES, ENGINES


class EngineError(ValueError):
    """An engine cannot run here (missing library, unsupported hardware, no exported file)."""


# ---- hardware: what this machine can run ------------------------------------------------------


def cpu_has_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def supported_engines(device: torch.device) -> list[str]:
    """The engines that make sense on ``device`` (fastest-first is decided by measurement)."""
    engines = ["torch"]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            engines.append("torch-bf16")
        if "CUDAExecutionProvider" in onnxruntime_providers():
            engines.append("onnx")
        return engines
    if cpu_has_bf16():
        engines.append("torch-bf16")
    if "CPUExecutionProvider" in onnxruntime_providers():
        engines += ["onnx", "onnx-int8"]
    return engines


def hardware_key(device: torch.device) -> str:
    """Names the hardware speed figures were measured on (they do not carry to another machine)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.backends.cpu.get_cpu_capability()}:bf16={cpu_has_bf16()}"


# ---- the model check: one place --------------------------------------------------------------


def check_model(loaded: LoadedModel, source: str, declared_size=None) -> None:
    """Refuse, with the reason, a model that cannot give sensible scores: an unusable class
    list, an input size that does not fit its network, outputs that do not match its classes,
    or weights that are not finite numbers (NaN/inf: a damaged or tampered file)."""
    classes = loaded.classes
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ModelFileError(
            f"{source}: its class list is unusable ({len(classes)} classes, "
            f"{len(classes) - len(set(classes))} duplicates)"
        )
    size = tuple(loaded.preprocessing.input_size)
    if declared_size is not None and tuple(int(v) for v in declared_size) != size:
        raise ModelFileError(
            f"{source}: its input size {list(declared_size)} does not match its preprocessing's {list(size)}"
        )
    bad = [name for name, t in loaded.model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ModelFileError(
            f"{source}: its weights are not finite numbers (NaN or infinite in {bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): a damaged or tampered model file?"
        )
    try:
        with torch.inference_mode():
            out = loaded.model.eval()(torch.zeros(1, 3, *size, device=_device_of(loaded.model)))
    except Exception as exc:
        raise ModelFileError(
            f"{source}: input size {size[0]}x{size[1]} does not fit network "
            f"{loaded.spec.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    if tuple(out.shape) != (1, len(classes)):
        raise ModelFileError(
            f"{source}: the network gives {tuple(out.shape)[1:]} outputs for one "
            f"image but the model file names {len(classes)} classes"
        )


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_checked(model_url: str) -> tuple[LoadedModel, dict]:
    """Read, build and check a model file: what every path that loads a model goes through."""
    record = read_model_record(model_url)
    loaded = model_from_record(record, source=model_url)
    check_model(loaded, model_url, record.get("input_size"))
    return loaded, record


# ---- the predictor --------------------------------------------------------------------------


# What a forward pass gives: the logits and, where the engine can, the embedding (the pooled
# input of the head layer, tasks.networks.WithEmbedding), from the same pass.
Outputs = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class Predictor:
    """Scores for uint8 image batches with one engine; what every path predicts with."""

    classes: list[str]
    preprocessing: Preprocessing
    engine: str
    device: torch.device
    forward: Callable[[torch.Tensor], Outputs]  # network input -> (logits, embedding or None)
    affine: InputAffine
    decoder: str = "exact"  # how its images are decoded (tasks.preprocessing.load_image)

    def network_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 batch in the network's channel order -> the network's float input."""
        return self.affine(pixels, self.device)

    def outputs_ordered(self, pixels: torch.Tensor) -> Outputs:
        """(logits, embeddings or None), float32, for a batch in the network's channel order."""
        with torch.inference_mode():
            logits, embeddings = self.forward(self.network_input(pixels))
            return logits.float(), None if embeddings is None else embeddings.float()

    def scores(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Softmax scores (N x K, float32, on the CPU) for a uint8 RGB batch at the input size."""
        return self.scores_and_embeddings(images, batch_size)[0]

    def scores_and_embeddings(self, images: torch.Tensor, batch_size: int = 64) -> Outputs:
        """Softmax scores (N x K) and embeddings (N x C, or None where the engine gives none),
        float32 on the CPU, for a uint8 RGB batch at the input size: one forward pass each."""
        scores, embeddings = [], []
        for start in range(0, len(images), batch_size):
            logits, embedded = self.outputs_ordered(images[start : start + batch_size][:, self.affine.channels])
            scores.append(torch.softmax(logits, dim=1).cpu())
            embeddings.append(None if embedded is None else embedded.cpu())
        if not scores:
            return torch.empty((0, len(self.classes))), None
        return torch.cat(scores), None if any(e is None for e in embeddings) else torch.cat(embeddings)


def torch_forward(
    model: torch.nn.Module, bf16: bool = False, head_layer: str | None = None
) -> Callable[[torch.Tensor], Outputs]:
    """The forward pass of an in-memory model: (logits, embedding) where ``head_layer`` is known
    (tasks.networks.WithEmbedding), else (logits, None)."""
    network = WithEmbedding(model, head_layer) if head_layer else None
    device_type = _device_of(model).type

    def forward(x: torch.Tensor) -> Outputs:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return network(x) if network is not None else (model(x), None)

    return forward


def prepare_torch_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.eval().to(device, memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def torch_predictor(
    model: torch.nn.Module,
    preprocessing: Preprocessing,
    classes: list[str],
    device: torch.device | None = None,
    bf16: bool = False,
    head_layer: str | None = None,
) -> Predictor:
    """A predictor over an in-memory model, put in eval mode (the caller restores training
    mode); its parameters are left as they are (a model being trained keeps its layout).
    ``head_layer``: where its embeddings are taken (none without it)."""
    device = device or _device_of(model)
    model.eval()
    engine = "torch-bf16" if bf16 else "torch"
    return Predictor(
        list(classes),
        preprocessing,
        engine,
        device,
        torch_forward(model, bf16, head_layer),
        InputAffine.of(preprocessing, device),
    )


def onnx_session(onnx_url: str, threads: int | None = None, device: torch.device | None = None):
    """An ONNX Runtime session on a checked ONNX file (refused when it fails the checks)."""
    from retrain.tasks.export import checked_onnx_source

    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineError("the onnx engines need onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(checked_onnx_source(onnx_url), options, providers=providers)


def onnx_forward(session) -> Callable[[torch.Tensor], Outputs]:
    """(logits, embedding) from one run of an exported file (tasks.export: its second output),
    (logits, None) from a file exported without one."""
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> Outputs:
        array = x.detach().cpu().contiguous().numpy()  # ONNX Runtime wants NCHW, contiguous
        outputs = session.run(None, {name: array})
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]) if len(outputs) > 1 else None

    return forward


def build_predictor(
    loaded: LoadedModel,
    engine: str = "torch",
    onnx_url: str | None = None,
    device: torch.device | None = None,
    decoder: str = "exact",
) -> Predictor:
    """A predictor for a checked model with ``engine`` (the ONNX engines run ``onnx_url``)."""
    if engine not in ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {engine!r}")
    device = device or resolve_device("auto")
    if engine.startswith("torch"):
        if engine == "torch-bf16" and engine not in supported_engines(device):
            raise EngineError(f"engine torch-bf16 needs bf16 hardware; this {device.type} has none")
        predictor = torch_predictor(
            prepare_torch_model(loaded.model, device),
            loaded.preprocessing,
            loaded.classes,
            device,
            engine != "torch",
            loaded.spec.head_layer,
        )
        predictor.decoder = decoder
        return predictor
    if not onnx_url:
        raise EngineError(f"engine {engine} needs its ONNX file (made by tasks.engine_gate.prepare_engines)")
    session = onnx_session(onnx_url, device=device)
    cpu = torch.device("cpu")  # ONNX Runtime takes its input from host memory
    return Predictor(
        list(loaded.classes),
        loaded.preprocessing,
        engine,
        cpu,
        onnx_forward(session),
        InputAffine.of(loaded.preprocessing, cpu),
        decoder,
    )


# ---- a process's predictors: loaded once per worker ------------------------------------------------

_CACHE: OrderedDict[tuple, Predictor] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2
LOADS = {"count": 0}  # how often this process loaded a model (tests read it)


def cached_predictor(
    model_url: str, sha256: str, engine: str = "torch", onnx_url: str | None = None, decoder: str = "exact"
) -> Predictor:
    """The predictor for this process, loaded once (not once per task) while tasks keep asking
    for the same file content and engine; a file changed under a running job is refused."""
    key = (model_url, sha256, engine, onnx_url, decoder)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        loaded, _ = load_checked(model_url)
        if storage.sha256_of(model_url) != sha256:
            raise ModelFileError(
                f"{model_url} changed while the job was running (its sha256 is no longer {sha256[:12]}...); rerun the job"
            )
        predictor = build_predictor(loaded, engine, onnx_url, decoder=decoder)
        _CACHE[key] = predictor
        LOADS["count"] += 1
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return predictor


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def top_k(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the ``k`` best classes per row, best first."""
    values, indices = scores.topk(k, dim=1)
    return indices.cpu().numpy(), values.cpu().numpy()
