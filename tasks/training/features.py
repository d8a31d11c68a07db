"""Transfer mode's feature cache: the frozen body run once per training image and per cached
augmented view, so the head trains on features (an iteration then costs about a tenth).

The training images are cut into parts of FEATURE_PART consecutive images (in training
order); a part's features (every view) are computed by one call of :func:`part_features`,
the unit of work wherever it runs, so every path gives the same numbers:

- small caches stay in memory (on the GPU when they fit there), computed part by part in
  this process, up to ``feature_cache_memory_mb``;
- larger ones are written part by part as feature shards, ``.npy`` files in a folder (the
  run's ``features/``, or a folder shared by an experiment's runs), and streamed from there
  with positioned reads, so the process's memory does not grow with the number of images;
- on a Dask cluster (a local one, or ``--dask-address``) each part is a task that reads its
  images from the image shards and writes its feature shard to the store; the head then
  streams them like a cache on disk.

The body runs on the fastest engine that passes its gate here (int8, bf16: see
:mod:`.feature_engine`), or in float32; a cache says which made it.

A folder's ``plan.json`` says what its shards are made of (images, body weights, engine,
views, seed, augmentation...); shards already there with the same plan are kept, so a run killed
while extracting features (kill -9) resumes with the parts still missing, and a finished set
(``manifest.json``, written last) is reused by a resumed run or by the other runs of an
experiment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from retrain.tasks.parts import compute_here, finish
from retrain.tasks.preprocessing import Augmentation, Preprocessing
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.devices import to_device
from retrain.tasks.training.feature_engine import CALIBRATION_IMAGES, FLOAT32, BodyEngine, choose_engine
from retrain.tasks.training.feature_files import (
    PLAN,
    FeatureCache,
    FeaturePlan,
    existing_files,
    local_folder,
    open_shards,
    start_folder,
)
from retrain.tasks.training.row_files import write_npy
from retrain.tasks.training.schedule import seeded_generator
from retrain.tasks.training.shards import ShardImages

if TYPE_CHECKING:  # the Dask path loads only when a cluster is asked for
    from retrain.tasks.training.feature_cluster import ClusterBody

log = logging.getLogger("retrain.training")

FEATURE_DTYPE = torch.float16  # half the memory of float32; features are ReLU/pool outputs
_FP16_MAX = 65504.0
AUG_CHUNK = 32  # images per augmentation generator: the views do not depend on batch sizes
# Images per backbone pass when computing features. On a CPU small batches are faster per
# image (SqueezeNet at 227 px: ~7 ms an image in batches of 16, ~15 ms in batches of 128,
# whose activations no longer fit the caches); a GPU wants large ones.
FEATURE_BATCH = {"cpu": 16, "cuda": 256}
FEATURE_FORMAT = "retrain.features/2"
# Training images per feature part (one task, one shard file): a multiple of every batch the
# body runs in (AUG_CHUNK x 8 on a GPU), so parts cut no batch and the features are the same
# as from one pass over the whole set.
FEATURE_PART = int(os.environ.get("RETRAIN_FEATURE_PART", "512"))


def _check_part_size(size: int) -> int:
    if size < AUG_CHUNK or size % AUG_CHUNK:
        raise ValueError(f"feature part size must be a positive multiple of {AUG_CHUNK}, not {size}")
    return size


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def body_digest(body: nn.Module) -> str:
    """What a frozen body is: its weights (and buffers)."""
    return _digest(*body.state_dict().values())


def _images_digest(images) -> str:
    """What a set of images is: the shards' key and which images for images in shards (no
    reading), the bytes for a tensor."""
    if isinstance(images, ShardImages):
        return images.content_digest()
    return _digest(images)


# ---- one part: the unit of work ------------------------------------------------------------------


def _stored_layout(features: torch.Tensor) -> torch.Tensor:
    """N x C x H x W feature maps -> N x H x W x C (a view when they are channels_last)."""
    return features.permute(0, 2, 3, 1) if features.dim() == 4 else features


def network_layout(features: torch.Tensor) -> torch.Tensor:
    """Stored N x H x W x C -> the N x C x H x W (channels_last) the network takes."""
    return features.permute(0, 3, 1, 2) if features.dim() == 4 else features


def _view_batches(
    images: torch.Tensor,
    views: int,
    augmentation: Augmentation,
    seed: int,
    batch_size: int,
    device: torch.device,
    first: int = 0,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(view, first index, uint8 batch on ``device``) for view 0 (the images as they are) and
    each augmented view; ``images`` are the training images from position ``first`` on (a
    multiple of AUG_CHUNK). Augmentation runs on the device (exact integer ops, the random
    draws come from the same CPU generators, so any device gives the same views), per
    AUG_CHUNK images with its own generator, keyed by their position in the training set."""
    augment_on_device = device.type != "cpu"
    for view in range(views + 1):
        for start in range(0, len(images), batch_size):
            batch = to_device(images[start : start + batch_size], device)
            if view > 0:
                parts = []
                for s in range(0, len(batch), AUG_CHUNK):
                    chunk_key = (first + start + s) // AUG_CHUNK
                    g = seeded_generator(seed, -2, view, chunk_key)
                    chunk = batch[s : s + AUG_CHUNK]
                    if augment_on_device:
                        try:
                            parts.append(augmentation(chunk, g))
                            continue
                        except RuntimeError as exc:  # an op without a device kernel: on the host
                            log.warning("augmenting on the host (%s)", exc)
                            augment_on_device = False
                            g = seeded_generator(seed, -2, view, chunk_key)
                    parts.append(to_device(augmentation(chunk.cpu(), g), device))
                batch = torch.cat(parts)
            yield view, start, batch


