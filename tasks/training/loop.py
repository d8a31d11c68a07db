"""The training loop: resume, step, validate (best model, early stopping), checkpoint, finish.

:func:`train` reads like MATLAB's ``trainnet``: cross-entropy on mini-batches, validation
every ``validation_frequency`` iterations (or epochs), the best-validation network out. Its
state lives in a :class:`LoopState` (what a checkpoint keeps), its arithmetic in a
:class:`Plan` (how many iterations, which images each takes), and one iteration's work in a
step strategy (:mod:`retrain.tasks.training.steps`). Given
:class:`~retrain.tasks.training.distributed.Ranks`, it is one of several
DistributedDataParallel processes: each trains on its part of every batch, rank 0 alone
validates, checkpoints and reports.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import pandas as pd
import torch
from torch import nn

from retrain.tasks.allocator import tune_allocator
from retrain.tasks.feature_sharing import feature_lock
from retrain.tasks.networks import (
    NetworkSpec,
    configure_trainable,
    freeze_batchnorm,
    parameter_groups,
    resolve_device,
)
from retrain.tasks.preprocessing import Augmentation, Preprocessing
from retrain.tasks.training.body_head import split_at_head
from retrain.tasks.training.checkpoints import load_latest_checkpoint, remove_write_debris, save_checkpoint
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.devices import Prefetcher, autocast
from retrain.tasks.training.distributed import Ranks
from retrain.tasks.training.dropout import KeyedDropout
from retrain.tasks.training.feature_cluster import ClusterBody
from retrain.tasks.training.features import build_feature_cache
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.training.schedule import dropout_seed, epoch_order, make_optimizer, set_epoch_learn_rate
from retrain.tasks.training.steps import CachedSteps, ClassicSteps, validation_metrics
from retrain.tasks.vocabulary import check_mode

log = logging.getLogger("retrain.training")


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
    pooled_features: tuple | None = field(default=None, repr=False)  # CachedSteps.pooled_features


@dataclass
class LoopState:
    """Where training is and its best so far: what a checkpoint keeps besides the weights."""

    iteration: int = 0
    best_loss: float = math.inf
    best_iteration: int | None = None
    best_state: dict | None = None  # weights at the best validation loss (CPU copies)
    bad_validations: int = 0  # validations since the best one
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False

    def to_checkpoint(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> LoopState:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Plan:
    """The loop's arithmetic: mini-batches of ``batch`` images, the last partial batch of an
    epoch dropped (like MATLAB), ``total`` iterations."""

    options: TrainingOptions
    n_train: int
    batch: int
    per_epoch: int
    total: int

    @classmethod
    def of(cls, n_train: int, options: TrainingOptions) -> Plan:
        batch = min(options.mini_batch_size, n_train)
        per_epoch = max(1, n_train // batch)
        return cls(options, n_train, batch, per_epoch, per_epoch * options.max_epochs)

    def batch_indices(self, iteration: int) -> tuple[int, int, torch.Tensor]:
        """(epoch, position in the epoch, training image indices) of an iteration."""
        epoch, position = divmod(iteration, self.per_epoch)
        order = epoch_order(self.n_train, epoch, self.options)
        return epoch, position, order[position * self.batch : (position + 1) * self.batch]

    def _every(self, done: int, frequency: int, unit: str) -> bool:
        """Whether ``done`` iterations end a multiple of ``frequency`` iterations or whole epochs."""
        units = done if unit == "iteration" else (done // self.per_epoch if done % self.per_epoch == 0 else 0)
        return bool(units) and units % frequency == 0

    def validation_due(self, done: int) -> bool:
        """After ``done`` iterations: every validation_frequency iterations or epochs, and at the end."""
        options = self.options
        return self._every(done, options.validation_frequency, options.validation_frequency_unit) or done == self.total

    def checkpoint_due(self, done: int) -> bool:
        """After ``done`` iterations: every checkpoint_frequency iterations or whole epochs."""
        options = self.options
        return bool(options.checkpoint_frequency) and self._every(
            done, options.checkpoint_frequency, options.checkpoint_frequency_unit
        )


class _Trainer:
    """The model, its optimizer and the loop's state, with the four things the loop does."""

    def __init__(
        self,
        model: nn.Module,
        spec: NetworkSpec,
        mode: str,
        options: TrainingOptions,
        plan: Plan,
        device: torch.device,
        checkpoints: str | None,
        logger: logging.Logger,
        ranks: Ranks | None = None,
    ):
        self.model, self.spec, self.mode, self.options, self.plan = model, spec, mode, options, plan
        self.device, self.checkpoints, self.logger, self.ranks = device, checkpoints, logger, ranks
        configure_trainable(model, spec, mode)
        if ranks is not None and device.type == "cuda":
            # Batch statistics over the global batch, as in one process (gloo has no SyncBatchNorm).
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device, memory_format=torch.channels_last)
        groups = parameter_groups(model, spec, mode, options.learn_rate(mode), options.head_learn_rate_factor)
        self.optimizer = make_optimizer(groups, options)
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        self.state = LoopState()
        self.started = time.perf_counter()
        # This process's part [start, stop) of each global batch (all of it in one process),
        # and the forward pass that trains: the model, or its DDP wrapper (gradients averaged).
        self.part = ranks.part(plan.batch) if ranks is not None else (0, plan.batch)
        self.train_model: nn.Module = model
        if ranks is not None:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        self.dropout = KeyedDropout(model)  # masks by sample, whatever the split (dropout.py)

    @property
    def leader(self) -> bool:
        """The process that validates, checkpoints and reports: the only one, or rank 0."""
        return self.ranks is None or self.ranks.leader

    @property
    def unfinished(self) -> bool:
        return self.state.iteration < self.plan.total and not self.state.stopped_early

    def make_steps(
        self,
        preprocessing: Preprocessing,
        data: TrainingData,
        augmentation: Augmentation,
        feature_folder: str | None,
        progress: bool,
        shared_features: dict | None = None,
        feature_cluster=None,
    ) -> ClassicSteps | CachedSteps:
        """The head on transfer mode's cached body features while there is training left
        (unless ``options.classic_loop``, or the network cannot be split at its head); the
        classic loop otherwise (and for a finished run: no feature cache to build).
        ``shared_features`` (``{"folder", "seed"}``, tasks/feature_sharing.py): a cache other
        runs share, built on disk once, under a lock, from that seed's views, and kept.
        ``feature_cluster`` (a :class:`~retrain.tasks.training.cluster.LazyCluster`): compute
        the features on its Dask cluster, into ``feature_folder`` (or the shared folder)."""
        options = self.options
        classic = ClassicSteps(self.model, preprocessing, data, augmentation, options, self.device, self.train_model)
        if self.mode != "transfer" or options.classic_loop or not self.unfinished:
            return classic
        try:
            split = split_at_head(self.model, self.spec)
        except NotImplementedError as exc:
            self.logger.info("training with the classic loop: %s", exc)
            return classic
        shared = shared_features or {}
        cluster = None
        if feature_cluster is not None:
            head = self.model.state_dict()[f"{self.spec.head_layer}.weight"]
            cluster = ClusterBody(
                feature_cluster.client, self.model, self.spec.name, int(head.shape[0]), options.execution_environment
            )
        with feature_lock(shared.get("folder")):
            cache = build_feature_cache(
                split.body,
                data,
                preprocessing,
                augmentation,
                options.cache_views(augmentation),
                shared.get("seed", options.seed),
                self.device,
                0 if shared else options.feature_cache_memory_mb * 2**20,  # shared: on disk
                shared.get("folder", feature_folder),
                progress=progress,
                logger=self.logger,
                cluster=cluster,
                engine=options.feature_engine,
            )
        return CachedSteps(self.model, split.rest, split.dropout, cache, data, options, self.device, bool(shared))

    def resume(self) -> int | None:
        """Continue from the newest checkpoint, if any; returns its iteration."""
        if not self.checkpoints:
            return None
        remove_write_debris(self.checkpoints)
        saved = load_latest_checkpoint(self.checkpoints)
        if saved is None:
            return None
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = LoopState.from_checkpoint(saved)
        self.logger.info("resuming from checkpoint at iteration %d of %d", self.state.iteration, self.plan.total)
        return self.state.iteration

    def step(self, steps: ClassicSteps | CachedSteps, prepared: tuple) -> dict:
        """One optimizer step on a prepared batch; returns its history record."""
        epoch = self.state.iteration // self.plan.per_epoch
        learn_rate = set_epoch_learn_rate(self.optimizer, epoch, self.options)
        self.train_model.train()
        freeze_batchnorm(self.model, self.spec, self.mode)
        self.dropout.train_mode()
        torch.manual_seed(dropout_seed(self.options.seed, self.state.iteration))
        positions = torch.arange(*self.part)  # in the global batch: what keys dropout's masks
        with self.dropout.keyed(self.options.seed, self.state.iteration, positions), autocast(self.device, True):
            logits, targets = steps.logits(prepared)
            loss_sum = self.loss_fn(logits.float(), targets)
        # The global batch's mean loss: this part's sum over the whole batch's size, times the
        # number of processes, whose gradients DDP averages.
        processes = self.ranks.size if self.ranks is not None else 1
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum * (processes / self.plan.batch)).backward()
        self.optimizer.step()
        self.state.iteration += 1
        sums = [float(loss_sum.detach()), float((logits.argmax(1) == targets).sum())]
        if self.ranks is not None:
            sums = self.ranks.all_sum(sums, self.device)
        return {
            "iteration": self.state.iteration,
            "epoch": epoch + 1,
            "loss": sums[0] / self.plan.batch,
            "accuracy": sums[1] / self.plan.batch,
            "learn_rate": learn_rate,
            "val_loss": math.nan,
            "val_accuracy": math.nan,
            "seconds": time.perf_counter() - self.started,
        }

    def validate(self, steps: ClassicSteps | CachedSteps, targets: torch.Tensor, record: dict) -> None:
        """Fill ``record``'s validation figures; keep the best weights; stop early when the
        loss has not improved for ``validation_patience`` validations."""
        record["val_loss"], record["val_accuracy"] = validation_metrics(steps.val_scores(), targets)
        state, it = self.state, record["iteration"]
        if record["val_loss"] < state.best_loss:
            state.best_loss, state.best_iteration, state.bad_validations = record["val_loss"], it, 0
            state.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            state.bad_validations += 1
            patience = self.options.validation_patience
            if patience is not None and state.bad_validations >= patience:
                state.stopped_early = True
                self.logger.info(
                    "early stop at iteration %d: validation loss has not improved for %d validations", it, patience
                )
        (self.logger.info if self.options.verbose else self.logger.debug)(
            f"epoch {record['epoch']} iteration {it}/{self.plan.total}: loss {record['loss']:.4f}, "
            f"val loss {record['val_loss']:.4f}, val accuracy {record['val_accuracy']:.4f}"
        )

    def checkpoint(self) -> None:
        if self.checkpoints and self.leader:
            save_checkpoint(
                self.checkpoints,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    **self.state.to_checkpoint(),
                },
            )

    def finish(self, resumed_from: int | None, feature_info: dict | None) -> TrainingOutcome:
        """The output network (best validation, or the last iteration) and its figures."""
        state = self.state
        if state.stopped_early:
            self.checkpoint()  # so a rerun of a finished-early run does not train on
        history = pd.DataFrame(state.history)
        use_best = self.options.output_network == "best-validation" and state.best_state is not None
        if use_best:
            final_state = state.best_state
        else:
            final_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        validated = history.dropna(subset=["val_loss"]) if len(history) else history
        best_row = validated[validated["iteration"] == state.best_iteration] if use_best else validated.tail(1)
        return TrainingOutcome(
            iterations=state.iteration,
            epochs_completed=state.iteration // self.plan.per_epoch,
            final_val_loss=float(best_row["val_loss"].iloc[0]) if len(best_row) else None,
            final_val_accuracy=float(best_row["val_accuracy"].iloc[0]) if len(best_row) else None,
            best_iteration=state.best_iteration if use_best else state.iteration,
            stopped_early=state.stopped_early,
            resumed_from=resumed_from,
            seconds=time.perf_counter() - self.started,
            history=history,
            state_dict=final_state,
            feature_cache=feature_info,
        )


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
    shared_features: dict | None = None,
    ranks: Ranks | None = None,
    feature_cluster=None,
    pooled_features: bool = False,
) -> TrainingOutcome:
    """Train ``model`` with cross-entropy; returns the output network's weights and history.

    ``checkpoints``: a folder URL; when it holds checkpoints of this run, training resumes
    from the newest. ``on_validation`` gets the history after each validation (for the
    progress plot). In transfer mode the head trains on cached body features (see
    :func:`~retrain.tasks.training.features.build_feature_cache`; ``feature_folder`` is where
    a cache too large for memory goes; ``feature_cluster``: a Dask cluster to compute it on)
    unless ``options.classic_loop``; the result is the same kind of full state dict.
    ``data``'s images may be tensors or image shards (:mod:`~retrain.tasks.training.shards`).
    ``ranks``: this process's place among DistributedDataParallel
    processes (tasks/training/distributed.py; finetune and scratch modes); only rank 0
    validates, writes checkpoints and calls ``on_validation``, and only its outcome counts.
    ``pooled_features``: the outcome also carries the feature cache's pooled features (for
    tasks/label_issues.py), when training on one.
    """
    logger = logger or log
    check_mode(mode)
    options.validate()
    device = resolve_device(options.execution_environment)
    if ranks is not None:
        if mode == "transfer":
            raise ValueError("transfer mode trains in one process (its feature cache); processes must be 1")
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
    else:
        tune_allocator("training")  # activations and gradients stay in the heap (tasks/allocator.py)
    plan = Plan.of(len(data.train_targets), options)
    if ranks is not None and plan.batch < ranks.size:
        raise ValueError(f"{ranks.size} processes need mini-batches of at least as many images, not {plan.batch}")
    trainer = _Trainer(model, spec, mode, options, plan, device, checkpoints, logger, ranks)
    try:
        resumed_from = trainer.resume()
        steps = trainer.make_steps(
            preprocessing, data, augmentation, feature_folder, progress, shared_features, feature_cluster
        )
        pooled = steps.pooled_features() if pooled_features and isinstance(steps, CachedSteps) else None
        _loop(trainer, steps, data, on_validation if trainer.leader else None, progress and trainer.leader)
        outcome = trainer.finish(resumed_from, steps.feature_info)
        outcome.pooled_features = pooled
        return outcome
    finally:
        trainer.dropout.remove()


