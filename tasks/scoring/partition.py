"""What a Dask worker runs: score one partition of image URLs and write its parquet part.

The worker gets its predictor from :func:`tasks.inference.cached_predictor` (loaded once per
process, with the engine and decoder the driver chose), reads and decodes the next mini-batch
in a thread while the current one runs forward, and writes one row per file: a file that
cannot be read or decoded becomes a row with an ``error``; it never fails the partition.

On a GPU (one worker process per GPU: tasks/scoring/cluster.py) the files are read by CPU
threads, the JPEGs are decoded and resized on the GPU in one batched nvJPEG call
(:func:`tasks.preprocessing.load_jpegs`) and anything else is decoded on the CPU; a forward
pass there takes at least GPU_MINI_BATCH_SIZE images.

Nothing here imports Prefect: each Prefect import in a worker would start its own API.
"""

from __future__ import annotations

import io
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from retrain.tasks import storage
from retrain.tasks.allocator import tune_allocator
from retrain.tasks.drift import takes_embedding
from retrain.tasks.inference import Predictor, cached_predictor, top_k
from retrain.tasks.preprocessing import ImageDecodeError, jpeg_batch_applies, load_image, load_jpegs
from retrain.tasks.scoring.layout import DEFAULT_MINI_BATCH_SIZE, DEFAULT_TOP_K
from retrain.tasks.scoring.listing import LISTING_SCHEMA, unlisted

REMOTE_READ_THREADS = 8  # reads from object stores wait on the network: overlap them
# A GPU worker's own threads read the files (and decode on the CPU what nvJPEG does not take),
# so that the GPU does not wait on one thread's reads.
GPU_READ_THREADS = 4
# The job's mini-batch size is sized for a CPU core's cache (8); a GPU is busy only with
# hundreds of images per forward pass and per nvJPEG call, so a GPU worker takes at least this.
GPU_MINI_BATCH_SIZE = 256

SCORES_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("top_labels", pa.list_(pa.string())),
        ("top_scores", pa.list_(pa.float32())),
        ("error", pa.string()),
    ]
)
# A part's and scores.parquet's rows: the scores, and the identity of the file scored (from the
# listing: tasks/scoring/listing.py), so that a rerun sees which files changed since.
ROW_SCHEMA = pa.schema([*SCORES_SCHEMA, *(f for f in LISTING_SCHEMA if f.name != "path")])
# A part file also holds the embeddings of a sample of its images (null for the others), which
# consolidation compares with the model's reference (tasks/drift.py); scores.parquet does not.
EMBEDDING = pa.field("embedding", pa.list_(pa.float32()))
PART_SCHEMA = ROW_SCHEMA.append(EMBEDDING)
# Schema metadata of a part and of scores.parquet: the model, engine, decoder and top-k its
# rows were scored with (scores_key). Rows of other settings are never reused.
SCORES_KEY = b"retrain.scores"


def read_file(url: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) or (None, why it cannot be read). Never raises."""
    try:
        return storage.read_bytes(url), None
    except FileNotFoundError:
        return None, "file not found (removed after it was listed?)"
    except IsADirectoryError:
        return None, "is a folder, not a file"
    except Exception as exc:  # permissions, network errors after fsspec's own retries
        return None, f"cannot read file ({type(exc).__name__}: {exc})"


def read_and_decode(url: str, predictor: Predictor) -> tuple[torch.Tensor | None, str | None]:
    """(uint8 RGB image at the input size, None) or (None, why it is unusable). Never raises:
    a file that cannot be read or decoded becomes its row's ``error`` (the row names the file)."""
    data, reason = read_file(url)
    return decode_one(data, predictor) if data is not None else (None, reason)


