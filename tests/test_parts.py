"""The resumable-parts engine alone (tasks/parts.py), in process and on a small in-process Dask
cluster: present parts are not computed again, a part whose computation fails is tried once
more, a store failure ends the job at once, the manifest is written last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrain.tasks import parts, storage

NAMES = [f"part-{i:03d}.bin" for i in range(6)]


def write_part(folder: str, attempts: str, name: str, fail: int = 0, error: str = "value") -> dict:
    """A part's computation: fails its first ``fail`` attempts (with a ValueError, or a store
    failure), then writes the part. Each attempt leaves a file in ``attempts``."""
    attempt = len(list(Path(attempts).glob(f"{name}.*"))) + 1
    (Path(attempts) / f"{name}.{attempt}").touch()
    if attempt <= fail:
        raise {"value": ValueError, "store": storage.StorageError}[error](f"{name}: attempt {attempt} failed")
    storage.write_bytes(storage.join(folder, name), name.encode())
    return {"name": name, "attempt": attempt}


def make_job(tmp_path: Path, failing: dict[str, tuple[int, str]] | None = None) -> tuple[parts.PartsJob, Path]:
    folder, attempts = tmp_path / "parts", tmp_path / "attempts"
    folder.mkdir(exist_ok=True)
    attempts.mkdir(exist_ok=True)
    failing = failing or {}
    job = parts.PartsJob(
        str(folder),
        tuple(parts.Part(name, (str(folder), str(attempts), name, *failing.get(name, (0, "value")))) for name in NAMES),
        write_part,
        what="test parts",
        label="test",
        manifest="manifest.json",
        manifest_record={"parts": len(NAMES)},
    )
    return job, attempts


def attempts_of(attempts: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in attempts.iterdir():
        name = f.name.rsplit(".", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.fixture(params=["in process", "dask"])
def where(request, dask_client):
    """How the job runs: the client source given to run_parts (None: in this process)."""
    return request.param, (None if request.param == "in process" else (lambda: dask_client))


def test_present_parts_are_not_computed_again_and_the_manifest_comes_last(tmp_path, where):
    mode, client = where
    job, attempts = make_job(tmp_path)
    folder = Path(job.folder)
    for name in NAMES[1::2]:  # what an interrupted run left
        (folder / name).write_bytes(b"kept")
    (folder / (NAMES[0] + storage.TMP_MARKER + "dead")).write_bytes(b"half a part")
    assert [p.name for p in job.missing(parts.present(job.folder))] == NAMES[0::2]

    seen = []
    run = parts.run_parts(job, client, lambda part, record: seen.append((part.name, record["name"])))
    assert (run.where, run.total, run.computed, run.reused) == (mode, 6, 3, 3)
    assert sorted(r["name"] for r in run.records) == NAMES[0::2]
    assert sorted(seen) == [(n, n) for n in NAMES[0::2]]
    assert attempts_of(attempts) == dict.fromkeys(NAMES[0::2], 1)
    assert all((folder / n).read_bytes() == b"kept" for n in NAMES[1::2])  # not rewritten
    assert json.loads((folder / "manifest.json").read_text()) == {"parts": 6}

    # Finished: nothing computed, no cluster asked for.
    again = parts.run_parts(job, lambda: pytest.fail("a finished job needs no cluster"))
    assert (again.computed, again.reused, again.records) == (0, 6, [])


def test_a_part_that_fails_is_tried_once_more(tmp_path, where):
    _, client = where
    job, attempts = make_job(tmp_path, {NAMES[2]: (1, "value")})
    run = parts.run_parts(job, client)
    assert run.computed == 6
    assert attempts_of(attempts) == {**dict.fromkeys(NAMES, 1), NAMES[2]: 2}
    assert parts.present(job.folder) >= {*NAMES, "manifest.json"}


def test_a_part_that_fails_twice_is_reported_after_the_others(tmp_path, where):
    mode, client = where
    job, attempts = make_job(tmp_path, {NAMES[1]: (2, "value")})
    if mode == "in process":  # its second failure ends the job, as it is
        with pytest.raises(ValueError, match="attempt 2 failed"):
            parts.run_parts(job, client)
        assert attempts_of(attempts) == {NAMES[0]: 1, NAMES[1]: 2}
    else:  # the others are computed, then the job fails with what failed first
        with pytest.raises(parts.PartsIncompleteError, match=r"1 of 6 test parts failed .*part-001.bin.*attempt 2"):
            parts.run_parts(job, client)
        assert attempts_of(attempts) == {**dict.fromkeys(NAMES, 1), NAMES[1]: 2}
    assert "manifest.json" not in parts.present(job.folder)


def test_a_store_failure_ends_the_job_at_the_first_failed_part(tmp_path, where):
    _, client = where
    job, attempts = make_job(tmp_path, {NAMES[0]: (5, "store")})
    with pytest.raises(storage.StorageError, match="part-000.bin: attempt 1 failed"):
        parts.run_parts(job, client)
    counts = attempts_of(attempts)
    assert counts[NAMES[0]] == 1  # not retried: every part would fail the same way
    # No more handed out: in process none after it; on the one-thread cluster at most the one in flight beside it.
    assert sum(counts.values()) <= 2
    assert "manifest.json" not in parts.present(job.folder)


def test_a_part_its_computation_did_not_write_fails_the_check(tmp_path):
    job, _ = make_job(tmp_path)
    job = parts.PartsJob(job.folder, job.parts, lambda *args: None, what="test parts", manifest="manifest.json")
    with pytest.raises(parts.PartsIncompleteError, match=r"test parts \['part-000.bin'"):
        parts.run_parts(job)
    assert "manifest.json" not in parts.present(job.folder)
