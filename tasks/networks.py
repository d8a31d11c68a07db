"""The pretrained network registry as data; head replacement, freezing, learn-rate factors, summary.

Each entry is a row, in the style of torchvision's weights enums and fastai's ``model_meta``:
an architecture (a torchvision builder), its pretrained weights (torchvision's own ``Weights``
enum member, or a state-dict file described the same way), the preprocessing and input size
those weights want, its head layer (``conv10`` in SqueezeNet, as MATLAB names it) and, where the
head is not the network's last operation, where the transfer-mode feature cache cuts it off.
Every torchvision classifier is an entry under its builder name; :data:`NAMED_ENTRIES` adds the
names the seed and MATLAB use. The model file that carries these facts with the weights is
:mod:`retrain.tasks.model_file`.
"""

from __future__ import annotations

import difflib
import functools
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from retrain.tasks import storage
from retrain.tasks.preprocessing import Preprocessing
from retrain.tasks.vocabulary import MODES


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the network."""


@dataclass(frozen=True)
class WeightsFile:
    """Pretrained weights torchvision does not download, described as its weights enums describe
    theirs: a state-dict file (found under this name in torch's hub cache, or passed with
    ``--weights``), the preprocessing they were trained with, and what they classify."""

    file_name: str
    preprocessing: Preprocessing
    description: str
    categories: int

    def __str__(self) -> str:
        return self.file_name


@dataclass(frozen=True)
class HeadCut:
    """Where the feature cache cuts a network whose head is not its last operation (fastai's
    "cut"): the body's module path, the module paths from the head to the output (their output
    is flattened to N x classes), and the dropout just before the head, which in training acts
    on the features."""

    body: str
    rest: tuple[str, ...]
    dropout: str | None = None


@dataclass(frozen=True)
class ArchitectureMeta:
    """What torchvision's registry does not say about an architecture (fastai's ``model_meta``)."""

    head_name: str | None = None  # the head's name in the literature / MATLAB
    cut: HeadCut | None = None  # None: the head is the last operation
    builder_args: Mapping[str, Any] = field(default_factory=dict)


_SQUEEZENET = ArchitectureMeta(
    head_name="conv10",  # MATLAB's (and the paper's) name
    # features -> classifier [Dropout, conv10 (the head), ReLU, AdaptiveAvgPool] -> flatten
    cut=HeadCut(body="features", rest=("classifier.1", "classifier.2", "classifier.3"), dropout="classifier.0"),
)
# Builder arguments torchvision itself passes along with the Inception networks' pretrained
# weights: they take ImageNet-normalised input and rescale it inside (transform_input), and their
# auxiliary heads only matter when training from scratch on ImageNet. Applied to every build, so
# a state-dict file and the pretrained enum agree.
_INCEPTION = ArchitectureMeta(builder_args={"aux_logits": False, "transform_input": True, "init_weights": True})
MODEL_META = {
    "squeezenet1_0": _SQUEEZENET,
    "squeezenet1_1": _SQUEEZENET,
    "googlenet": _INCEPTION,
    "inception_v3": _INCEPTION,
}
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # in the raw downloaded files; never used here


@dataclass(frozen=True)
class Entry:
    """A registry name that is not a torchvision builder name."""

    architecture: str
    weights: WeightsFile | None = None  # None: the architecture's DEFAULT torchvision weights


# The original Caffe SqueezeNet 1.1 that MATLAB imports, in ../shared/weights: BGR, 0-255, with
# the per-channel mean (B 104, G 117, R 123) subtracted and no std, at 227x227.
CAFFE_SQUEEZENET = WeightsFile(
    file_name="squeezenet1_1_caffe-2c890718.pth",
    preprocessing=Preprocessing(
        input_size=(227, 227), channel_order="BGR", scale=1.0, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)
    ),
    description="SqueezeNet 1.1 with the original Caffe ImageNet weights MATLAB imports",
    categories=1000,
)
NAMED_ENTRIES = {
    "squeezenet": Entry("squeezenet1_1"),
    "squeezenet-caffe": Entry("squeezenet1_1", CAFFE_SQUEEZENET),
}


@dataclass(frozen=True)
class NetworkSpec:
    """A registry entry with everything the rest of retrain needs to know about it."""

    name: str
    architecture: str  # torchvision.models builder name
    head_layer: str  # module path of the layer replaced for K classes
    head_name: str  # what the layer is called in the literature / MATLAB
    preprocessing: Preprocessing
    weights: WeightsEnum | WeightsFile  # the pretrained weights, torchvision's own object or a file
    description: str = ""
    categories: int = 0  # classes of the pretrained head (ImageNet: 1000)
    cut: HeadCut | None = None  # where the feature cache cuts it; None: just before the head

    @property
    def from_torchvision(self) -> bool:
        """Whether torchvision downloads the pretrained weights (else they come in a file)."""
        return isinstance(self.weights, WeightsEnum)


def torchvision_classifiers() -> list[str]:
    """Every image classifier torchvision's registry knows (not detection, video...)."""
    return torchvision.models.list_models(module=torchvision.models)


