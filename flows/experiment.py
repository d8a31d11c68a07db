"""The experiment flow: a grid of run options x seeds, each a retrain run, then the comparison.

Each run is the retrain flow (flows/pipeline.py) as a subflow, ``parallel`` at a time in this
process; with ``train_deployment`` each run's training is a flow run of that deployment on its
work pool, so the pool's workers train in parallel while this process waits. Transfer runs
that share a frozen body share its feature cache (tasks/feature_sharing.py). The comparison
table and the accuracy-vs-time plot are Prefect artifacts and files in
``<store>/experiments/<id>/``.

Nothing is done twice: the experiment's id is a digest of its data and runs (unless named),
and each run's folder is named after the experiment and the run, so the same command again
reuses the runs that completed and resumes the others (from their checkpoints).
"""

from __future__ import annotations

import argparse
import contextvars
import ctypes
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from retrain import failures
from retrain.flows.pipeline import promotion_gate, retrain_flow, validate_step
from retrain.tasks import storage
from retrain.tasks.datastore import index_dataset, materialize
from retrain.tasks.experiments import (
    PlannedRun,
    RunResult,
    best_run,
    comparison_table,
    experiment_key,
    finished_summary,
    finite,
    parse_grid,
    parse_seeds,
    plan_runs,
    run_id_in,
    run_result,
    table_markdown,
    write_experiment,
)
from retrain.tasks.promotion import run_model_name
from retrain.tasks.reports import accuracy_text, png_markdown
from retrain.tasks.request import check_store_names
from retrain.tasks.samples import ensure_sample_dataset


def default_parallel(runs: int, train_deployment: str | None) -> int:
    """How many runs at once: all of them when a work pool trains (its workers decide), else
    one per two cores, at most four: on a CPU, each run's torch already uses every core."""
    if train_deployment:
        return max(1, runs)
    return max(1, min(4, (os.cpu_count() or 1) // 2, runs))


@task(name="experiment-run")
def one_run(planned: PlannedRun, common: dict, run_id: str) -> RunResult:
    """One run of the grid as a retrain subflow in the run folder ``run_id``: reused when it
    completed before (a rerun of the experiment), resumed when it did not. The run's own
    failure is recorded, not raised, so the other runs and the comparison go on; a failure
    every further run would meet too (the store, the Prefect API) is raised: it stops the
    experiment."""
    started = time.perf_counter()
    summary = finished_summary(common["store"], run_id)
    if summary is not None:
        get_run_logger().info("run %s seed %d: finished before, run %s", planned.label, planned.seed, run_id)
        return run_result(planned, summary, summary["seconds"])
    try:
        summary = retrain_flow(**common, **planned.parameters, run_id=run_id)
    except Exception as exc:
        if _stops_the_experiment(exc):
            raise
        error = f"{type(exc).__name__}: {exc}"
        get_run_logger().warning("run %s seed %d failed: %s", planned.label, planned.seed, error)
        return RunResult(planned.label, planned.combination, planned.seed, error=error)
    return run_result(planned, summary, time.perf_counter() - started)


def _stops_the_experiment(exc: BaseException) -> bool:
    failure = failures.classify(argparse.Namespace(command="experiment"), exc)
    return failure is not None and failure[1] in failures.SHARED_FAILURES


def run_all(jobs: list[tuple[PlannedRun, str]], common: dict, workers: int) -> list[RunResult]:
    """:func:`one_run` of every (planned run, run id), ``workers`` at a time, in order. One at
    a time, each runs in this thread, where Ctrl-C interrupts the run itself. In parallel each
    runs in a thread of its own; Ctrl-C (which only this thread receives) or a failure that
    stops the experiment interrupts the runs in progress, and no further run starts."""
    if workers == 1:
        return [one_run(planned, common, run_id) for planned, run_id in jobs]
    pending = deque(enumerate(jobs))
    running: dict[Future, int] = {}
    in_progress = _RunThreads()
    results: dict[int, RunResult] = {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="experiment-run")
    try:
        while pending or running:
            while pending and len(running) < workers:
                index, (planned, run_id) = pending.popleft()
                context = contextvars.copy_context()  # the flow run's, so each run is its task
                future = pool.submit(context.run, in_progress.run, index, one_run, planned, common, run_id)
                running[future] = index
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
    except BaseException:
        in_progress.interrupt()
        wait(running)
        raise
    finally:
        pool.shutdown(cancel_futures=True)
    return [results[index] for index in range(len(jobs))]


class _RunThreads:
    """The threads running a run now, to interrupt them: a KeyboardInterrupt raised in each
    (at its next Python instruction; a torch operation in progress ends first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[int, int] = {}

    def run(self, index: int, function, *args):
        with self._lock:
            self._threads[index] = threading.get_ident()
        try:
            return function(*args)
        finally:
            with self._lock:  # once out of here, this thread is the pool's again: never interrupted
                del self._threads[index]

    def interrupt(self) -> None:
        with self._lock:
            for ident in self._threads.values():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))


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
    check_store_names(experiment_id=experiment_id, model_name=model_name)  # before anything is written
    base = dict(base or {})
    data = storage.absolute(data) if data else ensure_sample_dataset(store)
    dataset = materialize(data, store)
    planned = plan_runs(base, parse_grid(grid or []), parse_seeds(seeds), store, dataset, share_features)
    labels = base.get("labels")
    content = index_dataset(dataset, store, storage.absolute(labels) if labels else None).content
    experiment_id = experiment_id or experiment_key(dataset, planned, content)
    folder = storage.join(store, "experiments", experiment_id)
    workers = parallel or default_parallel(len(planned), train_deployment)
    logger.info("experiment %s: %d runs, %d at a time, results in %s", experiment_id, len(planned), workers, folder)
    # Only the promoted run's engines are validated (below): the others' models are not scored.
    common = {
        "data": data,
        "store": store,
        "train_deployment": train_deployment,
        "promote": False,
        "validate_engines": False,
    }
    results = run_all([(p, run_id_in(experiment_id, p, content)) for p in planned], common, workers)
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
        "runs": finite([r.to_dict() for r in results]),
        "table": finite(table.to_dict(orient="records")),  # a combination whose runs all failed: no mean
        "best": best.to_dict() if best else None,
        "seconds": time.perf_counter() - started,
        "experiment": folder,
    }
    if best and promote_best:
        record["engines"] = validate_step(best.run)
        record["promotion"] = promotion_gate(store, model_name or run_model_name(data, best.run), best.run)
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
        f"Best: **{best['label']}**, run `{best['run_id']}` (validation accuracy "
        f"{accuracy_text(best['val_accuracy'], 'validation')}, test accuracy {accuracy_text(best['test_accuracy'], 'test')})"
        if best
        else "No run finished.",
        "",
        f"{len(record['runs'])} runs in {record['seconds']:.0f} s, {record['parallel']} at a time; "
        f"results in `{record['experiment']}`",
        "",
        png_markdown(record["files"]["plot"], "Accuracy vs time"),
    ]
    create_markdown_artifact("\n".join(lines), key="experiment-summary", description="Experiment comparison")
