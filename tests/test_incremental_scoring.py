"""A rerun into the same output scores only what changed in the folder (issue 22): each case
(added, replaced, deleted, unchanged, a crash mid-rerun, an output from before file identities,
--verify-content) on a local folder, memory:// and S3 (moto), and each rerun's scores.parquet
equals what a fresh job on the folder as it is now writes.

Every job here runs on the module's in-process Dask cluster or, for a rerun without a client, in
the driver's own process (a rerun with few images to score starts no cluster): memory:// is a
store of this process only."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrain.tasks import scoring, storage
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.scoring import partition
from retrain.tasks.scoring.partition import SCORES_KEY, SCORES_SCHEMA, table_bytes
from tests.conftest import s3_environment

PARTITION_SIZE = 2
COUNTS = ("new", "changed", "deleted", "unchanged", "processed")
# What each store's listing gives as a file's version (tasks/scoring/listing.py: version_of).
VERSION_KIND = {"local": "mtime:", "memory": "created:", "s3": "ETag:"}


@dataclass
class Store:
    """A folder of images and an output on one kind of store."""

    kind: str
    base: str

    @property
    def images(self) -> str:
        return storage.join(self.base, "images")

    @property
    def out(self) -> str:
        return storage.join(self.base, "out")

    def image(self, rel: str) -> str:
        return storage.join(self.images, rel)


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.services)])
def store(request, tmp_path, monkeypatch):
    """9 tiny shapes (3 per class) in ``<base>/images`` on a local disk, memory:// or a moto
    bucket of this test's own."""
    tag = os.urandom(4).hex()
    if request.param == "local":
        base = str(tmp_path)
    elif request.param == "memory":
        base = f"memory://incremental-{tag}"
    else:
        s3fs = pytest.importorskip("s3fs")
        s3_environment(monkeypatch, request.getfixturevalue("moto"))
        s3fs.S3FileSystem().mkdir(f"incremental-{tag}")
        base = f"s3://incremental-{tag}/job"
    made = Store(request.param, base)
    make_shapes_dataset(made.images, per_class=3, size=40, seed=3)
    yield made
    if request.param == "memory":
        storage.remove(base, recursive=True)


@pytest.fixture(scope="module")
def model_file(random_model_file) -> str:
    return random_model_file


def score(store: Store, model_file: str, out: str | None = None, **options) -> dict:
    return scoring.score_job(model_file, store.images, out or store.out, partition_size=PARTITION_SIZE, **options)


def read_scores(out: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(scoring.JobLayout(out).scores)))


def row(table: pa.Table, rel: str) -> dict:
    """The row of image ``rel`` (below the images folder; a store may spell the folder's URL
    otherwise in its listing: memory:///x for memory://x)."""
    (found,) = [r for r in table.to_pylist() if r["path"].endswith(f"/images/{rel}")]
    return found


def counts(summary: dict) -> dict:
    return {k: summary[k] for k in COUNTS}


def assert_finished(out: str) -> None:
    """A finished job leaves no parts: their rows are in scores.parquet."""
    assert not storage.isdir(scoring.JobLayout(out).parts) or not storage.names_in(scoring.JobLayout(out).parts)


def assert_as_fresh(store: Store, model_file: str, dask_client) -> pa.Table:
    """The output's scores.parquet equals a fresh job's on the folder as it is now: the same
    paths, labels, scores (within 1e-5), errors and file identities; returns the fresh table."""
    fresh_out = storage.join(store.base, f"fresh-{os.urandom(3).hex()}")
    summary = score(store, model_file, fresh_out, client=dask_client)
    assert summary["new"] == summary["processed"] == summary["images"]
    fresh, rerun = read_scores(fresh_out), read_scores(store.out)
    assert rerun.schema.metadata[SCORES_KEY] == fresh.schema.metadata[SCORES_KEY]
    for name in ("path", "label", "top_labels", "error", "size", "version", "sha256"):
        assert rerun[name].to_pylist() == fresh[name].to_pylist(), name
    assert rerun["score"].to_pylist() == pytest.approx(fresh["score"].to_pylist(), abs=1e-5)
    for got, want in zip(rerun["top_scores"].to_pylist(), fresh["top_scores"].to_pylist()):
        assert got == pytest.approx(want, abs=1e-5)
    assert_finished(store.out)
    return fresh


