"""Batch scoring: inference over partitions of image URLs on Dask.

One module per responsibility:

- :mod:`.layout`    the job folder's file names (spelled once), settings defaults, errors
- :mod:`.listing`   what the images folder holds now (each file's identity), what changed
- :mod:`.partition` what a Dask worker runs: one partition -> one parquet part
- :mod:`.job`       the driver's side: list, plan, consolidate
- :mod:`.to_label`  what to label next: the least certain images, as a label table
- :mod:`.cluster`   the Dask cluster (local, in the background, or given) and the task map
- :mod:`.run`       a job start to end: :func:`score_job`, and the lock, cluster and clock
                    it and ``score_flow`` hold (:class:`ScoringRun`)

Nothing here imports Prefect: these functions run inside Dask workers, and each Prefect import
there would start its own API. :mod:`flows.score` calls the same stages as Prefect tasks.

The names below load their module on first use: ``retrain.tasks.scoring.layout`` (what the
command line needs for its help) stays free of torch.
"""

from __future__ import annotations

import importlib

_HOME = {
    **dict.fromkeys(
        (
            "JobLayout",
            "ScoringError",
            "ScoringIncompleteError",
            "ScoringLockedError",
            "check_output",
            "default_out",
            "lock_job",
        ),
        "layout",
    ),
    **dict.fromkeys(("DEFAULT_MINI_BATCH_SIZE", "DEFAULT_PARTITION_SIZE", "DEFAULT_TOP_K"), "layout"),
    **dict.fromkeys(("PartResult", "WorkerModel", "score_partition", "score_paths"), "partition"),
    **dict.fromkeys(
        (
            "JobPlan",
            "ModelInfo",
            "Partition",
            "consolidate",
            "inspect_model",
            "partitions",
            "parts_job",
            "prepare_job",
            "read_partitions",
        ),
        "job",
    ),
    **dict.fromkeys(("ImageList", "changes", "list_images"), "listing"),
    **dict.fromkeys(("LocalClusterStart", "start_cluster"), "cluster"),
    **dict.fromkeys(("ScoringRun", "score_job", "score_missing"), "run"),
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
