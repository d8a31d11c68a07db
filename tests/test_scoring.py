"""Batch scoring (tasks/scoring/, flows/score.py, `retrain score`) on tiny generated images:
bad files become rows with an error, parts are resumable after a kill -9, one job per output
at a time, and the same code runs on a local cluster and on a separately started one."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from retrain.tasks import inference, scoring, storage
from retrain.tasks.model_file import ModelFileError, read_model_record, save_model_file
from retrain.tasks.preprocessing import load_image
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.scoring import partition
from retrain.tasks.scoring.job import run_record
from retrain.tasks.scoring.layout import is_part_file
from retrain.tasks.scoring.listing import IDENTITY_COLUMNS, LISTING_SCHEMA, changes, current_rows, version_of
from retrain.tasks.scoring.partition import ROW_SCHEMA
from tests._services import kill_group

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


def png_bytes(mode: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 128) if mode == "RGBA" else 7).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, per_class: int = 4, bad: bool = True) -> dict[str, str | None]:
    """Shapes in nested class folders plus bad files; returns file -> expected error word."""
    make_shapes_dataset(str(root), per_class=per_class, size=40, seed=3)
    expected: dict[str, str | None] = {str(p): None for p in root.rglob("*.jpg")}
    if bad:
        good = (root / "circle" / "circle_000.jpg").read_bytes()
        files = {
            "bad/corrupt.jpg": (good[:200] + b"\x00" * 300 + good[500:], None),  # may decode: any outcome but a crash
            "bad/truncated.jpg": (good[: len(good) // 2], "truncated"),
            "bad/empty.jpg": (b"", "empty"),
            "bad/text named.jpg": (b"hello, I am not an image\n", "not a readable image"),
            "odd/ünïcode alpha.png": (png_bytes("RGBA"), None),
            "odd/grey.png": (png_bytes("L"), None),
            "odd/anim.gif": (_gif(), None),
        }
        for name, (data, error) in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            expected[str(path)] = error
        (root / "notes.txt").write_text("not scored: no image extension")
        (root / ".hidden.jpg").write_bytes(good)
    return expected


def _gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("P", (20, 20), i) for i in (1, 60)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def read_scores(out: str):
    return pq.read_table(scoring.JobLayout(out).scores).to_pandas()


# The real score_partition, for the stand-ins tests put in its place. Dask pickles a stand-in by
# value, and with it any function it holds: the real one, once the module's attribute is the
# stand-in, would be pickled by value too (and cannot be: it names torch.classes). This function
# of a module is pickled by name, and calls the real one in the worker.
_SCORE_PARTITION = partition.score_partition


def real_score_partition(*args):
    return _SCORE_PARTITION(*args)


@pytest.fixture(scope="module")
def model_file(random_model_file) -> str:
    """The shared random-weights model for the CLASSES (tests/conftest.py)."""
    return random_model_file


# ---- listing and partitions -------------------------------------------------------------------


def test_listing_folder_recursively_and_list_file(tmp_path):
    expected = make_folder(tmp_path / "images")
    listing = scoring.list_images(str(tmp_path / "images"))
    assert listing.paths == sorted(expected) and len(listing.paths) == 12 + 7
    assert listing.ignored == [str(tmp_path / "images" / "notes.txt")]  # hidden files: neither
    # each file's identity from the one listing: its size and modification time, no hash
    assert listing.files.schema == LISTING_SCHEMA
    assert listing.files["size"].to_pylist() == [os.stat(p).st_size for p in listing.paths]
    assert listing.files["version"].to_pylist() == [f"mtime:{os.stat(p).st_mtime}" for p in listing.paths]
    assert listing.files["sha256"].null_count == len(listing.paths)
    hashed = scoring.list_images(str(tmp_path / "images"), verify_content=True)
    assert hashed.files["sha256"].to_pylist() == [
        hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in hashed.paths
    ]

    (tmp_path / "list.txt").write_text(
        "# two images and one that is gone\nimages/square/square_001.jpg\n\n"
        f"{tmp_path}/images/circle/circle_000.jpg\nimages/missing.jpg\n"
        "images/square/square_001.jpg\n"
    )
    listed = scoring.list_images(str(tmp_path / "list.txt"))
    assert [Path(p).name for p in listed.paths] == ["circle_000.jpg", "missing.jpg", "square_001.jpg"]
    rows = {Path(r["path"]).name: r for r in listed.files.to_pylist()}
    square = tmp_path / "images" / "square" / "square_001.jpg"
    assert rows["square_001.jpg"]["size"] == square.stat().st_size
    assert rows["square_001.jpg"]["version"] == f"mtime:{square.stat().st_mtime}"
    # a listed file that is not there: unknown identity (scored, and its row says it is missing)
    assert (rows["missing.jpg"]["size"], rows["missing.jpg"]["version"], rows["missing.jpg"]["sha256"]) == (None,) * 3
    with pytest.raises(FileNotFoundError):
        scoring.list_images(str(tmp_path / "nowhere"))


def test_version_of_takes_the_stores_own_version_from_a_listing_entry():
    # S3: the version id where the bucket keeps versions, else the ETag (not the time)
    s3 = {"name": "b/x.jpg", "size": 5, "ETag": '"9a0364b9e99bb480dd25e1f0284c8555"', "LastModified": "2026-12-05"}
    assert version_of(s3) == 'ETag:"9a0364b9e99bb480dd25e1f0284c8555"'
    assert version_of({**s3, "VersionId": "3HL4kqtJlcpXroDTDmJ"}) == "VersionId:3HL4kqtJlcpXroDTDmJ"
    assert version_of({"name": "/d/x.jpg", "size": 5, "mtime": 1796512818.25}) == "mtime:1796512818.25"  # local
    assert version_of({"name": "/x.jpg", "size": 5, "created": 1796512832.5}) == "created:1796512832.5"  # memory://
    # the key is kept in the value: an ETag and a time that print alike are not one version
    assert version_of({"etag": "17"}) != version_of({"mtime": 17}) and version_of({"mtime": 17}) == "mtime:17"
    assert version_of({"name": "x", "size": 5, "ETag": ""}) is None and version_of({}) is None


def test_a_memory_store_gives_each_write_a_new_version():
    url = "memory://listing-versions/imgs"
    storage.write_bytes(f"{url}/a.jpg", b"one")
    storage.write_bytes(f"{url}/notes.txt", b"not an image")
    before = scoring.list_images(url).files.to_pylist()
    assert [(Path(r["path"]).name, r["size"]) for r in before] == [("a.jpg", 3)]
    assert before[0]["version"].startswith("created:") and before[0]["sha256"] is None
    time.sleep(0.01)
    storage.write_bytes(f"{url}/a.jpg", b"two")  # same name, same size
    after = scoring.list_images(url, verify_content=True).files.to_pylist()
    assert after[0]["size"] == 3 and after[0]["version"] != before[0]["version"]
    assert after[0]["sha256"] == hashlib.sha256(b"two").hexdigest()


def _listing(*rows: tuple) -> pa.Table:
    """Listing rows (path, size, version, sha256)."""
    return pa.Table.from_pylist([dict(zip(LISTING_SCHEMA.names, r)) for r in rows], schema=LISTING_SCHEMA)


def _scored(*rows: tuple) -> pa.Table:
    """An output's rows (path, size, version, sha256, error; label and scores from the error)."""
    out = []
    for path, size, version, sha256, error, *score in rows:
        good = error is None
        label, value = ("circle", score[0] if score else 0.5) if good else (None, None)
        out.append(
            dict(
                path=path,
                label=label,
                score=value,
                top_labels=[label] if good else None,
                top_scores=[value] if good else None,
                error=error,
                size=size,
                version=version,
                sha256=sha256,
            )
        )
    return pa.Table.from_pylist(out, schema=ROW_SCHEMA)