def test_an_unchanged_folder_scores_nothing(store, model_file, dask_client):
    first = score(store, model_file, client=dask_client)
    assert counts(first) == {"new": 9, "changed": 0, "deleted": 0, "unchanged": 0, "processed": 9}
    assert_finished(store.out)
    before = read_scores(store.out)
    assert all(v.startswith(VERSION_KIND[store.kind]) for v in before["version"].to_pylist())
    summary = score(store, model_file)  # few to score: in this process, no cluster
    assert counts(summary) == {"new": 0, "changed": 0, "deleted": 0, "unchanged": 9, "processed": 0}
    assert summary["resumed_partitions"] == 0 and summary["partitions"] == 0 and "note" not in summary
    assert read_scores(store.out).equals(before)
    assert_as_fresh(store, model_file, dask_client)


def test_added_images_are_the_only_ones_scored(store, model_file, dask_client):
    score(store, model_file, client=dask_client)
    sample = storage.read_bytes(store.image("square/square_001.jpg"))
    storage.write_bytes(store.image("aaa/first.jpg"), sample)  # sorts before every other file
    storage.write_bytes(store.image("square/square_100.jpg"), storage.read_bytes(store.image("circle/circle_002.jpg")))
    summary = score(store, model_file, client=dask_client)
    assert counts(summary) == {"new": 2, "changed": 0, "deleted": 0, "unchanged": 9, "processed": 2}
    assert summary["images"] == 11 and summary["partitions"] == 1
    fresh = assert_as_fresh(store, model_file, dask_client)
    # the same bytes under another name: the same scores
    assert row(fresh, "aaa/first.jpg")["score"] == row(fresh, "square/square_001.jpg")["score"]


def test_a_replaced_image_is_scored_again(store, model_file, dask_client):
    score(store, model_file, client=dask_client)
    replaced, other = "circle/circle_000.jpg", "triangle/triangle_001.jpg"
    old = row(read_scores(store.out), replaced)
    # another class's image under the same name
    storage.write_bytes(store.image(replaced), storage.read_bytes(store.image(other)))
    summary = score(store, model_file, client=dask_client)
    assert counts(summary) == {"new": 0, "changed": 1, "deleted": 0, "unchanged": 8, "processed": 1}
    new = row(read_scores(store.out), replaced)
    fresh = assert_as_fresh(store, model_file, dask_client)
    assert new["label"] == row(fresh, replaced)["label"] == row(fresh, other)["label"]
    assert new["score"] == pytest.approx(row(fresh, other)["score"], abs=1e-5)
    assert (new["label"], new["score"]) != (old["label"], old["score"])
    assert new["version"] != old["version"]


def test_deleted_images_lose_their_rows(store, model_file, dask_client):
    score(store, model_file, client=dask_client)
    gone = ["circle/circle_001.jpg", "triangle/triangle_002.jpg"]
    for rel in gone:
        storage.remove(store.image(rel))
    summary = score(store, model_file)
    assert counts(summary) == {"new": 0, "changed": 0, "deleted": 2, "unchanged": 7, "processed": 0}
    table = read_scores(store.out)
    assert table.num_rows == summary["images"] == 7
    assert not any(p.endswith(tuple(gone)) for p in table["path"].to_pylist())
    assert_as_fresh(store, model_file, dask_client)


def test_added_replaced_and_deleted_at_once(store, model_file, dask_client):
    score(store, model_file, client=dask_client)
    storage.write_bytes(store.image("0/first.jpg"), storage.read_bytes(store.image("square/square_000.jpg")))
    storage.write_bytes(store.image("zzz/last.jpg"), storage.read_bytes(store.image("circle/circle_001.jpg")))
    storage.write_bytes(
        store.image("square/square_002.jpg"), storage.read_bytes(store.image("triangle/triangle_000.jpg"))
    )
    storage.remove(store.image("circle/circle_002.jpg"))
    summary = score(store, model_file)  # in this process: 3 images in 2 partitions
    assert counts(summary) == {"new": 2, "changed": 1, "deleted": 1, "unchanged": 7, "processed": 3}
    assert summary["partitions"] == 2 and summary["images"] == 10
    fresh = assert_as_fresh(store, model_file, dask_client)
    assert row(fresh, "square/square_002.jpg")["score"] == row(fresh, "triangle/triangle_000.jpg")["score"]


