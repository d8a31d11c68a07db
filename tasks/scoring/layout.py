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
    <out>/to_label.csv                     the least certain images, to label next (to_label.py)
"""

from __future__ import annotations

import hashlib
import os
import re
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
# Images in to_label.csv: a batch a person labels in one sitting.
DEFAULT_TO_LABEL = 100


class ScoringError(ValueError):
    """A scoring job cannot run as asked (bad model for scoring, bad settings, bad output)."""


class ScoringLockedError(ScoringError, storage.LockedError):
    """Another scoring job is writing to the same output."""


class ScoringIncompleteError(ScoringError):
    """Some partitions failed as a whole (not one bad file: a worker crash, say); the others
    are saved and a rerun scores only the missing ones."""


def part_file(name: str) -> str:
    """The file of partition ``name`` in ``<out>/parts``."""
    return f"{name}.parquet"


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
        return storage.join(self.parts, part_file(name))

    @property
    def scores(self) -> str:
        return storage.join(self.out, "scores.parquet")

    @property
    def summary(self) -> str:
        return storage.join(self.out, "summary.json")

    @property
    def to_label(self) -> str:
        return storage.join(self.out, "to_label.csv")

    @property
    def drift(self) -> str:
        return storage.join(self.out, "drift.json")

    @property
    def drift_plot(self) -> str:
        return storage.join(self.out, "drift.png")

    @property
    def lock(self) -> str:
        return storage.lock_url(self.out)


def lock_job(out: str, wait_s: float = 0.0, lease_s: float = 120.0) -> storage.FolderLock:
    """The output's lock (the store's :class:`~retrain.tasks.storage.FolderLock` on
    ``<out>/.lock``): a second job on the same output is refused with :class:`ScoringLockedError`
    once ``wait_s`` has passed. Acquire it before writing."""

    def refusal(who: str) -> ScoringLockedError:
        return ScoringLockedError(
            f"another scoring job is writing to {out}{who}; wait for it to finish, or score into another --out"
        )

    return storage.FolderLock(out, wait_s=wait_s, lease_s=lease_s, refusal=refusal)


# What a job writes directly in its folder (the lock, the plan, the parts' folder, the results)
# and what it writes in <out>/parts (part-<n>-<digest>.parquet, as job.partitions names them).
# A job writes and removes nothing else there, and refuses a folder that holds anything else.
JOB_ENTRIES = frozenset(
    {
        storage.LOCK_NAME,
        "job.json",
        "files.parquet",
        "parts",
        "scores.parquet",
        "summary.json",
        "to_label.csv",
        "drift.json",
        "drift.png",
    }
)
_PART_FILE = re.compile(r"part-\d{6,}-[0-9a-z]+\.parquet")


def _finished_name(name: str) -> str:
    """The name an atomic write's unfinished ``<name>.tmp-<id>`` debris is written for."""
    return name.split(storage.TMP_MARKER, 1)[0]


def is_job_entry(name: str) -> bool:
    return _finished_name(name) in JOB_ENTRIES


def is_part_file(name: str) -> bool:
    return bool(_PART_FILE.fullmatch(_finished_name(name)))


def check_output(out: str, images: str) -> None:
    """Refuse an output folder that is, or is inside, the images folder (the job's files would
    be listed with the images next time), or that holds anything a job does not write there
    (a user's folder: a job writes and removes only its own files). An empty, missing or
    earlier job's folder is fine: that is how a job resumes."""
    if _inside(out, images) and storage.isdir(images):
        raise ScoringError(
            f"output {out} is inside the images folder {images}: its files would be listed with the "
            "images next time; score into a folder outside it"
        )
    layout = JobLayout(out)
    foreign = sorted(n for n in storage.names_in(out) if not is_job_entry(n))
    if storage.isdir(layout.parts):
        foreign += sorted(f"parts/{n}" for n in storage.names_in(layout.parts) if not is_part_file(n))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ScoringError(
            f"output {out} holds files a scoring job did not write ({listed}); a job writes and removes only "
            "its own files: score into a new or empty folder, or into an earlier job's output to resume it"
        )


def _inside(url: str, folder: str) -> bool:
    """Whether ``url`` is ``folder`` or below it."""
    if storage.is_local(url) and storage.is_local(folder):
        url, folder = (os.path.realpath(storage.absolute(u)) for u in (url, folder))
    url, folder = url.rstrip("/"), folder.rstrip("/")
    return url == folder or url.startswith(folder + "/")


def default_out(store: str, model_sha256: str, images: str) -> str:
    """``<store>/scores/<job-id>``: the same model and images give the same job id, so the
    same command run again resumes the same job."""
    digest = hashlib.sha256(images.encode("utf-8")).hexdigest()[:8]
    return storage.join(store, "scores", f"{model_sha256[:12]}-{digest}")