def part_features(
    body: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    first: int,
    views: int,
    augmentation: Augmentation,
    preprocessing: Preprocessing,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Body features (float16, stored layout, on ``device``) of ``images`` (uint8, the
    training images from position ``first`` on) in views 0..``views``: (views + 1, n, *shape).
    ``body``: the frozen body, or it on a faster engine (a :class:`.feature_engine.BodyEngine`,
    which owns its precision)."""
    out = None
    batch_size = AUG_CHUNK * (8 if device.type == "cuda" else 1)  # images augmented (and copied) at once
    body_batch = FEATURE_BATCH.get(device.type, batch_size)
    with torch.inference_mode():
        for view, start, batch in _view_batches(images, views, augmentation, seed, batch_size, device, first):
            for s in range(0, len(batch), body_batch):
                part = batch[s : s + body_batch]
                count = len(part)
                if count < body_batch:  # pad: one input shape, so one set of kernels (a new
                    # shape costs seconds of oneDNN kernel generation, or cuDNN autotuning)
                    part = torch.cat([part, part.new_zeros((body_batch - count, *part.shape[1:]))])
                x = preprocessing.normalize(part).contiguous(memory_format=torch.channels_last)
                features = _stored_layout(body(x)[:count].float().clamp_(-_FP16_MAX, _FP16_MAX).to(FEATURE_DTYPE))
                if out is None:
                    out = torch.empty((views + 1, len(images), *features.shape[1:]), dtype=FEATURE_DTYPE, device=device)
                out[view, start + s : start + s + count] = features
    if out is None:  # no images
        raise ValueError("no images to compute features of")
    return out


# ---- the plan of a feature folder ------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureJob:
    """What a feature cache is computed from: the frozen body, the images, their
    preprocessing and cached views' augmentation, the plan of its parts and the views' seed."""

    body: nn.Module
    data: TrainingData
    preprocessing: Preprocessing
    augmentation: Augmentation
    plan: FeaturePlan
    seed: int
    engine: str = FLOAT32  # what computes the features (tasks/training/feature_engine.py)
    runner: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)  # the body on it

    def forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.runner if self.runner is not None else self.body

    def key(self) -> dict:
        """What a folder's ``plan.json`` says: shards with another key are not reused."""
        return {
            "format": FEATURE_FORMAT,
            "views": self.plan.views,
            "seed": self.seed,
            "augmentation": self.augmentation.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "aug_chunk": AUG_CHUNK,
            "part": self.plan.part,
            "train_images": _images_digest(self.data.train_images),
            "val_images": _images_digest(self.data.val_images),
            "counts": [len(self.data.train_targets), len(self.data.val_targets)],
            "body": body_digest(self.body),
            # Features from another engine are other numbers: never reused as these.
            "engine": self.engine,
        }

    def images(self, kind: str):
        return self.data.train_images if kind == "train" else self.data.val_images


# ---- building the cache ------------------------------------------------------------------------


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
    cluster: ClusterBody | None = None,  # tasks/training/feature_cluster.py
    engine: str = FLOAT32,
) -> FeatureCache:
    """Run the frozen ``body`` once over every training image in ``views`` + 1 views and every
    validation image. Kept in memory (on the GPU when it fits there) up to ``memory_bytes``;
    larger caches are feature shards in ``folder`` (a local path, else a temporary folder),
    which a resumed run reuses (or completes) when they were made from the same images, body
    and settings. With ``cluster`` (and images in shards), the parts are computed on Dask into
    ``folder`` (any store URL) and then streamed. ``engine``: what the body runs on
    (tasks/training/feature_engine.py: "auto" is the fastest one not failed here before);
    the cache's description names the engine it was made on."""
    logger = logger or log
    started = time.perf_counter()
    body.eval()
    n, m = len(data.train_targets), len(data.val_targets)
    plan = FeaturePlan(n, m, views, _check_part_size(FEATURE_PART))
    if engine == "auto":
        engine = choose_engine(engine, device, lambda: body_digest(body), (views + 1) * n + m, m)
    # Said before it starts: the body's pass over every view is the slow part of transfer mode.
    logger.info(
        "feature cache: preparing the body features of %d training images x %d views + %d validation images on %s",
        n,
        views + 1,
        m,
        engine,
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(views + 1) * n + m, desc="features", unit="img", leave=False)
    try:
        distributed = (
            cluster is not None
            and isinstance(data.train_images, ShardImages)
            and (m == 0 or isinstance(data.val_images, ShardImages))
            and folder is not None
        )
        runner = BodyEngine(body, engine, device, preprocessing, lambda: data.train_images[:CALIBRATION_IMAGES])
        job = FeatureJob(body, data, preprocessing, augmentation, plan, seed, engine, runner)
        if distributed:
            from retrain.tasks.training.feature_cluster import build_on_cluster  # Dask: only when asked

            cache = build_on_cluster(job, folder, cluster, bar, logger)
        else:
            cache = _build_in_process(job, device, memory_bytes, folder, bar, logger)
    finally:
        if bar is not None:
            bar.close()
    if not cache.reused:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cache.seconds = time.perf_counter() - started
    cache.extraction["engine"] = engine
    info = cache.describe()
    logger.info(
        "feature cache: %d training images x %d views + %d validation images, %.0f MiB in %s, %s%.1f s "
        "(%.0f images/s on %s)",
        n,
        views + 1,
        m,
        info["bytes"] / 2**20,
        info["location"],
        "reused, " if cache.reused else "",
        info["seconds"],
        info["images_per_second"] or 0,
        engine,
    )
    return cache


