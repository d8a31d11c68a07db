"""Scoring that follows the folder: a rerun into the same ``--out`` scores only what changed, and
its scores.parquet equals a fresh job's on the folder as it is now (issue 22's "Must show").

The data: ``--count`` JPEG photos of mixed sizes (300-1000 px; random crops, flips and resizes
of the hymenoptera photos in ../shared, bench_score's ``make_photos``), and 70 more kept aside
for the changes. The model: SqueezeNet (the Caffe ImageNet weights in ../shared/weights)
retrained on hymenoptera train/ by ``retrain run`` (transfer mode), its engines validated once
(``retrain evaluate --engine auto``, outside the timed steps), or ``--model``. All in one run,
with ``retrain server`` up (its own PREFECT_HOME in the benchmark's temporary folder; every
``retrain`` command below runs in its resident process: an untimed one-image ``retrain
classify`` before each step waits for it, as it restarts when the code changed), first on a
local folder, then on a bucket of moto's S3 server (photos and output in S3, the model local),
each step ``retrain score MODEL IMAGES --out OUT --json`` in a fresh process, timed by its
process wall:

1. first job: every photo scored into OUT (wall W1);
2. the folder changes: 50 photos added (10 of them named to sort before every other file, the
   rest between existing ones), 20 replaced by other photos under the same names, 30 deleted;
3. rerun into OUT (wall W2): it must process exactly 70 images (new 50, changed 20, deleted 30,
   unchanged 4,950);
4. a fresh job on the final folder into OUT2; OUT's and OUT2's scores.parquet compared: the same
   paths, labels, top labels and identity columns (size, version, sha256), and the largest score
   difference (0 expected: the same engine scores the same bytes);
5. rerun into OUT with nothing changed (wall W3): processed 0.

What counts: the checks (all must pass; the exit status is 1 otherwise) and W2/W1, the goal
<= 0.1. Where the rerun's seconds go comes from its summary.json: the job's own seconds (plan:
model check, engine, listing and diff; scoring; the cluster wait), the rest of the process wall
being the command's start, the hand-over to the resident process, the Prefect flow run and the
consolidation. Other work on the machine makes absolute figures noisy; the load average and
CPU model are printed beside them, and everything goes to a JSON record (``--json-out``, else
benchmarks/results/incremental-<time>.json). Run from the project root:

    .venv/bin/python benchmarks/bench_incremental.py                 # the issue's 5,000/50/20/30
    .venv/bin/python benchmarks/bench_incremental.py --count 300     # quicker: changes scaled down
    .venv/bin/python benchmarks/bench_incremental.py --no-s3 --model RUN/model.pt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests._services: the moto server and `retrain server` helpers

from bench_score import BIN, PHOTOS, WEIGHTS, cli, make_photos, train_model  # noqa: E402

from tests._services import local_retrain_server, moto_s3  # noqa: E402

# The folder and changes; --count scales the changes with it (debugging only).
COUNT, ADDED, REPLACED, DELETED = 5000, 50, 20, 30
GOAL = 0.1  # the rerun's wall against the first job's
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The resident process's log: a line per command it runs, one each time it is ready.
COMMAND_LINE, READY_LINE = r"pid \d+: retrain ", r" ready at "
# The rerun's figures from its summary.json (ScoringRun and run_record write them).
SUMMARY_SECONDS = (
    "seconds",
    "plan_seconds",
    "cluster_wait_seconds",
    "scoring_seconds",
    "decode_seconds",
    "forward_seconds",
)


# ---- the folder and its changes ---------------------------------------------------------------


def photos(work: Path, count: int, spare: int) -> tuple[Path, list[Path]]:
    """``count`` photos in ``work/photos`` and ``spare`` more (other crops, other sizes) set aside
    for the changes: one make_photos call, its last files moved out."""
    made = make_photos(work, [count + spare])[count + spare]
    files = sorted(made.rglob("*.jpg"))
    aside = work / "spare"
    aside.mkdir()
    kept = []
    for f in files[count:]:
        kept.append(f.rename(aside / f.name))
    return made.rename(work / "photos"), kept


def plan_changes(names: list[str], spare: list[Path], added: int, replaced: int, deleted: int) -> dict:
    """Which names are added (from which spare photo), replaced (by which) and deleted. The first
    fifth of the added names sort before every other file ("000/000_new_..." before
    "000/photo_..."); the others sort right after an existing photo ("photo_001234b.jpg"), so
    additions land all through the sorted list."""
    rng = random.Random(22)
    chosen = rng.sample(names, replaced + deleted)
    first = max(1, added // 5)
    new = [f"000/000_new_{i:03d}.jpg" for i in range(first)]
    new += [n.replace(".jpg", "b.jpg") for n in rng.sample(names, added - first)]
    return {
        "added": dict(zip(new, spare[:added])),
        "replaced": dict(zip(chosen[:replaced], spare[added:])),
        "deleted": chosen[replaced:],
    }


def apply_changes(fs, root: str, changes: dict) -> None:
    """Make the planned changes below ``root`` of the fsspec filesystem ``fs`` (local or S3)."""
    for name, source in {**changes["added"], **changes["replaced"]}.items():
        fs.put_file(str(source), f"{root}/{name}")
    fs.rm([f"{root}/{name}" for name in changes["deleted"]])


# ---- one scoring step --------------------------------------------------------------------------


def resident_log(home: Path, pattern: str) -> int:
    """How many lines of the resident process's log match ``pattern``."""
    log = home / "retrain-resident.log"
    return len(re.findall(pattern, log.read_text())) if log.exists() else 0


