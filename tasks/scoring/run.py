"""A scoring job, start to end: :func:`score_job` (what scripts and tests call, no Prefect) and
:class:`ScoringRun`, what it and ``score_flow`` hold while the stages run.

lock the output -> (local cluster starting in the background) -> check the model, choose its
engine, list, compare with the output's rows and plan -> score the new and changed images on
Dask (a few, in this process) -> consolidate

``score_flow`` (flows/score.py) calls the same stages as Prefect tasks, in the same order, inside
the same :class:`ScoringRun`. A script calling :func:`score_job` needs no
``if __name__ == "__main__":`` guard: the local cluster's workers do not run the script again
(cluster.LocalClusterStart).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

from retrain.tasks import storage
from retrain.tasks.parts import compute_here, map_on_dask, present
from retrain.tasks.scoring.cluster import LocalClusterStart, dask_client, start_cluster
from retrain.tasks.scoring.job import JobPlan, check_settings, consolidate, parts_job, prepare_job, run_record
from retrain.tasks.scoring.layout import (
    DEFAULT_MINI_BATCH_SIZE,
    DEFAULT_PARTITION_SIZE,
    DEFAULT_TO_LABEL,
    JobLayout,
    check_output,
    lock_job,
)
from retrain.tasks.scoring.partition import PartResult

# A rerun into an output that holds scores usually has few images to score: up to this many are
# scored in the driver's process, with no local cluster to start (spawning its workers and
# importing torch there takes seconds, in which the driver scores a few hundred images).
IN_PROCESS_MAX_IMAGES = 256


def holds_scores(out: str) -> bool:
    """Whether ``out`` holds an earlier job's scores: a rerun, which scores what changed."""
    return storage.exists(JobLayout(out).scores)


class ScoringRun:
    """What a job holds from the start to its consolidation: the output's lock, the cluster
    and the clock of the summary's start-up figures.

    The cluster is ``client``'s, the one at ``dask_address``, ``cluster`` (a local cluster its
    starter already started and closes; the command line starts it before Prefect's API), or
    else a local cluster of ``workers`` processes this run starts and closes: on entry, in the
    background (its workers start and import torch while the model is checked and the images
    listed), unless the output holds scores already; a rerun starts it only when the plan has
    more than IN_PROCESS_MAX_IMAGES images to score, and scores fewer in this process."""

    def __init__(
        self,
        out: str,
        images: str,
        mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
        partition_size: int = DEFAULT_PARTITION_SIZE,
        dask_address: str | None = None,
        workers: int | None = None,
        client=None,
        cluster: LocalClusterStart | None = None,
        lock_wait_s: float = 0.0,
    ):
        self.out, self.images = out, images
        self.mini_batch_size, self.partition_size = mini_batch_size, partition_size
        self.dask_address, self.workers, self.client, self.given = dask_address, workers, client, cluster
        self.lock_wait_s = lock_wait_s
        # A local cluster runs one process per core: one torch thread each.
        self.torch_threads = 1 if client is None and not dask_address else None
        self._held = ExitStack()  # the lock and this run's own cluster, from entry to exit
        self._own = None  # the cluster this run started (and closes)
        self.started = self.planned_at = self.scoring_started = 0.0

    def __enter__(self) -> ScoringRun:
        self.started = time.perf_counter()
        check_settings(self.mini_batch_size, self.partition_size)
        check_output(self.out, self.images)  # before the lock: a refused folder is left as it was found
        with ExitStack() as stack:
            stack.enter_context(lock_job(self.out, wait_s=self.lock_wait_s))
            stack.callback(self._close_cluster)  # closed before the lock is released
            if self.client is None and self.given is None and (self.dask_address or not holds_scores(self.out)):
                self._own = start_cluster(self.dask_address, self.workers)
            self._held = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._held.__exit__(*exc)

    def _close_cluster(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None

    def planned(self, plan: JobPlan) -> JobPlan:
        """Mark the plan made (the end of the start-up the summary measures); returns ``plan``."""
        self.planned_at = self.scoring_started = time.perf_counter()
        return plan

    def scheduler(self, plan: JobPlan) -> str | None:
        """The cluster's scheduler address, once it has started; None with a given client, or
        where ``plan`` is scored in this process (a rerun with few images to score). Scoring
        starts now."""
        if self.client is None and self.given is None and self._own is None:
            if plan.todo_images > IN_PROCESS_MAX_IMAGES:
                self._own = start_cluster(self.dask_address, self.workers)
            else:
                self.torch_threads = None  # this process's own threads
        cluster = self._own or self.given
        address = cluster.address() if cluster is not None else None
        self.scoring_started = time.perf_counter()
        return address

    def scored(self, plan: JobPlan, results: list[PartResult]) -> dict:
        """Scoring is over: close this run's cluster; returns this run's figures for the summary."""
        scoring_s = time.perf_counter() - self.scoring_started
        self._close_cluster()
        figures = run_record(plan, results, time.perf_counter() - self.started, scoring_s)
        # Start-up, measured: what the plan took (model check, engine, listing), and how long
        # the job then still waited for the cluster started beside it.
        figures["plan_seconds"] = round(self.planned_at - self.started, 3)
        figures["cluster_wait_seconds"] = round(self.scoring_started - self.planned_at, 3)
        return figures


def score_missing(
    plan: JobPlan,
    scheduler: str | None,
    torch_threads: int | None = None,
    on_done: Callable[[PartResult], None] | None = None,
    client=None,
) -> list[PartResult]:
    """Score the plan's missing partitions (listed now) on the cluster at ``scheduler`` (or
    ``client``; neither: in this process), mapped by the parts engine; ``on_done`` gets each
    part's result as it ends."""
    job = parts_job(plan, torch_threads=torch_threads)
    todo = job.missing(present(job.folder))
    if not todo:
        return []
    report = (lambda part, result: on_done(result)) if on_done else None
    if client is None and scheduler is None:
        return compute_here(job, todo, report)
    if client is not None:
        return map_on_dask(client, job, todo, report)
    with dask_client(scheduler) as made:
        return map_on_dask(made, job, todo, report)


def score_job(
    model_url: str,
    images: str,
    out: str,
    engine: str = "auto",
    dask_address: str | None = None,
    workers: int | None = None,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    top_k: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    client=None,
    lock_wait_s: float = 0.0,
    cluster: LocalClusterStart | None = None,
    verify_content: bool = False,
    to_label: int = DEFAULT_TO_LABEL,
) -> dict:
    """Score every image of ``images`` with the model at ``model_url`` into ``out`` and return
    the summary (the cluster: see :class:`ScoringRun`). Rerun with the same ``out`` to score
    what changed: new and changed images are scored, deleted ones' rows dropped, a stopped
    job's parts reused. ``verify_content``: compare the files' content hashes, not only their
    sizes and versions. ``to_label``: the least certain images listed in ``to_label.csv``
    (0: none)."""
    with ScoringRun(
        out, images, mini_batch_size, partition_size, dask_address, workers, client, cluster, lock_wait_s
    ) as job:
        plan = job.planned(
            prepare_job(
                model_url, images, out, top_k, partition_size, mini_batch_size, None, engine, verify_content, to_label
            )
        )
        results = score_missing(plan, job.scheduler(plan), job.torch_threads, client=client) if plan.missing else []
        return consolidate(plan, job.scored(plan, results))
