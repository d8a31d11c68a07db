"""Pretrained network registry, head replacement, freezing, learn-rate factors, summary,
and the self-describing model file.

Each registry entry knows its architecture, where its weights come from, its input size and
preprocessing, and its head layer (``conv10`` in SqueezeNet, as MATLAB names it). A model
file carries the same facts plus the classes, metrics and state dict, and loads with
``torch.load(..., weights_only=True)``: nothing in it can run code.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from retrain.tasks import storage
from retrain.tasks.preprocessing import CAFFE_BGR, IMAGENET_RGB, Preprocessing
from retrain.tasks.request import MODES
from torch import nn

MODEL_FORMAT = "retrain.model/1"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the network."""


class ModelFileError(ValueError):
    """A model file is missing, truncated, tampered with, unsafe or not a retrain model."""


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    architecture: str  # torchvision.models builder name
    head_layer: str  # module path of the layer replaced for K classes
    head_name: str  # what the layer is called in the literature / MATLAB
    preprocessing: Preprocessing
    torchvision_weights: str | None = None  # e.g. "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    weights_file: str | None = None  # expected file name in torch's hub cache
    description: str = ""


NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in [
        NetworkSpec(
            "squeezenet",
            "squeezenet1_1",
            "classifier.1",
            "conv10",
            Preprocessing(input_size=(224, 224), **IMAGENET_RGB),
            torchvision_weights="SqueezeNet1_1_Weights.IMAGENET1K_V1",
            description="SqueezeNet 1.1, torchvision's ImageNet weights (1.2 M parameters)",
        ),
        NetworkSpec(
            "squeezenet-caffe",
            "squeezenet1_1",
            "classifier.1",
            "conv10",
            Preprocessing(input_size=(227, 227), **CAFFE_BGR),
            weights_file="squeezenet1_1_caffe-2c890718.pth",
            description="SqueezeNet 1.1 with the original Caffe ImageNet weights MATLAB imports",
        ),
        NetworkSpec(
            "resnet18",
            "resnet18",
            "fc",
            "fc",
            Preprocessing(input_size=(224, 224), **IMAGENET_RGB),
            torchvision_weights="ResNet18_Weights.IMAGENET1K_V1",
            description="ResNet-18, torchvision's ImageNet weights (11.7 M parameters)",
        ),
        NetworkSpec(
            "mobilenet_v3_small",
            "mobilenet_v3_small",
            "classifier.3",
            "classifier.3",
            Preprocessing(input_size=(224, 224), **IMAGENET_RGB),
            torchvision_weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1",
            description="MobileNetV3-Small, torchvision's ImageNet weights (2.5 M parameters)",
        ),
    ]
}