def decode_one(data: bytes, predictor: Predictor) -> tuple[torch.Tensor | None, str | None]:
    """:func:`read_and_decode` of bytes already read: the decoder the driver chose, on the CPU."""
    try:
        return load_image(data, predictor.preprocessing.input_size, predictor.decoder), None
    except ImageDecodeError as exc:
        return None, exc.reason
    except Exception as exc:  # a decoder bug must not fail the other images
        return None, f"cannot decode image ({type(exc).__name__}: {exc})"


@dataclass
class _Batch:
    pixels: torch.Tensor  # uint8, N x 3 x H x W in the network's channel order, channels_last
    rows: list[int]  # the partition row of each image in ``pixels``
    errors: dict[int, str]  # partition row -> reason
    decode_seconds: float
    batch_decoded: int = 0  # images decoded by load_jpegs (on a GPU: nvJPEG)


def jpeg_batch_device(predictor: Predictor) -> torch.device | None:
    """Where a worker decodes its JPEGs in batches: on the predictor's GPU; None on a CPU, whose
    worker decodes each file in its own thread with the decoder the driver chose."""
    return predictor.device if predictor.device.type == "cuda" else None


def _read_for_batch(url: str, predictor: Predictor) -> tuple[torch.Tensor | bytes | None, str | None]:
    """:func:`read_and_decode`, except that a JPEG the batch decoder takes stays bytes."""
    data, reason = read_file(url)
    if data is None:
        return None, reason
    return (data, None) if jpeg_batch_applies(data) else decode_one(data, predictor)


def _load_batch(
    paths: list[str],
    first_row: int,
    predictor: Predictor,
    pool: ThreadPoolExecutor | None,
    jpeg_device: torch.device | None = None,
) -> _Batch:
    """Read and decode ``paths`` (the rows from ``first_row``). With ``jpeg_device`` the JPEGs
    are decoded together there (:func:`tasks.preprocessing.load_jpegs`) and the batch is
    assembled on that device; the other files are decoded on the CPU, in the read threads."""
    started = time.perf_counter()
    size = predictor.preprocessing.input_size
    read = _read_for_batch if jpeg_device is not None else read_and_decode
    loaded = list(pool.map(lambda u: read(u, predictor), paths) if pool else (read(u, predictor) for u in paths))
    jpegs = [i for i, (item, _) in enumerate(loaded) if isinstance(item, (bytes, bytearray))]
    for i, image in zip(jpegs, load_jpegs([loaded[i][0] for i in jpegs], size, jpeg_device)):
        loaded[i] = (image, None) if isinstance(image, torch.Tensor) else (None, image.reason)
    good = [(first_row + i, image) for i, (image, _) in enumerate(loaded) if image is not None]
    errors = {first_row + i: reason for i, (_, reason) in enumerate(loaded) if reason is not None}
    channels = predictor.affine.channels
    if jpeg_device is not None and jpeg_device.type == "cuda":  # assembled where the JPEGs are
        pixels = (
            torch.stack([image.to(jpeg_device) for _, image in good])[:, channels]
            if good
            else torch.empty((0, 3, *size), dtype=torch.uint8, device=jpeg_device)
        ).contiguous(memory_format=torch.channels_last)
    else:
        pixels = torch.empty(
            (len(good), 3, *size),
            dtype=torch.uint8,
            memory_format=torch.channels_last,
            pin_memory=predictor.device.type == "cuda",
        )
        for j, (_, image) in enumerate(good):
            pixels[j] = image[channels]
    return _Batch(pixels, [row for row, _ in good], errors, time.perf_counter() - started, len(jpegs))


@dataclass
class PartResult:
    name: str
    url: str
    images: int
    failed: int
    seconds: float
    decode_seconds: float = 0.0  # spent reading and decoding (overlaps the forward passes)
    forward_seconds: float = 0.0
    gpu_decoded: int = 0  # images whose JPEG was decoded on the GPU (nvJPEG)
    skipped: bool = False  # the part was already there
    engine: str = ""


