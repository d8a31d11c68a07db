"""What training reads: the decoded images of a run's train and validation splits."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from retrain.tasks.preprocessing import load_images


@dataclass
class TrainingData:
    """Decoded images (uint8, at the network input size) and their class indices."""

    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor


def load_training_data(split: pd.DataFrame, classes: list[str], input_size: tuple[int, int]) -> TrainingData:
    """Decode the ``train`` and ``val`` rows of ``split`` (columns path, label, split)."""
    class_index = {c: i for i, c in enumerate(classes)}

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = split[split["split"] == name]
        images = load_images(list(rows["path"]), input_size)
        return images, torch.tensor([class_index[c] for c in rows["label"]], dtype=torch.long)

    return TrainingData(*part("train"), *part("val"))
