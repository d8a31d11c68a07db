"""The Dask cluster training's data work may run on: image shard preparation and transfer
mode's feature extraction (both inference, both mapped over shards). The same machinery as
batch scoring (:mod:`tasks.scoring.cluster`): a local cluster of ``workers`` processes, or the
cluster at ``address``. Started only when some work needs it (a rerun that finds every shard
written starts none), closed by whoever opened it; tasks/parts.py maps the work over it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from retrain.tasks.vocabulary import check_dask_workers

log = logging.getLogger("retrain.training")


@dataclass(frozen=True)
class ClusterRequest:
    """Where training's data work runs: ``address`` (a scheduler, e.g. tcp://host:8786) or a
    local cluster of ``workers`` processes; neither: in the training process."""

    address: str | None = None
    workers: int | None = None

    @property
    def wanted(self) -> bool:
        return bool(self.address) or bool(self.workers)

    def to_dict(self) -> dict:
        return {"address": self.address, "workers": self.workers}

    @classmethod
    def from_dict(cls, d: dict | None) -> ClusterRequest:
        d = d or {}
        return cls(d.get("address") or None, check_dask_workers(d.get("workers")))


class LazyCluster:
    """A Dask client made on first use from a :class:`ClusterRequest`."""

    def __init__(self, request: ClusterRequest, logger: logging.Logger | None = None):
        self.request, self.logger = request, logger or log
        self._stack = contextlib.ExitStack()
        self._client = None
        self.address: str | None = None

    def client(self):
        if self._client is None:
            from retrain.tasks.scoring.cluster import dask_client, dask_cluster

            self.address = self._stack.enter_context(dask_cluster(self.request.address, self.request.workers))
            self._client = self._stack.enter_context(dask_client(self.address))
            workers = len(self._client.scheduler_info().get("workers", {}))
            self.logger.info("training data work on the Dask cluster at %s (%d workers now)", self.address, workers)
        return self._client

    def close(self) -> None:
        self._client = None
        self._stack.close()


@contextlib.contextmanager
def training_cluster(
    request: ClusterRequest | None, logger: logging.Logger | None = None
) -> Iterator[LazyCluster | None]:
    """A :class:`LazyCluster` for ``request`` (None when it asks for none), closed on exit."""
    if request is None or not request.wanted:
        yield None
        return
    cluster = LazyCluster(request, logger)
    try:
        yield cluster
    finally:
        cluster.close()