class EpochLines:
    """One INFO line per epoch, like fastai's table: the epoch's mean training loss, the
    validation loss and accuracy at its end, its seconds. Validation points come every
    ``validation_frequency`` iterations (MATLAB's rule), so an epoch that does not end on
    one is validated for its line alone: the best network, early stopping and the history
    see only the scheduled validations. A run that stops early ends on a partial epoch."""

    def __init__(self, plan: Plan, logger: logging.Logger | logging.LoggerAdapter, bar=None):
        self.plan, self.logger, self.bar = plan, logger, bar
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self.started = time.perf_counter()

    def add(
        self, record: dict, steps: ClassicSteps | CachedSteps, val_targets: torch.Tensor | None, ended: bool
    ) -> None:
        """Count ``record`` (an iteration's history record); at an epoch's end (or
        ``ended``: the last iteration) log the epoch's line."""
        self.losses.append(record["loss"])
        self.accuracies.append(record["accuracy"])
        if record["iteration"] % self.plan.per_epoch and not ended:
            return
        val = None
        if val_targets is not None:
            val = (record["val_loss"], record["val_accuracy"])
            if math.isnan(val[0]):  # no scheduled validation at this epoch's end
                val = validation_metrics(steps.val_scores(), val_targets)
        line = epoch_line(
            record["epoch"],
            self.plan.options.max_epochs,
            sum(self.losses) / len(self.losses),
            sum(self.accuracies) / len(self.accuracies),
            val,
            time.perf_counter() - self.started,
        )
        self._log(line)
        self.losses, self.accuracies, self.started = [], [], time.perf_counter()

    def _log(self, line: str) -> None:
        if self.bar is None:
            self.logger.info(line)
            return
        with self.bar.external_write_mode(file=sys.stderr):  # the bar cleared, then redrawn below the line
            self.logger.info(line)


