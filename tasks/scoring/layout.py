"""The scoring job's folder: every file name spelled once, and the job's errors.

Everything a job writes lives under its output URL::

    <out>/.lock                            held while a job runs: a second job is refused
    <out>/job.json                         the model (URL, sha256, classes, input size), engine,
                                           images, settings
    <out>/files.parquet                    the sorted file list with each file's partition
    <out>/parts/part-<n>-<digest>.parquet  one per partition: path, label, score, top_labels,
                                           top_scores, error
    <out>/scores.parquet                   consolidated: exactly one row per image, sorted by path
    <out>/summary.json                     images, scored, failed, count per label, failures
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from retrain.tasks import storage

# Defaults of a job's settings (here, free of heavy imports, for the command line's help).
# Images per Dask task and per part: small enough that the last tasks leave no core idle for
# long and a kill loses little, large enough that a task's overhead does not count.
DEFAULT_PARTITION_SIZE = 128
# Small batches: on a CPU core the activations of 8 images at 227 px stay in cache; batches of
# 32-64 cost 1.5-2x more CPU time per image (measured with SqueezeNet, see benchmarks/).
DEFAULT_MINI_BATCH_SIZE = 8
DEFAULT_TOP_K = 5


class ScoringError(ValueError):
    """A scoring job cannot run as asked (bad model for scoring, bad settings, bad output)."""


class ScoringLockedError(ScoringError):
    """Another scoring job is writing to the same output."""


class ScoringIncompleteError(ScoringError):
    """Some partitions failed as a whole (not one bad file: a worker crash, say); the others
    are saved and a rerun scores only the missing ones."""


class ClusterLostError(RuntimeError):
    """The Dask scheduler could not be reached, or went away during the job. Not a refusal and
    not a store failure: the parts finished before are kept, and the same command run against a
    running scheduler scores only the missing ones."""


@dataclass(frozen=True)
class JobLayout:
    """The file names of a scoring job's folder ``out``."""

    out: str

    @property
    def job(self) -> str:
        return storage.join(self.out, "job.json")

    @property
    def files(self) -> str:
        return storage.join(self.out, "files.parquet")

    @property
    def parts(self) -> str:
        return storage.join(self.out, "parts")

    def part(self, name: str) -> str:
        return storage.join(self.parts, f"{name}.parquet")

    @property
    def scores(self) -> str:
        return storage.join(self.out, "scores.parquet")

    @property
    def summary(self) -> str:
        return storage.join(self.out, "summary.json")

    @property
    def lock(self) -> str:
        return storage.join(self.out, ".lock")


def default_out(store: str, model_sha256: str, images: str) -> str:
    """``<store>/scores/<job-id>``: the same model and images give the same job id, so the
    same command run again resumes the same job."""
    digest = hashlib.sha256(images.encode("utf-8")).hexdigest()[:8]
    return storage.join(store, "scores", f"{model_sha256[:12]}-{digest}")