def test_changes_count_new_changed_deleted_unchanged_and_retried():
    listing = _listing(
        ("a", 1, "mtime:1", None),  # unchanged
        ("b", 1, "mtime:2", None),  # changed: another version
        ("c", 1, None, None),  # version unknown: matches nothing, scored again
        ("d", 1, "mtime:4", None),  # its row failed: tried again
        ("e", 1, "mtime:5", None),  # new
        ("f", 2, "mtime:6", None),  # changed: another size, same time
    )
    scored = _scored(
        ("a", 1, "mtime:1", None, None),
        ("b", 1, "mtime:1", None, None),
        ("c", 1, None, None, None),
        ("d", 1, "mtime:4", None, "truncated image"),
        ("f", 1, "mtime:6", None, None),
        ("x", 1, "mtime:9", None, None),  # deleted
    )
    found = changes(listing, scored.select(["path", *IDENTITY_COLUMNS, "error"]))
    assert found.todo.schema == LISTING_SCHEMA and found.todo["path"].to_pylist() == ["b", "c", "d", "e", "f"]
    assert (found.new, found.changed, found.retried, found.unchanged, found.deleted) == (1, 3, 1, 1, 1)
    assert found.todo.num_rows == found.new + found.changed + found.retried

    # nothing scored yet: every file is new; the same rows again: nothing to do
    assert changes(listing, None).todo.equals(listing) and changes(listing, None).new == 6
    assert changes(_listing(("a", 1, "mtime:1", None)), scored).todo.num_rows == 0

    # verify_content compares size and hash: a new time over the same bytes is unchanged, new
    # bytes under the same size and time are changed, an unknown hash matches nothing
    hashed = _listing(("a", 1, "mtime:7", "h1"), ("b", 1, "mtime:1", "h3"), ("c", 1, "mtime:1", None))
    rows = _scored(("a", 1, "mtime:1", "h1", None), ("b", 1, "mtime:1", "h2", None), ("c", 1, "mtime:1", None, None))
    found = changes(hashed, rows, verify_content=True)
    assert found.todo["path"].to_pylist() == ["b", "c"] and (found.changed, found.unchanged) == (2, 1)
    assert changes(hashed, rows).todo["path"].to_pylist() == ["a"]  # without it: the time


def test_current_rows_keep_one_row_per_listed_file_this_runs_first():
    listing = _listing(("a", 1, "mtime:1", None), ("b", 1, "mtime:2", None), ("c", 1, None, None))
    rows = pa.concat_tables(
        [
            _scored(("b", 1, "mtime:2", None, None, 0.9), ("c", 1, None, None, None, 0.8)),  # this run's
            _scored(
                ("a", 1, "mtime:1", None, None, 0.1),
                ("b", 1, "mtime:2", None, None, 0.2),  # the same file scored earlier: dropped
                ("b", 1, "mtime:1", None, None, 0.3),  # an older version: dropped
                ("c", 1, None, None, None, 0.4),
                ("x", 1, "mtime:1", None, None, 0.5),  # deleted
            ),
        ]
    )
    kept = current_rows(rows, listing)
    assert kept.schema == ROW_SCHEMA  # the list columns too
    assert [(r["path"], r["score"], r["top_labels"]) for r in kept.to_pylist()] == [
        ("a", pytest.approx(0.1), ["circle"]),
        ("b", pytest.approx(0.9), ["circle"]),
        ("c", pytest.approx(0.8), ["circle"]),
    ]
    assert current_rows(rows.slice(2), listing)["score"].to_pylist() == pytest.approx([0.1, 0.2, 0.4])
    assert current_rows(rows.slice(0, 0), listing).num_rows == 0


