"""The scoring job in the driver: list the images with their identities, compare them with the
rows the output holds, cut the files to score into partitions and write the plan; after the
workers, consolidate into ``scores.parquet``, ``to_label.csv`` and ``summary.json``.

An output is kept in step with its folder: a rerun scores exactly the images that are new,
changed (their size, version or hash: tasks/scoring/listing.py) or failed before, keeps the
rows of the others and drops those of deleted images, so ``scores.parquet`` is what a fresh
job on the folder as it is now would write. A part's name digests its files' identities (and
the model, engine and top-k), and a part written before a crash or a kill -9 is reused by the
rerun: that is what makes a job resumable.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrain.tasks import storage
from retrain.tasks.drift import embedding_rate, judge
from retrain.tasks.engine_gate import EngineChoice, choose_engine
from retrain.tasks.inference import load_checked
from retrain.tasks.model_file import ModelFileError, read_model_record
from retrain.tasks.parts import Part, PartsJob, present, store_failure
from retrain.tasks.scoring import partition
from retrain.tasks.scoring.layout import (
    DEFAULT_MINI_BATCH_SIZE,
    DEFAULT_PARTITION_SIZE,
    DEFAULT_TO_LABEL,
    DEFAULT_TOP_K,
    JobLayout,
    ScoringError,
    ScoringIncompleteError,
    is_part_file,
    part_file,
)
from retrain.tasks.scoring.listing import IDENTITY_COLUMNS, changes, current_rows, list_images
from retrain.tasks.scoring.partition import (
    PART_SCHEMA,
    ROW_SCHEMA,
    SCORES_KEY,
    PartResult,
    WorkerModel,
    scores_key,
    table_bytes,
)
from retrain.tasks.scoring.to_label import write_to_label

MAX_FAILURES_IN_SUMMARY = 1000

# ---- partitions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    index: int
    name: str  # part-<index>-<digest of the files' identities and the scores key>
    files: pa.Table  # listing rows (LISTING_SCHEMA)

    @property
    def paths(self) -> list[str]:
        return self.files["path"].to_pylist()


def partitions(files: pa.Table, size: int = DEFAULT_PARTITION_SIZE, salt: str = "") -> list[Partition]:
    """Cut the files to score (listing rows) into consecutive partitions of ``size`` files, in
    path order. The names digest the files' identities and ``salt`` (the scores key), so the same
    files to score map to the same parts: a rerun after a crash finds them."""
    if size < 1:
        raise ScoringError(f"partition size must be at least 1, not {size}")
    files = files.sort_by("path")
    identity = [files[c].to_pylist() for c in files.column_names]
    out = []
    for index, start in enumerate(range(0, files.num_rows, size)):
        rows = zip(*(column[start : start + size] for column in identity))
        digest = hashlib.sha1("\n".join((salt, *map(repr, rows))).encode("utf-8")).hexdigest()[:12]
        out.append(Partition(index, f"part-{index:06d}-{digest}", files.slice(start, size)))
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
    reference: bool = False  # the model file carries a drift reference profile (tasks/drift.py)

    def for_workers(self) -> WorkerModel:
        e = self.engine
        return WorkerModel(self.url, self.sha256, e.engine, e.onnx_url, e.decoder)


def inspect_model(model_url: str, engine: str = "auto") -> ModelInfo:
    """Load and check the model once in the driver, so a bad model fails the job before any
    worker starts, with the reason; choose its engine (validating it the first time)."""
    sha256 = storage.sha256_of(model_url)
    loaded, record = load_checked(model_url)
    return ModelInfo(
        model_url,
        sha256,
        loaded.spec.name,
        list(loaded.classes),
        tuple(loaded.preprocessing.input_size),
        loaded.preprocessing.to_dict(),
        choose_engine(model_url, sha256, engine),
        bool(record.get("reference")),
    )


# ---- the job: plan ---------------------------------------------------------------------------------


@dataclass
class JobPlan:
    """What the flow's tasks hand each other: URLs and counts, not the file list."""

    out: str
    model: ModelInfo
    images: str
    files: str  # URL of files.parquet: the listing, each file to score with its partition
    count: int
    ignored: int
    partitions: int
    partition_size: int
    top_k: int
    mini_batch_size: int
    done: list[str] = field(default_factory=list)  # parts of a stopped run, found and reused
    done_images: int = 0  # images with a usable row already (nothing to score)
    # Against the last finished job's scores.parquet:
    new: int = 0
    changed: int = 0
    retried: int = 0  # files whose earlier row is a failure
    deleted: int = 0
    unchanged: int = 0
    verify_content: bool = False
    note: str | None = None  # why the output's earlier rows are not reused, when they are not
    to_label: int = DEFAULT_TO_LABEL  # rows of to_label.csv (0: none)
    embedding_rate: float = 0.0  # share of the images to score whose embeddings the parts keep

    @property
    def missing(self) -> int:
        """Partitions not scored when the plan was made."""
        return self.partitions

    @property
    def todo_images(self) -> int:
        return self.count - self.done_images

    @property
    def key(self) -> str:
        """The scores key every reused row must have (partition.scores_key)."""
        return scores_key(self.model.for_workers(), self.top_k)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_top_k(top_k: int | None, classes: list[str]) -> int:
    if top_k is None:
        return min(DEFAULT_TOP_K, len(classes))
    if not 1 <= top_k <= len(classes):
        raise ScoringError(f"top-k must be between 1 and the model's {len(classes)} classes, not {top_k}")
    return top_k


