"""The scoring job in the driver: list the images, cut them into partitions, write the plan;
after the workers, consolidate the parts into ``scores.parquet`` and ``summary.json``.

A part's name is its position and a digest of its file names (and of the model, engine and
top-k), so a rerun over the same files maps them to the same names and scores only the parts
that are missing: that is what makes a job resumable after a crash or a kill -9.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrain.tasks import storage
from retrain.tasks.datastore import _is_hidden as is_hidden  # one rule for hidden files, training's
from retrain.tasks.datastore import entry_url
from retrain.tasks.engine_gate import EngineChoice, choose_engine
from retrain.tasks.inference import load_checked
from retrain.tasks.model_file import ModelFileError
from retrain.tasks.parts import Part, PartsJob, present, store_failure
from retrain.tasks.preprocessing import IMAGE_EXTENSIONS
from retrain.tasks.scoring import partition
from retrain.tasks.scoring.layout import (
    DEFAULT_MINI_BATCH_SIZE,
    DEFAULT_PARTITION_SIZE,
    DEFAULT_TOP_K,
    JobLayout,
    ScoringError,
    ScoringIncompleteError,
    is_part_file,
    part_file,
)
from retrain.tasks.scoring.partition import (
    PART_SCHEMA,
    PartResult,
    WorkerModel,
    table_bytes,
)

LIST_FILE_COMMENT = "#"
MAX_FAILURES_IN_SUMMARY = 1000

# ---- listing and partitions ----------------------------------------------------------------


@dataclass
class ImageList:
    paths: list[str]  # sorted, unique URLs
    ignored: list[str]  # files in a folder without an image extension (not scored)
    source: str


def list_images(images: str, extensions: frozenset[str] | None = IMAGE_EXTENSIONS) -> ImageList:
    """The images to score, sorted: every file with an image extension below a folder
    (recursively; hidden files and folders left out), or every entry of a list file (one URL
    or path per line, relative ones taken from the list file's folder; blank lines and
    ``#`` comments skipped). A single image file is a list of one."""
    fs, root = storage.filesystem(images)
    below = _files_below(images)
    if below is not None:
        paths, ignored = [], []
        for found in below:
            rel = posixpath.relpath(found, root)
            if any(is_hidden(p) or storage.TMP_MARKER in p for p in rel.split("/")):
                continue
            url = storage.to_url(fs, found)
            if extensions is None or posixpath.splitext(found)[1].lower() in extensions:
                paths.append(url)
            else:
                ignored.append(url)
        return ImageList(sorted(set(paths)), sorted(ignored), images)
    if not storage.exists(images):
        raise FileNotFoundError(f"no folder or list file at {images}")
    if posixpath.splitext(root)[1].lower() in IMAGE_EXTENSIONS:
        return ImageList([images], [], images)
    try:
        text = storage.read_bytes(images).decode("utf-8")
    except UnicodeDecodeError:
        raise ScoringError(
            f"{images} is neither a folder, an image, nor a list file of image URLs (one per line, UTF-8)"
        ) from None
    base = images.rsplit("/", 1)[0] if "/" in images else "."
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith(LIST_FILE_COMMENT):
            continue
        paths.append(entry_url(entry, base))  # one spelling per file: ./x.jpg and x.jpg are one image
    return ImageList(sorted(set(paths)), [], images)


@storage.retrying
def _files_below(folder: str) -> list[str] | None:
    """Paths (in the folder's filesystem) of every file below ``folder``; None when it is not
    a folder. Retried on a remote store, like every other storage call."""
    fs, root = storage.filesystem(folder)
    return fs.find(root) if fs.isdir(root) else None


@dataclass(frozen=True)
class Partition:
    index: int
    name: str  # part-<index>-<digest of the file names, model and top-k>
    paths: tuple[str, ...]


def partitions(paths: list[str], size: int = DEFAULT_PARTITION_SIZE, salt: str = "") -> list[Partition]:
    """Cut the sorted file list into consecutive partitions of ``size`` files. The names
    depend only on the list (and ``salt``: the model and top-k), so a rerun over the same
    files maps them to the same parts."""
    if size < 1:
        raise ScoringError(f"partition size must be at least 1, not {size}")
    paths = sorted(paths)
    out = []
    for index, start in enumerate(range(0, len(paths), size)):
        chunk = tuple(paths[start : start + size])
        digest = hashlib.sha1("\n".join((salt, *chunk)).encode("utf-8")).hexdigest()[:12]
        out.append(Partition(index, f"part-{index:06d}-{digest}", chunk))
    return out


@dataclass
class ModelInfo:
    """What the driver learns about the model once and hands to every task."""

    url: str
    sha256: str
    network: str
    classes: list[str]
    input_size: tuple[int, int]
    preprocessing: dict
    engine: EngineChoice = field(default_factory=lambda: EngineChoice("torch"))

    def for_workers(self) -> WorkerModel:
        e = self.engine
        return WorkerModel(self.url, self.sha256, e.engine, e.onnx_url, e.decoder)


def inspect_model(model_url: str, engine: str = "auto") -> ModelInfo:
    """Load and check the model once in the driver, so a bad model fails the job before any
    worker starts, with the reason; choose its engine (validating it the first time)."""
    sha256 = storage.sha256_of(model_url)
    loaded, _ = load_checked(model_url)
    return ModelInfo(
        model_url,
        sha256,
        loaded.spec.name,
        list(loaded.classes),
        tuple(loaded.preprocessing.input_size),
        loaded.preprocessing.to_dict(),
        choose_engine(model_url, sha256, engine),
    )


# ---- the job: lock, manifest, plan ----------------------------------------------------------


@dataclass
class JobPlan:
    """What the flow's tasks hand each other: URLs and counts, not the file list."""

    out: str
    model: ModelInfo
    images: str
    files: str  # URL of files.parquet
    count: int
    ignored: int
    partitions: int
    partition_size: int
    top_k: int
    mini_batch_size: int
    done: list[str] = field(default_factory=list)  # parts already there when the plan was made
    done_images: int = 0  # images in those parts

    @property
    def missing(self) -> int:
        """Partitions not scored when the plan was made."""
        return self.partitions - len(self.done)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_top_k(top_k: int | None, classes: list[str]) -> int:
    if top_k is None:
        return min(DEFAULT_TOP_K, len(classes))
    if not 1 <= top_k <= len(classes):
        raise ScoringError(f"top-k must be between 1 and the model's {len(classes)} classes, not {top_k}")
    return top_k


def check_settings(mini_batch_size: int, partition_size: int) -> None:
    if mini_batch_size < 1:
        raise ScoringError(f"mini-batch size must be at least 1, not {mini_batch_size}")
    if partition_size < 1:
        raise ScoringError(f"partition size must be at least 1, not {partition_size}")


def prepare_job(
    model_url: str,
    images: str,
    out: str,
    top_k: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    model: ModelInfo | None = None,
    engine: str = "auto",
) -> JobPlan:
    """Check the model, list the images, cut them into partitions and write ``job.json`` and
    ``files.parquet``. An output that already holds another model's scores is refused."""
    check_settings(mini_batch_size, partition_size)
    model = model or inspect_model(model_url, engine)
    top_k = resolve_top_k(top_k, model.classes)
    layout = JobLayout(out)
    if storage.exists(layout.job):
        previous = storage.read_json(layout.job)
        if previous.get("model_sha256") != model.sha256:
            raise ScoringError(
                f"{out} already holds scores of another model ({previous.get('model')}, "
                f"sha256 {str(previous.get('model_sha256'))[:12]}, classes "
                f"{', '.join(previous.get('classes', []))}); score into another --out, or remove it first"
            )
    listing = list_images(images)
    # The engine and decoder are in the salt: one job's parts all come from one engine.
    salt = f"{model.sha256}:{top_k}:{model.engine.engine}:{model.engine.decoder}"
    parts = partitions(listing.paths, partition_size, salt=salt)
    found = present(layout.parts)
    done = [p.name for p in parts if part_file(p.name) in found]
    frame = pa.table(
        {
            "path": pa.array([u for p in parts for u in p.paths], type=pa.string()),
            "part": pa.array([p.name for p in parts for _ in p.paths], type=pa.string()),
        }
    )
    storage.write_bytes(layout.files, table_bytes(frame))
    storage.write_json(
        layout.job,
        {
            "model": model_url,
            "model_sha256": model.sha256,
            "network": model.network,
            "classes": model.classes,
            "input_size": list(model.input_size),
            "preprocessing": model.preprocessing,
            "engine": model.engine.to_dict(),
            "images": images,
            "count": len(listing.paths),
            "ignored": len(listing.ignored),
            "partitions": len(parts),
            "partition_size": partition_size,
            "top_k": top_k,
            "updated": storage.now(),
        },
    )
    return JobPlan(
        out,
        model,
        images,
        layout.files,
        len(listing.paths),
        len(listing.ignored),
        len(parts),
        partition_size,
        top_k,
        mini_batch_size,
        done,
        sum(len(p.paths) for p in parts if part_file(p.name) in found),
    )


def read_partitions(plan: JobPlan) -> list[Partition]:
    """The plan's partitions, read back from ``files.parquet``."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(plan.files)))
    paths, names = table["path"].to_pylist(), table["part"].to_pylist()
    out: list[Partition] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            out.append(Partition(len(out), names[start], tuple(paths[start:i])))
            start = i
    return out


def parts_job(plan: JobPlan, partitions: list[Partition] | None = None, torch_threads: int | None = None) -> PartsJob:
    """The plan's partitions (``partitions`` when already read) as a job of the parts engine
    (tasks/parts.py): part ``<name>.parquet`` in ``<out>/parts`` is :func:`score_partition` of the
    partition's files; a bad model or a failing store ends the job at once."""
    layout = JobLayout(plan.out)
    model = plan.model.for_workers()
    partitions = read_partitions(plan) if partitions is None else partitions
    return PartsJob(
        layout.parts,
        tuple(
            Part(
                part_file(p.name),
                (model, list(p.paths), layout.part(p.name), plan.mini_batch_size, plan.top_k, None, torch_threads),
            )
            for p in partitions
        ),
        partition.score_partition,  # looked up now: a test may stand a failing one in
        what="partitions",
        label="score",
        fatal=_ends_job,
        incomplete=ScoringIncompleteError,
        no_workers=ScoringError,
    )


def _ends_job(exc: BaseException) -> bool:
    """A bad model or a failing store: every other partition would fail the same way."""
    return isinstance(exc, ModelFileError) or store_failure(exc)


# ---- consolidation -----------------------------------------------------------------------------


def consolidate(plan: JobPlan, extra: dict | None = None) -> dict:
    """Concatenate the parts in plan order into ``scores.parquet`` (exactly one row per
    listed image, sorted by path) and write ``summary.json``; remove parts of earlier plans
    and temporary debris. Returns the summary."""
    layout = JobLayout(plan.out)
    parts = read_partitions(plan)
    missing = parts_job(plan, parts).missing(present(layout.parts))
    if missing:
        raise ScoringIncompleteError(
            f"{len(missing)} of {len(parts)} partitions are not scored yet "
            f"(first: {posixpath.splitext(missing[0].name)[0]}); rerun the job to score them"
        )
    sink = io.BytesIO()
    tally = _Tally()
    with pq.ParquetWriter(sink, PART_SCHEMA) as writer:
        for part in parts:
            table = _read_part(layout, part)
            writer.write_table(table)
            tally.add(table)
    if tally.rows != plan.count:
        raise ScoringError(f"consolidation found {tally.rows} rows for {plan.count} images")
    storage.write_bytes(layout.scores, sink.getvalue())
    summary = {
        "images": plan.count,
        "scored": tally.rows - tally.failed,
        "failed": tally.failed,
        "ignored": plan.ignored,
        "labels": dict(sorted(tally.labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failures": tally.failures,
        "failures_listed": len(tally.failures),
        "output": layout.scores,
        "out": plan.out,
        "images_source": plan.images,
        "model": plan.model.url,
        "model_sha256": plan.model.sha256,
        "network": plan.model.network,
        "engine": plan.model.engine.engine,
        "engine_reason": plan.model.engine.reason,
        "decoder": plan.model.engine.decoder,
        "classes": plan.model.classes,
        "top_k": plan.top_k,
        "partitions": plan.partitions,
        "finished": storage.now(),
        **(extra or {}),
    }
    storage.write_json(layout.summary, summary)
    _remove_stale(plan, {part_file(p.name) for p in parts})
    return summary


def _read_part(layout: JobLayout, part: Partition) -> pa.Table:
    """A part's table, checked to hold the files the plan gives it (a damaged part is removed)."""
    url = layout.part(part.name)
    data = storage.read_bytes(url)  # a storage error propagates: the part may be fine
    try:
        table = pq.read_table(io.BytesIO(data), schema=PART_SCHEMA)
    except pa.ArrowInvalid as exc:  # damaged after it was written
        storage.remove(url)
        raise ScoringIncompleteError(
            f"part {part.name} was unreadable ({exc}) and is removed; rerun the job to score it again"
        ) from None
    if table["path"].to_pylist() != list(part.paths):
        raise ScoringError(f"part {part.name} does not hold the files the plan gives it; remove {url} and rerun")
    return table


class _Tally:
    """What the summary counts over the parts: rows, failed files (the first
    MAX_FAILURES_IN_SUMMARY listed) and images per label."""

    def __init__(self):
        self.rows = self.failed = 0
        self.failures: list[dict] = []
        self.labels: dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        errors = table["error"]
        bad = errors.is_valid()
        self.failed += int(pc.sum(bad).as_py() or 0)
        room = MAX_FAILURES_IN_SUMMARY - len(self.failures)
        if room > 0 and errors.null_count < table.num_rows:
            paths, messages = table["path"].filter(bad).to_pylist(), errors.filter(bad).to_pylist()
            self.failures += [{"path": p, "error": e} for p, e in zip(paths[:room], messages[:room])]
        for item in pc.value_counts(table["label"].drop_null()).to_pylist():
            self.labels[item["values"]] = self.labels.get(item["values"], 0) + int(item["counts"])


def _remove_stale(plan: JobPlan, keep: set[str]) -> None:
    """Parts of earlier plans (the folder changed since) and temporary debris of killed runs;
    only files named as a job names its parts (check_output refused any other)."""
    for name in present(JobLayout(plan.out).parts) - keep:
        if not is_part_file(name):
            continue
        try:
            storage.remove(storage.join(JobLayout(plan.out).parts, name))
        except FileNotFoundError:
            pass


def run_record(plan: JobPlan, results: list[PartResult], seconds: float, scoring_seconds: float = 0.0) -> dict:
    """This run's figures, for the summary: how much it scored and how fast, over the whole
    job and over the time the workers were scoring (from the first task to the last)."""
    # Only the partitions missing at planning time are submitted, so a part a task finds
    # already written was written after planning: by an attempt of this run whose worker died
    # before it reported (Dask then runs the task again). Those images count as this run's.
    processed = sum(r.images for r in results)
    return {
        "seconds": round(seconds, 3),
        "processed": processed,
        "resumed_partitions": len(plan.done),
        "images_per_second": round(processed / seconds, 2) if seconds > 0 else None,
        "scoring_seconds": round(scoring_seconds, 3),
        "images_per_second_scoring": round(processed / scoring_seconds, 2) if scoring_seconds > 0 else None,
        "decode_seconds": round(sum(r.decode_seconds for r in results), 3),
        "forward_seconds": round(sum(r.forward_seconds for r in results), 3),
    }