def test_partition_names_depend_on_the_files_identities_and_the_salt_not_their_order():
    files = _listing(*((f"/data/img_{i:03d}.jpg", 100 + i, f"mtime:{i}", None) for i in range(10)))
    parts = scoring.partitions(files, 4, salt="m")
    assert [len(p.paths) for p in parts] == [4, 4, 2] and [p.index for p in parts] == [0, 1, 2]
    assert all(is_part_file(f"{p.name}.parquet") and p.name.startswith(f"part-{p.index:06d}-") for p in parts)
    assert parts[0].files.equals(files.slice(0, 4)) and sum((p.paths for p in parts), []) == files["path"].to_pylist()
    assert scoring.partitions(files.take(list(reversed(range(10)))), 4, salt="m") == parts  # order: no matter
    # a file of the last partition with a new version (same path, same size): only its name changes
    changed = files.set_column(2, "version", pa.array([f"mtime:{i}" for i in range(9)] + ["mtime:99"]))
    renamed = scoring.partitions(changed, 4, salt="m")
    assert [p.name for p in renamed[:2]] == [p.name for p in parts[:2]] and renamed[2].name != parts[2].name
    resized = files.set_column(1, "size", pa.array([100 + i for i in range(9)] + [1], pa.int64()))
    assert scoring.partitions(resized, 4, salt="m")[2].name != parts[2].name
    assert [p.name for p in scoring.partitions(files, 4, salt="other model")] != [p.name for p in parts]
    assert scoring.partitions(files.slice(0, 0), 4, salt="m") == []
    with pytest.raises(scoring.ScoringError, match="at least 1"):
        scoring.partitions(files, 0)


# ---- scoring a partition ------------------------------------------------------------------------


def test_partition_scoring_gives_one_row_per_file_and_errors_for_bad_ones(tmp_path, model_file):
    from retrain.tasks.evaluation import predict_scores
    from retrain.tasks.model_file import load_model_file

    expected = make_folder(tmp_path / "images")
    paths = sorted(expected) + [str(tmp_path / "images" / "vanished.jpg")]
    expected[paths[-1]] = "not found"
    inference.clear_cache()
    loads = inference.LOADS["count"]
    out = str(tmp_path / "part.parquet")
    model = scoring.WorkerModel(model_file, storage.sha256_of(model_file))
    result = scoring.score_partition(model, paths, out, mini_batch_size=3, k=2)
    table = pq.read_table(out).to_pandas()
    assert list(table["path"]) == paths and result.images == len(paths)
    for path, error in expected.items():
        row = table[table["path"] == path].iloc[0]
        if error is None and "corrupt" not in path:
            assert pd.isna(row["error"]) and row["label"] in CLASSES, (path, row["error"])
            assert len(row["top_labels"]) == 2 and row["top_labels"][0] == row["label"]
            assert row["top_scores"][0] == pytest.approx(row["score"]) and row["top_scores"][0] >= row["top_scores"][1]
        elif error is not None:
            assert pd.isna(row["label"]) and row["top_labels"] is None and error in row["error"], (path, row["error"])
    assert result.failed == int(table["error"].notna().sum()) >= 4

    # the same preprocessing and scores as evaluation / classify (the model file's own)
    good = [p for p in paths if expected.get(p) is None and "corrupt" not in p]
    loaded = load_model_file(model_file)
    pixels = torch.stack([load_image(storage.read_bytes(p), loaded.preprocessing.input_size) for p in good])
    reference = predict_scores(loaded.model, pixels, loaded.preprocessing)
    mine = table.set_index("path").loc[good]
    assert list(mine["label"]) == [CLASSES[i] for i in reference.argmax(1).tolist()]
    assert torch.allclose(torch.tensor(mine["score"].to_numpy()), reference.max(1).values, atol=1e-4)

    # a second partition in this process reuses the loaded model; an existing part is kept
    again = scoring.score_partition(model, good[:2], str(tmp_path / "p2.parquet"))
    assert again.images == 2 and inference.LOADS["count"] == loads + 1
    rescored = scoring.score_partition(model, paths, out)
    assert rescored.skipped and rescored.images == len(paths)
    # such a part was written after planning (by a lost attempt of the same run): its images
    # count as this run's, like those of the parts scored afresh
    record = run_record(SimpleNamespace(done=set()), [again, rescored], seconds=2.0)
    assert record["processed"] == 2 + len(paths) and record["resumed_partitions"] == 0


def test_models_that_do_not_fit_are_refused(tmp_path, model_file):
    record = torch.load(model_file, weights_only=True)
    wrong_classes = dict(record, classes=CLASSES + ["hexagon"])
    save_model_file(str(tmp_path / "four.pt"), wrong_classes)
    with pytest.raises(ModelFileError, match="do not fit"):
        scoring.inspect_model(str(tmp_path / "four.pt"))
    tiny = dict(record, input_size=[16, 16], preprocessing=dict(record["preprocessing"], input_size=[16, 16]))
    save_model_file(str(tmp_path / "tiny.pt"), tiny)
    with pytest.raises(ModelFileError, match="input size 16x16 does not fit"):
        scoring.inspect_model(str(tmp_path / "tiny.pt"))
    mismatch = dict(record, input_size=[224, 224])
    save_model_file(str(tmp_path / "mismatch.pt"), mismatch)
    with pytest.raises(ModelFileError, match="does not match"):
        scoring.inspect_model(str(tmp_path / "mismatch.pt"))
    make_folder(tmp_path / "images", per_class=1, bad=False)
    with pytest.raises(scoring.ScoringError, match="top-k"):
        scoring.prepare_job(model_file, str(tmp_path / "images"), str(tmp_path / "out"), top_k=4)

    # an output that holds another model's scores is refused, not mixed
    scoring.prepare_job(model_file, str(tmp_path / "images"), str(tmp_path / "out"))
    other = dict(record, metrics={"retrained": True})
    save_model_file(str(tmp_path / "other.pt"), other)
    with pytest.raises(scoring.ScoringError, match="another model"):
        scoring.prepare_job(str(tmp_path / "other.pt"), str(tmp_path / "images"), str(tmp_path / "out"))