def _build_in_process(
    job: FeatureJob, device: torch.device, memory_bytes: int, folder: str | None, bar, logger: logging.Logger
) -> FeatureCache:
    plan = job.plan
    local = local_folder(folder)
    key = None
    done: set[str] = set()
    if local and os.path.exists(os.path.join(local, PLAN)):
        key = job.key()
        done = existing_files(local, key)
    placed = _Placement(job, device, memory_bytes, local, bool(done), key, logger)
    work = plan.parts_job(local or "", placed.compute)
    if work.finished(done):
        train, val = open_shards(plan, local, local)
        logger.info("reusing the feature cache in %s", local)
        return FeatureCache(train, val, local, 0.0, reused=True, folder=local)
    todo = work.missing(done)

    def progress(part, _record) -> None:
        if bar is not None:
            kind, _, first, stop = part.args
            bar.update((stop - first) * ((plan.views + 1) if kind == "train" else 1))

    for part in work.parts:
        if part.name in done:
            progress(part, None)
    compute_here(work, todo, progress)
    stats = {"where": "in process", "parts": len(plan.parts()), "computed": len(todo)}
    if placed.where is None:  # every part was on disk already, but not the manifest
        placed.where, placed.target = local, local
    if placed.target is None:
        memory = placed.memory
        shape = next(iter(memory.values())).shape[2:]
        train = memory["train"]
        val = memory.get("val", torch.empty((1, 0, *shape), dtype=FEATURE_DTYPE, device=train.device))[0]
        return FeatureCache(train, val, placed.where, 0.0, extraction=stats)
    finish(replace(work, folder=placed.target))
    train, val = open_shards(plan, placed.target, placed.target)
    return FeatureCache(
        train, val, placed.target, 0.0, folder=placed.target, temporary=placed.temporary, extraction=stats
    )


