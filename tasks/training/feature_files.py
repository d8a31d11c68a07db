"""Transfer mode's feature shards on disk (tasks/training/features.py computes them): the
plan of a folder's parts, readers of the finished shards, the cache the head trains on (in
memory or streamed from the shards), and the files' clean-up.

::

    <folder>/plan.json          what the shards are made of (the cache key; written first)
    <folder>/train-000000.npy   training images 0..part-1, every view: (views + 1) x n x H x W x C float16
    <folder>/val-000000.npy     validation images 0..part-1: 1 x n x H x W x C float16
    <folder>/manifest.json      written last: every part is there
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from retrain.tasks import storage
from retrain.tasks.parts import Part, PartsJob
from retrain.tasks.training.row_files import RowFiles, local_copy, read_npy_header

PLAN, MANIFEST, MODEL = "plan.json", "manifest.json", "model.pt"
INT8_MODEL = "body-int8.onnx"  # the body on the onnx-int8 engine, for a cluster's workers


@dataclass(frozen=True)
class FeaturePlan:
    """The parts of a feature cache: training parts of ``part`` images, then validation parts."""

    n: int
    m: int
    views: int
    part: int

    def parts(self) -> list[tuple[str, int, int, int]]:
        """(kind, number, first, stop) of every part."""
        out = []
        for kind, count in (("train", self.n), ("val", self.m)):
            for j, first in enumerate(range(0, count, self.part)):
                out.append((kind, j, first, min(first + self.part, count)))
        return out

    @staticmethod
    def name(kind: str, j: int) -> str:
        return f"{kind}-{j:06d}.npy"

    def parts_job(
        self,
        folder: str,
        compute: Callable[..., object],
        args: Callable[[str, int, int, int], tuple] = lambda *part: part,
    ) -> PartsJob:
        """The cache's parts as a resumable-parts job (tasks/parts.py) in ``folder``: part
        ``(kind, j)`` is ``compute(*args(kind, j, first, stop))``; the manifest, written last,
        counts the parts."""
        return PartsJob(
            folder,
            tuple(Part(self.name(kind, j), args(kind, j, first, stop)) for kind, j, first, stop in self.parts()),
            compute,
            what="feature parts",
            label="features",
            manifest=MANIFEST,
            manifest_record={"parts": len(self.parts())},
        )


def existing_files(folder: str, key: dict) -> set[str]:
    """The files already in ``folder`` that a cache made with ``key`` wrote (none when its
    plan is another: those files are removed)."""
    present = storage.names_in(folder)
    if PLAN not in present:
        return set()
    try:
        same = storage.read_json(storage.join(folder, PLAN)) == key
    except (ValueError, OSError):
        same = False
    if same:
        return {name for name in present if storage.TMP_MARKER not in name}
    remove_feature_files(folder)
    return set()


def start_folder(folder: str, key: dict) -> set[str]:
    """The finished files of ``key``'s cache in ``folder``, its plan written when new."""
    done = existing_files(folder, key)
    if PLAN not in done:
        storage.write_json(storage.join(folder, PLAN), key)
        done.add(PLAN)
    return done


def _read_shapes(local_files: list[str]) -> tuple[int, ...]:
    with open(local_files[0], "rb") as f:
        shape, _, _ = read_npy_header(f)
    return tuple(shape[2:])


def open_shards(
    plan: FeaturePlan, folder: str, local: str, shape: tuple[int, ...] | None = None
) -> tuple[FeatureRows, FeatureRows]:
    """Readers of the finished shards in ``folder`` (their local copies in ``local``)."""
    files: dict[str, list[str]] = {"train": [], "val": []}
    counts: dict[str, list[int]] = {"train": [], "val": []}
    for kind, j, first, stop in plan.parts():
        files[kind].append(local_copy(storage.join(folder, plan.name(kind, j)), local))
        counts[kind].append(stop - first)
    shape = shape or _read_shapes(files["train"] or files["val"])
    train = FeatureRows(files["train"], counts["train"], plan.views, shape, plan.part)
    val = FeatureRows(files["val"], counts["val"], 0, shape, plan.part)
    return train, val


