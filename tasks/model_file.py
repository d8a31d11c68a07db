"""The self-describing model file: the network's registry facts (architecture, weights'
origin, input size, preprocessing, head layer) plus the classes, metrics, training options and
state dict, written with ``torch.save`` and loaded with ``torch.load(..., weights_only=True)``:
nothing in it can run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import torch
from torch import nn

from retrain.tasks import storage
from retrain.tasks.networks import NetworkSpec, TensorFileError, build_network, get_spec, load_tensors
from retrain.tasks.preprocessing import Preprocessing

MODEL_FORMAT = "retrain.model/1"


class ModelFileError(ValueError):
    """A model file is missing, truncated, tampered with, unsafe or not a retrain model."""


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
        record = load_tensors(url)
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {url}") from None
    except TensorFileError as exc:
        raise ModelFileError(_unloadable(url, exc.reason)) from None
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


def _unloadable(url: str, reason: Exception) -> str:
    """Why torch would not load the file at ``url``, in words for its owner."""
    if not isinstance(reason, pickle.UnpicklingError):
        return f"{url} is not a readable model file (truncated or corrupt?): {type(reason).__name__}: {reason}"
    lines = str(reason).splitlines()
    unsafe = next((line.strip() for line in lines if "Unsupported global" in line), None)
    if unsafe:
        return (
            f"refused to load {url}: it holds Python objects other than tensors and plain "
            f"values, which could run code ({unsafe})"
        )
    # torch's message suggests weights_only=False: advice never to pass on. Keep its reason.
    detail = str(reason).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
    return (
        f"refused to load {url}: not a model file that loads safely (truncated, "
        f"corrupt or not written by torch.save): {detail or lines[0]}"
    )
