"""Image shards: a data set's images decoded once, at the network's input size, into uint8
``.npy`` files in the store, which every run, epoch and mode then streams batches from.

::

    <store>/shards/<key>/plan.json            what the shards hold (written first)
    <store>/shards/<key>/shard-000000.npy     images 0..SHARD_IMAGES-1, uint8 N x 3 x H x W
    <store>/shards/<key>/shard-000001.npy     ... each written atomically (temporary name, then move)
    <store>/shards/<key>/manifest.json        written last: every shard is there

The images of a run's split (train, val and test rows alike) are sorted by path; image ``i``
of that order is row ``i % SHARD_IMAGES`` of shard ``i // SHARD_IMAGES``. The key is a digest
of the images' content (the sha1 the index stage took of each file's bytes, in that order), the
input size and the decoder and resize method (with their library versions), so runs with
other splits, seeds, modes or networks of the same input size share one set of shards, and a
changed file makes a new set. A preparation that is killed (kill -9) leaves whole shards and
at most ``*.tmp-*`` debris: the next run prepares only the shards that are missing.

Reads are positioned reads of the rows a batch needs, straight into the batch's buffer
(tasks/training/row_files.py): the operating system's page cache holds the files, not this
process, so the process's memory does not grow with the number of images (a memory map would
count every page it has touched as the process's own). A store that is not a local disk is
copied, shard by shard, into a local cache folder first.

Decoding runs in threads (decoders release the GIL), one shard at a time; on a Dask cluster
each missing shard is a task (threads only: Dask workers are daemon processes, which may not
start processes of their own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from retrain.tasks import parts, storage
from retrain.tasks.training.row_files import RowFiles, cache_root, local_copy, write_npy

if TYPE_CHECKING:
    from retrain.tasks.training.cluster import LazyCluster

log = logging.getLogger("retrain.training")

SHARD_FORMAT = "retrain.image-shards/1"
# Images per shard: 512 at 227 x 227 is 79 MB, what one preparation step holds in memory.
SHARD_IMAGES = int(os.environ.get("RETRAIN_SHARD_IMAGES", "512"))
PLAN, MANIFEST = "plan.json", "manifest.json"
REMOTE_READ_THREADS = 8  # reads from an object store wait on the network: overlap them


def _resize_method() -> str:
    """What turns a file into the stored pixels: the decoders, the resize and their versions."""
    import PIL
    import torchvision

    return f"decode_image+resize(bilinear,antialias);torchvision {torchvision.__version__};pillow {PIL.__version__}"


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """What a set of shards holds and where: picklable and small apart from ``paths`` (the
    image URLs in shard order, needed only to prepare shards)."""

    folder: str  # <store>/shards/<key>
    key: str
    count: int
    input_size: tuple[int, int]
    shard_images: int
    paths: tuple[str, ...] = ()

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_images)

    def shard_name(self, i: int) -> str:
        return f"shard-{i:06d}.npy"

    def shard_url(self, i: int) -> str:
        return storage.join(self.folder, self.shard_name(i))

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_images, min((i + 1) * self.shard_images, self.count)

    def without_paths(self) -> ShardPlan:
        return ShardPlan(self.folder, self.key, self.count, self.input_size, self.shard_images)

    def record(self) -> dict:
        d = asdict(self.without_paths())
        d.pop("paths")
        d["input_size"] = list(self.input_size)
        return {"format": SHARD_FORMAT, "method": _resize_method(), **d}


def _content_digests(paths: list[str], digests: Iterable | None) -> list[str]:
    """The sha1 of each file's bytes from the index; where the index has none (a run indexed
    before it kept them), the file's size and modification time stand in."""
    given = list(digests) if digests is not None else [None] * len(paths)
    missing = [i for i, d in enumerate(given) if not isinstance(d, str) or not d]
    if missing:

        def stat(url: str) -> str:
            fs, path = storage.filesystem(url)
            info = fs.info(path)
            return f"{url}:{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"

        with ThreadPoolExecutor(8) as pool:
            for i, value in zip(missing, pool.map(stat, [paths[i] for i in missing])):
                given[i] = value
    return given


def plan_shards(
    store: str, paths: list[str], digests: Iterable | None, input_size: tuple[int, int], shard_images: int | None = None
) -> ShardPlan:
    """The shard plan for images ``paths`` (sorted, unique) with content ``digests`` (one per
    path, from the index) at ``input_size``, in ``store``."""
    shard_images = shard_images or SHARD_IMAGES
    if shard_images < 1:
        raise ValueError(f"images per shard must be at least 1, not {shard_images}")
    paths = list(paths)
    if paths != sorted(set(paths)):
        raise ValueError("shard paths must be sorted and unique")
    h = hashlib.sha256()
    h.update(json.dumps([SHARD_FORMAT, _resize_method(), list(input_size), shard_images]).encode())
    for digest in _content_digests(paths, digests):
        h.update(digest.encode() + b"\n")
    key = h.hexdigest()[:24]
    folder = storage.join(storage.StoreLayout(store).shards, key)
    return ShardPlan(folder, key, len(paths), tuple(int(v) for v in input_size), shard_images, tuple(paths))


# ---- writing ----------------------------------------------------------------------------------------


def _decode(url: str, size: tuple[int, int]) -> torch.Tensor:
    from retrain.tasks.preprocessing import load_image  # the one loader: errors name the file

    return load_image(url, size)


