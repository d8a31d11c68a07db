"""Pretrained network registry, head replacement, freezing, learn-rate factors, summary.

Each registry entry knows its architecture, where its weights come from, its input size and
preprocessing, and its head layer (``conv10`` in SqueezeNet, as MATLAB names it). The model
file that carries these facts with the weights is :mod:`retrain.tasks.model_file`.
"""

from __future__ import annotations

import difflib
import functools
import io
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torchvision
from retrain.tasks import storage
from retrain.tasks.preprocessing import CAFFE_BGR, Preprocessing
from retrain.tasks.request import MODES
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the network."""


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
    categories: int = 0  # classes of the pretrained head (ImageNet: 1000)


# Names users know from MATLAB or the seed that are not torchvision builder names.
ALIASES = {"squeezenet": "squeezenet1_1"}
# Builder arguments torchvision itself passes along with these networks' pretrained weights:
# the Inception networks take ImageNet-normalised input and rescale it inside
# (transform_input), and their auxiliary heads only matter when training from scratch on
# ImageNet. Applied to every build, so a state-dict file and the pretrained enum agree.
_BUILDER_ARGS = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": True},
}
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # in the raw downloaded files; never used here


def torchvision_classifiers() -> list[str]:
    """Every image classifier torchvision's registry knows (not detection, video...)."""
    return torchvision.models.list_models(module=torchvision.models)


def network_names() -> list[str]:
    """What ``--network`` accepts: every torchvision classifier, the aliases and squeezenet-caffe."""
    return sorted({*torchvision_classifiers(), *ALIASES, "squeezenet-caffe"})


def _builder_args(architecture: str, input_size: tuple[int, int]) -> dict:
    args = dict(_BUILDER_ARGS.get(architecture, {}))
    if architecture.startswith("vit_"):  # position embeddings are sized for one input size
        args["image_size"] = input_size[0]
    return args


def _default_weights(architecture: str):
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


@functools.cache
def _torchvision_spec(architecture: str) -> NetworkSpec:
    """A spec from torchvision's registry: input size, normalisation and categories from the
    architecture's DEFAULT weights enum, the head found in the architecture itself."""
    weights = _default_weights(architecture)
    transforms = weights.transforms()
    size = int(transforms.crop_size[0])
    preprocessing = Preprocessing(
        input_size=(size, size),
        channel_order="RGB",
        scale=1 / 255,
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
    )
    head = find_head(_skeleton(architecture, (size, size)))
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    accuracy = f", ImageNet top-1 {metrics['acc@1']:.1f} %" if "acc@1" in metrics else ""
    return NetworkSpec(
        name=architecture,
        architecture=architecture,
        head_layer=head,
        head_name=head,
        preprocessing=preprocessing,
        torchvision_weights=f"{type(weights).__name__}.{weights.name}",
        description=f"torchvision {type(weights).__name__}.{weights.name} "
        f"({weights.meta['num_params'] / 1e6:.1f} M parameters{accuracy})",
        categories=len(weights.meta["categories"]),
    )


def get_spec(name: str) -> NetworkSpec:
    """The spec of any torchvision classifier by its builder name, of ``squeezenet``
    (SqueezeNet 1.1, its head named ``conv10`` as in MATLAB) or of ``squeezenet-caffe``."""
    if name == "squeezenet-caffe":
        return replace(
            get_spec("squeezenet"),
            name=name,
            preprocessing=Preprocessing(input_size=(227, 227), **CAFFE_BGR),
            torchvision_weights=None,
            weights_file="squeezenet1_1_caffe-2c890718.pth",
            description="SqueezeNet 1.1 with the original Caffe ImageNet weights MATLAB imports",
        )
    architecture = ALIASES.get(name, name)
    if architecture not in torchvision_classifiers():
        close = difflib.get_close_matches(name, network_names(), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown network {name!r}: any torchvision classifier (see `retrain network`), "
            f"or squeezenet-caffe" + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    spec = _torchvision_spec(architecture)
    if architecture.startswith("squeezenet"):
        spec = replace(spec, head_name="conv10")  # MATLAB's (and the paper's) name
    return replace(spec, name=name) if name != architecture else spec


def describe_network(name: str) -> dict:
    """One line of the network list, from torchvision's weights metadata alone (building
    every architecture to list them would take a minute)."""
    if name in ALIASES or name == "squeezenet-caffe":
        spec = get_spec(name)
        return {"network": name, "input_size": list(spec.preprocessing.input_size), "description": spec.description}
    weights = _default_weights(name)
    size = int(weights.transforms().crop_size[0])
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return {
        "network": name,
        "input_size": [size, size],
        "parameters": weights.meta["num_params"],
        "imagenet_top1": metrics.get("acc@1"),
        "description": f"{type(weights).__name__}.{weights.name}, {weights.meta['num_params'] / 1e6:.1f} M parameters",
    }


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

    ``weights``: ``"default"`` (the network's pretrained weights: torchvision's DEFAULT enum
    member, or the weights file of squeezenet-caffe), ``"none"`` (random init, for training
    from scratch) or the URL of a state-dict file for the torchvision architecture. Returns
    the model and a description of where its weights came from.
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {num_classes}")
    builder_args = _builder_args(spec.architecture, spec.preprocessing.input_size)
    if weights == "none":
        model = torchvision.models.get_model(spec.architecture, weights=None, **builder_args)
        origin = "random initialisation"
    elif weights == "default" and spec.torchvision_weights:
        weights_enum = _torchvision_weights(spec)
        try:
            model = torchvision.models.get_model(spec.architecture, weights=weights_enum, **builder_args)
        except Exception as exc:  # URLError, socket errors, hash mismatch, partial download
            raise _torchvision_unavailable(spec, exc) from None
        origin = f"torchvision {spec.torchvision_weights} ({weights_enum.url})"
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
    if weights == "default" and spec.torchvision_weights:
        try:
            _torchvision_weights(spec).get_state_dict(progress=False)
        except Exception as exc:
            raise _torchvision_unavailable(spec, exc) from None
        return
    _load_fitting(_skeleton(spec.architecture, spec.preprocessing.input_size), spec, _weights_file(spec, weights))


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


def _torchvision_weights(spec: NetworkSpec):
    enum_name, _, member = spec.torchvision_weights.partition(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def _torchvision_unavailable(spec: NetworkSpec, exc: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not obtain the pretrained weights for {spec.name!r} "
        f"({spec.torchvision_weights}) through torchvision: {type(exc).__name__}: {exc}. "
        f"On a machine without internet access, use a local weights file: "
        f"--weights PATH (a state dict for torchvision.models.{spec.architecture}), or "
        f"--network squeezenet-caffe --weights PATH_TO_squeezenet1_1_caffe-2c890718.pth; "
        f"or copy the file torchvision downloads ({_torchvision_weights(spec).url}) into "
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
