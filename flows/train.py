"""The training flow: one run folder in, ``trained.pt`` out.

Its own flow so a GPU work pool can run it as a deployment while the rest of the pipeline
runs anywhere; everything it needs and makes travels through the store, by URL. With no pool
named, :mod:`flows.pipeline` calls it in process as a subflow.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from retrain.flows.artifacts import TrainingMonitor
from retrain.tasks.storage import RunLayout
from retrain.tasks.training.stage import train_run


@flow(name="train", log_prints=True)
def train_flow(run_url: str, progress: bool = False, cluster: dict | None = None) -> dict:
    """Train the network described by ``run_url/run.json`` on ``run_url/split.parquet``;
    the UI shows its progress while it trains (:class:`flows.artifacts.TrainingMonitor`).
    ``cluster``: ``{"address", "workers"}`` of a Dask cluster for the image shards and
    transfer mode's features (tasks/training/cluster.py); None: in this process."""
    logger = get_run_logger()
    layout = RunLayout(run_url)
    monitor = TrainingMonitor(f"Training run {layout.run_id}", layout.progress, logger)
    summary = train_run(run_url, progress=progress, logger=logger, on_validation=monitor.update, cluster=cluster)
    monitor.finish(layout.history)
    return summary
