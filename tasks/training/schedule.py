"""Randomness and the learn rate as functions of the position in training.

Every random draw comes from a generator keyed by (seed, epoch, batch, ...), not from a
running generator, so a run resumed from a checkpoint takes exactly the path an
uninterrupted run would have taken.
"""

from __future__ import annotations

import functools

import torch

from retrain.tasks.training.options import TrainingOptions


def seeded_generator(*key: int) -> torch.Generator:
    # One generator per (seed, epoch, batch): the same key always gives the same numbers.
    g = torch.Generator()
    g.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def epoch_order(n: int, epoch: int, options: TrainingOptions) -> torch.Tensor:
    """The training images in an epoch's order (shared: not to be modified)."""
    if options.shuffle == "never":
        return _permutation(n, options.seed, None)
    return _permutation(n, options.seed, 0 if options.shuffle == "once" else epoch)


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int | None) -> torch.Tensor:
    # Drawn once per epoch, not once per iteration: at 270,000 images a draw takes ~12 ms,
    # as long as a head step on cached features.
    if epoch is None:
        return torch.arange(n)
    return torch.randperm(n, generator=seeded_generator(seed, epoch, -1))


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


@functools.lru_cache(maxsize=4)
def epoch_views(n: int, views: int, epoch: int, seed: int) -> torch.Tensor:
    """Which cached view of each image an epoch trains on (transfer mode's feature cache)."""
    return torch.randint(0, views + 1, (n,), generator=seeded_generator(seed, epoch, -2))


def dropout_seed(seed: int, iteration: int) -> int:
    """The global torch seed of one iteration: dropout's masks then depend on its position."""
    return hash((seed, iteration)) & 0xFFFF_FFFF
