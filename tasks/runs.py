"""The run folder and its record: configuration, fingerprint, status, resume, publish.

``runs/<run-id>/run.json`` holds what was asked for and how far the run got. A rerun of the
same command (same data, network and options) finds an unfinished run with the same
fingerprint and resumes it instead of starting over. The fingerprint covers the data's
content (the image index's key, :func:`tasks.datastore.content_key`), not only its URL: a
rerun after images were added, removed or relabelled starts a new run, and never reuses a
model, a split or a checkpoint made from the data as it was.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from retrain.tasks import promotion, storage
from retrain.tasks.model_file import read_model_record, save_model_file
from retrain.tasks.networks import load_tensors
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.vocabulary import LABEL_ISSUES, AugmentationSettings

STATUS_RUNNING, STATUS_COMPLETED, STATUS_FAILED = "running", "completed", "failed"
# Shown by list_runs, never recorded: a "running" run whose writer is gone (killed, power cut),
# so run.json was never told. The same command resumes it.
STATUS_INTERRUPTED = "interrupted"


class RunLockedError(storage.LockedError):
    """Another process is writing to this run folder (a second ``retrain run`` of the same
    unfinished run): refused, so that a run folder never has two writers."""


@dataclass(frozen=True)
class RunConfig:
    """The run's configuration, typed, from the checked request to the training loop: what
    ``run.json`` records under ``config`` and the training stage reads back
    (:meth:`from_record`). :meth:`tasks.request.RunRequest.check` makes it without its data;
    the retrain flow adds the data set and its content key."""

    data: str  # the data set URL as given
    dataset: str  # what identifies its content: the zip's sha256, or the folder URL
    network: str
    weights: str  # default, none, or a state-dict file's absolute URL ("none" in scratch mode)
    mode: str  # tasks.vocabulary.MODES
    split: tuple[float, float, float]  # train, val, test fractions per label
    options: TrainingOptions
    augmentation: AugmentationSettings
    # labels (a label table) and its sha256, split_seed (an experiment's), shared_features
    # (a feature cache shared with other runs, tasks/feature_sharing.py)
    extra: dict = field(default_factory=dict)
    content: str = ""  # the images' content key (datastore.content_key): the run is bound to it
    # tasks/label_issues.py: "find" (label_issues.csv), "exclude" (and train without the flagged
    # images) or "off"
    label_issues: str = "find"

    def __post_init__(self):
        # Options and augmentation may be given as dicts of the settings that differ from the
        # defaults (as a test or a Prefect parameter gives them): checked and typed here.
        if isinstance(self.options, dict):
            object.__setattr__(self, "options", TrainingOptions.from_dict(self.options))
        if isinstance(self.augmentation, dict):
            object.__setattr__(self, "augmentation", AugmentationSettings.from_dict(self.augmentation))
        object.__setattr__(self, "split", tuple(self.split))
        if self.label_issues not in LABEL_ISSUES:
            raise ValueError(f"label_issues must be one of {', '.join(LABEL_ISSUES)}, not {self.label_issues!r}")
        if self.label_issues == "exclude" and self.mode == "scratch":
            raise ValueError(
                "excluding label issues needs pretrained weights to find them before training: not scratch mode"
            )

    @classmethod
    def from_record(cls, config: dict) -> RunConfig:
        """The configuration ``run.json`` recorded (by this version or an earlier one: a
        missing ``extra`` or ``content`` takes its default)."""
        return cls(**config)

    def to_record(self) -> dict:
        return asdict(self)

    @property
    def split_seed(self) -> int:
        """The seed the split is drawn from: the experiment's, else the training seed."""
        return self.extra.get("split_seed", self.options.seed)

    @property
    def shared_features(self) -> dict | None:
        return self.extra.get("shared_features")

    def fingerprint(self) -> str:
        # The number of training processes is left out: it does not change the result
        # (tasks/training/distributed.py), so a run resumes with another. So is the feature
        # engine: its gate keeps the result within half a point of float32 features
        # (tasks/training/feature_engine.py), and runs started before it existed keep their
        # fingerprints.
        record = self.to_record()
        record["options"] = {k: v for k, v in record["options"].items() if k not in ("processes", "feature_engine")}
        if record["label_issues"] != "exclude":  # finding them or not leaves the model as it is
            del record["label_issues"]
        blob = json.dumps(record, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def read_run(run_url: str) -> dict:
    return storage.read_json(storage.RunLayout(run_url).run_json)


def update_run(run_url: str, **changes) -> dict:
    record = read_run(run_url)
    record.update(changes, updated=datetime.now(timezone.utc).isoformat())
    storage.write_json(storage.RunLayout(run_url).run_json, record)
    return record


def list_runs(store: str, check_writers: bool = True) -> list[dict]:
    """Each run's record, oldest first; with ``check_writers``, a "running" run whose writer
    is gone is shown as "interrupted" (:func:`writer_alive`)."""
    root = storage.StoreLayout(store).runs
    if not storage.exists(root):
        return []
    fs, path = storage.filesystem(root)
    records = []
    for entry in sorted(fs.ls(path, detail=False)):
        run_url = storage.to_url(fs, entry)
        run_json = storage.RunLayout(run_url).run_json
        if storage.exists(run_json):
            record = storage.read_json(run_json)
            if check_writers and record.get("status") == STATUS_RUNNING and not writer_alive(run_url):
                record["status"] = STATUS_INTERRUPTED
            records.append(record)
    return records


def writer_alive(run_url: str) -> bool:
    """Whether a process holds the run folder's lock. A killed writer's lock is free (the
    kernel dropped its ``flock``; its lease went stale), so taking it and letting go at once
    tells; a writer starting in that instant is refused as if the run were running."""
    try:
        lock = lock_run(run_url).acquire()
    except RunLockedError:
        return True
    lock.release()
    return False


def find_resumable(store: str, fingerprint: str) -> str | None:
    """The newest unfinished run with this fingerprint, if any."""
    for record in reversed(list_runs(store, check_writers=False)):
        if record.get("fingerprint") == fingerprint and record.get("status") != STATUS_COMPLETED:
            return record["run_id"]
    return None


def lock_run(run_url: str):
    """The run folder's lock (the store's :class:`~retrain.tasks.storage.FolderLock` on
    ``runs/<run-id>/.lock``: ``flock`` on a local disk, released by the kernel even when the
    holder is killed -9; a lease on an object store, taken over once its holder stops renewing
    it). Acquire it before writing."""
    run_id = storage.RunLayout(run_url).run_id

    def refusal(who: str) -> RunLockedError:
        return RunLockedError(
            f"run {run_id} is already running{who}, writing to {run_url}; a run folder takes one writer at a "
            "time: wait for that run to end (if it stops unfinished, the same command resumes it), or pass "
            "--fresh to start a new run"
        )

    return storage.FolderLock(run_url, refusal=refusal)


def start_run(store: str, config: RunConfig, run_id: str | None = None, resume: bool = True):
    """Create the run folder (or reopen the unfinished run to resume) under its lock; returns
    its URL and the held lock (the caller releases it when the run ends). A run that another
    process is writing to is refused with :class:`RunLockedError`. A ``run_id`` that exists
    with another fingerprint is refused, unless ``resume`` is False: then that run starts
    over (its earlier files are removed)."""
    if run_id is not None:
        storage.check_name(run_id, "run id")  # "../x" would write outside runs/
    fingerprint = config.fingerprint()
    if run_id is None and resume:
        run_id = find_resumable(store, fingerprint)
    run_id = run_id or new_run_id()
    run_url = storage.StoreLayout(store).run(run_id).url
    lock = lock_run(run_url).acquire()
    try:
        if not resume:
            _refuse_published(run_url, run_id)
            _clear_run_folder(run_url)
        _open_record(run_url, run_id, store, config, fingerprint)
    except BaseException:
        lock.release()
        raise
    return run_url, lock


def _open_record(run_url: str, run_id: str, store: str, config: RunConfig, fingerprint: str) -> None:
    run_json = storage.RunLayout(run_url).run_json
    if storage.exists(run_json):
        record = storage.read_json(run_json)
        if record.get("fingerprint") != fingerprint:
            raise ValueError(_other_fingerprint(run_id, record, config))
        # The same configuration but for what the fingerprint leaves out (processes): this one.
        update_run(run_url, status=STATUS_RUNNING, resumed=record.get("resumed", 0) + 1, config=config.to_record())
    else:
        now = datetime.now(timezone.utc).isoformat()
        storage.write_json(
            run_json,
            {
                "run_id": run_id,
                "store": store,
                "fingerprint": fingerprint,
                "config": config.to_record(),
                "status": STATUS_RUNNING,
                "created": now,
                "updated": now,
                "resumed": 0,
            },
        )


def _other_fingerprint(run_id: str, record: dict, config: RunConfig) -> str:
    """Why run ``run_id`` (``record``) cannot go on with ``config``, and what to do: one line."""
    if record.get("config", {}).get("content") != config.content:
        what = "from other data (images added, removed, replaced or relabelled since, or other data)"
    else:
        what = "with other settings"
    if storage.exists(storage.StoreLayout(record["store"]).run(run_id).model):
        redo = "choose another --run-id, or drop --run-id to start a new run"
    else:
        redo = f"add --fresh to start run {run_id} over (its files are replaced), or drop --run-id to start a new run"
    return f"run {run_id} was made {what}: its model, split and checkpoints do not fit this request; {redo}"


def _refuse_published(run_url: str, run_id: str) -> None:
    """A run that published its model is never started over: its model may be current for a
    model name, and another model file would then stand behind that name unjudged."""
    if storage.exists(storage.RunLayout(run_url).model):
        raise ValueError(
            f"run {run_id} has a published model ({storage.RunLayout(run_url).model}), which --fresh would replace; "
            "choose another --run-id, or drop --run-id to start a new run"
        )


def _clear_run_folder(run_url: str) -> None:
    """Remove what an earlier run of this id left (its lock, held by the caller, stays): a run
    started over must not find the old split, checkpoints or trained model."""
    for url in storage.ls(run_url):
        if posixpath.basename(url.rstrip("/")) != storage.LOCK_NAME:
            storage.remove(url, recursive=True)


def resolve_model(model: str, store: str) -> str:
    """A model file URL from, in this order, a model file's URL/path, a run id in the store, or
    a promoted model's name (what ``retrain models`` lists): its current model file, so a job
    that names the model scores with whichever model is current when it starts."""
    if storage.exists(model) and not storage.isdir(model):
        return model
    for candidate in (storage.RunLayout(model).model, storage.StoreLayout(store).run(model).model):
        if storage.exists(candidate):
            return candidate
    try:
        return promotion.current_model_url(store, model)
    except promotion.PromotionError:  # not a model name, or nothing promoted under it
        pass
    raise FileNotFoundError(
        f"no model file at {model!r}, no run {model!r} with a published model, and no promoted model named "
        f"{model!r} in the store {store}"
    )


def publish_run(run_url: str) -> str:
    """Write ``model.pt``: the trained network with its test metrics, self-describing.
    Written last and atomically, so a model file in the store is always a finished one."""
    layout = storage.RunLayout(run_url)
    record = read_model_record(layout.trained)
    metrics = storage.read_json(layout.metrics)
    record["metrics"] = {**record.get("metrics", {}), **metrics}
    record["run_id"] = read_run(run_url)["run_id"]
    if storage.exists(layout.reference):  # what scoring jobs judge drift against (tasks/drift.py)
        record["reference"] = load_tensors(layout.reference)
    model_url = layout.model
    save_model_file(model_url, record)
    update_run(run_url, status=STATUS_COMPLETED, model=model_url, test_accuracy=metrics.get("test_accuracy"))
    return model_url