def get_spec(name: str) -> NetworkSpec:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)}") from None


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def replace_head(model: nn.Module, head_layer: str, num_classes: int) -> nn.Module:
    """Swap the final learnable layer for a fresh one with ``num_classes`` outputs."""
    old = _module(model, head_layer)
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
        nn.init.normal_(new.weight, mean=0.0, std=0.01)  # torchvision's init for conv10
        nn.init.zeros_(new.bias)
    elif isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        raise TypeError(f"cannot replace head layer {head_layer!r} of type {type(old).__name__}")
    parent_path, _, child = head_layer.rpartition(".")
    setattr(_module(model, parent_path) if parent_path else model, child, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def _load_state_dict_file(url: str) -> dict[str, torch.Tensor]:
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise WeightsUnavailableError(f"weights file not found: {url}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated zip, garbage bytes...
        raise WeightsUnavailableError(
            f"weights file {url} is not a readable PyTorch state dict "
            f"(truncated, corrupt or holding arbitrary objects): {exc}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"weights file {url} does not hold a state dict of tensors")
    return obj


def _cached_weights_file(spec: NetworkSpec) -> str | None:
    candidate = os.path.join(torch.hub.get_dir(), "checkpoints", spec.weights_file)
    return candidate if os.path.exists(candidate) else None


def build_network(name: str, num_classes: int, weights: str = "default") -> tuple[nn.Module, str]:
    """The network ``name`` with its head replaced for ``num_classes``.

    ``weights``: ``"default"`` (the registry's pretrained weights), ``"none"`` (random init,
    for training from scratch) or the URL of a state-dict file. Returns the model and a
    description of where its weights came from.
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {num_classes}")
    builder = getattr(torchvision.models, spec.architecture)
    if weights == "none":
        model = builder(weights=None)
        origin = "random initialisation"
    elif weights == "default" and spec.torchvision_weights:
        weights_enum = _torchvision_weights(spec)
        try:
            model = builder(weights=weights_enum)
        except Exception as exc:  # URLError, socket errors, hash mismatch, partial download
            raise _torchvision_unavailable(spec, exc) from None
        origin = f"torchvision {spec.torchvision_weights} ({weights_enum.url})"
    else:
        url = _weights_file(spec, weights)
        model = builder(weights=None)
        _load_fitting(model, spec, url)
        origin = f"file {url} (sha256 {storage.sha256_of(url)[:12]})"
    replace_head(model, spec.head_layer, num_classes)
    return model, origin


def check_weights(name: str, weights: str = "default") -> None:
    """Fail now, as :func:`build_network` would later, when ``weights`` cannot be had for
    network ``name`` or do not fit it; without building the network: a weights file loads
    into the architecture on the meta device (no memory, no initialisation), torchvision's
    weights are fetched into torch's cache (where the build finds them)."""
    spec = get_spec(name)
    if weights == "none":
        return
    if weights == "default" and spec.torchvision_weights:
        try:
            _torchvision_weights(spec).get_state_dict(progress=False)
        except Exception as exc:
            raise _torchvision_unavailable(spec, exc) from None
        return
    url = _weights_file(spec, weights)
    with torch.device("meta"):
        model = getattr(torchvision.models, spec.architecture)(weights=None)
    _load_fitting(model, spec, url)


def _weights_file(spec: NetworkSpec, weights: str) -> str:
    """The state-dict file ``weights`` names ("default": the registry's file in torch's cache)."""
    if weights != "default":
        return weights
    url = _cached_weights_file(spec)
    if url is None:
        raise WeightsUnavailableError(
            f"network {spec.name!r} needs its weights file {spec.weights_file}: pass "
            f"--weights PATH_OR_URL (for example ../shared/weights/{spec.weights_file}), "
            f"or copy the file into {os.path.join(torch.hub.get_dir(), 'checkpoints')}"
        )
    return url


def _load_fitting(model: nn.Module, spec: NetworkSpec, url: str) -> None:
    """Load the state dict at ``url`` into ``model`` (on the meta device: check names and
    shapes only), or say why it does not fit."""
    state = _load_state_dict_file(url)
    try:
        model.load_state_dict(state, strict=True, assign=next(model.parameters()).is_meta)
    except RuntimeError as exc:
        raise WeightsUnavailableError(
            f"weights file {url} does not fit network {spec.name!r} ({spec.architecture}): "
            f"{str(exc).splitlines()[0]} ... (is it for another architecture?)"
        ) from None


def _torchvision_weights(spec: NetworkSpec):
    enum_name, _, member = spec.torchvision_weights.partition(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def _torchvision_unavailable(spec: NetworkSpec, exc: Exception) -> WeightsUnavailableError:
    alternatives = [n for n, s in NETWORKS.items() if s.weights_file]
    return WeightsUnavailableError(
        f"could not obtain the pretrained weights for {spec.name!r} "
        f"({spec.torchvision_weights}) through torchvision: {type(exc).__name__}: {exc}. "
        f"On a machine without internet access, use a local weights file: "
        f"--weights PATH (a state dict for torchvision.models.{spec.architecture}), or "
        f"--network {alternatives[0]} --weights PATH_TO_{NETWORKS[alternatives[0]].weights_file}; "
        f"or copy the file torchvision downloads into "
        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}"
    )


# ---- what trains: freezing and learn-rate factors --------------------------------------


def head_parameters(model: nn.Module, spec: NetworkSpec) -> list[nn.Parameter]:
    return list(_module(model, spec.head_layer).parameters())


def configure_trainable(model: nn.Module, spec: NetworkSpec, mode: str) -> None:
    """transfer: only the head learns; finetune and scratch: everything learns."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    head = {id(p) for p in head_parameters(model, spec)}
    for p in model.parameters():
        p.requires_grad_(mode != "transfer" or id(p) in head)


def parameter_groups(
    model: nn.Module, spec: NetworkSpec, mode: str, learn_rate: float, head_learn_rate_factor: float
) -> list[dict[str, Any]]:
    """Optimizer groups: in finetune mode the new head learns ``head_learn_rate_factor``
    times faster than the pretrained body (MATLAB's WeightLearnRateFactor)."""
    head = head_parameters(model, spec)
    if mode == "transfer":
        return [{"params": head, "lr": learn_rate, "name": "head"}]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    factor = head_learn_rate_factor if mode == "finetune" else 1.0
    return [
        {"params": body, "lr": learn_rate, "name": "body"},
        {"params": head, "lr": learn_rate * factor, "name": "head"},
    ]


def freeze_batchnorm(model: nn.Module, spec: NetworkSpec, mode: str) -> None:
    """In transfer mode the body is a fixed feature extractor, so its batch-norm layers keep
    their ImageNet statistics (call after ``model.train()``)."""
    if mode != "transfer":
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---- summary ---------------------------------------------------------------------------


@dataclass
class NetworkSummary:
    name: str
    architecture: str
    input_size: tuple[int, int]
    head_layer: str
    head_name: str
    num_classes: int
    learnables: int
    trainable: int
    layers: list[dict] = field(default_factory=list)

    def to_text(self, max_rows: int | None = None) -> str:
        lines = [f"{'layer':<28} {'type':<18} {'output':<18} {'learnables':>10}"]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for row in rows:
            lines.append(f"{row['name']:<28} {row['type']:<18} {row['output']:<18} {row['learnables']:>10,}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        lines += [
            f"network: {self.name} ({self.architecture}), {len(self.layers)} layers",
            f"input size: {self.input_size[0]}x{self.input_size[1]}x3",
            f"head layer: {self.head_name} ({self.head_layer}) -> {self.num_classes} classes",
            f"learnables: {self.learnables:,} ({self.trainable:,} trainable)",
        ]
        return "\n".join(lines)


def summarize(model: nn.Module, spec: NetworkSpec) -> NetworkSummary:
    """Layers with output shapes and learnables, found by one forward pass of a blank image."""
    layers: list[dict] = []
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):

            def hook(mod, _inputs, output, name=name):
                shape = "x".join(str(s) for s in output.shape[1:]) if torch.is_tensor(output) else "-"
                layers.append(
                    {
                        "name": name,
                        "type": type(mod).__name__,
                        "output": shape,
                        "learnables": sum(p.numel() for p in mod.parameters()),
                    }
                )

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device
            model(torch.zeros(1, 3, *spec.preprocessing.input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    head = _module(model, spec.head_layer)
    return NetworkSummary(
        name=spec.name,
        architecture=spec.architecture,
        input_size=spec.preprocessing.input_size,
        head_layer=spec.head_layer,
        head_name=spec.head_name,
        num_classes=head.out_channels if isinstance(head, nn.Conv2d) else head.out_features,
        learnables=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=layers,
    )


# ---- the model file --------------------------------------------------------------------


def resolve_device(execution_environment: str = "auto") -> torch.device:
    """auto: CUDA when present, else CPU (MATLAB's ExecutionEnvironment)."""
    if execution_environment == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if execution_environment == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("execution_environment='gpu' but no CUDA device is available")
        return torch.device("cuda")
    if execution_environment == "cpu":
        return torch.device("cpu")
    raise ValueError(f"execution_environment must be auto, cpu or gpu, not {execution_environment!r}")


@dataclass
class LoadedModel:
    model: nn.Module
    spec: NetworkSpec
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict


def model_record(
    model: nn.Module,
    spec: NetworkSpec,
    classes: list[str],
    weights_origin: str,
    metrics: dict | None = None,
    training: dict | None = None,
) -> dict:
    """Everything a model file holds: plain Python values and tensors only."""
    return {
        "format": MODEL_FORMAT,
        "network": spec.name,
        "architecture": spec.architecture,
        "head_layer": spec.head_layer,
        "weights_origin": weights_origin,
        "classes": list(classes),
        "input_size": list(spec.preprocessing.input_size),
        "preprocessing": spec.preprocessing.to_dict(),
        "metrics": metrics or {},
        "training": training or {},
        "torch_version": str(torch.__version__),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }


def save_model_file(url: str, record: dict) -> str:
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return storage.write_bytes(url, buffer.getvalue())


def read_model_record(url: str) -> dict:
    """Load a model file's record without building the network; refuses anything unsafe."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {url}") from None
    try:
        record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        unsafe = next((line.strip() for line in lines if "Unsupported global" in line), None)
        if unsafe:
            raise ModelFileError(
                f"refused to load {url}: it holds Python objects other than tensors and plain "
                f"values, which could run code ({unsafe})"
            ) from None
        # torch's message suggests weights_only=False: advice never to pass on. Keep its reason.
        text = str(exc)
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
        raise ModelFileError(
            f"refused to load {url}: not a model file that loads safely (truncated, "
            f"corrupt or not written by torch.save): {detail or lines[0]}"
        ) from None
    except Exception as exc:
        raise ModelFileError(
            f"{url} is not a readable model file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{url} is not a retrain model file (expected format {MODEL_FORMAT})")
    missing = [k for k in ("network", "classes", "preprocessing", "state_dict") if k not in record]
    if missing:
        raise ModelFileError(f"model file {url} lacks {', '.join(missing)}")
    return record


def model_from_record(record: dict, source: str = "model file") -> LoadedModel:
    spec = get_spec(record["network"])
    classes = [str(c) for c in record["classes"]]
    model, _ = build_network(spec.name, len(classes), weights="none")
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{source}: its weights do not fit {spec.name} with {len(classes)} classes: {str(exc).splitlines()[0]}"
        ) from None
    model.eval()
    return LoadedModel(
        model,
        spec,
        classes,
        Preprocessing.from_dict(record["preprocessing"]),
        {k: v for k, v in record.items() if k != "state_dict"},
    )


def load_model_file(url: str) -> LoadedModel:
    return model_from_record(read_model_record(url), source=url)


# ---- body and head: the split the transfer-mode feature cache trains on -----------------


@dataclass
class BodyHeadSplit:
    """A network cut just before its trainable head, sharing the model's modules (no copies).

    ``body`` maps a normalised image batch to features; ``rest`` maps features to logits: the
    head and the parameter-free layers after it (activation, pooling, flatten). ``dropout``
    is the probability of the dropout layer just before the head, which in training acts on
    the features (the caller applies it). ``rest(body(x)) == model(x)`` in eval mode; in
    transfer mode the body is frozen, so its output can be computed once and cached.
    """

    body: nn.Module
    rest: nn.Module
    dropout: float = 0.0


def split_at_head(model: nn.Module, spec: NetworkSpec) -> BodyHeadSplit:
    """The body/rest split of a registry network; raises ``NotImplementedError`` for an
    architecture it does not know (callers then fall back to running the whole model)."""
    arch = spec.architecture
    if arch.startswith("squeezenet"):
        # features -> classifier [Dropout, conv10 (the head), ReLU, AdaptiveAvgPool] -> flatten
        c = model.classifier
        return BodyHeadSplit(model.features, nn.Sequential(c[1], c[2], c[3], nn.Flatten(1)), c[0].p)
    if arch.startswith("resnet"):
        body = nn.Sequential(
            model.conv1,
            model.bn1,
            model.relu,
            model.maxpool,
            model.layer1,
            model.layer2,
            model.layer3,
            model.layer4,
            model.avgpool,
            nn.Flatten(1),
        )
        return BodyHeadSplit(body, model.fc)
    if arch.startswith("mobilenet_v3"):
        # classifier [Linear, Hardswish, Dropout, Linear (the head)]: the first two are frozen
        # pretrained layers, so they belong to the body.
        c = model.classifier
        return BodyHeadSplit(nn.Sequential(model.features, model.avgpool, nn.Flatten(1), c[0], c[1]), c[3], c[2].p)
    raise NotImplementedError(f"no body/head split known for architecture {arch!r}")
