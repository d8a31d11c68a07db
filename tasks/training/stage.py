"""The training stage: a run folder in (``run.json``, ``split.parquet``), ``trained.pt`` out.

Fine-tune and scratch modes train in several processes when the machine has several GPUs
(or ``processes`` asks for it): the same stage runs in each, rank 0 writes the outputs
(tasks/training/distributed.py).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from retrain.tasks import storage
from retrain.tasks.model_file import model_record, save_model_file
from retrain.tasks.networks import NetworkSpec, build_network, get_spec, resolve_device, summarize
from retrain.tasks.preprocessing import Augmentation
from retrain.tasks.reports import training_progress
from retrain.tasks.runs import RunConfig, read_run
from retrain.tasks.storage import RunLayout
from retrain.tasks.training.body_head import split_at_head
from retrain.tasks.training.checkpoints import keep_only_split, list_checkpoints, split_key
from retrain.tasks.training.cluster import ClusterRequest, LazyCluster, training_cluster
from retrain.tasks.training.data import TrainingData, load_training_data
from retrain.tasks.training.distributed import (
    Ranks,
    backend_for,
    launch,
    relay_history,
    relay_logger,
    resolve_processes,
)
from retrain.tasks.training.feature_engine import FLOAT32, float32_accuracy, gate, remember_failure
from retrain.tasks.training.features import body_digest
from retrain.tasks.training.loop import TrainingOutcome, train
from retrain.tasks.training.options import TrainingOptions

log = logging.getLogger("retrain.training")
PLOT_INTERVAL_S = 10  # the progress plot costs ~0.3 s: redrawn at most this often while training


class _ProgressPlot:
    """``progress.png`` redrawn from the history at most every PLOT_INTERVAL_S seconds."""

    def __init__(self, url: str):
        self.url, self.last = url, 0.0

    def __call__(self, history: pd.DataFrame) -> None:
        if time.monotonic() - self.last > PLOT_INTERVAL_S:
            training_progress(history, self.url)
            self.last = time.monotonic()


@dataclass(frozen=True)
class _Run:
    """A run folder as the training stage reads it: its configuration (``run.json``), its
    split, the network's registry entry and the classes."""

    layout: RunLayout
    store: str
    config: RunConfig
    spec: NetworkSpec
    split: pd.DataFrame
    classes: list[str]

    @classmethod
    def read(cls, run_url: str) -> _Run:
        layout = RunLayout(run_url)
        record = read_run(run_url)
        config = RunConfig.from_record(record["config"])
        split = storage.read_parquet(layout.split)
        return cls(
            layout,
            record.get("store") or layout.store,
            config,
            get_spec(config.network),
            split,
            sorted(split["label"].unique()),
        )

    def training_data(self, cluster: LazyCluster | None, logger: logging.Logger) -> TrainingData:
        """The train and validation images, from the data set's image shards (prepared now
        where missing, on ``cluster`` when given)."""
        size = self.spec.preprocessing.input_size
        return load_training_data(self.split, self.classes, size, self.store, cluster, logger)


def train_run(
    run_url: str,
    progress: bool = False,
    logger: logging.Logger | None = None,
    on_validation: Callable[[pd.DataFrame], None] | None = None,
    cluster: dict | ClusterRequest | None = None,
) -> dict:
    """Train the network a run asks for on its split; writes ``trained.pt``, ``history.csv``,
    ``progress.png``, ``network.txt`` and ``training.json`` into the run folder and returns
    the ``training.json`` record. Resumes from the run's checkpoints; a run already trained
    is not trained again. ``on_validation`` gets the history (a DataFrame) after each
    validation, besides the progress plot (a UI's live progress).

    The images come from the data set's image shards in the store (prepared now where
    missing); ``cluster`` (``{"address", "workers"}``, :class:`~.cluster.ClusterRequest`)
    prepares them, and computes transfer mode's features, on Dask instead of in this process."""
    logger = logger or log
    layout = RunLayout(run_url)
    run = _Run.read(run_url)
    key = split_key(run.split)
    if storage.exists(layout.training) and storage.exists(layout.trained):
        done = storage.read_json(layout.training)
        if done.get("split_key", key) == key:
            logger.info("run already trained; using %s", layout.trained)
            return done
        logger.warning("run trained on another split than its split.parquet now: training again")
    dropped = keep_only_split(layout.checkpoints, key)
    if dropped:
        logger.warning("%d checkpoint(s) made on another split removed: training from the start", dropped)
    device = resolve_device(run.config.options.execution_environment)
    processes = resolve_processes(run.config.options.processes, run.config.mode, device)
    if not isinstance(cluster, ClusterRequest):
        cluster = ClusterRequest.from_dict(cluster)
    if processes == 1:
        return _train(run, progress, logger, on_validation, cluster=cluster)
    with training_cluster(cluster, logger) as lazy_cluster:  # once, here: the ranks then only read the shards
        run.training_data(lazy_cluster, logger).close()
    logger.info("training in %d processes (DistributedDataParallel, %s)", processes, backend_for(device))
    launch(_train_rank, (run_url, progress), processes, device, logger, on_validation)
    return storage.read_json(layout.training)


