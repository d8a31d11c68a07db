"""Training, one module per responsibility:

- :mod:`.options`: ``TrainingOptions`` (MATLAB's ``trainingOptions``; imports no torch, so
  the CLI can build its flags from it),
- :mod:`.schedule`: seeded randomness and the learn-rate schedule,
- :mod:`.checkpoints`: checkpoint files, resume,
- :mod:`.devices`: mixed precision, pinned memory, the batch prefetcher,
- :mod:`.shards`: a data set's images decoded once into shards in the store, read per batch,
- :mod:`.cluster`: the Dask cluster shard preparation and feature extraction may run on,
- :mod:`.data`: a run's train and validation images (from the shards) and targets,
- :mod:`.features`: transfer mode's cache of body features (in memory, or feature shards),
- :mod:`.steps`: one iteration, classic or on cached features,
- :mod:`.dropout`: dropout masks keyed by each sample's place in the global batch,
- :mod:`.distributed`: fine-tune and scratch modes in several processes (DDP),
- :mod:`.loop`: ``train()``: resume, step, validate, checkpoint, finish,
- :mod:`.stage`: ``train_run()``: a run folder in, ``trained.pt`` out.

This file imports nothing heavy; the names below load their module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainingOptions": "options",
    "TrainingData": "data",
    "TrainingOutcome": "loop",
    "train": "loop",
    "train_run": "stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
