"""The retrain flow: MATLAB's "Retrain Neural Network to Classify New Images", step by step.

unzip -> index (+ montage) -> split -> train (its own flow) -> evaluate -> publish
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.train import train_flow
from tasks import storage
from tasks.datastore import index_stage, materialize, parse_fractions, split_stage
from tasks.evaluation import evaluate_run
from tasks.networks import get_spec
from tasks.preprocessing import Augmentation
from tasks.reports import png_markdown, run_summary_markdown
from tasks.runs import STATUS_FAILED, RunConfig, publish_run, start_run, update_run
from tasks.samples import ensure_sample_dataset
from tasks.training import TrainingOptions

unzip = task(materialize, name="unzip")
index = task(index_stage, name="index")
split = task(split_stage, name="split")
evaluate = task(evaluate_run, name="evaluate")
publish = task(publish_run, name="publish")


@flow(name="retrain")
def retrain_flow(data: str | None = None, store: str | None = None, network: str = "squeezenet",
                 weights: str = "default", mode: str = "transfer", split_fractions: str = "0.7,0.15,0.15",
                 options: dict | None = None, augmentation: dict | None = None,
                 run_id: str | None = None, resume: bool = True, progress: bool = False) -> dict:
    """Retrain ``network`` on the images in ``data`` (a zip or a folder of class folders,
    any fsspec URL; the generated sample set when None). Returns the run summary."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = storage.absolute(store or storage.default_store())
    # Validate everything the user chose before any work is done.
    get_spec(network)
    training_options = TrainingOptions.from_dict(options or {})
    augment = Augmentation(**(augmentation or {}))
    fractions = parse_fractions(split_fractions)
    if data is None:
        data = ensure_sample_dataset(store)
        logger.info("no data given: using the generated sample set %s", data)
    data = storage.absolute(data)
    if weights not in ("default", "none"):
        weights = storage.absolute(weights)

    dataset_url = unzip(data, store)
    config = RunConfig(data=data, dataset=dataset_url, network=network,
                       weights="none" if mode == "scratch" else weights, mode=mode, split=fractions,
                       options=training_options.to_dict(), augmentation=augment.to_dict())
    run_url = start_run(store, config, run_id=run_id, resume=resume)
    run_name = run_url.rstrip("/").rsplit("/", 1)[-1]
    logger.info("run %s in %s", run_name, run_url)
    try:
        indexed = index(dataset_url, run_url, training_options.seed)
        logger.info("%d classes: %s; %d files skipped", len(indexed.classes),
                    ", ".join(f"{c} ({n})" for c, n in indexed.counts.items()), indexed.skipped)
        split(run_url, fractions, training_options.seed)
        trained = train_flow(run_url, progress=progress)
        metrics = evaluate(run_url)
        model_url = publish(run_url)
    except BaseException as exc:
        update_run(run_url, status=STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    summary = {
        "run_id": run_name, "run": run_url, "model": model_url, "data": data,
        "network": network, "mode": mode, "weights_origin": trained["weights_origin"],
        "classes": indexed.classes, "counts": indexed.counts, "skipped": indexed.skipped,
        "test_accuracy": metrics["test_accuracy"], "val_accuracy": trained["val_accuracy"],
        "test_images": metrics["test_images"], "iterations": trained["iterations"],
        "epochs": trained["epochs"], "resumed_from": trained["resumed_from"],
        "device": trained["device"], "options": training_options.to_dict(),
        "seconds": time.perf_counter() - started,
    }
    storage.write_json(storage.join(run_url, "summary.json"), summary)
    publish_artifacts(summary, metrics, run_url, indexed.montage)
    return summary


def publish_artifacts(summary: dict, metrics: dict, run_url: str, montage_url: str) -> None:
    """What a person opening the run in the Prefect UI wants to see."""
    create_markdown_artifact(run_summary_markdown(summary), key="retrain-summary",
                             description="Retrain run summary")
    create_table_artifact([{"class": c, **{k: round(v, 4) for k, v in m.items()}}
                           for c, m in metrics["per_class"].items()],
                          key="per-class-metrics", description="Per-class test metrics")
    plots = [("Sample images", montage_url), ("Training progress", storage.join(run_url, "progress.png")),
             ("Confusion chart", metrics["confusion_chart"])]
    create_markdown_artifact("\n\n".join(f"## {title}\n\n{png_markdown(url, title)}"
                                         for title, url in plots if storage.exists(url)),
                             key="retrain-plots", description="Montage, training progress, confusion chart")