def resident_ready(env: dict, home: Path, probe: list[str], timeout: float = 180) -> bool:
    """Whether the resident process runs commands now, waiting for it when it does not yet: it
    imports torch, Prefect and Dask after ``retrain server start``, and a command that finds the
    code changed since it started runs in its own process and starts a fresh one. ``probe``: a
    quick command (a one-image classify) that tells, untimed, before each timed step."""
    from retrain.resident import socket_path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ran, readies = resident_log(home, COMMAND_LINE), resident_log(home, READY_LINE)
        if os.path.exists(socket_path(home)):
            subprocess.run([str(BIN / "retrain"), *probe], env=env, capture_output=True, cwd=ROOT)
            if resident_log(home, COMMAND_LINE) > ran:
                return True
        while resident_log(home, READY_LINE) == readies and time.monotonic() < deadline:
            time.sleep(0.5)
    return False


def score(images: str, out: str, ctx: dict) -> dict:
    """``retrain score`` in a fresh process: its JSON, process wall, and whether it ran in the
    resident process."""
    env, home = ctx["env"], ctx["home"]
    resident_ready(env, home, ctx["probe"])
    before = resident_log(home, COMMAND_LINE)
    result, wall = cli(["score", ctx["model"], images, "--score-out", out, "--engine", ctx["engine"]], env)
    ran = resident_log(home, COMMAND_LINE) > before
    return {**result, "wall_seconds": round(wall, 3), "in_resident": ran, "load": os.getloadavg()[0]}


def read_scores(fs, out: str):
    import pyarrow.parquet as pq

    fs.invalidate_cache()  # what retrain wrote since, not this process's listing of before
    with fs.open(f"{out}/scores.parquet", "rb") as f:
        return pq.read_table(f)


def compare(a, b) -> dict:
    """Two scores.parquet tables: the same rows, labels, top labels and identity columns, and the
    largest score difference."""
    import numpy as np

    same_paths = a["path"].to_pylist() == b["path"].to_pylist()
    result = {"rows": [a.num_rows, b.num_rows], "same_paths": same_paths}
    for column in ("label", "top_labels", "size", "version", "sha256", "error"):
        result[f"same_{column}"] = same_paths and a[column].to_pylist() == b[column].to_pylist()
    if same_paths:
        sa, sb = (np.array(t["score"].to_pylist(), dtype=float) for t in (a, b))
        result["max_score_difference"] = float(np.nanmax(np.abs(sa - sb))) if len(sa) else 0.0
        ta, tb = (np.array(t["top_scores"].to_pylist(), dtype=float) for t in (a, b))
        result["max_top_score_difference"] = float(np.nanmax(np.abs(ta - tb))) if ta.size else 0.0
    return result


# ---- a whole scenario (local folder or S3 bucket) ----------------------------------------------