def check_settings(mini_batch_size: int, partition_size: int, to_label: int = DEFAULT_TO_LABEL) -> None:
    if mini_batch_size < 1:
        raise ScoringError(f"mini-batch size must be at least 1, not {mini_batch_size}")
    if partition_size < 1:
        raise ScoringError(f"partition size must be at least 1, not {partition_size}")
    if to_label < 0:
        raise ScoringError(f"to-label must be 0 (none) or more images, not {to_label}")


def prepare_job(
    model_url: str,
    images: str,
    out: str,
    top_k: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    mini_batch_size: int = DEFAULT_MINI_BATCH_SIZE,
    model: ModelInfo | None = None,
    engine: str = "auto",
    verify_content: bool = False,
    to_label: int = DEFAULT_TO_LABEL,
) -> JobPlan:
    """Check the model, list the images with their identities, compare them with the rows the
    output holds (scores.parquet, and the parts of a run that stopped), cut the files to score
    (new, changed, failed before) into partitions and write ``job.json`` and ``files.parquet``.
    An output that already holds another model's scores is refused. ``to_label``: the least
    certain images consolidation lists in ``to_label.csv`` (0: none)."""
    check_settings(mini_batch_size, partition_size, to_label)
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
    listing = list_images(images, verify_content=verify_content)
    key = scores_key(model.for_workers(), top_k)
    earlier = earlier_rows(layout, key, columns=["path", *IDENTITY_COLUMNS, "error"])
    found = changes(listing.files, earlier.scores_rows, verify_content)
    # What a stopped run scored already is not scored again.
    todo = changes(found.todo, earlier.parts_rows, verify_content).todo if earlier.parts else found.todo
    parts = partitions(todo, partition_size, salt=key)
    # A stopped run's part named as a planned one holds the same files, all to score again: each
    # of its rows failed. Removed, so that it is scored again rather than taken as done.
    retry = {part_file(p.name) for p in parts} & set(earlier.parts)
    for name in retry:
        storage.remove(storage.join(layout.parts, name))
    part_of = {path: p.name for p in parts for path in p.paths}
    storage.write_bytes(
        layout.files,
        table_bytes(
            listing.files.append_column("part", pa.array([part_of.get(u) for u in listing.paths], type=pa.string()))
        ),
    )
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
            "count": listing.files.num_rows,
            "ignored": len(listing.ignored),
            "to_score": todo.num_rows,
            "partitions": len(parts),
            "partition_size": partition_size,
            "top_k": top_k,
            "verify_content": verify_content,
            "updated": storage.now(),
        },
    )
    return JobPlan(
        out,
        model,
        images,
        layout.files,
        listing.files.num_rows,
        len(listing.ignored),
        len(parts),
        partition_size,
        top_k,
        mini_batch_size,
        [name for name in earlier.parts if name not in retry],
        listing.files.num_rows - todo.num_rows,
        found.new,
        found.changed,
        found.retried,
        found.deleted,
        found.unchanged,
        verify_content,
        earlier.note,
        to_label,
        embedding_rate(todo.num_rows) if model.reference else 0.0,
    )


@dataclass
class EarlierRows:
    parts_rows: pa.Table | None  # of the parts a run that stopped before consolidating wrote
    parts: list[str]  # those part files
    scores_rows: pa.Table | None  # of scores.parquet: the last finished job's
    note: str | None = None  # why scores.parquet's rows are not reused, when they are not

    @property
    def rows(self) -> pa.Table | None:
        """Every usable row: the parts' first (the newer), then scores.parquet's."""
        tables = [t for t in (self.parts_rows, self.scores_rows) if t is not None]
        return pa.concat_tables(tables) if tables else None