# Module level, not a closure over the real one: Dask pickles the task's function, by reference
# when it can be imported by name; a stand-in that holds the real score_partition (no longer
# importable by name while patched) would have it pickled by value, torch's globals with it.
REAL_SCORE_PARTITION = partition.score_partition


def crash_on_second(model, files, part, *args):
    if "part-000001-" in part:
        raise MemoryError("worker ran out of memory")
    return REAL_SCORE_PARTITION(model, files, part, *args)


def test_a_rerun_that_crashes_resumes_with_the_rest(store, model_file, dask_client, monkeypatch):
    score(store, model_file, client=dask_client)
    make_shapes_dataset(storage.join(store.images, "more"), per_class=2, size=40, seed=4)  # 6 new: 3 parts
    storage.remove(store.image("square/square_002.jpg"))
    monkeypatch.setattr(partition, "score_partition", crash_on_second)
    with pytest.raises(scoring.ScoringIncompleteError, match="1 of 3 partitions failed"):
        score(store, model_file, client=dask_client)
    assert len(storage.names_in(scoring.JobLayout(store.out).parts)) == 2
    monkeypatch.setattr(partition, "score_partition", REAL_SCORE_PARTITION)
    summary = score(store, model_file)  # in this process
    # counted against the last finished job's rows; scored now: the crashed part's 2 images only
    assert counts(summary) == {"new": 6, "changed": 0, "deleted": 1, "unchanged": 8, "processed": 2}
    assert summary["resumed_partitions"] == 2 and summary["images"] == 14
    assert_as_fresh(store, model_file, dask_client)


def test_an_output_from_before_file_identities_is_scored_afresh(store, model_file, dask_client):
    score(store, model_file, client=dask_client)
    layout = scoring.JobLayout(store.out)
    old = read_scores(store.out).select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA).replace_schema_metadata(None)
    storage.write_bytes(layout.scores, table_bytes(old))  # as jobs wrote it before (6 columns)
    old_part = layout.part("part-000000-0123456789ab")  # and a part such a job left behind
    storage.write_bytes(old_part, table_bytes(old.slice(0, PARTITION_SIZE)))
    summary = score(store, model_file)
    assert "\n" not in summary["note"] and "written before scores recorded which file" in summary["note"]
    assert counts(summary) == {"new": 9, "changed": 0, "deleted": 0, "unchanged": 0, "processed": 9}
    assert not storage.exists(old_part)
    assert_as_fresh(store, model_file, dask_client)
    assert "note" not in score(store, model_file)  # written anew: the next rerun reuses it


def test_verify_content_sees_a_rewrite_that_keeps_size_and_time(tmp_path, model_file, dask_client):
    images = tmp_path / "images"
    make_shapes_dataset(str(images), per_class=1, size=40, seed=3)
    out = str(tmp_path / "out")

    def rerun(verify: bool) -> dict:
        return scoring.score_job(model_file, str(images), out, partition_size=PARTITION_SIZE, verify_content=verify)

    first = scoring.score_job(
        model_file, str(images), out, partition_size=PARTITION_SIZE, verify_content=True, client=dask_client
    )
    assert first["verify_content"] and all(read_scores(out)["sha256"].to_pylist())
    target = images / "circle" / "circle_000.jpg"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other bytes, the same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert counts(rerun(False)) == {"new": 0, "changed": 0, "deleted": 0, "unchanged": 3, "processed": 0}
    assert counts(rerun(True)) == {"new": 0, "changed": 1, "deleted": 0, "unchanged": 2, "processed": 1}
    assert counts(rerun(True))["unchanged"] == 3