def score_paths(
    paths: list[str],
    predictor: Predictor,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    k: int = DEFAULT_TOP_K,
    read_threads: int | None = None,
    timings: dict | None = None,
    embedding_rate: float = 0.0,
) -> pa.Table:
    """Score ``paths`` in mini-batches; the next batch is read and decoded in a thread while
    the current one runs forward. One row per path, in order; bad files get an error.
    ``read_threads``: files read and decoded at once (default: 1 for local files on a CPU; more
    on a GPU, and for remote files, whose reads wait on the network). ``embedding_rate``: the
    share of images (a fixed sample by path: tasks.drift.takes_embedding) whose embedding the
    row keeps, from the same forward pass. On a GPU (:func:`jpeg_batch_device`) the JPEGs of a
    mini-batch are decoded there together, and a mini-batch has at least GPU_MINI_BATCH_SIZE
    images."""
    n = len(paths)
    k = kept_labels(predictor, k)
    label_idx = np.full((n, k), -1, dtype=np.int64)
    top_scores = np.zeros((n, k), dtype=np.float32)
    errors: list[str | None] = [None] * n
    wanted = np.asarray([takes_embedding(p, embedding_rate) for p in paths], dtype=bool) if embedding_rate else None
    embeddings: dict[int, np.ndarray] = {}
    decode_s = forward_s = 0.0
    batch_decoded = 0  # on a GPU: by nvJPEG
    jpeg_device = jpeg_batch_device(predictor)
    if jpeg_device is not None:
        mini_batch_size = max(mini_batch_size, GPU_MINI_BATCH_SIZE)
    batches = [(start, paths[start : start + mini_batch_size]) for start in range(0, n, mini_batch_size)]
    if read_threads is None:
        local = not paths or storage.protocol_of(paths[0]) in ("file", "local")
        read_threads = REMOTE_READ_THREADS if not local else GPU_READ_THREADS if jpeg_device is not None else 1
    read_pool = ThreadPoolExecutor(read_threads) if read_threads > 1 else None
    prefetch = ThreadPoolExecutor(1)
    try:
        pending = (
            prefetch.submit(_load_batch, batches[0][1], batches[0][0], predictor, read_pool, jpeg_device)
            if batches
            else None
        )
        for i in range(len(batches)):
            batch = pending.result()
            pending = (
                prefetch.submit(_load_batch, batches[i + 1][1], batches[i + 1][0], predictor, read_pool, jpeg_device)
                if i + 1 < len(batches)
                else None
            )
            decode_s += batch.decode_seconds
            batch_decoded += batch.batch_decoded
            for row, reason in batch.errors.items():
                errors[row] = reason
            if not batch.rows:
                continue
            started = time.perf_counter()
            logits, embedded = predictor.outputs_ordered(batch.pixels)
            rows = np.asarray(batch.rows)
            label_idx[rows], top_scores[rows] = top_k(torch.softmax(logits, dim=1), k)
            if wanted is not None and embedded is not None:
                kept = wanted[rows]
                embeddings.update(zip(rows[kept].tolist(), embedded.cpu().numpy()[kept]))
            forward_s += time.perf_counter() - started
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        if read_pool:
            read_pool.shutdown(wait=True, cancel_futures=True)
    if timings is not None:
        timings.update(decode_seconds=decode_s, forward_seconds=forward_s, gpu_decoded=batch_decoded)
    return _table(paths, label_idx, top_scores, errors, predictor.classes, embeddings)


def _table(
    paths: list[str],
    label_idx: np.ndarray,
    top_scores: np.ndarray,
    errors: list[str | None],
    classes: list[str],
    embeddings: dict[int, np.ndarray],
) -> pa.Table:
    """The part's scores: one row per path; label, score and the top-k lists are null for a
    bad file, the embedding for a file outside the sample."""
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
            "embedding": pa.array([embeddings.get(i) for i in range(len(paths))], type=EMBEDDING.type),
        },
        schema=pa.schema([*SCORES_SCHEMA, EMBEDDING]),
    )


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@dataclass(frozen=True)
class WorkerModel:
    """What a worker needs to build its predictor: small, sent with every task."""

    url: str
    sha256: str
    engine: str = "torch"
    onnx_url: str | None = None
    decoder: str = "exact"