def earlier_rows(
    layout: JobLayout, key: str, columns: list[str] | None = None, first: frozenset[str] = frozenset()
) -> EarlierRows:
    """The rows the output holds that were scored with ``key`` (the model, engine, decoder and
    top-k of this job): each part's (written by a run that stopped before consolidating; a
    damaged part, or one of other settings, is removed: it is this job's file and of no use),
    then scores.parquet's. ``columns``: only these (the plan needs no scores). ``first``: the
    part files read before the others (this run's: its row of a file that failed in a stopped
    run's part is the one kept, whatever the parts' names sort as)."""
    tables, used = [], []
    for name in sorted(present(layout.parts), key=lambda n: (n not in first, n)):
        if not is_part_file(name) or storage.TMP_MARKER in name:
            continue
        table = _read_rows(storage.join(layout.parts, name), key, columns)
        if table is None:
            storage.remove(storage.join(layout.parts, name))
            continue
        tables.append(table)
        used.append(name)
    scores, note = None, None
    if storage.exists(layout.scores):
        scores = _read_rows(layout.scores, key, columns)
        if scores is None:
            note = _why_not_reused(layout.scores, key)
    return EarlierRows(pa.concat_tables(tables) if tables else None, used, scores, note)


def _read_rows(url: str, key: str, columns: list[str] | None) -> pa.Table | None:
    """The rows (ROW_SCHEMA, or ``columns`` of it) of a part or scores.parquet, if they carry
    file identities and were scored with ``key``; None otherwise."""
    try:
        file = pq.ParquetFile(io.BytesIO(storage.read_bytes(url)))
        schema = file.schema_arrow
        if (schema.metadata or {}).get(SCORES_KEY, b"").decode() != key or schema.remove_metadata() not in (
            ROW_SCHEMA,
            PART_SCHEMA,
        ):
            return None
        return file.read(columns=columns or ROW_SCHEMA.names).replace_schema_metadata(None)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError) or (isinstance(exc, OSError) and store_failure(exc)):
            raise
        return None


def _why_not_reused(url: str, key: str) -> str:
    try:
        schema = pq.read_schema(io.BytesIO(storage.read_bytes(url)))
    except (pa.ArrowInvalid, OSError):
        return f"{url} is unreadable: every image is scored afresh"
    if "version" not in schema.names:
        return f"{url} was written before scores recorded which file they scored: every image is scored afresh"
    return (
        f"{url} holds scores of other settings ({(schema.metadata or {}).get(SCORES_KEY, b'').decode()}; "
        f"this job: {key}): every image is scored afresh"
    )


def read_partitions(plan: JobPlan) -> list[Partition]:
    """The plan's partitions, read back from ``files.parquet``."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(plan.files)))
    todo = table.filter(pc.is_valid(table["part"]))
    names = todo["part"].to_pylist()
    files = todo.drop_columns(["part"])
    out: list[Partition] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            out.append(Partition(len(out), names[start], files.slice(start, i - start)))
            start = i
    return out


def listed_files(plan: JobPlan) -> pa.Table:
    """The listing the plan was made from (LISTING_SCHEMA)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(plan.files))).drop_columns(["part"])


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
                (
                    model,
                    p.files,
                    layout.part(p.name),
                    plan.mini_batch_size,
                    plan.top_k,
                    None,
                    torch_threads,
                    plan.embedding_rate,
                ),
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
    """Write ``scores.parquet``: exactly one row per listed image, sorted by path, taken from
    this run's parts, the parts of a run that stopped, and the earlier scores.parquet, each row
    the score of the file as it is now; ``to_label.csv``, ranked over all those rows; and
    ``summary.json``. Then remove the parts (their rows are in scores.parquet now) and
    temporary debris. Returns the summary."""
    layout = JobLayout(plan.out)
    parts = read_partitions(plan)
    missing = parts_job(plan, parts).missing(present(layout.parts))
    if missing:
        raise ScoringIncompleteError(
            f"{len(missing)} of {len(parts)} partitions are not scored yet "
            f"(first: {posixpath.splitext(missing[0].name)[0]}); rerun the job to score them"
        )
    for part in parts:  # this run's parts: each readable and holding the files it was given
        _check_part(layout, part, plan.key)
    listing = listed_files(plan)
    earlier = earlier_rows(layout, plan.key, first=frozenset(part_file(p.name) for p in parts))
    rows = current_rows(earlier.rows, listing, plan.verify_content) if earlier.rows is not None else None
    if rows is None or rows.num_rows != plan.count:
        raise ScoringError(f"consolidation found {0 if rows is None else rows.num_rows} rows for {plan.count} images")
    tally = _Tally()
    tally.add(rows)
    storage.write_bytes(
        layout.scores, table_bytes(rows.cast(ROW_SCHEMA).replace_schema_metadata({SCORES_KEY: plan.key}))
    )
    to_label = write_to_label(rows, layout.to_label, plan.to_label)
    drift = judge_drift(plan, layout, earlier.parts)
    summary = {
        "images": plan.count,
        "scored": tally.rows - tally.failed,
        "failed": tally.failed,
        "ignored": plan.ignored,
        "new": plan.new,
        "changed": plan.changed,
        "deleted": plan.deleted,
        "unchanged": plan.unchanged,
        "retried": plan.retried,
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
        "verify_content": plan.verify_content,
        "partitions": plan.partitions,
        "to_label": to_label,
        "drift": drift,
        **({"note": plan.note} if plan.note else {}),
        "finished": storage.now(),
        **(extra or {}),
    }
    storage.write_json(layout.summary, summary)
    _remove_parts(layout)
    return summary