def write_shard(plan: ShardPlan, i: int, paths: list[str] | None = None, threads: int | None = None) -> dict:
    """Decode shard ``i``'s images and write it (what one Dask task does). A shard already
    there is left as it is. Returns {"shard", "images", "seconds", "skipped"}."""
    started = time.perf_counter()
    url = plan.shard_url(i)
    if storage.exists(url):
        return {"shard": i, "images": 0, "seconds": 0.0, "skipped": True}
    from retrain.tasks.allocator import tune_allocator

    tune_allocator("inference")  # decoding allocates and frees image-sized blocks (tasks/allocator.py)
    start, stop = plan.shard_range(i)
    paths = list(plan.paths[start:stop]) if paths is None else list(paths)
    if len(paths) != stop - start:
        raise ValueError(f"shard {i} holds {stop - start} images, not {len(paths)}")
    if threads is None:
        threads = 4 if not paths or storage.is_local(paths[0]) else REMOTE_READ_THREADS
    out = np.empty((len(paths), 3, *plan.input_size), dtype=np.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for j, image in enumerate(pool.map(lambda u: _decode(u, plan.input_size), paths)):
            out[j] = image.numpy()
    write_npy(url, out)
    return {"shard": i, "images": len(paths), "seconds": time.perf_counter() - started, "skipped": False}


def shard_job(plan: ShardPlan, threads: int | None = None) -> parts.PartsJob:
    """The shards of ``plan`` as a resumable-parts job (tasks/parts.py): shard ``i`` is
    :func:`write_shard` over its images, decoding in ``threads`` (None: as many as suit where
    the images are), and the manifest lists every shard."""
    light = plan.without_paths()  # each task carries its own images, not the whole list
    return parts.PartsJob(
        plan.folder,
        tuple(
            parts.Part(plan.shard_name(i), (light, i, list(plan.paths[slice(*plan.shard_range(i))]), threads))
            for i in range(plan.shards)
        ),
        write_shard,
        what="image shards",
        label=f"shards-{plan.key[:8]}",
        manifest=MANIFEST,
        manifest_record={**plan.record(), "shards": [plan.shard_name(i) for i in range(plan.shards)]},
    )


def prepare_shards(
    plan: ShardPlan,
    cluster: LazyCluster | None = None,
    logger: logging.Logger | None = None,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Write every shard of ``plan`` that is not there yet, in this process (one shard at a
    time, decoding in threads) or as tasks on ``cluster`` (started only if some shard is
    missing); then the manifest.
    Returns what it did: {"shards", "prepared", "reused", "images", "seconds", "where"}."""
    logger = logger or log
    started = time.perf_counter()
    # 2 decoding threads per task on a cluster: a local cluster runs one worker per core
    job = shard_job(plan, threads=2 if cluster is not None else None)
    present = parts.present(plan.folder)
    todo = [] if job.finished(present) else job.missing(present)
    if todo:
        if PLAN not in present:
            storage.write_json(storage.join(plan.folder, PLAN), plan.record())
        logger.info(
            "image shards: preparing %d of %d shards (%d images at %dx%d) in %s",
            len(todo),
            plan.shards,
            plan.count,
            *plan.input_size,
            plan.folder,
        )
    done = None if on_shard is None else (lambda part, record: on_shard(record))
    run = parts.run_parts(job, cluster.client if cluster is not None else None, done, present)
    seconds = time.perf_counter() - started
    if todo:
        logger.info("image shards: %d prepared (%s) in %.1f s", run.computed, run.where, seconds)
    return {
        "folder": plan.folder,
        "shards": plan.shards,
        "prepared": run.computed,
        "reused": run.reused,
        "images": plan.count,
        "seconds": round(seconds, 3),
        "where": run.where,
    }


# ---- reading ----------------------------------------------------------------------------------------


class ShardSet:
    """The prepared shards of a plan, for reading: ``read(indices)`` gives those images
    (uint8, k x 3 x H x W) in that order."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan.without_paths()
        self.local_folder = None if storage.is_local(plan.folder) else os.path.join(cache_root(), "shards", plan.key)
        files = [self._local(i) for i in range(plan.shards)]
        self.rows = RowFiles(files, (3, *plan.input_size), np.uint8)

    def _local(self, i: int) -> str:
        if self.local_folder is None:
            return storage.absolute(self.plan.shard_url(i))
        return local_copy(self.plan.shard_url(i), self.local_folder)

    def __len__(self) -> int:
        return self.plan.count

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, *self.plan.input_size)

    def read(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.plan.count):
            raise IndexError(f"image index out of range 0..{self.plan.count - 1}")
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        size = self.plan.shard_images
        self.rows.read_into(out, indices // size, indices % size)
        return torch.from_numpy(out)

    def close(self) -> None:
        self.rows.close()


class ShardImages:
    """Some images of a :class:`ShardSet` (a run's train or validation part), indexed like
    the uint8 tensor they stand for: ``images[i]``, ``images[a:b]``, ``images[tensor]`` read
    those images from the shards. Picklable (each process opens the files itself)."""

    def __init__(self, shards: ShardSet, indices: np.ndarray):
        self.shards = shards
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.shards.image_shape)

    dtype = torch.uint8

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self.shards.read(self.indices[[int(key)]])[0]
        if isinstance(key, slice):
            return self.shards.read(self.indices[key])
        if torch.is_tensor(key):
            key = key.cpu().numpy()
        return self.shards.read(self.indices[np.asarray(key)])

    def content_digest(self) -> str:
        """What these images are (the shards' content key and which of them), without
        reading them."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.shards.plan.key.encode())
        h.update(np.ascontiguousarray(self.indices).tobytes())
        return h.hexdigest()

    def close(self) -> None:
        self.shards.close()