def scenario(what: str, fs, images: str, outs: tuple[str, str], setup, ctx: dict) -> dict:
    """The first job, the changes, the rerun, the fresh job, the comparison and the no-change
    rerun, on ``images`` (a folder of ``fs``, filled by ``setup()``) with outputs ``outs``."""
    changes, sizes = ctx["changes"], ctx["sizes"]
    out, fresh_out = outs
    root = fs._strip_protocol(images)
    record: dict = {"images": images, "out": out}
    started = time.perf_counter()
    setup()
    record["upload_seconds"] = round(time.perf_counter() - started, 1)

    first = score(images, out, ctx)
    record["first"] = first
    print(f"[{what}] first job: {first['processed']:,} images in {first['wall_seconds']:.1f} s", flush=True)
    before = read_scores(fs, out)

    apply_changes(fs, root, changes)
    rerun = score(images, out, ctx)
    with fs.open(f"{out}/summary.json") as f:
        rerun["summary"] = {k: v for k, v in json.load(f).items() if k in SUMMARY_SECONDS}
    record["rerun"] = rerun
    print(
        f"[{what}] rerun: processed {rerun['processed']} (new {rerun['new']}, changed {rerun['changed']}, "
        f"deleted {rerun['deleted']}, unchanged {rerun['unchanged']}) in {rerun['wall_seconds']:.2f} s; "
        f"summary {rerun['summary']}",
        flush=True,
    )
    after = read_scores(fs, out)

    fresh = score(images, fresh_out, ctx)
    record["fresh"] = fresh
    record["comparison"] = compare(after, read_scores(fs, fresh_out))
    print(f"[{what}] fresh job {fresh['wall_seconds']:.1f} s; rerun vs fresh: {record['comparison']}", flush=True)

    idle = score(images, out, ctx)
    record["no_change"] = idle
    print(f"[{what}] rerun, nothing changed: processed {idle['processed']} in {idle['wall_seconds']:.2f} s", flush=True)

    # The stale-score bug the issue starts from: a replaced photo's row must be its new score.
    old = dict(zip(before["path"].to_pylist(), before["score"].to_pylist()))
    new = dict(zip(after["path"].to_pylist(), after["score"].to_pylist()))
    replaced = [p for p in new if p.endswith(tuple("/" + n for n in changes["replaced"]))]
    record["replaced_rows_rescored"] = sum(new[p] != old.get(p) for p in replaced)
    record["ratio"] = round(rerun["wall_seconds"] / first["wall_seconds"], 4)
    record["checks"] = checks(record, sizes)
    return record


def checks(record: dict, sizes: dict) -> dict:
    rerun, idle, comparison = record["rerun"], record["no_change"], record["comparison"]
    final = sizes["count"] + sizes["added"] - sizes["deleted"]
    return {
        "first_processed_all": record["first"]["processed"] == sizes["count"],
        "rerun_processed": rerun["processed"] == sizes["added"] + sizes["replaced"],
        "rerun_new": rerun["new"] == sizes["added"],
        "rerun_changed": rerun["changed"] == sizes["replaced"],
        "rerun_deleted": rerun["deleted"] == sizes["deleted"],
        "rerun_unchanged": rerun["unchanged"] == sizes["count"] - sizes["replaced"] - sizes["deleted"],
        "rerun_rows": comparison["rows"][0] == final,
        "equals_fresh_job": all(comparison[k] for k in comparison if k.startswith("same_"))
        and comparison.get("max_score_difference", 1.0) <= 1e-6,
        "replaced_rescored": record["replaced_rows_rescored"] == sizes["replaced"],
        "no_change_processed_0": idle["processed"] == 0 and idle["unchanged"] == final,
        "in_resident_process": all(record[k]["in_resident"] for k in ("first", "rerun", "fresh", "no_change")),
        "ratio_goal": record["ratio"] <= GOAL,
    }


def local_scenario(work: Path, folder: Path, ctx: dict) -> dict:
    import fsspec

    images = work / "local-photos"
    return scenario(
        "local",
        fsspec.filesystem("file"),
        str(images),
        (str(work / "out-local"), str(work / "out-local-fresh")),
        lambda: shutil.copytree(folder, images),
        ctx,
    )