# ---- the job: resume, lock -----------------------------------------------------------------------


def test_a_finished_job_keeps_no_parts_and_a_rerun_scores_only_what_is_new_changed_or_failed(
    tmp_path, model_file, dask_client
):
    expected = make_folder(tmp_path / "images")
    images, out = tmp_path / "images", str(tmp_path / "out")

    def job(into: str = out) -> dict:
        return scoring.score_job(model_file, str(images), into, client=dask_client, partition_size=5, mini_batch_size=4)

    first = job()
    assert first["images"] == len(expected) == first["processed"] == first["new"]
    assert (first["changed"], first["deleted"], first["unchanged"], first["retried"]) == (0, 0, 0, 0)
    assert first["scored"] + first["failed"] == len(expected) and first["ignored"] == 1
    assert first["partitions"] == 4 and sum(first["labels"].values()) == first["scored"]
    assert {f["path"] for f in first["failures"]} >= {p for p, e in expected.items() if e}
    frame = read_scores(out)
    assert list(frame["path"]) == sorted(expected)
    assert list((Path(out) / "parts").iterdir()) == []  # their rows are in scores.parquet
    # each row records what it scored: the file's identity as listed, and the scores key
    table = pq.read_table(scoring.JobLayout(out).scores)
    assert table.schema.remove_metadata() == ROW_SCHEMA
    assert table.select(LISTING_SCHEMA.names).equals(scoring.list_images(str(images)).files)
    assert table.schema.metadata[partition.SCORES_KEY].decode().endswith(":top-3")

    # the same job again: the failed files are tried again (a fresh job would), nothing else
    again = job()
    failed = first["failed"]
    assert again["processed"] == again["retried"] == failed > 0 and again["unchanged"] == len(expected) - failed
    assert (again["new"], again["changed"], again["deleted"], again["resumed_partitions"]) == (0, 0, 0, 0)
    assert again["partitions"] == 1 and list((Path(out) / "parts").iterdir()) == []
    columns = ["path", "label", "score", "error"]
    assert read_scores(out)[columns].equals(frame[columns])

    # a new image that sorts first, one replaced under the same name, one deleted
    (images / "aa_new.jpg").write_bytes((images / "square" / "square_000.jpg").read_bytes())
    replaced = images / "circle" / "circle_001.jpg"
    replaced.write_bytes((images / "triangle" / "triangle_000.jpg").read_bytes())
    (images / "square" / "square_002.jpg").unlink()
    third = job()
    assert (third["new"], third["changed"], third["deleted"], third["retried"]) == (1, 1, 1, failed)
    assert third["processed"] == 2 + failed and third["unchanged"] == len(expected) - 2 - failed
    assert third["images"] == len(expected) and list((Path(out) / "parts").iterdir()) == []
    now = read_scores(out).set_index("path")
    assert sorted(now.index) == sorted(
        set(expected) - {str(images / "square" / "square_002.jpg")} | {str(images / "aa_new.jpg")}
    )
    before = frame.set_index("path")
    for path, same_as in ((replaced, "triangle/triangle_000.jpg"), (images / "aa_new.jpg", "square/square_000.jpg")):
        assert now.loc[str(path), "label"] == before.loc[str(images / same_as), "label"]
        assert now.loc[str(path), "score"] == pytest.approx(before.loc[str(images / same_as), "score"], abs=1e-5)
    kept = [p for p in before.index if p in now.index and p != str(replaced) and pd.isna(before.loc[p, "error"])]
    assert now.loc[kept, ["label", "score"]].equals(before.loc[kept, ["label", "score"]])  # not scored again
    # ... and scores.parquet is what a fresh job on the folder as it is now writes
    job(str(tmp_path / "fresh"))
    fresh = read_scores(str(tmp_path / "fresh"))
    mine = read_scores(out)
    assert list(mine["path"]) == list(fresh["path"]) and mine["label"].equals(fresh["label"])
    assert mine["error"].equals(fresh["error"]) and mine["score"].to_numpy() == pytest.approx(
        fresh["score"].to_numpy(), nan_ok=True, abs=1e-5
    )
    assert (
        pq.read_table(scoring.JobLayout(out).scores)
        .select(LISTING_SCHEMA.names)
        .equals(pq.read_table(scoring.JobLayout(str(tmp_path / "fresh")).scores).select(LISTING_SCHEMA.names))
    )


def _rows_in(parts: list[Path]) -> tuple[int, int]:
    """(rows, rows without an error) in the parts."""
    tables = [pq.read_table(p) for p in parts]
    return sum(t.num_rows for t in tables), sum(t["error"].null_count for t in tables)


