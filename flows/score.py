"""The score flow: batch inference over a large image folder on Dask.

resolve model -> lock the output -> plan (list, partition) -> score the missing partitions
on Dask -> consolidate -> summary artifact

Prefect orchestrates, Dask computes: the ``score-partitions`` task drives a
``dask.distributed`` client (a local cluster of one process per core, or the cluster at
``dask_address``) and maps the plain :func:`tasks.scoring.score_partition` over partitions.
No Prefect call runs inside a Dask worker; progress comes back to this task, which updates
a Prefect progress artifact and, on the command line, a progress bar.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from retrain.tasks import storage
from retrain.tasks.reports import flow_run_ui_url
from retrain.tasks.runs import resolve_model
from retrain.tasks.scoring import (
    DEFAULT_MINI_BATCH_SIZE,
    DEFAULT_PARTITION_SIZE,
    JobLock,
    JobPlan,
    PartResult,
    check_settings,
    consolidate,
    dask_client,
    dask_cluster,
    default_out,
    prepare_job,
    run_partitions,
    run_record,
)

PROGRESS_EVERY_S = 2.0  # at most one progress-artifact update per this many seconds


@task(name="plan-scoring", cache_policy=NO_CACHE)
def plan_task(
    model_url: str, images: str, out: str, top_k: int | None, partition_size: int, mini_batch_size: int
) -> JobPlan:
    return prepare_job(model_url, images, out, top_k, partition_size, mini_batch_size)


@task(name="score-partitions", cache_policy=NO_CACHE)
def score_task(
    plan: JobPlan, scheduler: str, torch_threads: int | None = None, progress: bool = False
) -> list[PartResult]:
    """Score the partitions still missing on the Dask cluster at ``scheduler``; report
    progress as parts finish."""
    logger = get_run_logger()
    done_images = plan.done_images
    artifact = create_progress_artifact(
        100.0 * done_images / max(plan.count, 1),
        key="score-progress",
        description=f"Scoring {plan.count:,} images into {plan.out}",
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.count, initial=done_images, desc="scoring", unit="img", leave=False)
    state = {"images": done_images, "reported": time.monotonic()}

    def on_done(result: PartResult) -> None:
        state["images"] += result.images
        if bar is not None:
            bar.update(result.images)
        now = time.monotonic()
        if now - state["reported"] >= PROGRESS_EVERY_S:
            state["reported"] = now
            update_progress_artifact(artifact, 100.0 * state["images"] / max(plan.count, 1))

    try:
        with dask_client(scheduler) as client:
            logger.info(
                "Dask scheduler %s; %d of %d partitions to score",
                scheduler,
                plan.partitions - len(plan.done),
                plan.partitions,
            )
            if dashboard := dashboard_link(client):
                logger.info("Dask dashboard: %s", dashboard)
                create_link_artifact(dashboard, link_text="Dask dashboard", key="score-dashboard")
            results = run_partitions(client, plan, on_done, torch_threads)
    finally:
        if bar is not None:
            bar.close()
    update_progress_artifact(artifact, 100.0)
    return results


def dashboard_link(client) -> str | None:
    """The Dask dashboard's address where the scheduler runs one (it needs bokeh), else None."""
    try:
        return client.dashboard_link
    except (KeyError, AttributeError, OSError):  # no "dashboard" among the scheduler's services
        return None


@task(name="consolidate-scores", cache_policy=NO_CACHE)
def consolidate_task(plan: JobPlan, figures: dict) -> dict:
    return consolidate(plan, figures)


@flow(name="score")
def score_flow(
    model: str,
    images: str,
    out: str | None = None,
    store: str | None = None,
    dask_address: str | None = None,
    workers: int | None = None,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    top_k: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    progress: bool = False,
    lock_wait_s: float = 0.0,
) -> dict:
    """Score every image in ``images`` (a folder, searched recursively, or a list file; any
    fsspec URL) with ``model`` (a model file URL or a run id in ``store``) into ``out``
    (default ``<store>/scores/<job-id>``). Rerun with the same ``out`` to resume: only
    missing partitions are scored. Returns the summary (images, scored, failed, seconds,
    images_per_second, output, count per label, failures)."""
    logger = get_run_logger()
    started = time.perf_counter()
    check_settings(mini_batch_size, partition_size)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if dask_address and workers:
        logger.warning("workers=%d is for a local cluster; the cluster at %s has its own", workers, dask_address)
    store = storage.absolute(store or storage.default_store())
    model_url = storage.absolute(resolve_model(model, store))
    images = storage.absolute(images)
    out = storage.absolute(out) if out else default_out(store, storage.sha256_of(model_url), images)
    with JobLock(out, wait_s=lock_wait_s):
        plan = plan_task(model_url, images, out, top_k, partition_size, mini_batch_size)
        logger.info(
            "%d images (%d other files ignored) in %d partitions; %d already scored",
            plan.count,
            plan.ignored,
            plan.partitions,
            len(plan.done),
        )
        results = []
        if len(plan.done) < plan.partitions:
            with dask_cluster(dask_address, workers) as scheduler:
                results = score_task(plan, scheduler, None if dask_address else 1, progress)
        summary = consolidate_task(plan, run_record(plan, results, time.perf_counter() - started))
    logger.info(
        "scored %d images (%d failed) in %.1f s -> %s",
        summary["scored"],
        summary["failed"],
        summary["seconds"],
        summary["output"],
    )
    publish_artifacts(summary)
    summary["ui_url"] = flow_run_ui_url()
    return summary


def summary_markdown(summary: dict) -> str:
    lines = [
        "# Batch scoring",
        "",
        "| | |",
        "|---|---|",
        f"| images | `{summary['images_source']}` |",
        f"| model | `{summary['model']}` ({summary['network']}, {len(summary['classes'])} classes) |",
        f"| images scored | {summary['scored']:,} |",
        f"| failed | {summary['failed']:,} |",
        f"| other files ignored | {summary['ignored']:,} |",
        f"| this run | {summary['processed']:,} images in {summary['seconds']:.1f} s "
        f"({summary['images_per_second'] or 0:.1f} images/s); {summary['resumed_partitions']} of "
        f"{summary['partitions']} partitions were already done |",
        f"| output | `{summary['output']}` |",
        "",
        "## Count per label",
        "",
        "| label | images |",
        "|---|---|",
        *[f"| {label} | {n:,} |" for label, n in summary["labels"].items()],
    ]
    if summary["failures"]:
        lines += [
            "",
            f"## Failures (first {summary['failures_listed']} of {summary['failed']})",
            "",
            "| file | error |",
            "|---|---|",
            *[f"| `{f['path']}` | {f['error']} |" for f in summary["failures"][:50]],
        ]
    return "\n".join(lines)


def publish_artifacts(summary: dict) -> None:
    create_markdown_artifact(summary_markdown(summary), key="score-summary", description="Batch scoring summary")
    create_table_artifact(
        [{"label": label, "images": n} for label, n in summary["labels"].items()],
        key="score-labels",
        description="Images per predicted label",
    )