def scores_key(model: WorkerModel, k: int) -> str:
    """What a row's scores depend on besides the file: the model, its engine and decoder, top-k."""
    return f"{model.sha256}:{model.engine}:{model.decoder}:top-{k}"


def kept_labels(predictor: Predictor, k: int) -> int:
    """The labels kept per image: top-k, at most the model's classes. (Its own function: a test's
    stand-in for score_partition pickles the real one by value, and a ``predictor.classes`` in
    its body would make cloudpickle take the ``torch.classes`` module along.)"""
    return min(k, len(predictor.classes))


def score_partition(
    model: WorkerModel,
    files: pa.Table | list[str],
    out_url: str,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    k: int = DEFAULT_TOP_K,
    read_threads: int | None = None,
    torch_threads: int | None = None,
    embedding_rate: float = 0.0,
) -> PartResult:
    """What one Dask task does: score ``files`` (listing rows: path and identity; or plain
    paths, of unknown identity) with the (cached) predictor and write the part atomically to
    ``out_url``, each row with its file's identity and the part with :func:`scores_key`. A part
    already there is not scored again. ``torch_threads``: set this process's torch threads
    first (1 in a local cluster of one process per core). ``embedding_rate``: the share of the
    images whose embeddings the part keeps for the drift test (tasks/drift.py)."""
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
            engine=model.engine,
        )
    files = unlisted(files) if isinstance(files, list) else files
    predictor = cached_predictor(model.url, model.sha256, model.engine, model.onnx_url, model.decoder)
    tune_allocator("inference")  # decoding and forward passes alternate (tasks/allocator.py)
    timings: dict = {}
    scores = score_paths(
        files["path"].to_pylist(), predictor, mini_batch_size, k, read_threads, timings, embedding_rate
    )
    table = pa.table(
        [scores[f.name] if f.name in scores.column_names else files[f.name] for f in PART_SCHEMA],
        schema=PART_SCHEMA.with_metadata({SCORES_KEY: scores_key(model, kept_labels(predictor, k))}),
    )
    storage.write_bytes(out_url, table_bytes(table))
    return PartResult(
        name,
        out_url,
        table.num_rows,
        table.num_rows - table["error"].null_count,
        time.perf_counter() - started,
        timings["decode_seconds"],
        timings["forward_seconds"],
        timings["gpu_decoded"],
        engine=model.engine,
    )


class _SchedulerGoneHeartbeat(logging.Filter):
    """Drops the worker's "Failed to communicate with scheduler during heartbeat" record. When
    the job fails (the Prefect API went away, the user pressed Ctrl-C) the driver closes its
    scheduler while a worker may still be finishing a partition; that worker's next heartbeat
    would print a traceback on the user's terminal, under the one-line error that says what
    happened. A lost scheduler is reported by the driver itself (ClusterLostError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


def warm_gpu() -> None:
    """Start CUDA and nvJPEG's decoder in a worker that has a GPU (a second or more), while the
    driver still lists the images and plans the job, not in the worker's first partition."""
    if torch.cuda.is_available():
        tiny = io.BytesIO()
        Image.new("RGB", (16, 16)).save(tiny, "JPEG")
        load_jpegs([tiny.getvalue()], (8, 8), "cuda")


def dask_setup(worker) -> None:
    """Dask calls this in each local worker that preloads this module (cluster.WORKER_PRELOAD)."""
    logging.getLogger("distributed.worker").addFilter(_SchedulerGoneHeartbeat())
    try:
        warm_gpu()
    except Exception:  # not fatal here: the worker's first partition meets the fault and reports it
        pass