def _train_rank(ranks: Ranks, run_url: str, progress: bool) -> None:
    """One training process (tasks/training/distributed.py launches them): rank 0 reports to
    the launching process and writes the outputs."""
    run = _Run.read(run_url)
    if ranks.leader:
        _train(run, progress, relay_logger(ranks), relay_history(ranks), ranks)
    else:
        _train(run, False, logging.getLogger(f"retrain.training.rank{ranks.rank}"), None, ranks)


def _train(
    run: _Run,
    progress: bool,
    logger: logging.Logger | logging.LoggerAdapter,
    on_validation: Callable[[pd.DataFrame], None] | None,
    ranks: Ranks | None = None,
    cluster: ClusterRequest | None = None,
) -> dict:
    """Train a run in this process, alone or as one of ``ranks``; the outputs are written by
    the only or the first process. Returns the ``training.json`` record (rank 0's)."""
    leader = ranks is None or ranks.leader
    config = run.config
    torch.manual_seed(config.options.seed)  # the new head's initial weights
    weights = "none" if config.mode == "scratch" else config.weights
    model, origin = build_network(run.spec.name, len(run.classes), weights)
    if leader:
        storage.write_bytes(run.layout.network, summarize(model, run.spec).to_text().encode())
    with training_cluster(cluster, logger) as lazy_cluster:
        data = run.training_data(lazy_cluster, logger)
        try:
            (logger.info if leader else logger.debug)(
                "training %s (%s mode) on %d images, validating on %d, %d classes",
                run.spec.name,
                config.mode,
                len(data.train_targets),
                len(data.val_targets),
                len(run.classes),
            )
            outcome = _train_on(run, model, data, progress, logger, on_validation, ranks, lazy_cluster)
            verdict = _feature_gate(run, model, data, outcome, logger)
            if verdict is not None and not verdict["passed"]:
                logger.warning(
                    "the %s features cost the head more than %.1f point of validation accuracy against float32: "
                    "computing them again in float32 and training again",
                    verdict["engine"],
                    100 * verdict["max_drop"],
                )
                for _, url in list_checkpoints(run.layout.checkpoints):  # the head trained on those features
                    storage.remove(url)
                torch.manual_seed(config.options.seed)  # the same initial head as the first try
                model, origin = build_network(run.spec.name, len(run.classes), weights)
                float32 = replace(config.options, feature_engine=FLOAT32)
                outcome = _train_on(run, model, data, progress, logger, on_validation, ranks, lazy_cluster, float32)
                outcome.feature_cache = {**(outcome.feature_cache or {}), "gate": verdict}
        finally:
            data.close()
    if not leader:
        return {}
    return _write_outputs(run, model, origin, outcome, data, ranks.size if ranks is not None else 1)


def _train_on(
    run: _Run,
    model: torch.nn.Module,
    data: TrainingData,
    progress: bool,
    logger: logging.Logger | logging.LoggerAdapter,
    on_validation: Callable[[pd.DataFrame], None] | None,
    ranks: Ranks | None,
    cluster: LazyCluster | None,
    options: TrainingOptions | None = None,
) -> TrainingOutcome:
    """The loop on the run's data (with ``options``, else the run's), with the progress plot
    after each validation."""
    plot = _ProgressPlot(run.layout.progress)

    def after_validation(history: pd.DataFrame) -> None:
        plot(history)
        if on_validation is not None:
            on_validation(history)

    config = run.config
    return train(
        model,
        run.spec,
        run.spec.preprocessing,
        data,
        config.mode,
        options or config.options,
        Augmentation.from_dict(config.augmentation.to_dict()),
        checkpoints=run.layout.checkpoints,
        on_validation=after_validation,
        progress=progress,
        logger=logger,
        feature_folder=run.layout.features,
        shared_features=config.shared_features,  # from an experiment
        ranks=ranks,
        feature_cluster=cluster,
        pooled_features=config.label_issues == "find",  # the label-issues step after training fits on them
    )


