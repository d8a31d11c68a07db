"""Body and head: the split the transfer-mode feature cache trains on (the frozen body runs
once per image and view; only the head trains)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from retrain.tasks.networks import NetworkSpec


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
    """The body/rest split of a network: where the registry gives a cut (SqueezeNet's 1x1-conv
    head is followed by ReLU and pooling), there; for every other network the head is the last
    operation and the body is the model with the head replaced by an identity. That is checked
    by one forward pass; where it does not hold, ``NotImplementedError`` (callers then run the
    whole model)."""
    if spec.cut is not None:
        rest = nn.Sequential(*(model.get_submodule(path) for path in spec.cut.rest), nn.Flatten(1))
        dropout = model.get_submodule(spec.cut.dropout).p if spec.cut.dropout else 0.0
        return BodyHeadSplit(model.get_submodule(spec.cut.body), rest, dropout)
    parent_path, _, child = spec.head_layer.rpartition(".")
    parent = model.get_submodule(parent_path)
    head = parent.get_submodule(child)
    dropout = 0.0
    if isinstance(parent, nn.Sequential):  # a dropout just before the head acts on the features
        siblings = list(parent._modules)
        position = siblings.index(child)
        if position and isinstance(parent[position - 1], nn.Dropout):
            dropout = parent[position - 1].p
    split = BodyHeadSplit(_with_identity_head(model, spec.head_layer), head, dropout)
    if not _split_matches(model, split, spec.preprocessing.input_size):
        raise NotImplementedError(f"{spec.architecture}: its head {spec.head_layer} is not its last operation")
    return split


def _with_identity_head(model: nn.Module, head_path: str) -> nn.Module:
    """``model`` with the head module swapped for an identity: shallow copies of the modules
    on the path to the head, every parameter and other module shared (no copies)."""
    *parents, child = head_path.split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)
    node = root
    for part in parents:
        copied = copy.copy(node._modules[part])
        copied._modules = dict(copied._modules)
        node._modules[part] = copied
        node = copied
    node._modules[child] = nn.Identity()
    return root


def _split_matches(model: nn.Module, split: BodyHeadSplit, input_size: tuple[int, int]) -> bool:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, *input_size, generator=generator).to(parameter.device, parameter.dtype)
            whole, parts = model(x), split.rest(split.body(x))
    finally:
        model.train(was_training)
    return whole.shape == parts.shape and torch.allclose(whole, parts, rtol=1e-3, atol=1e-4 * whole.abs().max().item())