def judge_drift(plan: JobPlan, layout: JobLayout, parts: list[str]) -> dict:
    """``drift.json`` (and, when it finds drift, ``drift.png``): the images this job scored (the
    rows of ``parts``: this run's and a stopped run's, not the earlier scores.parquet's) against
    the model's reference profile (tasks/drift.py). Returns what drift.json holds."""
    started = time.perf_counter()
    reference = read_model_record(plan.model.url).get("reference") if plan.model.reference else None
    counts: Counter[str] = Counter()
    confidence, embeddings = [], []
    for name in parts if reference else []:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(layout.parts, name))))
        good = table.filter(pc.is_null(table["error"]))
        counts.update({item["values"]: item["counts"] for item in pc.value_counts(good["label"]).to_pylist()})
        confidence.append(good["score"].to_numpy())
        kept = good["embedding"].drop_null() if "embedding" in good.column_names else []
        if len(kept):
            embeddings.append(pc.list_flatten(kept).to_numpy().reshape(len(kept), -1))
    scores = np.concatenate(confidence) if confidence else np.empty(0, dtype=np.float32)
    sample = np.concatenate(embeddings) if embeddings else None
    result = judge(reference, plan.model.classes, dict(counts), scores, sample)
    # The chart where someone will look at it: drawing it (matplotlib) costs ~1-1.5 s a job
    if result["drift"]:
        from retrain.tasks.reports import drift_chart

        result["plot"] = drift_chart(result, reference, scores, sample, layout.drift_plot)
    elif storage.exists(layout.drift_plot):  # an earlier run's, of images this verdict is not about
        storage.remove(layout.drift_plot)
    result["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_json(layout.drift, result)
    return result


def _check_part(layout: JobLayout, part: Partition, key: str) -> None:
    """A part of this run is readable, of this job's settings and holds the files the plan gives
    it; a damaged one is removed (the rerun scores it again)."""
    url = layout.part(part.name)
    data = storage.read_bytes(url)  # a storage error propagates: the part may be fine
    try:
        file = pq.ParquetFile(io.BytesIO(data))
        paths = file.read(columns=["path"])["path"].to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:  # damaged after it was written
        storage.remove(url)
        raise ScoringIncompleteError(
            f"part {part.name} was unreadable ({exc}) and is removed; rerun the job to score it again"
        ) from None
    if paths != part.paths or (file.schema_arrow.metadata or {}).get(SCORES_KEY, b"").decode() != key:
        raise ScoringError(f"part {part.name} does not hold the files the plan gives it; remove {url} and rerun")


class _Tally:
    """What the summary counts over the rows: rows, failed files (the first
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


def _remove_parts(layout: JobLayout) -> None:
    """The parts, once scores.parquet holds their rows, and temporary debris of killed runs;
    only files named as a job names its parts (check_output refused any other)."""
    for name in present(layout.parts):
        if not is_part_file(name):
            continue
        try:
            storage.remove(storage.join(layout.parts, name))
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
        "gpu_decoded": sum(r.gpu_decoded for r in results),  # JPEGs decoded by nvJPEG
    }