def epoch_line(
    epoch: int, epochs: int, loss: float, accuracy: float, val: tuple[float, float] | None, seconds: float
) -> str:
    """``epoch  2/10: loss 0.4812, val loss 0.3907, val accuracy 0.9167, 1.2 s``: fixed widths,
    so that the lines of a run read as a table. ``val``: (loss, accuracy) on the validation
    images; without any, the epoch's training accuracy stands in."""
    width = len(str(epochs))
    figures = (
        f"val loss {val[0]:.4f}, val accuracy {val[1]:.4f}"
        if val is not None
        else f"accuracy {accuracy:.4f} (no validation images)"
    )
    return f"epoch {epoch:>{width}}/{epochs}: loss {loss:.4f}, {figures}, {seconds:.1f} s"


def _loop(
    trainer: _Trainer,
    steps: ClassicSteps | CachedSteps,
    data: TrainingData,
    on_validation: Callable[[pd.DataFrame], None] | None,
    progress: bool,
) -> None:
    """Iterate until the plan's last iteration or an early stop; batches are prepared ahead
    on a GPU (see :class:`~retrain.tasks.training.devices.Prefetcher`)."""
    plan, state = trainer.plan, trainer.state
    has_val = len(data.val_targets) > 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total, initial=state.iteration, desc="training", unit="it", leave=False)
    batches = Prefetcher(
        lambda it: steps.prepare(*plan.batch_indices(it), part=trainer.part), background=trainer.device.type == "cuda"
    )
    epochs = EpochLines(plan, trainer.logger, bar) if trainer.leader else None
    val_accuracy = "-"  # the bar's: the last validation's
    trained = False
    try:
        while trainer.unfinished:
            record = trainer.step(steps, batches.get(state.iteration, plan.total))
            if has_val and plan.validation_due(record["iteration"]):
                if trainer.leader:
                    trainer.validate(steps, data.val_targets, record)
                if trainer.ranks is not None:  # rank 0 decides an early stop for all
                    state.stopped_early = trainer.ranks.from_leader(state.stopped_early, trainer.device)
            state.history.append(record)
            if bar is not None:
                if not math.isnan(record["val_accuracy"]):
                    val_accuracy = f"{record['val_accuracy']:.3f}"  # shown until the next validation
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", val_acc=val_accuracy)
            if epochs is not None:
                epochs.add(record, steps, data.val_targets if has_val else None, ended=not trainer.unfinished)
            if not math.isnan(record["val_loss"]) and on_validation is not None:
                history = pd.DataFrame(state.history)
                history.attrs["total_iterations"] = plan.total  # for a progress percentage
                on_validation(history)
            if plan.checkpoint_due(record["iteration"]):
                trainer.checkpoint()
        trained = True
    finally:
        batches.close()
        if bar is not None:
            bar.close()
        steps.close(trained)