def test_a_job_stopped_before_consolidating_resumes_from_its_parts(tmp_path, model_file, dask_client):
    expected = make_folder(tmp_path / "images")
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    plan = scoring.prepare_job(model_file, images, out, partition_size=5, mini_batch_size=4)
    assert (plan.partitions, plan.new, plan.todo_images) == (4, len(expected), len(expected))
    scoring.score_missing(plan, None)  # in this process; then the run stops before consolidating
    parts = sorted((Path(out) / "parts").iterdir())
    assert len(parts) == 4 and not Path(scoring.JobLayout(out).scores).exists()

    parts[1].unlink()  # lost
    parts[2].write_bytes(b"PAR1 not really")  # damaged: removed when planning, its files scored again
    debris = Path(out) / "parts" / "part-000099-debris.parquet.tmp-0a1b2c3d"
    debris.write_bytes(b"half")
    _, usable = _rows_in([parts[0], parts[3]])  # their failed rows are tried again
    again = scoring.score_job(model_file, images, out, client=dask_client, partition_size=5, mini_batch_size=4)
    assert again["resumed_partitions"] == 2 and again["processed"] == len(expected) - usable
    # new, changed, ... count against the last finished job's scores.parquet: none yet
    assert (again["new"], again["unchanged"], again["retried"], again["images"]) == (len(expected), 0, 0, len(expected))
    assert list((Path(out) / "parts").iterdir()) == []  # the reused parts and the debris too
    frame = read_scores(out)
    assert list(frame["path"]) == sorted(expected)

    # a part of this run damaged before its consolidation: removed, with a word to rerun; the
    # rerun scores only its files and reuses the run's other parts
    for shape in ("circle", "square", "triangle"):  # three images moved: new names, old rows dropped
        (tmp_path / "images" / f"{shape}/{shape}_000.jpg").rename(tmp_path / "images" / f"z_{shape}.jpg")
    plan = scoring.prepare_job(model_file, images, out, partition_size=2)
    scoring.score_missing(plan, None)
    parts = sorted((Path(out) / "parts").iterdir())
    assert len(parts) == plan.partitions >= 2
    parts[0].write_bytes(b"PAR1 not really")
    with pytest.raises(scoring.ScoringIncompleteError, match="unreadable"):
        scoring.consolidate(plan)
    assert not parts[0].exists() and not [p for p in parts[1:] if not p.exists()]
    _, usable = _rows_in(parts[1:])
    rerun = scoring.score_job(model_file, images, out, client=dask_client, partition_size=2)
    failed = int(frame["error"].notna().sum())
    assert (rerun["new"], rerun["deleted"], rerun["retried"], rerun["changed"]) == (3, 3, failed, 0)
    assert rerun["unchanged"] == len(expected) - 3 - failed and rerun["resumed_partitions"] == len(parts) - 1
    assert rerun["processed"] == plan.todo_images - usable and rerun["images"] == len(expected)
    assert len(read_scores(out)) == len(expected) and read_scores(out)["path"].is_unique
    assert list((Path(out) / "parts").iterdir()) == []


def test_a_rerun_keeps_its_own_row_of_a_file_over_the_failed_row_of_a_stopped_run(tmp_path, model_file, dask_client):
    """A file that failed in a stopped run's part (a read error that went away: the same size and
    time, or ETag, after) is scored again; its new row, not the old failure, is the one kept,
    whatever the names of the parts sort as."""
    make_folder(tmp_path / "images", per_class=4, bad=False)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    flaky = sorted((tmp_path / "images").rglob("*.jpg"))[::2]
    saved = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in flaky}
    for f, (data, mtime) in saved.items():
        f.write_bytes(b"\0" * len(data))
        os.utime(f, ns=(mtime, mtime))
    plan = scoring.prepare_job(model_file, images, out, partition_size=12)
    scoring.score_missing(plan, None)  # one part, 6 of its 12 rows failed; then the run stops
    for f, (data, mtime) in saved.items():
        f.write_bytes(data)
        os.utime(f, ns=(mtime, mtime))
    summary = scoring.score_job(model_file, images, out, client=dask_client, partition_size=1)
    assert summary["processed"] == 6 and summary["resumed_partitions"] == 1 and summary["partitions"] == 6
    assert summary["failed"] == 0 and read_scores(out)["error"].isna().all()


def test_a_stopped_runs_part_whose_rows_all_failed_is_scored_again_under_its_own_name(tmp_path, model_file):
    """The rerun's partition of those files has the stopped part's name (same files, same
    identities): the part is scored again, not taken as done."""
    make_folder(tmp_path / "images", per_class=2, bad=False)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    saved = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (tmp_path / "images").rglob("*.jpg")}
    for f, (data, mtime) in saved.items():
        f.write_bytes(b"\0" * len(data))
        os.utime(f, ns=(mtime, mtime))
    stopped = scoring.prepare_job(model_file, images, out, partition_size=6)
    scoring.score_missing(stopped, None)  # one part, every row failed; then the run stops
    for f, (data, mtime) in saved.items():
        f.write_bytes(data)
        os.utime(f, ns=(mtime, mtime))
    summary = scoring.score_job(model_file, images, out, partition_size=6)
    assert (summary["processed"], summary["resumed_partitions"], summary["failed"]) == (6, 0, 0)
    assert read_scores(out)["error"].isna().all()


def test_a_failing_partition_fails_the_job_but_keeps_the_others(tmp_path, model_file, dask_client, monkeypatch):
    make_folder(tmp_path / "images", per_class=3, bad=False)
    out = str(tmp_path / "out")

    def crash_on_second(model, files, part, *args):
        if "part-000001-" in part:
            raise MemoryError("worker ran out of memory")
        return real_score_partition(model, files, part, *args)

    monkeypatch.setattr(partition, "score_partition", crash_on_second)
    with pytest.raises(scoring.ScoringIncompleteError, match="1 of 3 partitions failed .*MemoryError"):
        scoring.score_job(model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=4)
    assert len(list((Path(out) / "parts").glob("*.parquet"))) == 2 and not Path(scoring.JobLayout(out).scores).exists()
    monkeypatch.setattr(partition, "score_partition", _SCORE_PARTITION)
    # the rerun reuses the two parts (5 images) and scores the failed partition's 4 images
    summary = scoring.score_job(model_file, str(tmp_path / "images"), out, client=dask_client, partition_size=4)
    assert summary["processed"] == 4 and summary["resumed_partitions"] == 2 and summary["partitions"] == 1
    assert (summary["new"], summary["unchanged"]) == (9, 0)  # against scores.parquet: none yet
    assert len(read_scores(out)) == 9
    assert list((Path(out) / "parts").iterdir()) == []


