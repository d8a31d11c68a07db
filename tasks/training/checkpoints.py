"""Checkpoints: ``checkpoints/iter-NNNNNNNN.pt`` in the run folder, the newest two kept.

A checkpoint holds the model and optimizer state and the loop's state (iteration, best
validation, history), so training resumes exactly where it stopped, and only on the split it
was made on (``split.key`` beside them, :func:`keep_only_split`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re

import pandas as pd
import torch

from retrain.tasks import storage

log = logging.getLogger("retrain.training")
_CHECKPOINT = re.compile(r"iter-(\d+)\.pt$")
SPLIT_KEY = "split.key"


def split_key(split: pd.DataFrame) -> str:
    """What a split is: every image's path, label and part. Checkpoints and a trained model
    are only reused on the split they were trained on."""
    rows = split[["path", "label", "split"]].sort_values(["path", "label", "split"], ignore_index=True)
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]


def keep_only_split(checkpoints: str, key: str) -> int:
    """Bind the checkpoints folder to the split ``key``: checkpoints made on another split
    (other images, labels or parts: a resume would train on a mix, or fail on another number
    of classes) are removed. Returns how many. Checkpoints from before the key was recorded
    are kept."""
    marker = storage.join(checkpoints, SPLIT_KEY)
    stale = []
    if storage.exists(marker) and storage.read_bytes(marker).decode().strip() != key:
        stale = list_checkpoints(checkpoints)
        for _, url in stale:
            storage.remove(url)
    storage.write_bytes(marker, key.encode())
    return len(stale)


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


def remove_write_debris(checkpoints: str) -> int:
    """Remove the temporary files that checkpoint writes killed midway left (``*.tmp-*``,
    never read: see tasks/storage/files.py), before a run writes there again. Returns how many."""
    debris = [url for url in storage.ls(checkpoints) if storage.TMP_MARKER in url.rsplit("/", 1)[-1]]
    for url in debris:
        storage.remove(url)
    return len(debris)


def load_latest_checkpoint(checkpoints: str) -> dict | None:
    """The newest checkpoint that loads; a damaged one is skipped with a warning (writes are
    atomic, so that only happens when a file was altered outside retrain)."""
    for _iteration, url in reversed(list_checkpoints(checkpoints)):
        try:
            return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("skipping unreadable checkpoint %s: %s", url, exc)
    return None
