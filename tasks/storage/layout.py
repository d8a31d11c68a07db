"""The store's layout: one object per folder kind names its files once. ::

    datasets/<name>/<content-hash>/files/...     extracted data set (same zip -> same folder)
    runs/<run-id>/run.json                       configuration, fingerprint, status
    runs/<run-id>/split.parquet                  the image index with its train/val/test split
    runs/<run-id>/checkpoints/iter-<n>.pt        training checkpoints (resume from the newest)
    runs/<run-id>/features/                      transfer mode's cached backbone features when
                                                 too large for memory (kept for a resume,
                                                 removed once trained)
    indexes/<content-key>/<root>/index.parquet   a data set's image index, before a run is
                                                 chosen for it (runs are bound to its key)
    shards/<key>/shard-<n>.npy                   a data set's images decoded at an input size
                                                 (tasks/training/shards.py), shared by runs
    runs/<run-id>/model.pt                       the published, self-describing model
    runs/<run-id>/{metrics.json,history.csv,*.png}

(The scoring job folder, scores/<job-id>/, has its own in tasks/scoring.)
"""

from __future__ import annotations

import posixpath

from retrain.tasks.storage.files import join


class RunLayout:
    """``runs/<run-id>/``: every file of a run folder, by what it holds."""

    def __init__(self, url: str):
        self.url = url
        self.run_json = join(url, "run.json")  # what was asked for, fingerprint, status
        self.index = join(url, "index.parquet")  # every usable image and its label
        self.skipped = join(url, "skipped.csv")  # the files that are not, and why
        self.montage = join(url, "montage.png")
        self.split = join(url, "split.parquet")  # the index with its train/val/test split
        self.network = join(url, "network.txt")  # the network summary
        self.checkpoints = join(url, "checkpoints")
        self.features = join(url, "features")  # transfer mode's feature cache when too large for memory
        self.history = join(url, "history.csv")
        self.progress = join(url, "progress.png")
        self.trained = join(url, "trained.pt")  # the trained network, before its test metrics
        self.training = join(url, "training.json")  # what training did (training.json)
        self.predictions = join(url, "predictions.parquet")  # the held-out images' predictions
        self.metrics = join(url, "metrics.json")
        self.reference = join(url, "reference.pt")  # held-out images' drift profile (tasks/drift.py)
        self.confusion = join(url, "confusion.png")
        self.mistakes = join(url, "mistakes.png")  # the top-loss test images (tasks/explain.py)
        self.label_issues = join(url, "label_issues.csv")  # likely label errors (tasks/label_issues.py)
        self.label_issues_plot = join(url, "label-issues.png")  # the top suspects
        self.pooled_features = join(url, "pooled_features.npz")  # transfer mode's, for label issues (then removed)
        self.gradcam = join(url, "gradcam.png")  # Grad-CAM overlays for a sample of test images
        self.model = join(url, "model.pt")  # the published model
        self.summary = join(url, "summary.json")
        self.promotion = join(url, "promotion.json")  # the promotion gate's decision on this run
        self.scores = join(url, "scores")  # default output of the run's batch-predict step

    @property
    def run_id(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    @property
    def store(self) -> str:
        """The store the run folder is in (``<store>/runs/<run-id>``)."""
        return posixpath.dirname(posixpath.dirname(self.url.rstrip("/")))


class DatasetLayout:
    """``datasets/<name>/<content-hash>/``: an extracted zip and its manifest (written last)."""

    def __init__(self, url: str):
        self.url = url
        self.files = join(url, "files")
        self.manifest = join(url, "manifest.json")


class ModelLayout:
    """``models/<name>/``: the promoted run and every decision taken on the name."""

    def __init__(self, url: str):
        self.url = url
        self.current = join(url, "current.json")  # the promoted run
        self.history = join(url, "history")  # one <utc-time>-<run-id>.json per decision


class StoreLayout:
    """The store root: where each kind of folder lives."""

    def __init__(self, store: str):
        self.url = store
        self.datasets = join(store, "datasets")
        self.runs = join(store, "runs")
        self.models = join(store, "models")
        self.scores = join(store, "scores")
        self.shards = join(store, "shards")  # decoded images, one folder per data set content and input size
        self.indexes = join(store, "indexes")  # a data set's image index before a run is chosen for it

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(join(self.runs, run_id))

    def dataset(self, name: str, content_hash: str) -> DatasetLayout:
        return DatasetLayout(join(self.datasets, name, content_hash[:16]))

    def model(self, name: str) -> ModelLayout:
        return ModelLayout(join(self.models, name))
