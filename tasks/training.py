"""The training loop: options, device, validation frequency, early stopping, best model,
checkpoints and resume.

Everything random is derived from the seed and the position in training (epoch, batch), not
from a running generator, so a run resumed from a checkpoint takes exactly the path an
uninterrupted run would have taken.

Transfer mode trains only the head, so by default it runs the frozen body once per image and
per cached augmented view (:func:`build_feature_cache`) and trains the head on those features
(an iteration then costs about a tenth); ``classic_loop=True`` gives the plain loop that pushes
every augmented image through the whole network on every iteration.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from retrain.tasks import storage
from retrain.tasks.allocator import tune_allocator
from retrain.tasks.evaluation import predict_scores
from retrain.tasks.networks import (
    MODES,
    NetworkSpec,
    build_network,
    configure_trainable,
    freeze_batchnorm,
    get_spec,
    model_record,
    parameter_groups,
    resolve_device,
    save_model_file,
    split_at_head,
    summarize,
)
from retrain.tasks.preprocessing import Augmentation, Preprocessing, load_images
from retrain.tasks.reports import training_progress
from retrain.tasks.runs import read_run
from torch import nn

log = logging.getLogger("retrain.training")

# Learn rates that work for each mode with Adam: the head alone can move fast; pretrained
# weights need small steps (the head still gets head_learn_rate_factor times more).
DEFAULT_LEARN_RATES = {"transfer": 1e-3, "finetune": 1e-4, "scratch": 1e-3}
# The automatic number of cached augmented views: one per this many epochs, at most this many.
# Each view costs a backbone pass over the training set, as much as an epoch of the classic
# loop, while a head on frozen features gains little from more views (benchmarks/bench_train.py:
# on hymenoptera, 0, 1 or 2 views were all within a point of the classic loop's accuracy).
AUTO_EPOCHS_PER_VIEW = 15
MAX_AUTO_VIEWS = 8


@dataclass
class TrainingOptions:
    """MATLAB's ``trainingOptions`` in snake_case. Validate once with :meth:`validate`."""

    solver: str = "adam"  # adam | sgdm
    initial_learn_rate: float | None = None  # None: the mode's default (DEFAULT_LEARN_RATES)
    max_epochs: int = 10
    mini_batch_size: int = 32
    shuffle: str = "every-epoch"  # every-epoch | once | never
    validation_frequency: int = 5  # iterations
    validation_patience: int | None = None  # validations without a better loss; None = never stop
    l2_regularization: float = 1e-4
    momentum: float = 0.9  # sgdm only
    learn_rate_schedule: str = "none"  # none | piecewise
    learn_rate_drop_factor: float = 0.1
    learn_rate_drop_period: int = 10  # epochs
    head_learn_rate_factor: float = 10.0  # finetune: head learn rate / body learn rate
    output_network: str = "best-validation"  # best-validation | last-iteration
    checkpoint_frequency: int = 1
    checkpoint_frequency_unit: str = "epoch"  # epoch | iteration
    execution_environment: str = "auto"  # auto | cpu | gpu
    seed: int = 0
    verbose: bool = False
    # Transfer mode: the plain loop (every augmented image through the whole network, every
    # iteration) instead of training the head on cached backbone features.
    classic_loop: bool = False
    # Random augmented views per training image in the feature cache, besides the image
    # itself; None: automatic (see cache_views).
    feature_cache_views: int | None = None
    # A feature cache larger than this (MiB) is kept on disk, in the run folder, memory-mapped
    # (on a GPU it is kept in GPU memory when it takes less than half of what is free).
    feature_cache_memory_mb: int = 4096

    def validate(self) -> TrainingOptions:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"training option {name}={getattr(self, name)!r}: expected {expected}")

        choices = {
            "solver": ("adam", "sgdm"),
            "shuffle": ("every-epoch", "once", "never"),
            "learn_rate_schedule": ("none", "piecewise"),
            "output_network": ("best-validation", "last-iteration"),
            "checkpoint_frequency_unit": ("epoch", "iteration"),
            "execution_environment": ("auto", "cpu", "gpu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, "one of " + ", ".join(allowed))
        for name in ("max_epochs", "mini_batch_size", "validation_frequency", "learn_rate_drop_period"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "a positive integer")
        if not isinstance(self.checkpoint_frequency, int) or self.checkpoint_frequency < 0:
            raise bad("checkpoint_frequency", "an integer >= 0 (0 turns checkpoints off)")
        if self.validation_patience is not None and (
            not isinstance(self.validation_patience, int) or self.validation_patience < 1
        ):
            raise bad("validation_patience", "a positive integer or None")
        if self.initial_learn_rate is not None and not (0 < self.initial_learn_rate < 10):
            raise bad("initial_learn_rate", "a number in (0, 10)")
        for name in ("l2_regularization", "momentum", "learn_rate_drop_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1 and math.isfinite(value)):
                raise bad(name, "a number in [0, 1]")
        if not self.head_learn_rate_factor > 0:
            raise bad("head_learn_rate_factor", "a positive number")
        if not isinstance(self.seed, int):
            raise bad("seed", "an integer")
        if not isinstance(self.classic_loop, bool):
            raise bad("classic_loop", "true or false")
        if self.feature_cache_views is not None and (
            not isinstance(self.feature_cache_views, int)
            or isinstance(self.feature_cache_views, bool)
            or self.feature_cache_views < 0
        ):
            raise bad("feature_cache_views", "an integer >= 0, or None for automatic")
        if (
            not isinstance(self.feature_cache_memory_mb, int)
            or isinstance(self.feature_cache_memory_mb, bool)
            or self.feature_cache_memory_mb < 0
        ):
            raise bad("feature_cache_memory_mb", "an integer >= 0 (0 keeps the feature cache on disk)")
        return self

    def cache_views(self, augmentation: Augmentation | None = None) -> int:
        """Augmented views per training image in the feature cache. Automatic: one per
        AUTO_EPOCHS_PER_VIEW epochs (at least 1, at most MAX_AUTO_VIEWS, fewer than
        max_epochs); none when the augmentation changes nothing."""
        if augmentation is not None and not augmentation.reflect and augmentation.max_translation <= 0:
            return 0
        if self.feature_cache_views is not None:
            return self.feature_cache_views
        auto = max(1, round(self.max_epochs / AUTO_EPOCHS_PER_VIEW))
        return max(0, min(auto, MAX_AUTO_VIEWS, self.max_epochs - 1))

    def learn_rate(self, mode: str) -> float:
        return self.initial_learn_rate if self.initial_learn_rate is not None else DEFAULT_LEARN_RATES[mode]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainingOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values).validate()


@dataclass
class TrainingData:
    """Decoded images (uint8, at the network input size) and their class indices."""

    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor


@dataclass
class TrainingOutcome:
    iterations: int
    epochs_completed: int
    final_val_loss: float | None
    final_val_accuracy: float | None
    best_iteration: int | None
    stopped_early: bool
    resumed_from: int | None
    seconds: float
    history: pd.DataFrame = field(repr=False)
    state_dict: dict = field(repr=False)
    feature_cache: dict | None = None  # what the transfer-mode feature cache held and cost


def _generator(*key: int) -> torch.Generator:
    # One generator per (seed, epoch, batch): the same key always gives the same numbers.
    g = torch.Generator()
    g.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def epoch_order(n: int, epoch: int, options: TrainingOptions) -> torch.Tensor:
    if options.shuffle == "never":
        return torch.arange(n)
    shuffle_epoch = 0 if options.shuffle == "once" else epoch
    return torch.randperm(n, generator=_generator(options.seed, shuffle_epoch, -1))


def make_optimizer(groups: list[dict], options: TrainingOptions) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    if options.solver == "adam":
        return torch.optim.Adam(groups, weight_decay=options.l2_regularization)
    return torch.optim.SGD(groups, momentum=options.momentum, weight_decay=options.l2_regularization)


def set_epoch_learn_rate(optimizer: torch.optim.Optimizer, epoch: int, options: TrainingOptions) -> float:
    """Piecewise schedule: multiply by the drop factor every drop period (epochs)."""
    factor = 1.0
    if options.learn_rate_schedule == "piecewise":
        factor = options.learn_rate_drop_factor ** (epoch // options.learn_rate_drop_period)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return optimizer.param_groups[-1]["lr"]


# ---- checkpoints -------------------------------------------------------------------------

_CHECKPOINT = re.compile(r"iter-(\d+)\.pt$")


def checkpoint_url(checkpoints: str, iteration: int) -> str:
    return storage.join(checkpoints, f"iter-{iteration:08d}.pt")


def list_checkpoints(checkpoints: str) -> list[tuple[int, str]]:
    if not storage.exists(checkpoints):
        return []
    found = []
    for url in storage.list_files(checkpoints):
        m = _CHECKPOINT.search(url)
        if m:
            found.append((int(m.group(1)), url))
    return sorted(found)


def save_checkpoint(checkpoints: str, state: dict, keep: int = 2) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    url = storage.write_bytes(checkpoint_url(checkpoints, state["iteration"]), buffer.getvalue())
    for _, old in list_checkpoints(checkpoints)[:-keep]:
        storage.remove(old)
    return url


def remove_write_debris(checkpoints: str) -> int:
    """Remove the temporary files that checkpoint writes killed midway left (``*.tmp-*``,
    never read: see tasks/storage.py), before a run writes there again. Returns how many."""
    debris = [url for url in storage.ls(checkpoints) if storage.TMP_MARKER in url.rsplit("/", 1)[-1]]
    for url in debris:
        storage.remove(url)
    return len(debris)


def load_latest_checkpoint(checkpoints: str) -> dict | None:
    """The newest checkpoint that loads; a damaged one is skipped with a warning (writes are
    atomic, so that only happens when a file was altered outside retrain)."""
    for _iteration, url in reversed(list_checkpoints(checkpoints)):
        try:
            return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("skipping unreadable checkpoint %s: %s", url, exc)
    return None


# ---- devices: mixed precision, pinned memory, overlapped copies ---------------------------


def _autocast(device: torch.device, training: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it (fp16 for inference only on older
    GPUs, which would need loss scaling to train in fp16); nothing on the CPU, where float32
    is exact and as fast for these networks."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if not training:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory when the batch goes to a CUDA device (so its copy can run
    asynchronously), the tensor itself otherwise."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return _pinned(tensor, device).to(device, non_blocking=True)


class _Prefetcher:
    """Prepares the next iteration's batch (indexing, augmentation, gathering cached features,
    pinning) on a worker thread while the current one trains, when training runs on a GPU:
    the host's work then overlaps with the device's. On a CPU it prepares each batch when
    asked: a second thread there only competes with the compute threads (measured: ~20 %
    longer fine-tune iterations). ``prepare`` must depend on the iteration alone."""

    def __init__(self, prepare: Callable[[int], Any], background: bool):
        self._prepare = prepare
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="retrain-batches") if background else None
        self._next: tuple[int, Future] | None = None

    def get(self, iteration: int, total: int) -> Any:
        if self._next is not None and self._next[0] == iteration:
            batch = self._next[1].result()
        else:
            batch = self._prepare(iteration)
        self._next = None
        if self._pool is not None and iteration + 1 < total:
            self._next = (iteration + 1, self._pool.submit(self._prepare, iteration + 1))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _validation_metrics(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    loss = float(nn.functional.nll_loss(torch.log(scores.clamp_min(1e-12)), targets))
    accuracy = float((scores.argmax(1) == targets).float().mean())
    return loss, accuracy


# ---- the transfer-mode feature cache ---------------------------------------------------------

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
            batch = _to_device(images[start : start + batch_size], device)
            if view > 0:
                parts = []
                for s in range(0, len(batch), AUG_CHUNK):
                    g = _generator(seed, -2, view, (start + s) // AUG_CHUNK)
                    chunk = batch[s : s + AUG_CHUNK]
                    if augment_on_device:
                        try:
                            parts.append(augmentation(chunk, g))
                            continue
                        except RuntimeError as exc:  # an op without a device kernel: on the host
                            log.warning("augmenting on the host (%s)", exc)
                            augment_on_device = False
                            g = _generator(seed, -2, view, (start + s) // AUG_CHUNK)
                    parts.append(_to_device(augmentation(chunk.cpu(), g), device))
                batch = torch.cat(parts)
            yield view, start, batch


def _stored_layout(features: torch.Tensor) -> torch.Tensor:
    """N x C x H x W feature maps -> N x H x W x C (a view when they are channels_last)."""
    return features.permute(0, 2, 3, 1) if features.dim() == 4 else features


def _network_layout(features: torch.Tensor) -> torch.Tensor:
    """Stored N x H x W x C -> the N x C x H x W (channels_last) the network takes."""
    return features.permute(0, 3, 1, 2) if features.dim() == 4 else features


def _dropout_to_float(features: torch.Tensor, p: float) -> torch.Tensor:
    """Float32 copy of a float16 batch of cached features with inverted dropout applied, as
    ``nn.Dropout`` does in training. On the CPU the mask comes from 16-bit random integers,
    four per 64-bit draw (``p`` rounded to 1/65536), and is applied to the float16 values
    before the conversion: torch's per-element Bernoulli sampling on float32 otherwise costs
    more than the rest of a head step on cached features."""
    if p <= 0 or features.device.type != "cpu":
        return nn.functional.dropout(features.float(), p, training=p > 0, inplace=True)
    n = features.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    bits = bits.view(features.shape)
    if p == 0.5:  # the sign bit: all ones (keep) or zero, each with probability 1/2
        features.view(torch.int16).bitwise_and_(bits >> 15)
    else:
        features = torch.where(bits < round(65536 * (1 - p)) - 32768, features, 0)
    return torch.mul(features, 1.0 / (1.0 - p), out=torch.empty(features.shape, dtype=torch.float32))


class _StoredRest(nn.Module):
    """``rest`` on features in the stored layout (N x H x W x C maps, or N x C vectors). A
    1x1 convolution head (SqueezeNet's conv10) runs as the equivalent matrix product over
    channels, with the same parameters: on channels-last features that is one pass over them
    where the convolution makes several."""

    def __init__(self, rest: nn.Module):
        super().__init__()
        self.rest = rest
        first = rest[0] if isinstance(rest, nn.Sequential) and len(rest) else None
        pointwise = (
            isinstance(first, nn.Conv2d)
            and first.kernel_size == (1, 1)
            and first.stride == (1, 1)
            and first.padding in ((0, 0), "valid")
            and first.dilation == (1, 1)
            and first.groups == 1
            and first.padding_mode == "zeros"
        )
        self.pointwise = first if pointwise else None
        self.after = rest[1:] if pointwise else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pointwise is not None and features.dim() == 4:
            conv = self.pointwise
            out = nn.functional.linear(features, conv.weight.reshape(conv.out_channels, -1), conv.bias)
            return self.after(out.permute(0, 3, 1, 2))
        return self.rest(_network_layout(features))


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
    with torch.inference_mode(), _autocast(device, training=False):
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
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(views + 1) * n + m, desc="features", unit="img", leave=False)
    place: dict[str, Any] = {}

    def allocate(shape: tuple[int, ...]) -> torch.Tensor | np.ndarray:
        # The first batch tells the feature shape and so the cache's size: choose its place.
        per_image = int(np.prod(shape)) * 2
        total_bytes = per_image * ((views + 1) * n + m)
        if device.type == "cuda" and total_bytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
            place["where"], place["device"] = "cuda memory", device
        elif total_bytes <= memory_bytes:
            place["where"], place["device"] = "memory", torch.device("cpu")
        else:
            target = local or tempfile.mkdtemp(prefix="retrain-features-")
            os.makedirs(target, exist_ok=True)
            place["where"], place["folder"], place["temporary"] = target, target, target != local
            logger.info(
                "feature cache of %.0f MiB exceeds feature_cache_memory_mb: memory-mapped from %s",
                total_bytes / 2**20,
                target,
            )
            return np.lib.format.open_memmap(
                os.path.join(target, "train.npy"), mode="w+", dtype=np.float16, shape=(views + 1, n, *shape)
            )
        return torch.empty((views + 1, n, *shape), dtype=FEATURE_DTYPE, device=place["device"])

    def allocate_val(shape: tuple[int, ...]) -> torch.Tensor | np.ndarray:
        if "folder" in place:
            return np.lib.format.open_memmap(
                os.path.join(place["folder"], "val.npy"), mode="w+", dtype=np.float16, shape=(1, m, *shape)
            )
        return torch.empty((1, m, *shape), dtype=FEATURE_DTYPE, device=place["device"])

    try:
        train = _run_body(
            body, data.train_images, views, augmentation, preprocessing, seed, device, batch_size, allocate, bar
        )
        if m:
            val = _run_body(
                body, data.val_images, 0, augmentation, preprocessing, seed, device, batch_size, allocate_val, bar
            )
        else:
            val = allocate_val(tuple(train.shape[2:]))
    finally:
        if bar is not None:
            bar.close()
    if "folder" in place:
        train.flush()
        val.flush()
        if not place["temporary"]:
            key = key or _cache_key(body, data, preprocessing, augmentation, views, seed)
            storage.write_json(os.path.join(place["folder"], "manifest.json"), key)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cache = FeatureCache(
        train,
        val[0],
        place.get("where", "memory"),
        time.perf_counter() - started,
        folder=place.get("folder"),
        temporary=bool(place.get("temporary")),
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


@functools.lru_cache(maxsize=4)
def _epoch_views(n: int, views: int, epoch: int, seed: int) -> torch.Tensor:
    """Which cached view of each image an epoch trains on."""
    return torch.randint(0, views + 1, (n,), generator=_generator(seed, epoch, -2))


# ---- one iteration: the classic loop, or the head on cached features -------------------------


class _ClassicSteps:
    """Every augmented image through the whole network (finetune, scratch, classic_loop)."""

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        data: TrainingData,
        augmentation: Augmentation,
        options: TrainingOptions,
        device: torch.device,
    ):
        self.model, self.preprocessing, self.data = model, preprocessing, data
        self.augmentation, self.options, self.device = augmentation, options, device

    def prepare(self, epoch: int, position: int, indices: torch.Tensor) -> tuple:
        images = self.augmentation(self.data.train_images[indices], _generator(self.options.seed, epoch, position))
        return _pinned(images, self.device), _pinned(self.data.train_targets[indices], self.device)

    def logits(self, prepared: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = prepared
        x = self.preprocessing.normalize(images.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x), targets.to(self.device, non_blocking=True)

    def val_scores(self) -> torch.Tensor:
        with _autocast(self.device, training=False):
            return predict_scores(self.model, self.data.val_images, self.preprocessing, self.device)


class _CachedSteps:
    """The head (and the parameter-free layers around it) on cached body features; the
    dropout before the head acts on the features."""

    def __init__(
        self,
        model: nn.Module,
        rest: nn.Module,
        dropout: float,
        cache: FeatureCache,
        data: TrainingData,
        options: TrainingOptions,
        device: torch.device,
    ):
        self.model, self.rest, self.dropout, self.cache, self.data = model, _StoredRest(rest), dropout, cache, data
        self.options, self.device = options, device

    def prepare(self, epoch: int, position: int, indices: torch.Tensor) -> tuple:
        views = _epoch_views(len(self.data.train_targets), self.cache.views, epoch, self.options.seed)[indices]
        targets = _pinned(self.data.train_targets[indices], self.device)
        if self.cache.device.type == "cpu":  # gather on the host, copy the batch over
            return _pinned(self.cache.train_batch(views, indices), self.device), targets
        return (views, indices), targets  # the cache is on the device: gather there

    def logits(self, prepared: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        features, targets = prepared
        if isinstance(features, tuple):
            features = self.cache.train_batch(*features)
        features = _dropout_to_float(features.to(self.device, non_blocking=True), self.dropout)
        return self.rest(features), targets.to(self.device, non_blocking=True)

    def val_scores(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            with torch.inference_mode(), _autocast(self.device, training=False):
                for features in self.cache.val_batches(256):
                    logits = self.rest(_to_device(features, self.device).float())
                    out.append(torch.softmax(logits.float(), dim=1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.empty((0, 0))


# ---- the loop ----------------------------------------------------------------------------


def train(
    model: nn.Module,
    spec: NetworkSpec,
    preprocessing: Preprocessing,
    data: TrainingData,
    mode: str,
    options: TrainingOptions,
    augmentation: Augmentation,
    checkpoints: str | None = None,
    on_validation: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = False,
    logger: logging.Logger | None = None,
    feature_folder: str | None = None,
) -> TrainingOutcome:
    """Train ``model`` with cross-entropy; returns the output network's weights and history.

    ``checkpoints``: a folder URL; when it holds checkpoints of this run, training resumes
    from the newest. ``on_validation`` gets the history after each validation (for the
    progress plot). In transfer mode the head trains on cached body features (see
    :func:`build_feature_cache`; ``feature_folder`` is where a cache too large for memory
    goes) unless ``options.classic_loop``; the result is the same kind of full state dict.
    """
    logger = logger or log
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    options.validate()
    started = time.perf_counter()
    device = resolve_device(options.execution_environment)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
    else:
        tune_allocator("training")  # activations and gradients stay in the heap (tasks/allocator.py)
    configure_trainable(model, spec, mode)
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(
        parameter_groups(model, spec, mode, options.learn_rate(mode), options.head_learn_rate_factor), options
    )
    loss_fn = nn.CrossEntropyLoss()
    n_train = len(data.train_targets)
    batch = min(options.mini_batch_size, n_train)
    per_epoch = max(1, n_train // batch)  # drop the last partial batch, like MATLAB
    total = per_epoch * options.max_epochs
    has_val = len(data.val_targets) > 0

    state = {
        "iteration": 0,
        "best_loss": math.inf,
        "best_iteration": None,
        "best_state": None,
        "bad_validations": 0,
        "history": [],
        "stopped_early": False,
    }
    resumed_from = None
    if checkpoints:
        remove_write_debris(checkpoints)
        saved = load_latest_checkpoint(checkpoints)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state.update({k: saved[k] for k in state})
            resumed_from = state["iteration"]
            logger.info("resuming from checkpoint at iteration %d of %d", resumed_from, total)
    unfinished = state["iteration"] < total and not state["stopped_early"]

    split = None
    if mode == "transfer" and not options.classic_loop and unfinished:
        try:
            split = split_at_head(model, spec)
        except NotImplementedError as exc:
            logger.info("training with the classic loop: %s", exc)
    cache, feature_info = None, None
    if split is not None:
        cache = build_feature_cache(
            split.body,
            data,
            preprocessing,
            augmentation,
            options.cache_views(augmentation),
            options.seed,
            device,
            options.feature_cache_memory_mb * 2**20,
            feature_folder,
            progress=progress,
            logger=logger,
        )
        feature_info = cache.describe()
        steps = _CachedSteps(model, split.rest, split.dropout, cache, data, options, device)
    else:
        steps = _ClassicSteps(model, preprocessing, data, augmentation, options, device)

    def prepare(iteration: int) -> tuple:
        epoch, position = divmod(iteration, per_epoch)
        indices = epoch_order(n_train, epoch, options)[position * batch : (position + 1) * batch]
        return steps.prepare(epoch, position, indices)

    def validate() -> tuple[float, float]:
        return _validation_metrics(steps.val_scores(), data.val_targets)

    def checkpoint() -> None:
        if checkpoints:
            save_checkpoint(checkpoints, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state["iteration"], desc="training", unit="it", leave=False)
    batches = _Prefetcher(prepare, background=device.type == "cuda")
    try:
        while state["iteration"] < total and not state["stopped_early"]:
            epoch, position = divmod(state["iteration"], per_epoch)
            learn_rate = set_epoch_learn_rate(optimizer, epoch, options)
            prepared = batches.get(state["iteration"], total)
            model.train()
            freeze_batchnorm(model, spec, mode)
            torch.manual_seed(hash((options.seed, state["iteration"])) & 0xFFFF_FFFF)  # dropout
            with _autocast(device, training=True):
                logits, y = steps.logits(prepared)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["iteration"] += 1
            it = state["iteration"]
            record = {
                "iteration": it,
                "epoch": epoch + 1,
                "loss": float(loss.detach()),
                "accuracy": float((logits.argmax(1) == y).float().mean()),
                "learn_rate": learn_rate,
                "val_loss": math.nan,
                "val_accuracy": math.nan,
                "seconds": time.perf_counter() - started,
            }
            if has_val and (it % options.validation_frequency == 0 or it == total):
                record["val_loss"], record["val_accuracy"] = validate()
                if record["val_loss"] < state["best_loss"]:
                    state.update(
                        best_loss=record["val_loss"],
                        best_iteration=it,
                        bad_validations=0,
                        best_state=_state_copy(model),
                    )
                else:
                    state["bad_validations"] += 1
                    patience = options.validation_patience
                    if patience is not None and state["bad_validations"] >= patience:
                        state["stopped_early"] = True
                        logger.info(
                            "early stop at iteration %d: validation loss has not improved for %d validations",
                            it,
                            patience,
                        )
                message = (
                    f"epoch {epoch + 1} iteration {it}/{total}: loss {record['loss']:.4f}, "
                    f"val loss {record['val_loss']:.4f}, val accuracy {record['val_accuracy']:.4f}"
                )
                (logger.info if options.verbose else logger.debug)(message)
            state["history"].append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", val_acc=f"{record['val_accuracy']:.3f}")
            if not math.isnan(record["val_loss"]) and on_validation is not None:
                on_validation(pd.DataFrame(state["history"]))
            unit_done = (
                it
                if options.checkpoint_frequency_unit == "iteration"
                else (it // per_epoch if it % per_epoch == 0 else 0)
            )
            if options.checkpoint_frequency and unit_done and unit_done % options.checkpoint_frequency == 0:
                checkpoint()
    finally:
        batches.close()
        if bar is not None:
            bar.close()
        if cache is not None and cache.temporary:
            cache.close()
    if state["stopped_early"]:
        checkpoint()  # so a rerun of a finished-early run does not train on
    if cache is not None:
        cache.close(delete=True)  # trained: a cache on disk is not needed again
    history = pd.DataFrame(state["history"])
    use_best = options.output_network == "best-validation" and state["best_state"] is not None
    final_state = state["best_state"] if use_best else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    validated = history.dropna(subset=["val_loss"]) if len(history) else history
    best_row = validated[validated["iteration"] == state["best_iteration"]] if use_best else validated.tail(1)
    return TrainingOutcome(
        iterations=state["iteration"],
        epochs_completed=state["iteration"] // per_epoch,
        final_val_loss=float(best_row["val_loss"].iloc[0]) if len(best_row) else None,
        final_val_accuracy=float(best_row["val_accuracy"].iloc[0]) if len(best_row) else None,
        best_iteration=state["best_iteration"] if use_best else state["iteration"],
        stopped_early=state["stopped_early"],
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        history=history,
        state_dict=final_state,
        feature_cache=feature_info,
    )


# ---- the stage: a run folder in, trained.pt out ----------------------------------------------


def train_run(run_url: str, progress: bool = False, logger: logging.Logger | None = None) -> dict:
    """Train the network a run asks for on its split; writes ``trained.pt``, ``history.csv``,
    ``progress.png``, ``network.txt`` and ``training.json`` into the run folder and returns
    the ``training.json`` record. Resumes from the run's checkpoints; a run already trained
    is not trained again."""
    logger = logger or log
    summary_url = storage.join(run_url, "training.json")
    trained_url = storage.join(run_url, "trained.pt")
    if storage.exists(summary_url) and storage.exists(trained_url):
        logger.info("run already trained; using %s", trained_url)
        return storage.read_json(summary_url)
    config = read_run(run_url)["config"]
    mode = config["mode"]
    options = TrainingOptions.from_dict(config["options"])
    augmentation = Augmentation(**config["augmentation"])
    spec = get_spec(config["network"])
    split = storage.read_parquet(storage.join(run_url, "split.parquet"))
    classes = sorted(split["label"].unique())
    class_index = {c: i for i, c in enumerate(classes)}
    torch.manual_seed(options.seed)  # the new head's initial weights
    model, origin = build_network(spec.name, len(classes), "none" if mode == "scratch" else config["weights"])
    storage.write_bytes(storage.join(run_url, "network.txt"), summarize(model, spec).to_text().encode())

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = split[split["split"] == name]
        images = load_images(list(rows["path"]), spec.preprocessing.input_size)
        return images, torch.tensor([class_index[c] for c in rows["label"]], dtype=torch.long)

    data = TrainingData(*part("train"), *part("val"))
    logger.info(
        "training %s (%s mode) on %d images, validating on %d, %d classes",
        spec.name,
        mode,
        len(data.train_targets),
        len(data.val_targets),
        len(classes),
    )
    progress_url = storage.join(run_url, "progress.png")
    last_plot = [0.0]

    def plot(history: pd.DataFrame) -> None:
        if time.monotonic() - last_plot[0] > 10:  # the plot costs ~0.3 s; refresh at most every 10 s
            training_progress(history, progress_url)
            last_plot[0] = time.monotonic()

    outcome = train(
        model,
        spec,
        spec.preprocessing,
        data,
        mode,
        options,
        augmentation,
        checkpoints=storage.join(run_url, "checkpoints"),
        on_validation=plot,
        progress=progress,
        logger=logger,
        feature_folder=storage.join(run_url, "features"),
    )
    storage.write_bytes(storage.join(run_url, "history.csv"), outcome.history.to_csv(index=False).encode())
    if len(outcome.history):
        training_progress(outcome.history, progress_url)
    model.load_state_dict(outcome.state_dict)
    summary = {
        "iterations": outcome.iterations,
        "epochs": outcome.epochs_completed,
        "val_loss": outcome.final_val_loss,
        "val_accuracy": outcome.final_val_accuracy,
        "best_iteration": outcome.best_iteration,
        "stopped_early": outcome.stopped_early,
        "resumed_from": outcome.resumed_from,
        "seconds": outcome.seconds,
        "device": str(resolve_device(options.execution_environment)),
        "weights_origin": origin,
        "train_images": len(data.train_targets),
        "val_images": len(data.val_targets),
        "trained": trained_url,
        "progress_plot": progress_url,
        "feature_cache": outcome.feature_cache,
    }
    save_model_file(
        trained_url,
        model_record(
            model,
            spec,
            classes,
            origin,
            metrics={"val_accuracy": outcome.final_val_accuracy, "val_loss": outcome.final_val_loss},
            training={
                "mode": mode,
                "options": options.to_dict(),
                "augmentation": augmentation.to_dict(),
                "iterations": outcome.iterations,
                "epochs": outcome.epochs_completed,
            },
        ),
    )
    storage.write_json(summary_url, summary)
    return summary
