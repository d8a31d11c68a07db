"""The experiment flow: a grid of run options x seeds, each a retrain run, then the comparison.

Each run is the retrain flow (flows/retrain.py) as a subflow, ``parallel`` at a time in this
process; with ``train_deployment`` each run's training is a flow run of that deployment on its
work pool, so the pool's workers train in parallel while this process waits. Transfer runs
that share a frozen body share its feature cache (tasks/feature_sharing.py). The comparison
table and the accuracy-vs-time plot are Prefect artifacts and files in
``<store>/experiments/<id>/``.
"""

from __future__ import annotations

import os
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from retrain.flows.retrain import promotion_gate, retrain_flow
from retrain.tasks import storage
from retrain.tasks.datastore import materialize
from retrain.tasks.experiments import (
    PlannedRun,
    RunResult,
    best_run,
    comparison_table,
    parse_grid,
    parse_seeds,
    plan_runs,
    table_markdown,
    write_experiment,
)
from retrain.tasks.promotion import model_name_for
from retrain.tasks.reports import png_markdown
from retrain.tasks.runs import new_run_id
from retrain.tasks.samples import ensure_sample_dataset


def default_parallel(runs: int, train_deployment: str | None) -> int:
    """How many runs at once: all of them when a work pool trains (its workers decide), else
    one per two cores, at most four: on a CPU, each run's torch already uses every core."""
    if train_deployment:
        return max(1, runs)
    return max(1, min(4, (os.cpu_count() or 1) // 2, runs))


@task(name="experiment-run")
def one_run(planned: PlannedRun, common: dict) -> RunResult:
    """One run of the grid as a retrain subflow; a failure is recorded, not raised, so the
    other runs and the comparison go on."""
    result = RunResult(planned.label, planned.combination, planned.seed)
    started = time.perf_counter()
    try:
        summary = retrain_flow(**common, **planned.parameters)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        get_run_logger().warning("run %s seed %d failed: %s", planned.label, planned.seed, result.error)
        return result
    training = storage.read_json(storage.join(summary["run"], "training.json"))
    cache = training.get("feature_cache") or {}
    result.run_id, result.run, result.model = summary["run_id"], summary["run"], summary["model"]
    result.val_accuracy, result.test_accuracy = summary["val_accuracy"], summary["test_accuracy"]
    result.seconds = time.perf_counter() - started
    result.feature_cache = ("reused" if cache.get("reused") else "built") if cache else None
    result.extra = {"train_seconds": training.get("seconds"), "feature_seconds": cache.get("seconds")}
    return result


@flow(name="experiment")
def experiment_flow(
    data: str | None = None,
    store: str | None = None,
    grid: list[str] | None = None,
    seeds: str = "0,1,2",
    base: dict | None = None,
    train_deployment: str | None = None,
    promote_best: bool = False,
    model_name: str | None = None,
    parallel: int | None = None,
    share_features: bool = True,
    experiment_id: str | None = None,
) -> dict:
    """Run every ``grid`` combination (``["mode=transfer,finetune", ...]``) once per seed with
    the retrain flow's ``base`` parameters, and compare. Returns the experiment record:
    ``runs`` (one per run with run_id and metrics), ``table`` and ``best``."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = storage.absolute(store or storage.default_store())
    base = dict(base or {})
    data = storage.absolute(data) if data else ensure_sample_dataset(store)
    planned = plan_runs(
        base, parse_grid(grid or []), parse_seeds(seeds), store, materialize(data, store), share_features
    )
    experiment_id = experiment_id or new_run_id()
    folder = storage.join(store, "experiments", experiment_id)
    workers = parallel or default_parallel(len(planned), train_deployment)
    logger.info("experiment %s: %d runs, %d at a time, results in %s", experiment_id, len(planned), workers, folder)
    common = {"data": data, "store": store, "train_deployment": train_deployment, "promote": False}
    runner = ThreadPoolTaskRunner(max_workers=workers)
    with runner:
        futures = [runner.submit(one_run, parameters={"planned": p, "common": common}) for p in planned]
        results = [f.result() for f in futures]
    table = comparison_table(results)
    best = best_run(results, table)
    record = {
        "experiment_id": experiment_id,
        "data": data,
        "grid": grid or [],
        "seeds": parse_seeds(seeds),
        "base": base,
        "parallel": workers,
        "share_features": share_features,
        "train_deployment": train_deployment,
        "runs": [r.to_dict() for r in results],
        "table": table.to_dict(orient="records"),
        "best": best.to_dict() if best else None,
        "seconds": time.perf_counter() - started,
        "experiment": folder,
    }
    if best and promote_best:
        record["promotion"] = promotion_gate(store, model_name or model_name_for(data), best.run)
    record["files"] = write_experiment(folder, record, results, table)
    publish_experiment(record, table)
    return record


def publish_experiment(record: dict, table) -> None:
    create_table_artifact(
        [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in table.to_dict(orient="records")
        ],
        key="experiment-table",
        description=f"Experiment {record['experiment_id']}: mean ± sd over seeds",
    )
    best = record["best"]
    lines = [
        f"# Experiment `{record['experiment_id']}`",
        "",
        table_markdown(table),
        "",
        f"Best: **{best['label']}**, run `{best['run_id']}` (validation accuracy {best['val_accuracy']:.4f}, "
        f"test accuracy {best['test_accuracy']:.4f})"
        if best
        else "No run finished.",
        "",
        f"{len(record['runs'])} runs in {record['seconds']:.0f} s, {record['parallel']} at a time; "
        f"results in `{record['experiment']}`",
        "",
        png_markdown(record["files"]["plot"], "Accuracy vs time"),
    ]
    create_markdown_artifact("\n".join(lines), key="experiment-summary", description="Experiment comparison")
