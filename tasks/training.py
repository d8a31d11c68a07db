"""The training loop: options, device, validation frequency, early stopping, best model,
checkpoints and resume.

Everything random is derived from the seed and the position in training (epoch, batch), not
from a running generator, so a run resumed from a checkpoint takes exactly the path an
uninterrupted run would have taken.
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import pandas as pd
import torch
from torch import nn

from tasks import storage
from tasks.evaluation import predict_scores
from tasks.networks import (MODES, NetworkSpec, build_network, configure_trainable,
                            freeze_batchnorm, get_spec, model_record, parameter_groups,
                            resolve_device, save_model_file, summarize)
from tasks.preprocessing import Augmentation, Preprocessing, load_images
from tasks.reports import training_progress
from tasks.runs import read_run

log = logging.getLogger("retrain.training")

# Learn rates that work for each mode with Adam: the head alone can move fast; pretrained
# weights need small steps (the head still gets head_learn_rate_factor times more).
DEFAULT_LEARN_RATES = {"transfer": 1e-3, "finetune": 1e-4, "scratch": 1e-3}


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

    def validate(self) -> "TrainingOptions":
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"training option {name}={getattr(self, name)!r}: expected {expected}")

        choices = {"solver": ("adam", "sgdm"), "shuffle": ("every-epoch", "once", "never"),
                   "learn_rate_schedule": ("none", "piecewise"),
                   "output_network": ("best-validation", "last-iteration"),
                   "checkpoint_frequency_unit": ("epoch", "iteration"),
                   "execution_environment": ("auto", "cpu", "gpu")}
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
                not isinstance(self.validation_patience, int) or self.validation_patience < 1):
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
        return self

    def learn_rate(self, mode: str) -> float:
        return self.initial_learn_rate if self.initial_learn_rate is not None else DEFAULT_LEARN_RATES[mode]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
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


def load_latest_checkpoint(checkpoints: str) -> dict | None:
    """The newest checkpoint that loads; a damaged one is skipped with a warning (writes are
    atomic, so that only happens when a file was altered outside retrain)."""
    for iteration, url in reversed(list_checkpoints(checkpoints)):
        try:
            return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("skipping unreadable checkpoint %s: %s", url, exc)
    return None


# ---- the loop ----------------------------------------------------------------------------

def train(model: nn.Module, spec: NetworkSpec, preprocessing: Preprocessing, data: TrainingData,
          mode: str, options: TrainingOptions, augmentation: Augmentation,
          checkpoints: str | None = None,
          on_validation: Callable[[pd.DataFrame], None] | None = None,
          progress: bool = False, logger: logging.Logger | None = None) -> TrainingOutcome:
    """Train ``model`` with cross-entropy; returns the output network's weights and history.

    ``checkpoints``: a folder URL; when it holds checkpoints of this run, training resumes
    from the newest. ``on_validation`` gets the history after each validation (for the
    progress plot).
    """
    logger = logger or log
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    options.validate()
    started = time.perf_counter()
    device = resolve_device(options.execution_environment)
    configure_trainable(model, spec, mode)
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(parameter_groups(model, spec, mode, options.learn_rate(mode),
                                                options.head_learn_rate_factor), options)
    loss_fn = nn.CrossEntropyLoss()
    n_train = len(data.train_targets)
    batch = min(options.mini_batch_size, n_train)
    per_epoch = max(1, n_train // batch)  # drop the last partial batch, like MATLAB
    total = per_epoch * options.max_epochs
    has_val = len(data.val_targets) > 0

    state = {"iteration": 0, "best_loss": math.inf, "best_iteration": None, "best_state": None,
             "bad_validations": 0, "history": [], "stopped_early": False}
    resumed_from = None
    if checkpoints:
        saved = load_latest_checkpoint(checkpoints)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state.update({k: saved[k] for k in state})
            resumed_from = state["iteration"]
            logger.info("resuming from checkpoint at iteration %d of %d", resumed_from, total)

    def validate() -> tuple[float, float]:
        scores = predict_scores(model, data.val_images, preprocessing, device)
        loss = float(nn.functional.nll_loss(torch.log(scores.clamp_min(1e-12)), data.val_targets))
        accuracy = float((scores.argmax(1) == data.val_targets).float().mean())
        return loss, accuracy

    def checkpoint() -> None:
        if checkpoints:
            save_checkpoint(checkpoints, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          **state})

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=state["iteration"], desc="training", unit="it", leave=False)
    try:
        while state["iteration"] < total and not state["stopped_early"]:
            epoch, position = divmod(state["iteration"], per_epoch)
            learn_rate = set_epoch_learn_rate(optimizer, epoch, options)
            order = epoch_order(n_train, epoch, options)
            indices = order[position * batch:(position + 1) * batch]
            model.train()
            freeze_batchnorm(model, spec, mode)
            torch.manual_seed(hash((options.seed, state["iteration"])) & 0xFFFF_FFFF)  # dropout
            images = augmentation(data.train_images[indices], _generator(options.seed, epoch, position))
            x = preprocessing.normalize(images.to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            y = data.train_targets[indices].to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["iteration"] += 1
            it = state["iteration"]
            record = {"iteration": it, "epoch": epoch + 1, "loss": float(loss),
                      "accuracy": float((logits.argmax(1) == y).float().mean()),
                      "learn_rate": learn_rate, "val_loss": math.nan, "val_accuracy": math.nan,
                      "seconds": time.perf_counter() - started}
            if has_val and (it % options.validation_frequency == 0 or it == total):
                record["val_loss"], record["val_accuracy"] = validate()
                if record["val_loss"] < state["best_loss"]:
                    state.update(best_loss=record["val_loss"], best_iteration=it, bad_validations=0,
                                 best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                else:
                    state["bad_validations"] += 1
                    patience = options.validation_patience
                    if patience is not None and state["bad_validations"] >= patience:
                        state["stopped_early"] = True
                        logger.info("early stop at iteration %d: validation loss has not improved "
                                    "for %d validations", it, patience)
                message = (f"epoch {epoch + 1} iteration {it}/{total}: loss {record['loss']:.4f}, "
                           f"val loss {record['val_loss']:.4f}, val accuracy {record['val_accuracy']:.4f}")
                (logger.info if options.verbose else logger.debug)(message)
            state["history"].append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", val_acc=f"{record['val_accuracy']:.3f}")
            if not math.isnan(record["val_loss"]) and on_validation is not None:
                on_validation(pd.DataFrame(state["history"]))
            unit_done = (it if options.checkpoint_frequency_unit == "iteration"
                         else (it // per_epoch if it % per_epoch == 0 else 0))
            if options.checkpoint_frequency and unit_done and unit_done % options.checkpoint_frequency == 0:
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    if state["stopped_early"]:
        checkpoint()  # so a rerun of a finished-early run does not train on
    history = pd.DataFrame(state["history"])
    use_best = options.output_network == "best-validation" and state["best_state"] is not None
    final_state = state["best_state"] if use_best else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    validated = history.dropna(subset=["val_loss"]) if len(history) else history
    best_row = (validated[validated["iteration"] == state["best_iteration"]] if use_best else validated.tail(1))
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
    logger.info("training %s (%s mode) on %d images, validating on %d, %d classes",
                spec.name, mode, len(data.train_targets), len(data.val_targets), len(classes))
    progress_url = storage.join(run_url, "progress.png")
    last_plot = [0.0]

    def plot(history: pd.DataFrame) -> None:
        if time.monotonic() - last_plot[0] > 10:  # the plot costs ~0.3 s; refresh at most every 10 s
            training_progress(history, progress_url)
            last_plot[0] = time.monotonic()

    outcome = train(model, spec, spec.preprocessing, data, mode, options, augmentation,
                    checkpoints=storage.join(run_url, "checkpoints"), on_validation=plot,
                    progress=progress, logger=logger)
    storage.write_bytes(storage.join(run_url, "history.csv"), outcome.history.to_csv(index=False).encode())
    if len(outcome.history):
        training_progress(outcome.history, progress_url)
    model.load_state_dict(outcome.state_dict)
    summary = {
        "iterations": outcome.iterations, "epochs": outcome.epochs_completed,
        "val_loss": outcome.final_val_loss, "val_accuracy": outcome.final_val_accuracy,
        "best_iteration": outcome.best_iteration, "stopped_early": outcome.stopped_early,
        "resumed_from": outcome.resumed_from, "seconds": outcome.seconds,
        "device": str(resolve_device(options.execution_environment)), "weights_origin": origin,
        "train_images": len(data.train_targets), "val_images": len(data.val_targets),
        "trained": trained_url, "progress_plot": progress_url,
    }
    save_model_file(trained_url, model_record(
        model, spec, classes, origin,
        metrics={"val_accuracy": outcome.final_val_accuracy, "val_loss": outcome.final_val_loss},
        training={"mode": mode, "options": options.to_dict(), "augmentation": augmentation.to_dict(),
                  "iterations": outcome.iterations, "epochs": outcome.epochs_completed}))
    storage.write_json(summary_url, summary)
    return summary
