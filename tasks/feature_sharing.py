"""Runs that share a frozen body share its features.

Transfer-mode runs on the same images, network, weights, augmentation and number of cached
views compute the same feature cache (tasks/training/features.py): an experiment points them at one
folder, ``features/<key>/`` in the store, and the first run to get there builds it while the
others wait on the folder's lock (the store's: a lease on an object store), then memory-map it. The
folder's name is a digest of everything the cache depends on that is known before training;
the manifest inside still checks the images and body weights, so a wrong guess costs a
rebuild, never wrong features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator

from retrain.tasks import storage


def shared_feature_folder(store: str, **key) -> str:
    """``<store>/features/<digest of key>``: one folder per distinct frozen-body cache."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return storage.join(store, "features", digest)


@contextlib.contextmanager
def feature_lock(folder: str | None) -> Iterator[None]:
    """Hold the store's lock on ``folder`` (any store URL; a no-op for None) while its cache is
    checked or built, so concurrent runs build it once: the others wait as long as it takes.
    Each holder opens its own lock file, so threads of one process exclude each other too."""
    if folder is None:
        yield
        return
    with storage.FolderLock(storage.absolute(folder), wait_s=math.inf):
        yield