@dataclass
class _Placement:
    """Computes the parts in this process and puts each where the cache goes, which the
    first part computed decides (from its size: see :func:`_placement`): (GPU) memory, or
    feature shards in a folder."""

    job: FeatureJob
    device: torch.device
    memory_bytes: int
    local: str | None
    resuming: bool
    key: dict | None  # job.key() digests the body: once
    logger: logging.Logger
    where: str | None = None
    target: str | None = None  # the shard folder; None: memory
    temporary: bool = False
    memory: dict[str, torch.Tensor] = field(default_factory=dict)

    def compute(self, kind: str, j: int, first: int, stop: int) -> None:
        job, plan = self.job, self.job.plan
        views = plan.views if kind == "train" else 0
        images = job.images(kind)[first:stop]
        features = part_features(
            job.forward(), images, first, views, job.augmentation, job.preprocessing, job.seed, self.device
        )
        if self.where is None:
            self.where, self.target, self.temporary = _placement(
                plan, features, self.device, self.memory_bytes, self.local, self.resuming
            )
            if self.target is not None:
                self.key = self.key or job.key()
                start_folder(self.target, self.key)
                if self.target == self.local:
                    self.logger.info("feature cache: shards in %s", self.target)
        if self.target is None:
            if kind not in self.memory:
                total = plan.n if kind == "train" else plan.m
                on = self.device if self.where == "cuda memory" else torch.device("cpu")
                self.memory[kind] = torch.empty((views + 1, total, *features.shape[2:]), dtype=FEATURE_DTYPE, device=on)
            self.memory[kind][:, first:stop] = features.to(self.memory[kind].device)
        else:
            write_npy(os.path.join(self.target, plan.name(kind, j)), features.cpu().numpy())


def _placement(
    plan: FeaturePlan, first: torch.Tensor, device: torch.device, memory_bytes: int, local: str | None, resuming: bool
) -> tuple[str, str | None, bool]:
    """Where a cache goes, from its first part's feature shape: (location, shard folder or
    None for memory, whether that folder is temporary). GPU memory when it takes under half
    of what is free there, host memory up to ``memory_bytes``, else shards in ``local`` (a
    temporary folder when None). A folder that holds shards of this cache already stays."""
    total_bytes = int(np.prod(first.shape[2:])) * 2 * ((plan.views + 1) * plan.n + plan.m)
    if not resuming:
        if device.type == "cuda" and total_bytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
            return "cuda memory", None, False
        if total_bytes <= memory_bytes:
            return "memory", None, False
    target = local or tempfile.mkdtemp(prefix="retrain-features-")
    os.makedirs(target, exist_ok=True)
    return target, target, target != local
