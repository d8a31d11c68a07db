"""The score flow: batch inference over a large image folder on Dask.

resolve model -> plan (check the model, choose the engine, list, compare with the output's rows,
partition what is new or changed) -> score those partitions on Dask -> consolidate (scores,
to_label.csv, the drift verdict) -> summary and drift artifacts -> the drift event when the
verdict is drift (flows/drift_events.py), each stage a task of this module, called
in that order inside a :class:`tasks.scoring.run.ScoringRun` (the output's lock, the cluster,
the start-up clock), as :func:`tasks.scoring.score_job` calls the plain functions.

Prefect orchestrates, Dask computes: the ``score-partitions`` task drives a
``dask.distributed`` client (a local cluster of one process per core, started in the
background as the job begins, or the cluster at ``dask_address``) and maps the plain
:func:`tasks.scoring.partition.score_partition` over partitions. No Prefect call runs inside a
Dask worker; progress comes back to this task, which updates a Prefect progress artifact and,
on the command line, a progress bar.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from retrain.flows.artifacts import flow_run_ui_url
from retrain.flows.drift_events import emit_drift_event, promoted_name
from retrain.tasks import storage
from retrain.tasks.drift import verdict_line
from retrain.tasks.reports import drift_markdown
from retrain.tasks.runs import resolve_model
from retrain.tasks.scoring.cluster import LocalClusterStart
from retrain.tasks.scoring.job import JobPlan, consolidate, prepare_job
from retrain.tasks.scoring.layout import DEFAULT_MINI_BATCH_SIZE, DEFAULT_PARTITION_SIZE, DEFAULT_TO_LABEL, default_out
from retrain.tasks.scoring.partition import PartResult
from retrain.tasks.scoring.run import ScoringRun, score_missing
from retrain.tasks.vocabulary import check_workers

PROGRESS_EVERY_S = 2.0  # at most one progress-artifact update per this many seconds

plan_scoring = task(prepare_job, name="plan-scoring", cache_policy=NO_CACHE)
consolidate_scores = task(consolidate, name="consolidate-scores", cache_policy=NO_CACHE)


@task(name="score-partitions", cache_policy=NO_CACHE)
def score_partitions(
    plan: JobPlan, scheduler: str | None, torch_threads: int | None = None, progress: bool = False
) -> list[PartResult]:
    """Score the partitions still missing on the Dask cluster at ``scheduler``; report progress
    as parts finish (a progress artifact, and with ``progress`` a bar on the command line)."""
    artifact = create_progress_artifact(
        100.0 * plan.done_images / max(plan.count, 1),
        key="score-progress",
        description=f"Scoring {plan.count:,} images into {plan.out}",
    )
    get_run_logger().info(
        "%d images to score in %d partitions, %s",
        plan.todo_images,
        plan.partitions,
        f"on the Dask scheduler {scheduler}" if scheduler else "in this process (few images)",
    )
    bar = None  # after the line above: a log line written under a bar would join it
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.count, initial=plan.done_images, desc="scoring", unit="img", leave=False)
    state = {"images": plan.done_images, "reported": time.monotonic()}

    def on_done(result: PartResult) -> None:
        state["images"] += result.images
        if bar is not None:
            bar.update(result.images)
        now = time.monotonic()
        if now - state["reported"] >= PROGRESS_EVERY_S:
            state["reported"] = now
            update_progress_artifact(artifact, 100.0 * state["images"] / max(plan.count, 1))

    try:
        results = score_missing(plan, scheduler, torch_threads, on_done)
    finally:
        if bar is not None:
            bar.close()
    update_progress_artifact(artifact, 100.0)
    return results


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
    engine: str = "auto",
    cluster: LocalClusterStart | None = None,
    verify_content: bool = False,
    to_label: int = DEFAULT_TO_LABEL,
) -> dict:
    """Score every image in ``images`` (a folder, searched recursively, or a list file; any
    fsspec URL) with ``model`` (a model file URL, a run id or a promoted model name in
    ``store``) into ``out`` (default ``<store>/scores/<job-id>``, one per model file and folder)
    with ``engine`` (auto: the fastest validated one here). Rerun with the same ``out`` to score what changed: new and changed images (by size and
    version; with ``verify_content`` by content hash) are scored, the rows of deleted ones
    dropped, the parts of a stopped job reused. Returns the summary (images, new, changed,
    deleted, unchanged, scored, failed, seconds, images_per_second, engine, output, count per
    label, failures, to_label). ``to_label``: the least certain images (smallest margin between
    the two top scores) listed in ``<out>/to_label.csv`` for a person to label (0: none).
    ``cluster``: a local cluster of ``workers`` processes its caller
    already started (and closes), used instead of starting one (in process only: a deployment
    cannot pass it)."""
    logger = get_run_logger()
    check_workers(workers)
    if dask_address and workers:
        logger.warning("workers=%d is for a local cluster; the cluster at %s has its own", workers, dask_address)
    store = storage.absolute(store or storage.default_store())
    model_url = storage.absolute(resolve_model(model, store))
    images = storage.absolute(images)
    out = storage.absolute(out) if out else default_out(store, storage.sha256_of(model_url), images)

    with ScoringRun(
        out, images, mini_batch_size, partition_size, dask_address, workers, cluster=cluster, lock_wait_s=lock_wait_s
    ) as job:
        plan = job.planned(
            plan_scoring(
                model_url, images, out, top_k, partition_size, mini_batch_size, None, engine, verify_content, to_label
            )
        )
        if plan.note:
            logger.warning(plan.note)
        logger.info(
            "%d images (%d other files ignored): %d new, %d changed, %d failed before, %d unchanged; %d deleted; "
            "engine %s (%s), %s decoding",
            plan.count,
            plan.ignored,
            plan.new,
            plan.changed,
            plan.retried,
            plan.done_images,
            plan.deleted,
            plan.model.engine.engine,
            plan.model.engine.reason,
            plan.model.engine.decoder,
        )
        results = score_partitions(plan, job.scheduler(plan), job.torch_threads, progress) if plan.missing else []
        summary = consolidate_scores(plan, job.scored(plan, results))
    if summary.get("drift"):
        (logger.warning if summary["drift"]["drift"] else logger.info)(verdict_line(summary["drift"]))
    logger.info(
        "%d images scored by this run in %.1f s with %s; the output holds %d rows (%d failed) -> %s",
        summary["processed"],
        summary["seconds"],
        summary["engine"],
        summary["images"],
        summary["failed"],
        summary["output"],
    )
    publish_artifacts(summary)
    emit_drift_event(summary, promoted_name(model, store, model_url))  # retrain/scheduled's trigger
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
        f"| engine | {summary['engine']} ({summary['engine_reason']}); {summary['decoder']} decoding |",
        f"| images scored | {summary['scored']:,} |",
        f"| failed | {summary['failed']:,} |",
        f"| other files ignored | {summary['ignored']:,} |",
        f"| since the last run | {summary['new']:,} new, {summary['changed']:,} changed, "
        f"{summary['deleted']:,} deleted, {summary['unchanged']:,} unchanged |",
        f"| this run | {summary['processed']:,} images scored in {summary['seconds']:.1f} s "
        f"({summary['images_per_second'] or 0:.1f} images/s) |",
        f"| output | `{summary['output']}` |",
        *(
            [f"| to label next | `{summary['to_label']['url']}` ({summary['to_label']['count']:,} least certain) |"]
            if summary.get("to_label")
            else []
        ),
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
    if summary.get("drift"):
        create_markdown_artifact(
            drift_markdown(summary["drift"]),
            key="score-drift",
            description="Do these images still look like the model's held-out images?",
        )
    create_table_artifact(
        [{"label": label, "images": n} for label, n in summary["labels"].items()],
        key="score-labels",
        description="Images per predicted label",
    )