def test_second_job_on_the_same_output_is_refused_until_the_first_ends(tmp_path, model_file, dask_client):
    make_folder(tmp_path / "images", per_class=2, bad=False)
    out = str(tmp_path / "out")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom retrain.tasks.scoring import lock_job\n"
            "lock_job(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)",
            out,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(scoring.ScoringLockedError, match=f"pid {holder.pid}"):
            scoring.score_job(model_file, str(tmp_path / "images"), out, client=dask_client)
        assert not Path(scoring.JobLayout(out).scores).exists()
        threading.Timer(1.0, lambda: os.kill(holder.pid, signal.SIGKILL)).start()  # dies holding it
        summary = scoring.score_job(
            model_file, str(tmp_path / "images"), out, client=dask_client, lock_wait_s=60
        )  # waits, then runs
    finally:
        holder.kill()
        holder.wait()
    assert summary["images"] == 6 and len(read_scores(out)) == 6
    assert not Path(scoring.JobLayout(out).lock).exists()


def test_lease_lock_on_a_remote_store():
    first = scoring.lock_job("memory://leases/out", lease_s=60).acquire()
    with pytest.raises(scoring.ScoringLockedError):
        scoring.lock_job("memory://leases/out", lease_s=60).acquire()
    first.release()
    with scoring.lock_job("memory://leases/out", lease_s=60):
        pass
    stale = {"host": "gone", "pid": 1, "token": "old", "since": "then", "heartbeat": time.time() - 3600}
    storage.write_json(scoring.JobLayout("memory://leases/out").lock, stale)
    with scoring.lock_job("memory://leases/out", lease_s=60):  # a lease not renewed is taken over
        assert storage.read_json(scoring.JobLayout("memory://leases/out").lock)["token"] != "old"


KILL_SCRIPT = """
import sys
from retrain.tasks.scoring import score_job

if __name__ == "__main__":
    model, images, out = sys.argv[1:4]
    score_job(model, images, out, workers=1, partition_size=2, mini_batch_size=2)
"""


