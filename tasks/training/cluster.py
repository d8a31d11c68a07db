"""The Dask cluster training's data work may run on: image shard preparation and transfer
mode's feature extraction (both inference, both mapped over shards). The same machinery as
batch scoring (:mod:`tasks.scoring.cluster`): a local cluster of ``workers`` processes, or the
cluster at ``address``. Started only when some work needs it (a rerun that finds every shard
written starts none), closed by whoever opened it. :func:`run_tasks` runs a batch of such work there.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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
        workers = d.get("workers")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            raise ValueError(f"Dask workers (--dask-workers) must be an integer >= 0 (0: in process), not {workers!r}")
        return cls(d.get("address") or None, workers or None)


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


def run_tasks(client, tasks: dict[str, tuple], on_result: Callable[[Any], None] | None = None) -> list[tuple[str, Any]]:
    """Run each ``tasks[name] = (function, *arguments)`` on the Dask ``client`` (one retry
    each: a worker lost mid-task); ``on_result`` gets each result as it arrives. Returns the
    failures, ``(name, exception)``; what is still running when this returns is cancelled."""
    from distributed import as_completed

    futures = {
        client.submit(function, *arguments, key=f"{name}-{uuid.uuid4().hex[:8]}", retries=1): name
        for name, (function, *arguments) in tasks.items()
    }
    failures = []
    try:
        for future in as_completed(futures):
            if future.status != "finished":
                failures.append((futures[future], future.exception() if future.status == "error" else None))
            elif on_result is not None:
                on_result(future.result())
    finally:
        client.cancel(list(futures))
    return failures
