"""Batch scoring: inference over partitions of image URLs (what a Dask worker runs).

A scoring job lists the images once, cuts the sorted list into partitions of file names and
scores each partition in mini-batches; a Dask task scores one partition and writes one
parquet part, atomically. Everything a job writes lives under its output URL::

    <out>/.lock                          held while a job runs: a second job is refused
    <out>/job.json                       the model (URL, sha256, classes, input size), images, settings
    <out>/files.parquet                  the sorted file list with each file's partition
    <out>/parts/part-<n>-<digest>.parquet  one per partition: path, label, score, top_labels,
                                         top_scores, error
    <out>/scores.parquet                 consolidated: exactly one row per image, sorted by path
    <out>/summary.json                   images, scored, failed, count per label, failures

A part's name is its position and a digest of its file names (and of the model and top-k),
so a rerun over the same files maps them to the same names and scores only the parts that
are missing: that is what makes a job resumable after a crash or a kill -9. A file that
cannot be read or decoded becomes a row with an ``error``; it never fails the job.

Nothing here imports Prefect: these functions run inside Dask workers, and each Prefect
import there would start its own API. :mod:`flows.score` orchestrates them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from retrain.tasks import storage
from retrain.tasks.allocator import tune_allocator
from retrain.tasks.networks import LoadedModel, ModelFileError, model_from_record, read_model_record, resolve_device
from retrain.tasks.preprocessing import IMAGE_EXTENSIONS, ImageDecodeError, Preprocessing, load_image

# Images per Dask task and per part: small enough that the last tasks leave no core idle for
# long and a kill loses little, large enough that a task's overhead does not count.
DEFAULT_PARTITION_SIZE = 128
# Small batches: on a CPU core the activations of 8 images at 227 px stay in cache; batches of
# 32-64 cost 1.5-2x more CPU time per image (measured with SqueezeNet, see benchmarks/).
DEFAULT_MINI_BATCH_SIZE = 8
REMOTE_READ_THREADS = 8  # reads from object stores wait on the network: overlap them
DEFAULT_TOP_K = 5
LIST_FILE_COMMENT = "#"
MAX_FAILURES_IN_SUMMARY = 1000

PART_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("top_labels", pa.list_(pa.string())),
        ("top_scores", pa.list_(pa.float32())),
        ("error", pa.string()),
    ]
)


class ScoringError(ValueError):
    """A scoring job cannot run as asked (bad model for scoring, bad settings, bad output)."""


class ScoringLockedError(ScoringError):
    """Another scoring job is writing to the same output."""


class ScoringIncompleteError(ScoringError):
    """Some partitions failed as a whole (not one bad file: a worker crash, say); the others
    are saved and a rerun scores only the missing ones."""


# ---- the output layout ----------------------------------------------------------------------


def job_url(out: str) -> str:
    return storage.join(out, "job.json")


def files_url(out: str) -> str:
    return storage.join(out, "files.parquet")


def parts_dir(out: str) -> str:
    return storage.join(out, "parts")


def part_url(out: str, name: str) -> str:
    return storage.join(parts_dir(out), f"{name}.parquet")


def scores_url(out: str) -> str:
    return storage.join(out, "scores.parquet")


def summary_url(out: str) -> str:
    return storage.join(out, "summary.json")


def lock_url(out: str) -> str:
    return storage.join(out, ".lock")


def default_out(store: str, model_sha256: str, images: str) -> str:
    """``<store>/scores/<job-id>``: the same model and images give the same job id, so the
    same command run again resumes the same job."""
    digest = hashlib.sha256(images.encode("utf-8")).hexdigest()[:8]
    return storage.join(store, "scores", f"{model_sha256[:12]}-{digest}")


# ---- listing and partitions ----------------------------------------------------------------


@dataclass
class ImageList:
    paths: list[str]  # sorted, unique URLs
    ignored: list[str]  # files in a folder without an image extension (not scored)
    source: str


def _hidden(part: str) -> bool:
    return part.startswith(".") or part in ("__MACOSX", "Thumbs.db", "desktop.ini")


def list_images(images: str, extensions: frozenset[str] | None = IMAGE_EXTENSIONS) -> ImageList:
    """The images to score, sorted: every file with an image extension below a folder
    (recursively; hidden files and folders left out), or every entry of a list file (one URL
    or path per line, relative ones taken from the list file's folder; blank lines and
    ``#`` comments skipped). A single image file is a list of one."""
    fs, root = storage.filesystem(images)
    below = _files_below(images)
    if below is not None:
        paths, ignored = [], []
        for found in below:
            rel = posixpath.relpath(found, root)
            if any(_hidden(p) or storage.TMP_MARKER in p for p in rel.split("/")):
                continue
            url = storage.to_url(fs, found)
            if extensions is None or posixpath.splitext(found)[1].lower() in extensions:
                paths.append(url)
            else:
                ignored.append(url)
        return ImageList(sorted(set(paths)), sorted(ignored), images)
    if not storage.exists(images):
        raise FileNotFoundError(f"no folder or list file at {images}")
    if posixpath.splitext(root)[1].lower() in IMAGE_EXTENSIONS:
        return ImageList([images], [], images)
    try:
        text = storage.read_bytes(images).decode("utf-8")
    except UnicodeDecodeError:
        raise ScoringError(
            f"{images} is neither a folder, an image, nor a list file of image URLs (one per line, UTF-8)"
        ) from None
    base = images.rsplit("/", 1)[0] if "/" in images else "."
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith(LIST_FILE_COMMENT):
            continue
        if "://" not in entry and not entry.startswith("/"):
            entry = storage.join(base, entry)
        paths.append(entry)
    return ImageList(sorted(set(paths)), [], images)


@storage.retrying
def _files_below(folder: str) -> list[str] | None:
    """Paths (in the folder's filesystem) of every file below ``folder``; None when it is not
    a folder. Retried on a remote store, like every other storage call."""
    fs, root = storage.filesystem(folder)
    return fs.find(root) if fs.isdir(root) else None


@dataclass(frozen=True)
class Partition:
    index: int
    name: str  # part-<index>-<digest of the file names, model and top-k>
    paths: tuple[str, ...]


def partitions(paths: list[str], size: int = DEFAULT_PARTITION_SIZE, salt: str = "") -> list[Partition]:
    """Cut the sorted file list into consecutive partitions of ``size`` files. The names
    depend only on the list (and ``salt``: the model and top-k), so a rerun over the same
    files maps them to the same parts."""
    if size < 1:
        raise ScoringError(f"partition size must be at least 1, not {size}")
    paths = sorted(paths)
    out = []
    for index, start in enumerate(range(0, len(paths), size)):
        chunk = tuple(paths[start : start + size])
        digest = hashlib.sha1("\n".join((salt, *chunk)).encode("utf-8")).hexdigest()[:12]
        out.append(Partition(index, f"part-{index:06d}-{digest}", chunk))
    return out


# ---- the model: checks and the per-worker cache ----------------------------------------------


def check_model(loaded: LoadedModel, record: dict, source: str) -> None:
    """Refuse, with the reason, a model whose classes or input size do not fit its network."""
    classes = loaded.classes
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ModelFileError(
            f"{source}: its class list is unusable ({len(classes)} classes, "
            f"{len(classes) - len(set(classes))} duplicates)"
        )
    size = tuple(loaded.preprocessing.input_size)
    declared = record.get("input_size")
    if declared is not None and tuple(int(v) for v in declared) != size:
        raise ModelFileError(
            f"{source}: its input size {list(declared)} does not match its preprocessing's {list(size)}"
        )
    try:
        with torch.inference_mode():
            out = loaded.model(torch.zeros(1, 3, *size))
    except Exception as exc:
        raise ModelFileError(
            f"{source}: input size {size[0]}x{size[1]} does not fit network "
            f"{loaded.spec.name}: {type(exc).__name__}: {exc}"
        ) from None
    if tuple(out.shape) != (1, len(classes)):
        raise ModelFileError(
            f"{source}: the network gives {tuple(out.shape)[1:]} outputs for one "
            f"image but the model file names {len(classes)} classes"
        )


@dataclass
class ModelInfo:
    """What the driver learns about the model once and hands to every task."""

    url: str
    sha256: str
    network: str
    classes: list[str]
    input_size: tuple[int, int]
    preprocessing: dict


def inspect_model(model_url: str) -> ModelInfo:
    """Load and check the model once in the driver, so a bad model fails the job before any
    worker starts, with the reason."""
    sha256 = storage.sha256_of(model_url)
    record = read_model_record(model_url)
    loaded = model_from_record(record, source=model_url)
    check_model(loaded, record, model_url)
    return ModelInfo(
        model_url,
        sha256,
        loaded.spec.name,
        list(loaded.classes),
        tuple(loaded.preprocessing.input_size),
        loaded.preprocessing.to_dict(),
    )


@dataclass
class ScoringModel:
    """A model ready for inference: eval mode, channels_last, on its device, with its input
    affine."""

    model: torch.nn.Module
    device: torch.device
    classes: list[str]
    preprocessing: Preprocessing
    channels: list[int]  # RGB -> the network's channel order
    mul: torch.Tensor  # per channel, in the network's order: x * mul + add == normalize(x)
    add: torch.Tensor
    identity_mul: bool


_MODEL_CACHE: OrderedDict[tuple[str, str], ScoringModel] = OrderedDict()
_MODEL_CACHE_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 2
MODEL_LOADS = {"count": 0}  # how often this process loaded a model (tests read it)


def prepare_model(loaded: LoadedModel, device: torch.device | None = None) -> ScoringModel:
    """``device``: default the worker's GPU when it sees one (CUDA), else its CPU. Decoding
    stays on the CPU either way; on a GPU the forward passes are float32 as on the CPU, so
    both give the same labels."""
    prep = loaded.preprocessing
    device = device or resolve_device("auto")
    model = loaded.model.eval().to(device, memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    mean = torch.tensor(prep.mean, dtype=torch.float32)
    std = torch.tensor(prep.std, dtype=torch.float32)
    mul = (prep.scale / std).view(1, 3, 1, 1).to(device)
    add = (-mean / std).view(1, 3, 1, 1).to(device)
    channels = [2, 1, 0] if prep.channel_order == "BGR" else [0, 1, 2]
    return ScoringModel(model, device, list(loaded.classes), prep, channels, mul, add, bool(torch.all(mul == 1.0)))


def cached_model(model_url: str, sha256: str) -> ScoringModel:
    """The model for this process, loaded once per worker (not once per task) and kept
    while tasks keep asking for the same file content."""
    key = (model_url, sha256)
    with _MODEL_CACHE_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            return _MODEL_CACHE[key]
        record = read_model_record(model_url)
        if storage.sha256_of(model_url) != sha256:
            raise ModelFileError(
                f"{model_url} changed while the job was running (its sha256 is "
                f"no longer {sha256[:12]}...); rerun the job"
            )
        scoring = prepare_model(model_from_record(record, source=model_url))
        tune_allocator("inference")  # decoding and forward passes alternate (tasks/allocator.py)
        _MODEL_CACHE[key] = scoring
        MODEL_LOADS["count"] += 1
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
        return scoring


def clear_model_cache() -> None:
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()


# ---- scoring one partition -------------------------------------------------------------------


def read_and_decode(url: str, size: tuple[int, int]) -> tuple[torch.Tensor | None, str | None]:
    """(uint8 image at ``size``, None) or (None, why it is unusable). Never raises."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None, "file not found (removed after it was listed?)"
    except IsADirectoryError:
        return None, "is a folder, not a file"
    except Exception as exc:  # permissions, network errors after fsspec's own retries
        return None, f"cannot read file ({type(exc).__name__}: {exc})"
    try:
        return load_image(data, size), None
    except ImageDecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # a decoder bug must not fail the other images
        return None, f"cannot decode image ({type(exc).__name__}: {exc})"


@dataclass
class _Batch:
    pixels: torch.Tensor  # uint8, N x 3 x H x W in the network's channel order, channels_last
    rows: list[int]  # the partition row of each image in ``pixels``
    errors: dict[int, str]  # partition row -> reason
    decode_seconds: float


def _load_batch(paths: list[str], first_row: int, scoring: ScoringModel, pool: ThreadPoolExecutor | None) -> _Batch:
    started = time.perf_counter()
    size = scoring.preprocessing.input_size
    loaded = list(
        pool.map(lambda u: read_and_decode(u, size), paths) if pool else (read_and_decode(u, size) for u in paths)
    )
    good = [(first_row + i, image) for i, (image, _) in enumerate(loaded) if image is not None]
    errors = {first_row + i: reason for i, (_, reason) in enumerate(loaded) if reason is not None}
    pixels = torch.empty(
        (len(good), 3, *size),
        dtype=torch.uint8,
        memory_format=torch.channels_last,
        pin_memory=scoring.device.type == "cuda",
    )
    for j, (_, image) in enumerate(good):
        pixels[j] = image[scoring.channels]
    return _Batch(pixels, [row for row, _ in good], errors, time.perf_counter() - started)


def network_input(pixels: torch.Tensor, scoring: ScoringModel) -> torch.Tensor:
    """uint8 batch already in the network's channel order -> float channels_last input on the
    model's device; equal to ``Preprocessing.normalize`` of the RGB batch, in two passes
    instead of five. To a GPU the batch travels as uint8, a quarter of the float bytes."""
    pixels = pixels.to(scoring.device, non_blocking=True)
    x = torch.empty(pixels.shape, dtype=torch.float32, device=scoring.device, memory_format=torch.channels_last)
    x.copy_(pixels)
    if not scoring.identity_mul:
        x.mul_(scoring.mul)
    return x.add_(scoring.add)


@dataclass
class PartResult:
    name: str
    url: str
    images: int
    failed: int
    seconds: float
    decode_seconds: float = 0.0  # spent reading and decoding (overlaps the forward passes)
    forward_seconds: float = 0.0
    skipped: bool = False  # the part was already there


def score_paths(
    paths: list[str],
    scoring: ScoringModel,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    top_k: int = DEFAULT_TOP_K,
    read_threads: int | None = None,
    timings: dict | None = None,
) -> pa.Table:
    """Score ``paths`` in mini-batches; the next batch is read and decoded in a thread while
    the current one runs forward. One row per path, in order; bad files get an error.
    ``read_threads``: files read and decoded at once (default: 1 for local files, more for
    remote ones, whose reads wait on the network)."""
    n = len(paths)
    k = min(top_k, len(scoring.classes))
    label_idx = np.full((n, k), -1, dtype=np.int64)
    top_scores = np.zeros((n, k), dtype=np.float32)
    errors: list[str | None] = [None] * n
    decode_s = forward_s = 0.0
    batches = [(start, paths[start : start + mini_batch_size]) for start in range(0, n, mini_batch_size)]
    if read_threads is None:
        read_threads = 1 if not paths or storage.protocol_of(paths[0]) in ("file", "local") else REMOTE_READ_THREADS
    read_pool = ThreadPoolExecutor(read_threads) if read_threads > 1 else None
    prefetch = ThreadPoolExecutor(1)
    try:
        pending = prefetch.submit(_load_batch, batches[0][1], batches[0][0], scoring, read_pool) if batches else None
        for i in range(len(batches)):
            batch = pending.result()
            pending = (
                prefetch.submit(_load_batch, batches[i + 1][1], batches[i + 1][0], scoring, read_pool)
                if i + 1 < len(batches)
                else None
            )
            decode_s += batch.decode_seconds
            for row, reason in batch.errors.items():
                errors[row] = reason
            if not batch.rows:
                continue
            started = time.perf_counter()
            with torch.inference_mode():
                probs = torch.softmax(scoring.model(network_input(batch.pixels, scoring)).float(), dim=1)
                values, indices = probs.topk(k, dim=1)
            rows = np.asarray(batch.rows)
            label_idx[rows] = indices.cpu().numpy()
            top_scores[rows] = values.cpu().numpy()
            forward_s += time.perf_counter() - started
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        if read_pool:
            read_pool.shutdown(wait=True, cancel_futures=True)
    if timings is not None:
        timings.update(decode_seconds=decode_s, forward_seconds=forward_s)
    return _table(paths, label_idx, top_scores, errors, scoring.classes)


def _table(
    paths: list[str], label_idx: np.ndarray, top_scores: np.ndarray, errors: list[str | None], classes: list[str]
) -> pa.Table:
    """The part: one row per path; label, score and the top-k lists are null for a bad file."""
    bad = np.asarray([e is not None for e in errors], dtype=bool)
    names = np.asarray(classes, dtype=object)[np.clip(label_idx, 0, None)]  # n x k
    names[bad] = None
    k = label_idx.shape[1]
    offsets = pa.array(np.arange(0, (len(paths) + 1) * k, k, dtype=np.int32))
    return pa.table(
        {
            "path": pa.array(paths, type=pa.string()),
            "label": pa.array(names[:, 0], type=pa.string()),
            "score": pa.array(top_scores[:, 0], type=pa.float32(), mask=bad),
            "top_labels": pa.ListArray.from_arrays(
                offsets, pa.array(names.reshape(-1), type=pa.string()), mask=pa.array(bad)
            ),
            "top_scores": pa.ListArray.from_arrays(
                offsets, pa.array(top_scores.reshape(-1), type=pa.float32()), mask=pa.array(bad)
            ),
            "error": pa.array(errors, type=pa.string()),
        },
        schema=PART_SCHEMA,
    )


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def score_partition(
    model_url: str,
    model_sha256: str,
    paths: list[str],
    out_url: str,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    top_k: int = DEFAULT_TOP_K,
    read_threads: int | None = None,
    torch_threads: int | None = None,
) -> PartResult:
    """What one Dask task does: score ``paths`` with the (cached) model and write the part
    atomically to ``out_url``. A part already there is not scored again. ``torch_threads``:
    set this process's torch threads first (1 in a local cluster of one process per core)."""
    started = time.perf_counter()
    if torch_threads and torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    name = posixpath.basename(out_url).rsplit(".parquet", 1)[0]
    if storage.exists(out_url):  # a duplicate task, or a straggler of an earlier run
        table = pq.read_table(io.BytesIO(storage.read_bytes(out_url)), columns=["error"])
        return PartResult(
            name,
            out_url,
            table.num_rows,
            table.num_rows - table["error"].null_count,
            time.perf_counter() - started,
            skipped=True,
        )
    scoring = cached_model(model_url, model_sha256)
    timings: dict = {}
    table = score_paths(list(paths), scoring, mini_batch_size, top_k, read_threads, timings)
    storage.write_bytes(out_url, _table_bytes(table))
    return PartResult(
        name,
        out_url,
        table.num_rows,
        table.num_rows - table["error"].null_count,
        time.perf_counter() - started,
        timings["decode_seconds"],
        timings["forward_seconds"],
    )


# ---- the job: lock, manifest, plan ----------------------------------------------------------


@dataclass
class JobPlan:
    """What the flow's tasks hand each other: URLs and counts, not the file list."""

    out: str
    model: ModelInfo
    images: str
    files: str  # URL of files.parquet
    count: int
    ignored: int
    partitions: int
    partition_size: int
    top_k: int
    mini_batch_size: int
    done: list[str] = field(default_factory=list)  # parts already there when the plan was made
    done_images: int = 0  # images in those parts

    def to_dict(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_top_k(top_k: int | None, classes: list[str]) -> int:
    if top_k is None:
        return min(DEFAULT_TOP_K, len(classes))
    if not 1 <= top_k <= len(classes):
        raise ScoringError(f"top-k must be between 1 and the model's {len(classes)} classes, not {top_k}")
    return top_k


def check_settings(mini_batch_size: int, partition_size: int) -> None:
    if mini_batch_size < 1:
        raise ScoringError(f"mini-batch size must be at least 1, not {mini_batch_size}")
    if partition_size < 1:
        raise ScoringError(f"partition size must be at least 1, not {partition_size}")


def prepare_job(
    model_url: str,
    images: str,
    out: str,
    top_k: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    model: ModelInfo | None = None,
) -> JobPlan:
    """Check the model, list the images, cut them into partitions and write ``job.json`` and
    ``files.parquet``. An output that already holds another model's scores is refused."""
    check_settings(mini_batch_size, partition_size)
    model = model or inspect_model(model_url)
    top_k = resolve_top_k(top_k, model.classes)
    if storage.exists(job_url(out)):
        previous = storage.read_json(job_url(out))
        if previous.get("model_sha256") != model.sha256:
            raise ScoringError(
                f"{out} already holds scores of another model ({previous.get('model')}, "
                f"sha256 {str(previous.get('model_sha256'))[:12]}, classes "
                f"{', '.join(previous.get('classes', []))}); score into another --out, or remove it first"
            )
    listing = list_images(images)
    parts = partitions(listing.paths, partition_size, salt=f"{model.sha256}:{top_k}")
    present = present_parts(out)
    done = [p.name for p in parts if f"{p.name}.parquet" in present]
    frame = pa.table(
        {
            "path": pa.array([u for p in parts for u in p.paths], type=pa.string()),
            "part": pa.array([p.name for p in parts for _ in p.paths], type=pa.string()),
        }
    )
    storage.write_bytes(files_url(out), _table_bytes(frame))
    storage.write_json(
        job_url(out),
        {
            "model": model_url,
            "model_sha256": model.sha256,
            "network": model.network,
            "classes": model.classes,
            "input_size": list(model.input_size),
            "preprocessing": model.preprocessing,
            "images": images,
            "count": len(listing.paths),
            "ignored": len(listing.ignored),
            "partitions": len(parts),
            "partition_size": partition_size,
            "top_k": top_k,
            "updated": _now(),
        },
    )
    return JobPlan(
        out,
        model,
        images,
        files_url(out),
        len(listing.paths),
        len(listing.ignored),
        len(parts),
        partition_size,
        top_k,
        mini_batch_size,
        done,
        sum(len(p.paths) for p in parts if f"{p.name}.parquet" in present),
    )


def read_partitions(plan: JobPlan) -> list[Partition]:
    """The plan's partitions, read back from ``files.parquet``."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(plan.files)))
    paths, names = table["path"].to_pylist(), table["part"].to_pylist()
    out: list[Partition] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            out.append(Partition(len(out), names[start], tuple(paths[start:i])))
            start = i
    return out


@storage.retrying
def present_parts(out: str) -> set[str]:
    """File names in ``<out>/parts``, listed afresh (workers elsewhere wrote them: a cached
    listing, as s3fs keeps, would miss some)."""
    fs, path = storage.filesystem(parts_dir(out))
    fs.invalidate_cache(path)
    return {posixpath.basename(p) for p in fs.ls(path, detail=False)} if fs.isdir(path) else set()


def missing_partitions(plan: JobPlan, parts: list[Partition] | None = None) -> list[Partition]:
    """The plan's partitions (``parts`` when already read) with no part written yet."""
    present = present_parts(plan.out)
    parts = read_partitions(plan) if parts is None else parts
    return [p for p in parts if f"{p.name}.parquet" not in present]


# ---- the lock: one job per output at a time -----------------------------------------------------


class JobLock:
    """An exclusive lock on an output while a job writes to it.

    On a local disk it is ``fcntl.flock`` on ``<out>/.lock``: the kernel drops it when the
    holder exits, even by kill -9, so a crashed job never blocks its rerun. Elsewhere (S3...)
    it is a lease: the file names its holder and is refreshed every ``lease_s / 4`` seconds;
    one not refreshed for ``lease_s`` is taken over (best effort: object stores have no
    atomic create-if-absent through fsspec).
    """

    def __init__(self, out: str, wait_s: float = 0.0, lease_s: float = 120.0):
        self.out, self.url, self.wait_s, self.lease_s = out, lock_url(out), wait_s, lease_s
        self.local = storage.protocol_of(out) in ("file", "local")
        self.token, self.since = uuid.uuid4().hex, _now()
        self._fd: int | None = None
        self._made_folders: list[str] = []  # folders this lock created, innermost first
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _holder(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "since": self.since,
            "heartbeat": time.time(),
        }

    def _refused(self, holder: dict | None) -> ScoringLockedError:
        who = f" (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})" if holder else ""
        return ScoringLockedError(
            f"another scoring job is writing to {self.out}{who}; wait for it to finish, or score into another --out"
        )

    def acquire(self) -> JobLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try_local() if self.local else self._try_lease()
            if holder is None:
                return self
            if time.monotonic() >= deadline:
                raise self._refused(holder)
            time.sleep(0.5)

    def _try_local(self) -> dict | None:
        import fcntl

        path = self.url[len("file://") :] if self.url.startswith("file://") else self.url
        folder = os.path.dirname(path)
        while not os.path.isdir(folder):
            self._made_folders.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            except ValueError:
                holder = None
            os.close(fd)
            return holder or {}
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file as we opened it: try again on the new one
            os.close(fd)
            return self._try_local()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._holder()).encode(), 0)
        self._fd = fd
        return None

    def _try_lease(self) -> dict | None:
        if storage.exists(self.url):
            try:
                holder = storage.read_json(self.url)
            except Exception:
                holder = {}
            if holder.get("token") != self.token and time.time() - float(holder.get("heartbeat", 0)) < self.lease_s:
                return holder
        storage.write_json(self.url, self._holder())
        time.sleep(0.2)  # a racer writing at the same moment: the last writer wins, the other sees it
        if storage.read_json(self.url).get("token") != self.token:
            return storage.read_json(self.url)
        self._refresher = threading.Thread(target=self._refresh, daemon=True, name="score-lock-lease")
        self._refresher.start()
        return None

    def _refresh(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                storage.write_json(self.url, self._holder())
            except Exception:
                pass

    def release(self) -> None:
        if self._fd is not None:
            path = self.url[len("file://") :] if self.url.startswith("file://") else self.url
            try:
                os.unlink(path)  # while still holding it; a waiter then retries on a new file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
            for folder in self._made_folders:  # a job refused before it wrote anything leaves no
                try:  # empty --out behind
                    os.rmdir(folder)
                except OSError:  # not empty: the job's files
                    break
        elif self._refresher is not None:
            self._stop.set()
            self._refresher.join(timeout=5)
            self._refresher = None
            storage.remove(self.url)

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- consolidation -----------------------------------------------------------------------------


def consolidate(plan: JobPlan, extra: dict | None = None) -> dict:
    """Concatenate the parts in plan order into ``scores.parquet`` (exactly one row per
    listed image, sorted by path) and write ``summary.json``; remove parts of earlier plans
    and temporary debris. Returns the summary."""
    parts = read_partitions(plan)
    missing = missing_partitions(plan, parts)
    if missing:
        raise ScoringIncompleteError(
            f"{len(missing)} of {len(parts)} partitions are not scored yet "
            f"(first: {missing[0].name}); rerun the job to score them"
        )
    sink = io.BytesIO()
    labels: dict[str, int] = {}
    failures: list[dict] = []
    failed = rows = 0
    with pq.ParquetWriter(sink, PART_SCHEMA) as writer:
        for part in parts:
            url = part_url(plan.out, part.name)
            data = storage.read_bytes(url)  # a storage error propagates: the part may be fine
            try:
                table = pq.read_table(io.BytesIO(data), schema=PART_SCHEMA)
            except pa.ArrowInvalid as exc:  # damaged after it was written
                storage.remove(url)
                raise ScoringIncompleteError(
                    f"part {part.name} was unreadable ({exc}) and is removed; rerun the job to score it again"
                ) from None
            if table["path"].to_pylist() != list(part.paths):
                raise ScoringError(
                    f"part {part.name} does not hold the files the plan gives it; "
                    f"remove {part_url(plan.out, part.name)} and rerun"
                )
            writer.write_table(table)
            rows += table.num_rows
            errors = table["error"]
            bad = errors.is_valid()
            failed += int(pc.sum(bad).as_py() or 0)
            if len(failures) < MAX_FAILURES_IN_SUMMARY and errors.null_count < table.num_rows:
                for path, error in zip(table["path"].filter(bad).to_pylist(), errors.filter(bad).to_pylist()):
                    if len(failures) < MAX_FAILURES_IN_SUMMARY:
                        failures.append({"path": path, "error": error})
            counts = pc.value_counts(table["label"].drop_null())
            for item in counts.to_pylist():
                labels[item["values"]] = labels.get(item["values"], 0) + int(item["counts"])
    if rows != plan.count:
        raise ScoringError(f"consolidation found {rows} rows for {plan.count} images")
    storage.write_bytes(scores_url(plan.out), sink.getvalue())
    summary = {
        "images": plan.count,
        "scored": rows - failed,
        "failed": failed,
        "ignored": plan.ignored,
        "labels": dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failures": failures,
        "failures_listed": len(failures),
        "output": scores_url(plan.out),
        "out": plan.out,
        "images_source": plan.images,
        "model": plan.model.url,
        "model_sha256": plan.model.sha256,
        "network": plan.model.network,
        "classes": plan.model.classes,
        "top_k": plan.top_k,
        "partitions": plan.partitions,
        "finished": _now(),
        **(extra or {}),
    }
    storage.write_json(summary_url(plan.out), summary)
    _remove_stale(plan, {f"{p.name}.parquet" for p in parts})
    return summary


def _remove_stale(plan: JobPlan, keep: set[str]) -> None:
    """Parts of earlier plans (the folder changed since) and temporary debris of killed runs."""
    for name in present_parts(plan.out) - keep:
        try:
            storage.remove(storage.join(parts_dir(plan.out), name))
        except FileNotFoundError:
            pass


# ---- driving Dask (plain: the flow wraps these with Prefect progress and artifacts) -----------


@contextmanager
def _quiet_dask() -> Iterator[None]:
    """Prefect's log handlers would otherwise show all of Dask's INFO chatter."""
    import logging

    levels = {name: logging.getLogger(name).level for name in ("distributed", "tornado")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None) -> Iterator[str]:
    """The scheduler address of the cluster to use: ``address`` as given, or that of a local
    cluster started here and stopped on exit (``workers`` processes, default one per core,
    one thread each). Workers start in the background and take tasks as each comes up."""
    if address:
        yield address
        return
    import logging

    from distributed import LocalCluster

    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 1:
        raise ScoringError(f"workers must be at least 1, not {n}")
    with (
        _nanny_environ_restored(),
        _quiet_dask(),
        LocalCluster(
            n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
    ):
        cluster.scale(n)
        yield cluster.scheduler_address


@contextmanager
def _nanny_environ_restored() -> Iterator[None]:
    """Dask's nanny puts its worker environment (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS=1...)
    into this process's ``os.environ`` and leaves it there, so every process started later
    (a training run, a server) would inherit one thread and a slow allocator. Put it back."""
    import dask

    keys = set(dask.config.get("distributed.nanny.pre-spawn-environ", {})) | {"PYTHONHASHSEED"}
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def dask_client(address: str) -> Iterator:
    from distributed import Client

    with _quiet_dask(), Client(address, timeout="30s") as client:
        yield client


def run_partitions(
    client,
    plan: JobPlan,
    on_done: Callable[[PartResult], None] | None = None,
    torch_threads: int | None = None,
    read_threads: int | None = None,
    worker_timeout_s: float = 300.0,
) -> list[PartResult]:
    """Map :func:`score_partition` over the partitions still missing, on ``client``; calls
    ``on_done`` in this (the driver's) thread as each finishes. A partition that fails as a
    whole is retried once, then reported in :class:`ScoringIncompleteError` after the
    others are done; a bad model fails fast."""
    from distributed import as_completed

    todo = missing_partitions(plan)
    if not todo:
        return []
    try:
        client.wait_for_workers(1, timeout=worker_timeout_s)
    except TimeoutError:
        raise ScoringError(f"no Dask worker joined the cluster within {worker_timeout_s:.0f} s") from None
    futures = {}
    for part in todo:
        future = client.submit(
            score_partition,
            plan.model.url,
            plan.model.sha256,
            list(part.paths),
            part_url(plan.out, part.name),
            plan.mini_batch_size,
            plan.top_k,
            read_threads,
            torch_threads,
            key=f"score-{part.name}-{uuid.uuid4().hex[:8]}",
            retries=1,
        )
        futures[future] = part
    results, failures = [], []
    try:
        for future in as_completed(futures):
            part = futures[future]
            if future.status != "finished":  # error (after its retry), or cancelled
                exc = future.exception() if future.status == "error" else None
                if isinstance(exc, ModelFileError):
                    raise exc
                failures.append((part.name, f"{type(exc).__name__}: {exc}" if exc else future.status))
                continue
            result = future.result()
            results.append(result)
            if on_done:
                on_done(result)
    finally:
        client.cancel(list(futures))
    if failures:
        raise ScoringIncompleteError(
            f"{len(failures)} of {len(todo)} partitions failed (first: "
            f"{failures[0][0]}: {failures[0][1]}); the others are saved, "
            f"rerun the job to retry these"
        )
    return results


def score_images(
    model: str,
    images: str,
    out: str,
    dask_address: str | None = None,
    workers: int | None = None,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    top_k: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    client=None,
    lock_wait_s: float = 0.0,
    on_done: Callable[[PartResult], None] | None = None,
) -> dict:
    """The whole job without Prefect (what ``score_flow`` does, for scripts and benchmarks):
    lock the output, plan, score what is missing on Dask, consolidate. Returns the summary.

    A script that calls this with a local cluster must guard its entry point with
    ``if __name__ == "__main__":``, since Dask starts worker processes by spawning."""
    started = time.perf_counter()
    torch_threads = 1 if client is None and not dask_address else None  # a local cluster of ours
    with JobLock(out, wait_s=lock_wait_s):
        plan = prepare_job(model, images, out, top_k, partition_size, mini_batch_size)
        results: list[PartResult] = []
        if len(plan.done) < plan.partitions:
            with ExitStack() as stack:
                if client is None:
                    address = stack.enter_context(dask_cluster(dask_address, workers))
                    client = stack.enter_context(dask_client(address))
                results = run_partitions(client, plan, on_done, torch_threads)
        return consolidate(plan, run_record(plan, results, time.perf_counter() - started))


def run_record(plan: JobPlan, results: list[PartResult], seconds: float) -> dict:
    """This run's figures, for the summary: how much it scored and how fast."""
    processed = sum(r.images for r in results if not r.skipped)
    return {
        "seconds": round(seconds, 3),
        "processed": processed,
        "resumed_partitions": len(plan.done),
        "images_per_second": round(processed / seconds, 2) if seconds > 0 else None,
        "decode_seconds": round(sum(r.decode_seconds for r in results), 3),
        "forward_seconds": round(sum(r.forward_seconds for r in results), 3),
    }