def _feature_gate(
    run: _Run,
    model: torch.nn.Module,
    data: TrainingData,
    outcome: TrainingOutcome,
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict | None:
    """The verdict on the engine that made the head's features (None for float32 ones, or no
    feature cache): the output network, whose body runs in float32 wherever it is evaluated or
    scores, validated in float32 against the accuracy its head reached on the engine's
    features (tasks/training/feature_engine.py). A failure is remembered for this body here.
    Recorded in the cache's description (training.json)."""
    info = outcome.feature_cache
    engine = (info or {}).get("engine", FLOAT32)
    if engine == FLOAT32 or outcome.final_val_accuracy is None or not len(data.val_targets):
        return None
    started = time.perf_counter()
    device = resolve_device(run.config.options.execution_environment)
    model.load_state_dict(outcome.state_dict)
    accuracy = float32_accuracy(model, data.val_images, data.val_targets, run.spec.preprocessing, device)
    verdict = gate(engine, outcome.final_val_accuracy, accuracy, len(data.val_targets))
    verdict["seconds"] = round(time.perf_counter() - started, 3)  # what the check costs besides the features
    info["gate"] = verdict
    logger.info(
        "feature engine %s: validation accuracy %.4f on its features, %.4f with a float32 body: %s",
        engine,
        verdict["engine_val_accuracy"],
        verdict["float32_val_accuracy"],
        "passed" if verdict["passed"] else "failed",
    )
    if not verdict["passed"]:
        remember_failure(body_digest(split_at_head(model, run.spec).body), engine, device, verdict)
    return verdict


def _write_outputs(
    run: _Run, model: torch.nn.Module, origin: str, outcome: TrainingOutcome, data: TrainingData, processes: int
) -> dict:
    """history.csv, progress.png, trained.pt and training.json; returns the training.json record."""
    layout = run.layout
    storage.write_bytes(layout.history, outcome.history.to_csv(index=False).encode())
    if len(outcome.history):
        training_progress(outcome.history, layout.progress)
    model.load_state_dict(outcome.state_dict)
    config = run.config
    training = {
        "mode": config.mode,
        "options": config.options.to_dict(),
        "augmentation": config.augmentation.to_dict(),
        "iterations": outcome.iterations,
        "epochs": outcome.epochs_completed,
        "processes": processes,
        "feature_engine": (outcome.feature_cache or {}).get("engine"),  # transfer mode's features
    }
    metrics = {"val_accuracy": outcome.final_val_accuracy, "val_loss": outcome.final_val_loss}
    record = model_record(model, run.spec, run.classes, origin, metrics=metrics, training=training)
    save_model_file(layout.trained, record)
    if outcome.pooled_features is not None:
        buffer = io.BytesIO()
        np.savez(buffer, train=outcome.pooled_features[0], val=outcome.pooled_features[1])
        storage.write_bytes(layout.pooled_features, buffer.getvalue())
    summary = _summary(outcome, layout, origin, config.options, len(data.train_targets), len(data.val_targets))
    summary["processes"] = processes
    summary["image_shards"] = data.shards
    summary["split_key"] = split_key(run.split)  # what it was trained on: not reused on another split
    storage.write_json(layout.training, summary)
    return summary


def _summary(
    outcome: TrainingOutcome, layout: RunLayout, origin: str, options: TrainingOptions, n_train: int, n_val: int
) -> dict:
    """The ``training.json`` record."""
    return {
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
        "train_images": n_train,
        "val_images": n_val,
        "trained": layout.trained,
        "progress_plot": layout.progress,
        "feature_cache": outcome.feature_cache,
        "feature_engine": (outcome.feature_cache or {}).get("engine"),  # transfer mode's features: what made them
    }
