"""Training options: MATLAB's ``trainingOptions`` in snake_case, one dataclass validated once.

Imports no torch: the CLI builds its ``retrain run`` flags from these fields, and a bad value
is refused before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrain.tasks.vocabulary import AugmentationSettings


# Learn rates that work for each mode with Adam: the head alone can move fast; pretrained
# weights need small steps (the head still gets head_learn_rate_factor times more).
DEFAULT_LEARN_RATES = {"transfer": 1e-3, "finetune": 1e-4, "scratch": 1e-3}
# The automatic number of cached augmented views: one per this many epochs, at most this many.
# Each view costs a backbone pass over the training set, as much as an epoch of the classic
# loop, while a head on frozen features gains little from more views (benchmarks/bench_train.py:
# on hymenoptera, 0, 1 or 2 views were all within a point of the classic loop's accuracy).
AUTO_EPOCHS_PER_VIEW = 15
MAX_AUTO_VIEWS = 8
# The allowed values of the options that take a word (also the `retrain run` flags' choices).
CHOICES = {
    "solver": ("adam", "sgdm"),
    "shuffle": ("every-epoch", "once", "never"),
    "learn_rate_schedule": ("none", "piecewise"),
    "output_network": ("best-validation", "last-iteration"),
    "checkpoint_frequency_unit": ("epoch", "iteration"),
    "validation_frequency_unit": ("iteration", "epoch"),
    "execution_environment": ("auto", "cpu", "gpu"),
    "feature_engine": ("auto", "torch"),
}
# A field's annotation -> the type of its value (an optional one's when set).
_VALUE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "int | None": int, "float | None": float}


@dataclass(frozen=True)
class TrainingOptions:
    """MATLAB's ``trainingOptions`` in snake_case. Validate once with :meth:`validate`."""

    solver: str = "adam"  # adam | sgdm
    initial_learn_rate: float | None = None  # None: the mode's default (DEFAULT_LEARN_RATES)
    max_epochs: int = 10
    mini_batch_size: int = 32
    shuffle: str = "every-epoch"  # every-epoch | once | never
    validation_frequency: int = 5
    # iteration (MATLAB's) | epoch. Each validation covers the whole validation split, so with a
    # frequency in iterations its cost grows as the square of the data set (iterations x
    # validation images); in epochs it grows as the data set does (benchmarks/bench_scale.py).
    validation_frequency_unit: str = "iteration"
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
    # A feature cache larger than this (MiB) is kept on disk as feature shards, in the run
    # folder, and streamed from there (on a GPU it is kept in GPU memory when it takes less than
    # half of what is free). The bound on what training holds in memory, whatever the data
    # set's size (streamed from the page cache: benchmarks/bench_scale.py).
    feature_cache_memory_mb: int = 1024
    # Transfer mode: what computes the frozen body's features. auto: the fastest engine here
    # (int8 or bf16 on CPUs that have them, bf16/fp16 on GPUs) whose features keep the head's
    # validation accuracy within half a point of float32's, else float32; torch: float32
    # (tasks/training/feature_engine.py).
    feature_engine: str = "auto"
    # Fine-tune and scratch modes: training processes (DistributedDataParallel, one per GPU,
    # each taking a part of every mini-batch); None: every visible GPU when training on CUDA,
    # else 1. Transfer mode trains in one process. Does not change the result beyond float
    # rounding (tasks/training/distributed.py).
    processes: int | None = None

    def validate(self) -> TrainingOptions:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"training option {name}={getattr(self, name)!r}: expected {expected}")

        for name, allowed in CHOICES.items():
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
        if self.processes is not None and (
            not isinstance(self.processes, int) or isinstance(self.processes, bool) or self.processes < 1
        ):
            raise bad("processes", "a positive integer, or None for every visible GPU")
        if self.processes is not None and self.processes > self.mini_batch_size:
            raise bad(
                "processes", f"at most mini_batch_size={self.mini_batch_size} (each takes a part of a mini-batch)"
            )
        return self

    def cache_views(self, augmentation: AugmentationSettings | None = None) -> int:
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
    def value_types(cls) -> dict[str, type]:
        """Each option's value type: what a flag or an experiment grid converts its text to."""
        return {f.name: _VALUE_TYPES[str(f.type)] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> TrainingOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values).validate()
