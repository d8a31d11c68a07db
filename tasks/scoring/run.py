"""The one orchestration of a scoring job: what ``score_flow`` runs, and what scripts and tests
call directly.

lock the output -> (local cluster starting in the background) -> check the model, choose its
engine, list and plan -> score the missing partitions on Dask -> consolidate

The flow passes its Prefect tasks as the :class:`Stages`; called plainly, the stages are the
plain functions. A script calling it needs no ``if __name__ == "__main__":`` guard: the local
cluster's workers do not run the script again (cluster.LocalClusterStart).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from retrain.tasks.scoring.cluster import dask_client, run_partitions, start_cluster
from retrain.tasks.scoring.job import (
    JobPlan,
    check_settings,
    consolidate,
    missing_partitions,
    prepare_job,
    run_record,
)
from retrain.tasks.scoring.layout import DEFAULT_MINI_BATCH_SIZE, DEFAULT_PARTITION_SIZE, JobLayout, check_output
from retrain.tasks.scoring.lock import JobLock
from retrain.tasks.scoring.partition import PartResult


def score_missing(
    plan: JobPlan,
    scheduler: str | None,
    torch_threads: int | None = None,
    on_done: Callable[[PartResult], None] | None = None,
    client=None,
) -> list[PartResult]:
    """Score the plan's missing partitions on the cluster at ``scheduler`` (or ``client``)."""
    layout = JobLayout(plan.out)
    todo = [(list(p.paths), layout.part(p.name)) for p in missing_partitions(plan)]
    if not todo:
        return []
    args = (plan.model.for_workers(), todo, plan.mini_batch_size, plan.top_k, on_done, torch_threads)
    if client is not None:
        return run_partitions(client, *args)
    with dask_client(scheduler) as made:
        return run_partitions(made, *args)


@dataclass(frozen=True)
class Stages:
    """How each stage runs: plain functions, or the flow's Prefect tasks around them."""

    plan: Callable[..., JobPlan] = prepare_job
    score: Callable[..., list[PartResult]] = score_missing
    consolidate: Callable[[JobPlan, dict], dict] = consolidate


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
    stages: Stages = Stages(),
    on_plan: Callable[[JobPlan], None] | None = None,
) -> dict:
    """Score every image of ``images`` with the model at ``model_url`` into ``out`` and return
    the summary. A local cluster (no ``client``, no ``dask_address``) starts in the background
    at once, so its workers start and import torch while the model is checked and the images
    listed. Rerun with the same ``out`` to resume: only missing partitions are scored."""
    started = time.perf_counter()
    check_settings(mini_batch_size, partition_size)
    check_output(out, images)  # before the lock: a refused folder is left as it was found
    torch_threads = 1 if client is None and not dask_address else None  # one process per core: one thread
    with JobLock(out, wait_s=lock_wait_s):
        cluster = start_cluster(dask_address, workers) if client is None else None
        try:
            plan = stages.plan(model_url, images, out, top_k, partition_size, mini_batch_size, None, engine)
            planned = time.perf_counter()
            if on_plan:
                on_plan(plan)
            results: list[PartResult] = []
            scoring_started = planned
            if len(plan.done) < plan.partitions:
                scheduler = cluster.address() if cluster is not None else None
                scoring_started = time.perf_counter()
                results = stages.score(plan, scheduler, torch_threads, client=client)
            scoring_s = time.perf_counter() - scoring_started
        finally:
            if cluster is not None:
                cluster.close()
        figures = run_record(plan, results, time.perf_counter() - started, scoring_s)
        # Start-up, measured: what the plan took (model check, engine, listing), and how long
        # the job then still waited for the cluster started beside it.
        figures["plan_seconds"] = round(planned - started, 3)
        figures["cluster_wait_seconds"] = round(scoring_started - planned, 3)
        return stages.consolidate(plan, figures)