class FeatureRows:
    """Features of one kind (training: views x images; validation: images) in shard files
    ``files[j]`` (local paths), each (views + 1, n_j, *shape) float16, part ``j`` holding
    images ``j * part .. j * part + n_j - 1``."""

    def __init__(self, files: list[str], counts: list[int], views: int, shape: tuple[int, ...], part: int):
        self.counts, self.views, self.part = list(counts), views, part
        self.rows = RowFiles(files, tuple(shape), np.float16)
        self.shape = (views + 1, sum(counts), *shape)

    def gather(self, views: np.ndarray, indices: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
        """View ``views[i]`` of image ``indices[i]``, into ``out`` when given."""
        files = indices // self.part
        counts = np.asarray(self.counts, dtype=np.int64)[files]
        rows = views * counts + (indices - files * self.part)
        if out is None:
            out = np.empty((len(indices), *self.shape[2:]), dtype=np.float16)
        return torch.from_numpy(self.rows.read_into(out, files, rows))

    def close(self) -> None:
        self.rows.close()


@dataclass
class FeatureCache:
    """Body outputs for every training image (view 0: as it is; views 1..V: augmented, drawn
    once from the seed) and every validation image; float16, in (GPU) memory or streamed from
    feature shards on disk. Feature maps are stored channels-last (H x W x C per image): the
    layout the head's convolution and the dropout before it run fastest on."""

    train: torch.Tensor | FeatureRows  # (views + 1, N, *stored_shape)
    val: torch.Tensor | FeatureRows  # (M, *stored_shape) in memory; (1, M, *stored_shape) on disk
    location: str  # "memory", "cuda memory" or the folder holding the shards
    seconds: float
    reused: bool = False
    folder: str | None = None  # the local folder of the shard files, for a cache on disk
    temporary: bool = False  # the folder is a temporary one (or a local copy), deleted after training
    store_folder: str | None = None  # where the shards are in the store, when not ``folder``
    extraction: dict = field(default_factory=dict)  # where the features were computed, and how

    @property
    def views(self) -> int:
        return int(self.train.shape[0]) - 1

    @property
    def device(self) -> torch.device:
        return self.train.device if torch.is_tensor(self.train) else torch.device("cpu")

    @property
    def val_count(self) -> int:
        return int(self.val.shape[0]) if torch.is_tensor(self.val) else int(self.val.shape[1])

    def train_batch(self, views: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Features of image ``indices[i]`` in view ``views[i]``, where the cache lives."""
        if torch.is_tensor(self.train):
            return self.train[views.to(self.train.device), indices.to(self.train.device)]
        return self.train.gather(views.cpu().numpy().astype(np.int64), indices.cpu().numpy().astype(np.int64))

    def val_batches(self, batch_size: int, reuse: bool = False) -> Iterator[torch.Tensor]:
        """The validation features in batches. ``reuse``: batches from shards on disk are read
        into one buffer, reused for every batch, so a batch is valid only until the next one is
        asked for. Under the training malloc settings (tasks/allocator.py) a new buffer per
        batch let the heap grow by up to 1.4 GB during one validation of 5,760 images."""
        m = self.val_count
        if torch.is_tensor(self.val):
            for start in range(0, m, batch_size):
                yield self.val[start : start + batch_size]
            return
        buffer = np.empty((min(batch_size, m), *self.val.shape[2:]), dtype=np.float16) if reuse else None
        for start in range(0, m, batch_size):
            indices = np.arange(start, min(start + batch_size, m), dtype=np.int64)
            out = buffer[: len(indices)] if buffer is not None else None
            yield self.val.gather(np.zeros_like(indices), indices, out=out)

    def close(self, delete: bool = False) -> None:
        """Let go of the arrays (closing files); delete the shards of a temporary folder, or
        of any folder (and its copy in the store) when ``delete``."""
        for part in (self.train, self.val):
            if isinstance(part, FeatureRows):
                part.close()
        self.train = self.val = None  # type: ignore[assignment]
        if self.folder and (delete or self.temporary):
            remove_feature_files(self.folder)
        if self.store_folder and delete:
            remove_feature_files(self.store_folder)

    def describe(self) -> dict:
        itemsize = 2
        shape = list(self.train.shape[2:])
        if len(shape) == 3:  # stored H x W x C: say C x H x W, as the network does
            shape = [shape[2], shape[0], shape[1]]
        images = int(self.train.shape[0] * self.train.shape[1] + self.val_count)
        return {
            "views": self.views,
            "train_images": int(self.train.shape[1]),
            "val_images": self.val_count,
            "feature_shape": shape,
            "bytes": images * int(np.prod(shape)) * itemsize,
            "location": self.location,
            "seconds": round(self.seconds, 3),
            "reused": self.reused,
            "images_per_second": round(images / self.seconds, 1) if self.seconds > 0 and not self.reused else None,
            **self.extraction,
        }


def _is_feature_file(name: str) -> bool:
    base = name.split(storage.TMP_MARKER, 1)[0]
    return base in (PLAN, MANIFEST, MODEL, INT8_MODEL) or (
        base.startswith(("train-", "val-")) and base.endswith(".npy")
    )


def remove_feature_files(folder: str) -> None:
    """Delete the files a feature cache wrote (and their debris), then the folder if nothing
    else is in it. ``folder``: a local path or a store URL."""
    if storage.is_local(folder):
        path = storage.absolute(folder)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(path):
                if _is_feature_file(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(path, name))
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return
    for url in storage.ls(folder):
        if _is_feature_file(posixpath.basename(url)):
            with contextlib.suppress(FileNotFoundError):
                storage.remove(url)


def local_folder(url: str | None) -> str | None:
    """The local path for a cache folder URL; None for a store that is not a local disk."""
    if not url:
        return None
    if storage.is_local(url):
        return storage.absolute(url)
    return None