@pytest.mark.services
def test_kill_9_mid_run_then_rerun_gives_exactly_one_row_per_image(tmp_path, model_file, dask_client):
    expected = make_folder(tmp_path / "images", per_class=12)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    script = tmp_path / "score_job.py"
    script.write_text(KILL_SCRIPT)
    log = open(tmp_path / "job.log", "wb")
    job = subprocess.Popen(
        [sys.executable, str(script), model_file, images, out],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    parts = Path(out) / "parts"
    total = (len(expected) + 1) // 2
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if parts.is_dir() and len(list(parts.glob("*.parquet"))) >= 2:
                break
            time.sleep(0.02)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        os.kill(job.pid, signal.SIGKILL)  # kill -9 of the scoring run
        job.wait()
        done_at_kill = len(list(parts.glob("*.parquet")))
        _wait_group_gone(job.pid)  # its Dask worker notices its parent died and exits
    finally:
        kill_group(job.pid)
        log.close()
    assert 2 <= done_at_kill < total, (done_at_kill, total)
    assert not Path(scoring.JobLayout(out).scores).exists()

    # the parts the killed run wrote are reused: only their failed rows and the rest are scored
    left = sorted(parts.glob("*.parquet"))
    _, usable = _rows_in(left)
    summary = scoring.score_job(model_file, images, out, client=dask_client, partition_size=2, mini_batch_size=2)
    frame = read_scores(out)
    assert len(frame) == len(expected) == summary["images"]
    assert frame["path"].is_unique and set(frame["path"]) == set(expected)
    assert summary["resumed_partitions"] == len(left) >= done_at_kill and summary["processed"] == len(expected) - usable
    assert list(parts.iterdir()) == []  # their rows are in scores.parquet; no debris of the killed run


@pytest.mark.services
def test_a_job_runs_on_the_local_cluster_its_caller_started_and_leaves_it_to_the_caller(tmp_path, model_file):
    """`retrain score` starts a local cluster before its flow (beside Prefect's API) and hands
    it to the flow; the job scores on it and leaves it running: its starter closes it (also when
    the flow fails before using it)."""
    from retrain.tasks.scoring.cluster import LocalClusterStart

    given = LocalClusterStart(1)
    try:
        expected = make_folder(tmp_path / "images", per_class=1, bad=False)
        out = str(tmp_path / "out")
        summary = scoring.score_job(model_file, str(tmp_path / "images"), out, cluster=given, partition_size=2)
        assert summary["images"] == summary["processed"] == len(expected)
        assert given.address().startswith("tcp://")
        # Its workers drop the heartbeat traceback a scheduler closed under them would print
        # (partition.dask_setup), and only that record.
        from distributed import Client

        with Client(given.address()) as client:  # still running after the job
            kept = client.run(_worker_logs_after_scheduler_loss)
        assert list(kept.values()) == [[False, True]]
    finally:
        given.close()


def _worker_logs_after_scheduler_loss() -> list[bool]:
    """In a worker: whether its logger lets the lost-scheduler heartbeat and another error through."""
    import logging

    log = logging.getLogger("distributed.worker")
    messages = ["Failed to communicate with scheduler during heartbeat.", "other"]
    return [bool(log.filter(log.makeRecord(log.name, logging.ERROR, __file__, 1, m, (), None))) for m in messages]


@pytest.mark.services
def test_a_dask_worker_killed_mid_job_still_gives_exactly_one_row_per_image(tmp_path, model_file):
    """kill -9 of one worker process while the job runs: its nanny starts a new one, Dask runs
    the lost task again, and the same job ends with every image once."""
    from distributed import Client, LocalCluster

    expected = make_folder(tmp_path / "images", per_class=8)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    parts = Path(out) / "parts"
    killed: list[int] = []

    def kill_one_worker_after_the_first_part(client) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (parts.is_dir() and list(parts.glob("*.parquet"))):
            time.sleep(0.02)
        pid = next(iter(client.run(os.getpid).values()))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        killer = threading.Thread(target=kill_one_worker_after_the_first_part, args=(client,), daemon=True)
        killer.start()
        summary = scoring.score_job(model_file, images, out, client=client, partition_size=2, mini_batch_size=2)
        killer.join(timeout=60)
    assert killed, "no worker was killed: the job ended before its first part was seen"
    frame = read_scores(out)
    assert len(frame) == len(expected) == summary["images"] and frame["path"].is_unique
    assert set(frame["path"]) == set(expected) and summary["processed"] == len(expected)


def _wait_group_gone(pid_group: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid_group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# ---- what to label next --------------------------------------------------------------------------


def test_to_label_lists_the_least_certain_images_as_a_label_table_run_accepts(tmp_path, model_file, dask_client):
    from retrain.tasks.labels import index_from_table

    make_folder(tmp_path / "images", per_class=2)
    images, out = tmp_path / "images", str(tmp_path / "out")
    layout = scoring.JobLayout(out)

    def job(to_label: int) -> dict:
        return scoring.score_job(model_file, str(images), out, client=dask_client, top_k=2, to_label=to_label)

    def least_certain(n: int) -> pd.DataFrame:
        """The n rows without an error of smallest top-2 margin, computed from scores.parquet."""
        scores = read_scores(out)
        good = scores[scores["error"].isna()]
        margin = good["top_scores"].map(lambda s: float(s[0] - s[1]))
        return good.assign(margin=margin).sort_values(["margin", "path"]).head(n)

    def to_label() -> pd.DataFrame:
        return pd.read_csv(layout.to_label, dtype=str, keep_default_na=False)

    first = job(4)
    assert first["failed"] > 0 and first["to_label"] == {"url": layout.to_label, "count": 4}
    table, want = to_label(), least_certain(4)
    assert list(table.columns) == ["path", "label", "predicted", "score", "second_label", "margin"]
    assert table["path"].tolist() == want["path"].tolist() and (table["label"] == "").all()
    assert table["predicted"].tolist() == want["label"].tolist()
    assert table["second_label"].tolist() == want["top_labels"].map(lambda t: t[1]).tolist()
    assert table["margin"].astype(float).tolist() == pytest.approx(want["margin"].tolist(), abs=1e-5)
    # filled in (one row left empty), it is a table `retrain run DATA --labels TABLE` takes, whatever DATA is
    filled = tmp_path / "labelled.csv"
    table.assign(label=["circle", "square", "circle", ""]).to_csv(filled, index=False)
    index = index_from_table(str(filled), str(tmp_path / "elsewhere"))
    assert index.images["path"].tolist() == table["path"].tolist()[:3]
    assert index.images["label"].tolist() == ["circle", "square", "circle"]
    assert index.skipped["reason"].str.contains("empty label").tolist() == [True]

    # a rerun that scores one new image ranks every current row; N beyond them lists them all
    (images / "aa_new.jpg").write_bytes((images / "square" / "square_000.jpg").read_bytes())
    again = job(1000)
    good = least_certain(1000)
    assert again["to_label"]["count"] == len(good) == again["scored"] and again["processed"] < again["images"]
    assert to_label()["path"].tolist() == good["path"].tolist()

    # none asked for: the earlier list (of rows no longer current) is removed
    assert job(0)["to_label"] is None and not storage.exists(layout.to_label)
    with pytest.raises(scoring.ScoringError, match="to-label"):
        job(-1)


def test_to_label_with_one_kept_score_ranks_by_the_top_score():
    from retrain.tasks.scoring.to_label import least_certain

    rows = pa.table(
        {
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "label": ["x", "y", None, "x"],
            "score": [0.6, 0.4, None, 0.9],
            "top_labels": [["x"], ["y"], None, ["x"]],
            "top_scores": [[0.6], [0.4], None, [0.9]],
            "error": [None, None, "not a readable image", None],
        },
        schema=partition.SCORES_SCHEMA,
    )
    table = least_certain(rows, 10).to_pydict()
    assert table["path"] == ["b.jpg", "a.jpg", "d.jpg"]  # margin unknown: its bound 2 * score - 1 ranks
    assert table["margin"] == table["second_label"] == [None] * 3


# ---- the flow and the command line --------------------------------------------------------------


@pytest.fixture
def dask_processes(tmp_path):
    """A `dask scheduler` and a `dask worker` (one process, one thread) on 127.0.0.1, started
    as separate processes (tests/_services.py) and stopped after the test."""
    from tests._services import dask_cluster

    with dask_cluster(tmp_path / "dask") as address:
        yield address


@pytest.fixture
def prefect_logs(prefect_api):
    """Prefect's console log handler binds the sys.stderr of the moment it is set up; set up
    during a test that captures output (capsys), it is left writing to a closed stream, and a
    flow with log_prints then fails. Point it at an open stream before flows run here."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            handler.setStream(sys.stderr)
            if hasattr(handler, "console"):
                handler.console.file = sys.stderr
    return prefect_api


def run_cli(args: list[str]) -> tuple[int, dict]:
    """``retrain ARGS`` in process; its return code and the JSON object of its last line
    (stdout redirected here rather than with capsys, see ``prefect_logs``)."""
    from contextlib import redirect_stdout

    from retrain.cli import main

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(args)
    return code, json.loads(buffer.getvalue().strip().splitlines()[-1])


def test_cli_on_a_separately_started_dask_cluster(prefect_logs, tmp_path, model_file, dask_processes):
    from distributed import Client

    expected = make_folder(tmp_path / "images")
    out = str(tmp_path / "out")
    args = [
        "score",
        model_file,
        str(tmp_path / "images"),
        "--out",
        out,
        "--dask-address",
        dask_processes,
        "--partition-size",
        "4",
        "--mini-batch-size",
        "8",
        "--top-k",
        "2",
        "--to-label",
        "3",
        "--json",
    ]
    code, result = run_cli(args)
    assert code == 0
    assert result["to_label"] == {"url": scoring.JobLayout(out).to_label, "images": 3}
    assert set(result) >= {"images", "scored", "failed", "seconds", "images_per_second", "scores_url", "engine"}
    assert result["engine"] == "torch" and "no held-out" in result["engine_reason"]  # no run beside the model
    assert result["images"] == len(expected) == result["scored"] + result["failed"]
    assert result["scores_url"] == scoring.JobLayout(out).scores and result["images_per_second"] > 0
    frame = read_scores(out)
    assert len(frame) == len(expected) and frame["top_labels"].dropna().map(len).eq(2).all()
    with Client(dask_processes) as client:  # 5 partitions, one model load in that worker
        loads = client.run(lambda: __import__("retrain.tasks.inference").tasks.inference.LOADS["count"])
    assert list(loads.values()) == [1]

    code, again = run_cli(args)  # again: only the files that failed are tried again
    assert code == 0 and again["images"] == len(expected) and list((Path(out) / "parts").iterdir()) == []
    assert again["processed"] == again["retried"] == result["failed"] and again["resumed_partitions"] == 0
    assert (again["new"], again["changed"], again["deleted"]) == (0, 0, 0)
    assert again["unchanged"] == len(expected) - result["failed"] and "note" not in again
    assert read_scores(out)[["path", "label", "error"]].equals(frame[["path", "label", "error"]])
    with Client(dask_processes) as client:  # the given cluster scored them, with the model it had
        loads = client.run(lambda: __import__("retrain.tasks.inference").tasks.inference.LOADS["count"])
    assert list(loads.values()) == [1]

    code, failed = run_cli(["score", str(tmp_path / "no-model.pt"), str(tmp_path / "images"), "--json"])
    assert code == 2 and "no model file" in failed["error"]


def test_retrain_flow_ends_with_batch_predict_on_a_local_cluster(prefect_logs, shapes_dir, tmp_path):
    from retrain.flows.pipeline import retrain_flow
    from retrain.flows.score import score_flow

    expected = make_folder(tmp_path / "to-score", per_class=3)
    store = str(tmp_path / "store")
    environ = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}
    summary = retrain_flow(
        data=shapes_dir,
        store=store,
        network="squeezenet-caffe",
        weights="none",
        options={"max_epochs": 1, "mini_batch_size": 8},
        promote=False,
        score_folder=str(tmp_path / "to-score"),
    )
    out = str(Path(summary["run"]) / "scores")
    assert summary["scores"] == scoring.JobLayout(out).scores
    frame = read_scores(out)
    assert len(frame) == len(expected) and frame["path"].is_unique
    scored = storage.read_json(scoring.JobLayout(out).summary)
    assert scored["model"] == summary["model"] and scored["images"] == len(expected)
    # the published model carries its held-out images' drift profile (tasks/drift.py); 6 of them
    # are too few for a verdict
    split = storage.read_parquet(storage.RunLayout(summary["run"]).split)
    reference = read_model_record(summary["model"])["reference"]
    assert reference["images"] == split["split"].isin(["val", "test"]).sum() == 6
    assert reference["embeddings"].shape == (6, 512) and sum(reference["label_counts"]) == 6
    assert scored["drift"]["drift"] is None and "reference holds 6 held-out images" in scored["drift"]["reason"]
    # the local cluster's workers had their own environment; this process keeps its own
    assert {k: os.environ.get(k) for k in environ} == environ

    # the flow again, by run id, into the same output: only the files that failed are tried again
    again = score_flow(model=summary["run_id"], images=str(tmp_path / "to-score"), out=out, store=store)
    assert again["processed"] == again["retried"] == scored["failed"] > 0 and again["resumed_partitions"] == 0
    assert (again["new"], again["changed"], again["deleted"]) == (0, 0, 0)
    assert again["unchanged"] == len(expected) - scored["failed"] and again["partitions"] == 1
    assert read_scores(out)[["path", "label", "error"]].equals(frame[["path", "label", "error"]])
    _assert_artifacts("score-summary", "score-progress", "score-labels", "score-drift")


def _assert_artifacts(*keys: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
    assert {a.key for a in found} >= set(keys)


def test_early_prefect_api_is_not_started_where_a_server_is_configured(monkeypatch, tmp_path):
    from retrain.early_api import api_configured, start_early_api

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    assert start_early_api() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://team:4200/api"\n[profiles.ephemeral]\n'
    )
    assert api_configured() and start_early_api() is None
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert not api_configured()
