"""What training reads: a run's train and validation images and their class indices.

The images are in image shards in the store (:mod:`.shards`: decoded once per data set and
input size, read back batch by batch), so memory does not grow with the data set; a
:class:`TrainingData` made of plain uint8 tensors (tests, benchmarks of the loop) works the
same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from retrain.tasks.preprocessing import load_images
from retrain.tasks.training.shards import ShardImages, ShardSet, plan_shards, prepare_shards

log = logging.getLogger("retrain.training")


@dataclass
class TrainingData:
    """Images (uint8, at the network input size: a tensor, or :class:`ShardImages` read on
    demand, indexed the same way) and their class indices."""

    train_images: torch.Tensor | ShardImages
    train_targets: torch.Tensor
    val_images: torch.Tensor | ShardImages
    val_targets: torch.Tensor
    shards: dict | None = None  # what preparing the image shards did (None: tensors in memory)

    def close(self) -> None:
        for images in (self.train_images, self.val_images):
            if isinstance(images, ShardImages):
                images.close()


def load_training_data(
    split: pd.DataFrame,
    classes: list[str],
    input_size: tuple[int, int],
    store: str | None = None,
    cluster=None,
    logger: logging.Logger | None = None,
) -> TrainingData:
    """The ``train`` and ``val`` rows of ``split`` (columns path, label, split and, from the
    index, digest). With a ``store``: from the image shards of every row of the split (made
    now where missing, on ``cluster``'s Dask client when given: a
    :class:`~retrain.tasks.training.cluster.LazyCluster`); without one, decoded into memory."""
    class_index = {c: i for i, c in enumerate(classes)}

    def targets(rows: pd.DataFrame) -> torch.Tensor:
        return torch.tensor([class_index[c] for c in rows["label"]], dtype=torch.long)

    train_rows, val_rows = split[split["split"] == "train"], split[split["split"] == "val"]
    if store is None:
        return TrainingData(
            load_images(list(train_rows["path"]), input_size),
            targets(train_rows),
            load_images(list(val_rows["path"]), input_size),
            targets(val_rows),
        )
    rows = split.drop_duplicates("path").sort_values("path")
    paths = list(rows["path"])
    plan = plan_shards(store, paths, rows["digest"] if "digest" in rows.columns else None, input_size)
    record = prepare_shards(plan, cluster, logger=logger)
    shards = ShardSet(plan)
    position = pd.Series(np.arange(len(paths), dtype=np.int64), index=paths)
    return TrainingData(
        ShardImages(shards, position[list(train_rows["path"])].to_numpy()),
        targets(train_rows),
        ShardImages(shards, position[list(val_rows["path"])].to_numpy()),
        targets(val_rows),
        shards=record,
    )
