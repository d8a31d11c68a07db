"""Transfer mode's feature extraction on a Dask cluster (:mod:`.features` describes the cache).

Each feature part is a task: the worker rebuilds the frozen body once (from the model's
state dict, written next to the feature shards, on the cache's engine: an int8 body is written
there too, quantized once by the training process), reads the part's images from the image
shards and writes the part's feature shard to the store with :func:`.features.part_features`,
the same call the in-process path makes, so both give the same numbers. The training process
then streams the shards like a cache on disk (local copies where the store is remote).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from retrain.tasks import storage
from retrain.tasks.parts import run_parts
from retrain.tasks.preprocessing import Augmentation, Preprocessing
from retrain.tasks.training.feature_engine import FLOAT32, BodyEngine
from retrain.tasks.training.feature_files import (
    INT8_MODEL,
    MODEL,
    FeatureCache,
    FeaturePlan,
    local_folder,
    open_shards,
    start_folder,
)
from retrain.tasks.training.features import FeatureJob, part_features
from retrain.tasks.training.row_files import write_npy
from retrain.tasks.training.shards import ShardImages, ShardPlan, ShardSet

# ---- the body on a worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerBody:
    """How a worker rebuilds the frozen body: the network, its classes and a state-dict file."""

    network: str
    classes: int
    url: str
    sha256: str
    execution_environment: str = "auto"
    engine: str = FLOAT32
    onnx_url: str | None = None  # the int8 body (engine onnx-int8)


@functools.lru_cache(maxsize=2)
def _worker_body(body: WorkerBody) -> tuple[BodyEngine, torch.device]:
    from retrain.tasks.networks import build_network, get_spec, resolve_device
    from retrain.tasks.training.body_head import split_at_head

    spec = get_spec(body.network)
    model, _ = build_network(spec.name, body.classes, "none")
    state = torch.load(io.BytesIO(storage.read_bytes(body.url)), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    device = resolve_device(body.execution_environment)
    model.to(device, memory_format=torch.channels_last)
    model.eval()
    onnx_data = storage.read_bytes(body.onnx_url) if body.onnx_url else None
    frozen = split_at_head(model, spec).body.eval()
    return BodyEngine(frozen, body.engine, device, spec.preprocessing, onnx_data=onnx_data), device


@functools.lru_cache(maxsize=2)
def _worker_shards(plan: ShardPlan) -> ShardSet:
    return ShardSet(plan)


@dataclass(frozen=True)
class FeatureTask:
    """What every feature task shares (small: sent with each)."""

    folder: str
    body: WorkerBody
    shards: ShardPlan  # without paths
    views: int
    augmentation: dict
    preprocessing: dict
    seed: int


def extract_part(task: FeatureTask, kind: str, j: int, first: int, indices: np.ndarray) -> dict:
    """What one Dask task does: the features of training (or validation) images ``first`` ..
    ``first + len(indices) - 1`` (``indices``: those images in the image shards), written to
    the part's shard file. A part already there is not computed again."""
    started = time.perf_counter()
    url = storage.join(task.folder, FeaturePlan.name(kind, j))
    if storage.exists(url):
        return {"kind": kind, "part": j, "images": len(indices), "seconds": 0.0, "skipped": True}
    from retrain.tasks.allocator import tune_allocator

    tune_allocator("inference")  # Dask's nanny starts workers with a trimming malloc (tasks/allocator.py)
    body, device = _worker_body(task.body)
    images = _worker_shards(task.shards).read(indices)
    views = task.views if kind == "train" else 0
    features = part_features(
        body,
        images,
        first,
        views,
        Augmentation(**task.augmentation),
        Preprocessing.from_dict(task.preprocessing),
        task.seed,
        device,
    )
    write_npy(url, features.cpu().numpy())
    return {
        "kind": kind,
        "part": j,
        "images": len(indices),
        "seconds": time.perf_counter() - started,
        "skipped": False,
        "threads": torch.get_num_threads(),
    }


@dataclass
class ClusterBody:
    """What the feature extraction on a cluster needs besides the body: the whole model (the
    workers rebuild the body from it), its network name and execution environment."""

    client_source: Callable[[], object]  # returns a dask.distributed Client (started on first use)
    model: nn.Module
    network: str
    classes: int
    execution_environment: str = "auto"


def build_on_cluster(job: FeatureJob, folder: str, cluster: ClusterBody, bar, logger: logging.Logger) -> FeatureCache:
    plan, data = job.plan, job.data
    folder = storage.absolute(folder)
    done = start_folder(folder, job.key())
    local = local_folder(folder) or tempfile.mkdtemp(prefix="retrain-features-")
    # The workers' part function is set once the body is written for them (only when some part is missing).
    work = plan.parts_job(
        folder, extract_part, lambda kind, j, first, stop: (kind, j, first, job.images(kind).indices[first:stop])
    )
    if work.finished(done):
        train, val = open_shards(plan, folder, local)
        logger.info("reusing the feature cache in %s", folder)
        return FeatureCache(
            train, val, folder, 0.0, reused=True, folder=local, temporary=local != folder, store_folder=folder
        )
    todo = work.missing(done)
    shards: ShardImages = data.train_images if isinstance(data.train_images, ShardImages) else data.val_images
    started = time.perf_counter()
    stats = {"parts": len(plan.parts()), "computed": len(todo), "where": "dask"}
    if todo:
        model_url = storage.join(folder, MODEL)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in cluster.model.state_dict().items()}, buffer)
        payload = buffer.getvalue()
        storage.write_bytes(model_url, payload)
        onnx_url = None
        if job.engine == "onnx-int8":  # quantized here once, not by every worker
            onnx_url = storage.join(folder, INT8_MODEL)
            storage.write_bytes(onnx_url, job.runner.onnx_data())
        task = FeatureTask(
            folder,
            WorkerBody(
                cluster.network,
                cluster.classes,
                model_url,
                hashlib.sha256(payload).hexdigest(),
                cluster.execution_environment,
                job.engine,
                onnx_url,
            ),
            shards.shards.plan,
            plan.views,
            job.augmentation.to_dict(),
            job.preprocessing.to_dict(),
            job.seed,
        )
        work = replace(work, compute=functools.partial(extract_part, task))
        logger.info("feature extraction: %d of %d parts on the Dask cluster", len(todo), len(plan.parts()))
    threads = []

    def progress(part, result: dict) -> None:
        threads.append(result.get("threads"))
        if bar is not None:
            bar.update(result["images"] * ((plan.views + 1) if result["kind"] == "train" else 1))

    run_parts(work, cluster.client_source, progress, done)
    if todo:
        stats["worker_threads"] = threads[-1] if threads else None
    stats["extract_seconds"] = round(time.perf_counter() - started, 3)
    for name in (MODEL, INT8_MODEL):
        with contextlib.suppress(FileNotFoundError):
            storage.remove(storage.join(folder, name))
    train, val = open_shards(plan, folder, local)
    return FeatureCache(
        train,
        val,
        folder,
        0.0,
        folder=local,
        temporary=local != folder,
        store_folder=folder,
        extraction=stats,
    )
