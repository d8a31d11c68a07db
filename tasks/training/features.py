"""Transfer mode's feature cache: the frozen body run once per training image and per cached
augmented view, so the head trains on features (an iteration then costs about a tenth).

Kept in memory (on the GPU when it fits there), or memory-mapped from ``.npy`` files in the
run folder when larger than ``feature_cache_memory_mb``; a resumed run reuses a cache on disk
made from the same images, body and settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from retrain.tasks import storage
from retrain.tasks.preprocessing import Augmentation, Preprocessing
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.devices import autocast, to_device
from retrain.tasks.training.schedule import seeded_generator
from torch import nn

log = logging.getLogger("retrain.training")

FEATURE_DTYPE = torch.float16  # half the memory of float32; features are ReLU/pool outputs
_FP16_MAX = 65504.0
AUG_CHUNK = 32  # images per augmentation generator: the views do not depend on batch sizes
# Images per backbone pass when computing features. On a CPU small batches are faster per
# image (SqueezeNet at 227 px: ~7 ms an image in batches of 16, ~15 ms in batches of 128,
# whose activations no longer fit the caches); a GPU wants large ones.
FEATURE_BATCH = {"cpu": 16, "cuda": 256}
FEATURE_FORMAT = "retrain.features/1"


@dataclass
class FeatureCache:
    """Body outputs for every training image (view 0: as it is; views 1..V: augmented, drawn
    once from the seed) and every validation image; float16, in (GPU) memory or memory-mapped
    from ``.npy`` files on disk. Feature maps are stored channels-last (H x W x C per image):
    the layout the head's convolution and the dropout before it run fastest on."""

    train: torch.Tensor | np.ndarray  # (views + 1, N, *stored_shape)
    val: torch.Tensor | np.ndarray  # (M, *stored_shape)
    location: str  # "memory", "cuda memory" or the folder holding the .npy files
    seconds: float
    reused: bool = False
    folder: str | None = None  # where the .npy files are, for a cache on disk
    temporary: bool = False  # the folder is a temporary one, deleted after training

    @property
    def views(self) -> int:
        return int(self.train.shape[0]) - 1

    @property
    def device(self) -> torch.device:
        return self.train.device if torch.is_tensor(self.train) else torch.device("cpu")

    def train_batch(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Features of image ``indices[i]`` in view ``views[i]``, where the cache lives."""
        if torch.is_tensor(self.train):
            return self.train[views.to(self.train.device), indices.to(self.train.device)]
        return torch.from_numpy(np.ascontiguousarray(self.train[views.numpy(), indices.numpy()]))

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.val), batch_size):
            chunk = self.val[start : start + batch_size]
            yield chunk if torch.is_tensor(chunk) else torch.from_numpy(np.array(chunk))  # a copy: maps are read-only

    def close(self, delete: bool = False) -> None:
        """Let go of the arrays (closing memory maps); delete the files of a temporary
        folder, or of any folder when ``delete``."""
        self.train = self.val = None  # type: ignore[assignment]
        if self.folder and (delete or self.temporary):
            _remove_cache_files(self.folder)

    def describe(self) -> dict:
        itemsize = 2
        shape = list(self.train.shape[2:])
        if len(shape) == 3:  # stored H x W x C: say C x H x W, as the network does
            shape = [shape[2], shape[0], shape[1]]
        images = int(self.train.shape[0] * self.train.shape[1] + self.val.shape[0])
        return {
            "views": self.views,
            "train_images": int(self.train.shape[1]),
            "val_images": int(self.val.shape[0]),
            "feature_shape": shape,
            "bytes": images * int(np.prod(shape)) * itemsize,
            "location": self.location,
            "seconds": round(self.seconds, 3),
            "reused": self.reused,
            "images_per_second": round(images / self.seconds, 1) if self.seconds > 0 and not self.reused else None,
        }


CACHE_FILES = ("manifest.json", "train.npy", "val.npy")  # the manifest goes first, comes last


def _remove_cache_files(folder: str) -> None:
    """Delete the files a cache wrote, then the folder if nothing else is in it."""
    for name in CACHE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _local_folder(url: str | None) -> str | None:
    """The local path for a cache folder URL; None for a store that is not a local disk
    (memory-mapping needs a local file)."""
    if not url:
        return None
    if "://" not in url or url.startswith("file://"):
        return storage.absolute(url)
    return None


def _view_batches(
    images: torch.Tensor, views: int, augmentation: Augmentation, seed: int, batch_size: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(view, first index, uint8 batch on ``device``) for view 0 (the images as they are) and
    each augmented view. Augmentation runs on the device (exact integer ops, the random draws
    come from the same CPU generators, so any device gives the same views), per AUG_CHUNK
    images with its own generator."""
    augment_on_device = device.type != "cpu"
    for view in range(views + 1):
        for start in range(0, len(images), batch_size):
            batch = to_device(images[start : start + batch_size], device)
            if view > 0:
                parts = []
                for s in range(0, len(batch), AUG_CHUNK):
                    g = seeded_generator(seed, -2, view, (start + s) // AUG_CHUNK)
                    chunk = batch[s : s + AUG_CHUNK]
                    if augment_on_device:
                        try:
                            parts.append(augmentation(chunk, g))
                            continue
                        except RuntimeError as exc:  # an op without a device kernel: on the host
                            log.warning("augmenting on the host (%s)", exc)
                            augment_on_device = False
                            g = seeded_generator(seed, -2, view, (start + s) // AUG_CHUNK)
                    parts.append(to_device(augmentation(chunk.cpu(), g), device))
                batch = torch.cat(parts)
            yield view, start, batch


def _stored_layout(features: torch.Tensor) -> torch.Tensor:
    """N x C x H x W feature maps -> N x H x W x C (a view when they are channels_last)."""
    return features.permute(0, 2, 3, 1) if features.dim() == 4 else features


def network_layout(features: torch.Tensor) -> torch.Tensor:
    """Stored N x H x W x C -> the N x C x H x W (channels_last) the network takes."""
    return features.permute(0, 3, 1, 2) if features.dim() == 4 else features


def _store_features(out: torch.Tensor | np.ndarray, view: int, start: int, features: torch.Tensor) -> None:
    features = _stored_layout(features.float().clamp_(-_FP16_MAX, _FP16_MAX).to(FEATURE_DTYPE))
    if torch.is_tensor(out):
        out[view, start : start + len(features)] = features.to(out.device)
    else:
        out[view, start : start + len(features)] = features.cpu().numpy()


def _run_body(
    body: nn.Module,
    images: torch.Tensor,
    views: int,
    augmentation: Augmentation,
    preprocessing: Preprocessing,
    seed: int,
    device: torch.device,
    batch_size: int,
    allocate: Callable[[tuple[int, ...]], torch.Tensor | np.ndarray],
    bar=None,
) -> torch.Tensor | np.ndarray:
    """Body features of ``images`` in views 0..``views``, into the array ``allocate(shape)``
    gives once the feature shape is known."""
    out = None
    body_batch = FEATURE_BATCH.get(device.type, batch_size)
    with torch.inference_mode(), autocast(device, training=False):
        for view, start, batch in _view_batches(images, views, augmentation, seed, batch_size, device):
            for s in range(0, len(batch), body_batch):
                part = batch[s : s + body_batch]
                count = len(part)
                if count < body_batch:  # pad: one input shape, so one set of kernels (a new
                    # shape costs seconds of oneDNN kernel generation, or cuDNN autotuning)
                    part = torch.cat([part, part.new_zeros((body_batch - count, *part.shape[1:]))])
                x = preprocessing.normalize(part).contiguous(memory_format=torch.channels_last)
                features = body(x)[:count]
                if out is None:
                    out = allocate(tuple(_stored_layout(features).shape[1:]))
                _store_features(out, view, start + s, features)
            if bar is not None:
                bar.update(len(batch))
    return out


class _Placement:
    """Where a cache goes, chosen when the first batch tells the feature shape (and so the
    size): GPU memory when it takes under half of what is free there, host memory up to
    ``memory_bytes``, else ``.npy`` files in ``local`` (a temporary folder when None)."""

    def __init__(self, device: torch.device, memory_bytes: int, local: str | None, counts: tuple[int, int, int]):
        self.device, self.memory_bytes, self.local = device, memory_bytes, local
        self.views, self.n, self.m = counts
        self.where, self.folder, self.temporary = "memory", None, False
        self.tensor_device = torch.device("cpu")

    def train_array(self, shape: tuple[int, ...]) -> torch.Tensor | np.ndarray:
        total_bytes = int(np.prod(shape)) * 2 * ((self.views + 1) * self.n + self.m)
        if self.device.type == "cuda" and total_bytes < 0.5 * torch.cuda.mem_get_info(self.device)[0]:
            self.where, self.tensor_device = "cuda memory", self.device
        elif total_bytes > self.memory_bytes:
            self.folder = self.local or tempfile.mkdtemp(prefix="retrain-features-")
            os.makedirs(self.folder, exist_ok=True)
            self.where, self.temporary = self.folder, self.folder != self.local
            log.info(
                "feature cache of %.0f MiB exceeds feature_cache_memory_mb: memory-mapped from %s",
                total_bytes / 2**20,
                self.folder,
            )
        return self._array("train.npy", (self.views + 1, self.n, *shape))

    def val_array(self, shape: tuple[int, ...]) -> torch.Tensor | np.ndarray:
        return self._array("val.npy", (1, self.m, *shape))

    def _array(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | np.ndarray:
        if self.folder:
            path = os.path.join(self.folder, name)
            return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        return torch.empty(shape, dtype=FEATURE_DTYPE, device=self.tensor_device)


def build_feature_cache(
    body: nn.Module,
    data: TrainingData,
    preprocessing: Preprocessing,
    augmentation: Augmentation,
    views: int,
    seed: int,
    device: torch.device,
    memory_bytes: int,
    folder: str | None = None,
    progress: bool = False,
    logger: logging.Logger | None = None,
) -> FeatureCache:
    """Run the frozen ``body`` once over every training image in ``views`` + 1 views and every
    validation image. Kept in memory (on the GPU when it fits there) up to ``memory_bytes``;
    larger caches go to ``.npy`` files in ``folder`` (a local path, else a temporary folder),
    which a resumed run reuses when they were made from the same images, body and settings."""
    logger = logger or log
    started = time.perf_counter()
    body.eval()
    batch_size = AUG_CHUNK * (8 if device.type == "cuda" else 1)  # images augmented (and copied) at once
    n, m = len(data.train_targets), len(data.val_targets)
    local = _local_folder(folder)
    key = None
    if local and os.path.exists(local):
        key = _cache_key(body, data, preprocessing, augmentation, views, seed)
        cached = _open_disk_cache(local, key)
        if cached is not None:
            logger.info("reusing the feature cache in %s", local)
            return cached
        _remove_cache_files(local)  # unfinished, or made from something else
    place = _Placement(device, memory_bytes, local, (views, n, m))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(views + 1) * n + m, desc="features", unit="img", leave=False)
    settings = (augmentation, preprocessing, seed, device, batch_size)
    try:
        train = _run_body(body, data.train_images, views, *settings, place.train_array, bar)
        val = place.val_array(tuple(train.shape[2:]))  # the same body, so the same feature shape
        if m:
            _run_body(body, data.val_images, 0, *settings, lambda _shape: val, bar)
    finally:
        if bar is not None:
            bar.close()
    if place.folder:
        train.flush()
        val.flush()
        if not place.temporary:
            key = key or _cache_key(body, data, preprocessing, augmentation, views, seed)
            storage.write_json(os.path.join(place.folder, "manifest.json"), key)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cache = FeatureCache(
        train, val[0], place.where, time.perf_counter() - started, folder=place.folder, temporary=place.temporary
    )
    info = cache.describe()
    logger.info(
        "feature cache: %d training images x %d views + %d validation images, %.0f MiB in %s, %.1f s (%.0f images/s)",
        n,
        views + 1,
        m,
        info["bytes"] / 2**20,
        info["location"],
        info["seconds"],
        info["images_per_second"] or 0,
    )
    return cache


def _cache_key(
    body: nn.Module, data: TrainingData, preprocessing: Preprocessing, augmentation: Augmentation, views: int, seed: int
) -> dict:
    return {
        "format": FEATURE_FORMAT,
        "views": views,
        "seed": seed,
        "augmentation": augmentation.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "aug_chunk": AUG_CHUNK,
        "train_images": _digest(data.train_images),
        "val_images": _digest(data.val_images),
        "body": _digest(*[t for t in body.state_dict().values()]),
    }


def _open_disk_cache(folder: str, key: dict) -> FeatureCache | None:
    try:
        if storage.read_json(os.path.join(folder, "manifest.json")) != key:
            return None
        train = np.load(os.path.join(folder, "train.npy"), mmap_mode="r")
        val = np.load(os.path.join(folder, "val.npy"), mmap_mode="r")
    except (OSError, ValueError):
        return None
    return FeatureCache(train, val[0], folder, 0.0, reused=True, folder=folder)
