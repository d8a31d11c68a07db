"""Dropout whose mask is a function of (seed, iteration, the sample's place in the global batch).

``nn.Dropout`` draws one mask for the whole batch from the global generator: a process that
holds half of the batch draws a different mask for the same sample than one process holding
all of it, so a run split over several processes (tasks/training/distributed.py) would follow
another path than the same run in one. Here each element's keep/drop is a hash of the key, the
sample's position in the global batch and the element's index: the same sample at the same
iteration is masked the same however the batch is split, on any device, and a resumed run
masks as an uninterrupted one does. It applies to ``nn.Dropout`` modules (SqueezeNet's,
VGG's, AlexNet's, the ViT's and EfficientNet's classifiers); other random layers
(``nn.Dropout2d``, torchvision's StochasticDepth) keep drawing from the global generator.
"""

from __future__ import annotations

import torch
from torch import nn

_MASK32 = 0xFFFF_FFFF
_KEEP_BITS = 24  # the keep probability is rounded to 1/2**24


def _signed32(value: int) -> int:
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int32 (products wrap; shifts made logical by
    masking), in place."""
    x ^= (x >> 16) & 0xFFFF
    x *= _signed32(0x85EB_CA6B)
    x ^= (x >> 13) & 0x7FFFF
    x *= _signed32(0xC2B2_AE35)
    x ^= (x >> 16) & 0xFFFF
    return x


def keep_mask(
    shape: tuple[int, ...], p: float, key: int, positions: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Boolean keep mask (``shape``: batch first) for the samples at ``positions`` of the
    global batch: element e of the sample at position s is kept when the hash of
    (key, s, e) falls above ``p``."""
    per_sample = 1
    for n in shape[1:]:
        per_sample *= n
    salt = positions.to(device=device, dtype=torch.int32) * _signed32(0x9E37_79B9) + _signed32(key)
    salt = _fmix32(salt)
    x = torch.arange(per_sample, device=device, dtype=torch.int32).mul_(_signed32(0x27D4_EB2F))
    x = _fmix32(x.unsqueeze(0) + salt.unsqueeze(1))
    threshold = round(p * (1 << _KEEP_BITS))
    return ((x & ((1 << _KEEP_BITS) - 1)) >= threshold).view(shape)


class KeyedDropout:
    """Replaces the dropout of a model's ``nn.Dropout`` modules while training: call
    :meth:`train_mode` after ``model.train()`` (the modules themselves then pass their input
    through) and run the forward pass inside :meth:`keyed`; outside it (validation) the
    modules behave as usual. :meth:`remove` takes the hooks off."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
        self._key: tuple[int, int, torch.Tensor] | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in self.modules]
        self._index = {id(m): i for i, m in enumerate(self.modules)}

    def train_mode(self) -> None:
        for m in self.modules:
            m.eval()

    def keyed(self, seed: int, iteration: int, positions: torch.Tensor) -> _Keyed:
        """The forward passes inside draw the masks of ``iteration`` for the samples at
        ``positions`` of the global batch."""
        return _Keyed(self, (seed, iteration, positions))

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._key is None:
            return None
        seed, iteration, positions = self._key
        key = hash((seed, iteration, self._index[id(module)])) & _MASK32
        p = module.p
        if p >= 1:
            return output * 0
        mask = keep_mask(tuple(output.shape), p, key, positions, output.device)
        return output * mask.to(output.dtype) * (1.0 / (1.0 - p))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _Keyed:
    def __init__(self, owner: KeyedDropout, key: tuple):
        self.owner, self.key = owner, key

    def __enter__(self) -> None:
        self.owner._key = self.key

    def __exit__(self, *exc) -> None:
        self.owner._key = None