def network_names() -> list[str]:
    """What ``--network`` accepts: every torchvision classifier and the named entries."""
    return sorted({*torchvision_classifiers(), *NAMED_ENTRIES})


def _file_entries() -> dict[str, WeightsFile]:
    """The named entries whose weights come in a file (torchvision cannot download them)."""
    return {name: entry.weights for name, entry in NAMED_ENTRIES.items() if entry.weights}


def _builder_args(architecture: str, input_size: tuple[int, int]) -> dict:
    args = dict(MODEL_META.get(architecture, ArchitectureMeta()).builder_args)
    if architecture.startswith("vit_"):  # position embeddings are sized for one input size
        args["image_size"] = input_size[0]
    return args


def _default_weights(architecture: str) -> WeightsEnum:
    return torchvision.models.get_model_weights(architecture).DEFAULT


def find_head(model: nn.Module) -> str:
    """The module path of a classifier's final learnable layer: the last Linear or 1x1
    convolution registered (every torchvision classifier registers its head last)."""
    heads = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1))
    ]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no Linear or 1x1 convolution to use as its head")
    return heads[-1]


def _skeleton(architecture: str, input_size: tuple[int, int]) -> nn.Module:
    """The architecture without memory for its weights (meta tensors) where it builds that
    way; a few (RegNet) compute their widths with tensors and need a real build."""
    builder_args = {**_builder_args(architecture, input_size), "weights": None}
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(architecture, **builder_args)
    except (NotImplementedError, RuntimeError):
        return torchvision.models.get_model(architecture, **builder_args)


def _torchvision_preprocessing(weights: WeightsEnum) -> Preprocessing:
    """Input size and normalisation from the transforms torchvision's weights carry."""
    transforms = weights.transforms()
    size = int(transforms.crop_size[0])
    return Preprocessing(
        input_size=(size, size),
        channel_order="RGB",
        scale=1 / 255,
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )


@functools.cache
def _architecture_spec(architecture: str) -> NetworkSpec:
    """The entry of a torchvision builder name: its DEFAULT weights, their preprocessing and
    categories, the head found in the architecture itself, and the architecture's meta row."""
    weights = _default_weights(architecture)
    preprocessing = _torchvision_preprocessing(weights)
    head = find_head(_skeleton(architecture, preprocessing.input_size))
    meta = MODEL_META.get(architecture, ArchitectureMeta())
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    accuracy = f", ImageNet top-1 {metrics['acc@1']:.1f} %" if "acc@1" in metrics else ""
    return NetworkSpec(
        name=architecture,
        architecture=architecture,
        head_layer=head,
        head_name=meta.head_name or head,
        preprocessing=preprocessing,
        weights=weights,
        description=f"torchvision {weights} ({weights.meta['num_params'] / 1e6:.1f} M parameters{accuracy})",
        categories=len(weights.meta["categories"]),
        cut=meta.cut,
    )