def s3_scenario(work: Path, folder: Path, ctx: dict) -> dict:
    import s3fs

    with moto_s3(work) as endpoint:
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
        fs.mkdir("bench-photos")
        fs.mkdir("bench-out")
        env = {**ctx["env"], **S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        env.pop("AWS_PROFILE", None)
        return scenario(
            "s3",
            fs,
            "s3://bench-photos/photos",
            ("s3://bench-out/out", "s3://bench-out/out-fresh"),
            lambda: fs.put(f"{folder}/", "bench-photos/photos", recursive=True),
            {**ctx, "env": env},
        )


# ---- main and report ---------------------------------------------------------------------------


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    return {"cpu": model, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=COUNT, help=f"photos in the folder (default {COUNT:,})")
    parser.add_argument("--model", default=None, help="a model file to score with (default: train one)")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--no-s3", action="store_true", help="the local folder only")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if not (WEIGHTS.exists() and PHOTOS.exists()):
        sys.exit("the benchmark needs ../shared/weights and ../shared/data/hymenoptera_data")
    scale = args.count / COUNT
    sizes = {
        "count": args.count,
        "added": max(1, round(ADDED * scale)),
        "replaced": max(1, round(REPLACED * scale)),
        "deleted": max(1, round(DELETED * scale)),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-incr-"))
    results: dict = {**machine(), "sizes": sizes, "load_average_start": os.getloadavg(), "json_out": args.json_out}
    try:
        started = time.perf_counter()
        folder, spare = photos(work, sizes["count"], sizes["added"] + sizes["replaced"])
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))
        changes = plan_changes(names, spare, sizes["added"], sizes["replaced"], sizes["deleted"])
        print(f"{len(names):,} photos (+{len(spare)} aside) in {time.perf_counter() - started:.0f} s", flush=True)
        with local_retrain_server(work) as server:
            env, home = server["env"], server["home"]
            model = args.model or train_model(work / "store", env)
            if args.engine == "auto":  # the engine gate validates once per model: not in a timed step
                cli(["evaluate", model, str(PHOTOS / "val"), "--engine", "auto"], env)
            probe = ["classify", model, str(folder / names[0]), "--json"]
            ctx = {"model": model, "engine": args.engine, "env": env, "home": home, "probe": probe}
            ctx.update(changes=changes, sizes=sizes)
            results["model"] = model
            results["local"] = local_scenario(work, folder, ctx)
            if not args.no_s3:
                results["s3"] = s3_scenario(work, folder, ctx)
    finally:
        results["load_average_end"] = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)
    if not report(results):
        sys.exit(1)


def report(results: dict) -> bool:
    """Print the table and write the JSON record; whether every check passed."""
    scenarios = [s for s in ("local", "s3") if s in results]
    print(f"\n{'':<10}{'W1 s':>8}{'W2 s':>8}{'W2/W1':>8}{'W3 s':>8}{'fresh s':>9}{'processed 1/2/3':>18}{'engine':>11}")
    for s in scenarios:
        r = results[s]
        processed = "/".join(str(r[k]["processed"]) for k in ("first", "rerun", "no_change"))
        print(
            f"{s:<10}{r['first']['wall_seconds']:>8.1f}{r['rerun']['wall_seconds']:>8.2f}{r['ratio']:>8.3f}"
            f"{r['no_change']['wall_seconds']:>8.2f}{r['fresh']['wall_seconds']:>9.1f}{processed:>18}"
            f"{r['rerun']['engine']:>11}"
        )
    passed = True
    for s in scenarios:
        r = results[s]
        c = r["comparison"]
        print(
            f"{s}: rerun vs fresh job: rows {c['rows']}, same paths {c['same_paths']}, same labels "
            f"{c['same_label']}, same identity {c['same_size'] and c['same_version'] and c['same_sha256']}, "
            f"max |score difference| {c.get('max_score_difference')}"
        )
        print(f"{s}: rerun's summary: {r['rerun']['summary']}, process wall {r['rerun']['wall_seconds']} s")
        failed = [k for k, ok in r["checks"].items() if not ok]
        print(f"{s}: checks {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
        passed = passed and not failed
    print(
        f"load average {results['load_average_start'][0]:.1f} at the start, {results['load_average_end'][0]:.1f} "
        f"at the end; {results['cpu']}, {results['cores']} cores; {results['date']}"
    )
    out = Path(
        results.get("json_out")
        or ROOT / "benchmarks" / "results" / f"incremental-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")
    return passed


if __name__ == "__main__":
    main()