def get_spec(name: str) -> NetworkSpec:
    """The entry ``name``: any torchvision classifier by its builder name, or a named entry."""
    entry = NAMED_ENTRIES.get(name, Entry(name))
    if entry.architecture not in torchvision_classifiers():
        close = difflib.get_close_matches(name, network_names(), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown network {name!r}: any torchvision classifier (see `retrain network`), "
            f"or {', '.join(_file_entries())}" + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    spec = _architecture_spec(entry.architecture)
    if entry.weights:
        w = entry.weights
        spec = replace(
            spec, weights=w, preprocessing=w.preprocessing, description=w.description, categories=w.categories
        )
    return replace(spec, name=name) if name != spec.name else spec


def describe_network(name: str) -> dict:
    """One line of the network list, from torchvision's weights metadata alone (building
    every architecture to list them would take a minute); a named entry by its description."""
    if name in NAMED_ENTRIES:
        spec = get_spec(name)
        return {"network": name, "input_size": list(spec.preprocessing.input_size), "description": spec.description}
    weights = _default_weights(name)
    size = _torchvision_preprocessing(weights).input_size[0]
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return {
        "network": name,
        "input_size": [size, size],
        "parameters": weights.meta["num_params"],
        "imagenet_top1": metrics.get("acc@1"),
        "description": f"{weights}, {weights.meta['num_params'] / 1e6:.1f} M parameters",
    }


def replace_head(model: nn.Module, head_layer: str, num_classes: int) -> nn.Module:
    """Swap the final learnable layer for a fresh one with ``num_classes`` outputs."""
    old = model.get_submodule(head_layer)
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
        nn.init.normal_(new.weight, mean=0.0, std=0.01)  # torchvision's init for conv10
        nn.init.zeros_(new.bias)
    elif isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        raise TypeError(f"cannot replace head layer {head_layer!r} of type {type(old).__name__}")
    parent_path, _, child = head_layer.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


class TensorFileError(ValueError):
    """A file that ``torch.load(..., weights_only=True)`` refuses or cannot read: unsafe,
    truncated, corrupt or not a torch file. ``reason`` is torch's own exception."""

    def __init__(self, url: str, reason: Exception):
        super().__init__(f"{url}: {type(reason).__name__}: {reason}")
        self.reason = reason


def load_tensors(url: str) -> Any:
    """The file at ``url`` through ``torch.load(..., weights_only=True)``: tensors and plain
    values only, nothing in it can run code. The store's errors (FileNotFoundError where there
    is no file) pass through; :class:`TensorFileError` where torch cannot load it."""
    data = storage.read_bytes(url)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TensorFileError(url, exc) from exc


def _load_state_dict_file(url: str) -> dict[str, torch.Tensor]:
    try:
        obj = load_tensors(url)
    except FileNotFoundError:
        raise WeightsUnavailableError(f"weights file not found: {url}") from None
    except TensorFileError as exc:  # unpickling refused, truncated zip, garbage bytes...
        raise WeightsUnavailableError(
            f"weights file {url} is not a readable PyTorch state dict "
            f"(truncated, corrupt or holding arbitrary objects): {exc.reason}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"weights file {url} does not hold a state dict of tensors")
    return obj


def build_network(name: str, num_classes: int, weights: str = "default") -> tuple[nn.Module, str]:
    """The network ``name`` with its head replaced for ``num_classes``.

    ``weights``: ``"default"`` (the entry's pretrained weights: torchvision's weights enum
    member, or the entry's weights file in torch's hub cache), ``"none"`` (random init, for
    training from scratch) or the URL of a state-dict file for the entry's architecture.
    Returns the model and a description of where its weights came from.
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {num_classes}")
    builder_args = _builder_args(spec.architecture, spec.preprocessing.input_size)
    if weights == "none":
        model = torchvision.models.get_model(spec.architecture, weights=None, **builder_args)
        origin = "random initialisation"
    elif weights == "default" and spec.from_torchvision:
        try:
            model = torchvision.models.get_model(spec.architecture, weights=spec.weights, **builder_args)
        except Exception as exc:  # URLError, socket errors, hash mismatch, partial download
            raise _torchvision_unavailable(spec, exc) from None
        origin = f"torchvision {spec.weights} ({spec.weights.url})"
    else:
        url = _weights_file(spec, weights)
        model = torchvision.models.get_model(spec.architecture, weights=None, **builder_args)
        _load_fitting(model, spec, url)
        origin = f"file {url} (sha256 {storage.sha256_of(url)[:12]})"
    replace_head(model, spec.head_layer, num_classes)
    return model, origin


def check_weights(name: str, weights: str = "default") -> None:
    """Fail now, as :func:`build_network` would later, when ``weights`` cannot be had for
    network ``name`` or do not fit it; without building the network: a weights file loads
    into the architecture's skeleton (meta tensors where it builds that way), torchvision's
    weights are fetched into torch's cache (where the build finds them)."""
    spec = get_spec(name)
    if weights == "none":
        return
    if weights == "default" and spec.from_torchvision:
        try:
            spec.weights.get_state_dict(progress=False)
        except Exception as exc:
            raise _torchvision_unavailable(spec, exc) from None
        return
    _load_fitting(_skeleton(spec.architecture, spec.preprocessing.input_size), spec, _weights_file(spec, weights))


def _weights_file(spec: NetworkSpec, weights: str) -> str:
    """The state-dict file ``weights`` names ("default": the entry's file in torch's hub cache)."""
    if weights != "default":
        return weights
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    url = os.path.join(checkpoints, spec.weights.file_name)
    if not os.path.exists(url):
        raise WeightsUnavailableError(
            f"network {spec.name!r} needs its weights file {spec.weights.file_name}: pass "
            f"--weights PATH_OR_URL (for example ../shared/weights/{spec.weights.file_name}), "
            f"or copy the file into {checkpoints}"
        )
    return url


def _load_fitting(model: nn.Module, spec: NetworkSpec, url: str) -> None:
    """Load the state dict at ``url`` into ``model`` (on the meta device: check names and
    shapes only), or say why it does not fit. The Inception networks' auxiliary heads, in
    the raw downloaded files, are left out (never used here)."""
    state = {k: v for k, v in _load_state_dict_file(url).items() if not k.startswith(_AUX_PREFIXES)}
    try:
        model.load_state_dict(state, strict=True, assign=next(model.parameters()).is_meta)
    except RuntimeError as exc:
        raise WeightsUnavailableError(
            f"weights file {url} does not fit network {spec.name!r} ({spec.architecture}): "
            f"{str(exc).splitlines()[0]} ... (is it for another architecture?)"
        ) from None


def _torchvision_unavailable(spec: NetworkSpec, exc: Exception) -> WeightsUnavailableError:
    files = "".join(f", or --network {name} --weights PATH_TO_{w.file_name}" for name, w in _file_entries().items())
    return WeightsUnavailableError(
        f"could not obtain the pretrained weights for {spec.name!r} "
        f"({spec.weights}) through torchvision: {type(exc).__name__}: {exc}. "
        f"On a machine without internet access, use a local weights file: "
        f"--weights PATH (a state dict for torchvision.models.{spec.architecture}){files}; "
        f"or copy the file torchvision downloads ({spec.weights.url}) into "
        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}"
    )


# ---- what trains: freezing and learn-rate factors --------------------------------------


def pooled(head_input: torch.Tensor) -> torch.Tensor:
    """A head layer's input as one vector per image: averaged over its spatial positions (a
    convolutional head such as SqueezeNet's conv10), or flattened (a linear one)."""
    x = head_input.float()
    return x.mean((2, 3)) if x.dim() == 4 else x.flatten(1)


class WithEmbedding(nn.Module):
    """The network giving, beside its logits, the image's embedding: the pooled input of its
    head layer (the body's output, what the head classifies), from the same forward pass. Drift
    tests compare these (tasks/drift.py); the ONNX export gives them as a second output."""

    def __init__(self, model: nn.Module, head_layer: str):
        super().__init__()
        self.model = model
        self.head_layer = head_layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        head = self.model.get_submodule(self.head_layer)
        hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        return logits, pooled(captured[-1])


def head_parameters(model: nn.Module, spec: NetworkSpec) -> list[nn.Parameter]:
    return list(model.get_submodule(spec.head_layer).parameters())


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
    head = model.get_submodule(spec.head_layer)
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
