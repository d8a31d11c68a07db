"""Listing and diffing at scale: what a scoring rerun spends before it scores anything, on
100,000 generated small files, on a local disk and in S3 (moto's server), and per million
files on paper.

The data: 100,000 files of 300 bytes named ``.jpg`` (they do not decode: listing never reads
them; ``--verify-content`` does), in 100 folders, written to a temporary folder and uploaded to
a bucket of a moto S3 server started for the run (tests/_services.py). And a scores-like table
of the same files (path, label, score, top-5 labels and scores, error, size, version, sha256):
the rows an earlier job wrote, with 0.1 % of them for an older version of their file
(changed), 0.05 % of the files missing from it (new), 0.03 % rows of files no longer listed
(deleted) and 0.01 % failures (retried). Each measured ``--repeat`` times, the median kept:

- ``list_images(folder)`` (tasks/scoring/listing.py): local and S3, and the ``fs.find`` it
  starts with on its own (fsspec's share); on S3 the LIST requests it made, counted in moto's
  request log, against 1 + ceil(keys / 1,000) (the first asks: is it a folder?). And, on a
  10,000-file subset of the local folder, ``list_images`` with and without ``verify_content``
  (which reads and hashes every file).
- ``changes(listing, scored)``: the diff a rerun plans from; ``current_rows(rows, listing)``:
  consolidation's filter over this run's rows and the earlier ones.
- scores.parquet of the 100,000 rows: written and read back (local disk and S3), its size.

Wall and this process's CPU time. A listing's memory is the peak of Python's heap in one more,
untimed, call (tracemalloc: a listing's entries are Python objects); the other steps' is the
growth of the process's peak RSS during the first call (Linux: the peak is reset before each,
/proc/self/clear_refs; memory the process freed before may be reused: a lower bound). Local
figures are with the files in the page cache (they were just written). The per-million column
scales the measured cost a file linearly. On S3, moto's wall is not S3's: its ListObjectsV2
reads the whole bucket for every page (about 0.9 s a page at 100,000 keys, so the listing's
wall grows as the square of the keys; hence ``--s3-repeat`` 2): what carries over is the count
of requests and this process's CPU. The real-S3 figure printed is an estimate, AWS's 1,000 keys
a LIST request at a typical 50-100 ms a request, not a measurement. The upload takes about
5 minutes. Other work on the machine makes the figures noisy: the load average is printed next
to them. Run from the project root:

    .venv/bin/python benchmarks/bench_listing.py
    .venv/bin/python benchmarks/bench_listing.py --files 20000 --no-s3   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests._services: the moto server the tests use

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from retrain.tasks import storage  # noqa: E402
from retrain.tasks.scoring.listing import changes, current_rows, list_images  # noqa: E402
from retrain.tasks.scoring.partition import ROW_SCHEMA, table_bytes  # noqa: E402

BUCKET = "bench-listing"
FILE_BYTES = 300
TOP_K = 5
CLASSES = [f"class_{i:03d}" for i in range(1000)]
# The earlier output's differences from the folder, as fractions of the files.
CHANGED, NEW, DELETED, FAILED = 0.001, 0.0005, 0.0003, 0.0001
KEYS_PER_LIST = 1000  # S3's ListObjectsV2 page
REAL_S3_LIST_SECONDS = (0.05, 0.10)  # a LIST request on real S3, typical: an estimate
UPLOAD_THREADS = 32


# ---- measuring -----------------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(
    operation: Callable[[], object], repeat: int, before: Callable[[], None] | None = None, traced: bool = False
) -> dict:
    """Median wall and CPU time of ``repeat`` calls (``before`` run ahead of each, untimed), the
    growth of peak RSS during the first; ``traced``: one more call first, untimed, for the peak
    of Python's heap (tracemalloc: it sees Python objects, not Arrow's buffers). Returns the
    figures and the last call's result."""
    figures = {}
    if traced:
        if before:
            before()
        tracemalloc.start()
        operation()
        figures["python_heap_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    walls, cpu, growth, result = [], [], None, None
    for i in range(repeat):
        if before:
            before()
        if i == 0:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the peak RSS to the current RSS
            start_kb = _rss_kb("VmRSS")
        started, started_cpu = time.perf_counter(), time.process_time()
        result = operation()
        walls.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        if i == 0:
            growth = (_rss_kb("VmHWM") - start_kb) / 1024
    return figures | {
        "seconds": statistics.median(walls),
        "all_seconds": [round(w, 3) for w in walls],
        "cpu_seconds": statistics.median(cpu),  # this process's: on S3, the rest is waiting on the server
        "peak_rss_growth_mb": round(growth, 1),
        "load": round(os.getloadavg()[0], 2),
        "result": result,
    }


# ---- the data ------------------------------------------------------------------------------------


def file_names(count: int, folders: int) -> list[str]:
    return [f"d{i % folders:03d}/img{i:07d}.jpg" for i in range(count)]


def content(i: int) -> bytes:
    return i.to_bytes(8, "big") * (FILE_BYTES // 8)


def write_local(root: Path, names: list[str]) -> float:
    started = time.perf_counter()
    for folder in {n.split("/")[0] for n in names}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).write_bytes(content(i))
    return time.perf_counter() - started


def upload_s3(endpoint: str, prefix: str, names: list[str]) -> float:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=UPLOAD_THREADS))
    client.create_bucket(Bucket=BUCKET)
    started = time.perf_counter()
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=BUCKET, Key=f"{prefix}/{names[i]}", Body=content(i)),
                range(len(names)),
            )
        )
    return time.perf_counter() - started


def earlier_output(listing: pa.Table) -> tuple[pa.Table, dict]:
    """Rows an earlier job wrote for ``listing``'s folder, differing from it by the fractions
    above, and the counts ``changes`` must find."""
    n = listing.num_rows
    new, changed, deleted, failed = (max(1, round(n * f)) for f in (NEW, CHANGED, DELETED, FAILED))
    rows = listing.to_pydict()
    step = n // (new + changed + failed + 1)  # the altered files spread over the folder
    altered = list(range(0, n, step))[: new + changed + failed]
    new_at, changed_at, failed_at = (
        set(altered[:new]),
        set(altered[new : new + changed]),
        set(altered[new + changed :]),
    )
    keep = [i for i in range(n) if i not in new_at]
    paths = [rows["path"][i] for i in keep] + [f"{rows['path'][0]}.gone{j}.jpg" for j in range(deleted)]
    m = len(paths)
    versions = [rows["version"][i] + ("-older" if i in changed_at else "") for i in keep] + ["mtime:1"] * deleted
    errors = [("cannot decode" if i in failed_at else None) for i in keep] + [None] * deleted
    labels = [CLASSES[(j * 7) % len(CLASSES)] for j in range(m)]
    top = [[CLASSES[(j * 7 + t) % len(CLASSES)] for t in range(TOP_K)] for j in range(m)]
    scores = [[0.9 - 0.1 * t for t in range(TOP_K)] for _ in range(m)]
    table = pa.table(
        {
            "path": paths,
            "label": labels,
            "score": [s[0] for s in scores],
            "top_labels": top,
            "top_scores": scores,
            "error": errors,
            "size": [rows["size"][i] for i in keep] + [FILE_BYTES] * deleted,
            "version": versions,
            "sha256": [None] * m,
        },
        schema=ROW_SCHEMA,
    ).sort_by("path")
    expect = {
        "new": new,
        "changed": changed,
        "retried": failed,
        "deleted": deleted,
        "unchanged": n - new - changed - failed,
    }
    return table, expect


def fresh_rows(todo: pa.Table) -> pa.Table:
    """What this run's parts would hold: a score for each listed file to score."""
    n = todo.num_rows
    return pa.table(
        {
            "path": todo["path"],
            "label": [CLASSES[0]] * n,
            "score": [0.5] * n,
            "top_labels": [CLASSES[:TOP_K]] * n,
            "top_scores": [[0.5] * TOP_K] * n,
            "error": [None] * n,
            "size": todo["size"],
            "version": todo["version"],
            "sha256": todo["sha256"],
        },
        schema=ROW_SCHEMA,
    )


# ---- the measurements ----------------------------------------------------------------------------


def bench_listing(url: str, repeat: int, verify_content: bool = False, before=None) -> dict:
    figures = measure(lambda: list_images(url, verify_content=verify_content), repeat, before, traced=True)
    listing = figures.pop("result")
    figures["files"] = listing.files.num_rows
    figures["us_per_file"] = figures["seconds"] / listing.files.num_rows * 1e6
    figures["listing_table_mb"] = round(listing.files.nbytes / 2**20, 1)
    return figures | {"listing": listing}


def bench_diff(listing: pa.Table, repeat: int) -> dict:
    scored, expect = earlier_output(listing)
    diff = measure(lambda: changes(listing, scored), repeat)
    found = diff.pop("result")
    got = {k: getattr(found, k) for k in expect}
    if got != expect:
        raise AssertionError(f"changes() found {got}, expected {expect}")
    # consolidation: this run's rows first, then the earlier output's
    rows = pa.concat_tables([fresh_rows(found.todo), scored])
    kept = measure(lambda: current_rows(rows, listing), repeat)
    final = kept.pop("result")
    if final.num_rows != listing.num_rows:
        raise AssertionError(f"current_rows() kept {final.num_rows} rows for {listing.num_rows} files")
    n = listing.num_rows
    return {
        "changes": diff | {"rows": scored.num_rows, "us_per_file": diff["seconds"] / n * 1e6, "found": got},
        "current_rows": kept | {"rows": rows.num_rows, "us_per_file": kept["seconds"] / n * 1e6},
        "final": final,
    }


def bench_parquet(final: pa.Table, urls: list[str], repeat: int) -> dict:
    table = final.replace_schema_metadata({b"retrain.scores": b"bench"})
    out = {}
    for url in urls:
        write = measure(lambda url=url: storage.write_bytes(url, table_bytes(table)), repeat)
        read = measure(lambda url=url: pq.read_table(pa.BufferReader(storage.read_bytes(url))), repeat)
        if read["result"].num_rows != table.num_rows:
            raise AssertionError(f"{url} read back {read['result'].num_rows} rows")
        write.pop("result"), read.pop("result")
        fs, path = storage.filesystem(url)
        out["local" if storage.is_local(url) else "s3"] = {
            "rows": table.num_rows,
            "mb": round(fs.size(path) / 2**20, 2),
            "write": write,
            "read": read,
        }
    return out


def requests_logged(log: Path, since: int) -> list[str]:
    """The requests in moto's log after byte ``since`` (method and path, one a line)."""
    with open(log, "rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    return [line.split('"')[1] for line in lines if line.count('"') >= 2 and "HTTP/1" in line]


@contextmanager
def s3_bucket(workdir: Path, names: list[str]) -> Iterator[float]:
    """A moto S3 server holding ``names`` under s3://BUCKET/images/, the environment pointed at
    it; yields the upload's seconds."""
    import s3fs

    from tests._services import moto_s3

    with moto_s3(workdir) as endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        os.environ.pop("AWS_PROFILE", None)
        s3fs.S3FileSystem.clear_instance_cache()
        yield upload_s3(endpoint, "images", names)


def bench_s3_listing(workdir: Path, names: list[str], repeat: int) -> dict:
    url = f"s3://{BUCKET}/images"
    fs, _ = storage.filesystem(url)
    log = workdir / "moto.log"
    since = log.stat().st_size
    figures = bench_listing(url, repeat, before=fs.invalidate_cache)  # each as a fresh process would
    requests = requests_logged(log, since)
    listings = repeat + 1  # the traced one too
    figures |= {
        "list_requests_per_listing": sum("list-type=2" in r for r in requests) / listings,
        "requests_per_listing": len(requests) / listings,
        "first_requests": requests[:3],
        # one LIST of the folder's first level (is it a folder?), then its keys 1,000 a page
        "list_requests_expected": 1 + math.ceil(len(names) / KEYS_PER_LIST),
    }
    figures["seconds_per_list_request"] = figures["seconds"] / max(1, figures["list_requests_per_listing"])
    found = figures.pop("listing").files.num_rows
    if found != len(names):
        raise AssertionError(f"S3 listing found {found} of {len(names)} keys")
    return figures


# ---- report --------------------------------------------------------------------------------------


def report(results: dict) -> None:
    n = results["files"]
    rows = []

    def row(name: str, files: int, fig: dict) -> None:
        us = fig["seconds"] / files * 1e6
        heap = fig.get("python_heap_peak_mb")
        rows.append(
            (
                name,
                f"{files:,}",
                f"{fig['seconds']:.2f}",
                f"{fig['cpu_seconds']:.2f}",
                f"{us:.1f}",
                "" if heap is None else f"{heap:.0f}",
                f"{fig['peak_rss_growth_mb']:.0f}",
                f"{us:.0f} s",  # microseconds a file = seconds a million files
                f"{fig['load']:.1f}",
            )
        )

    if "s3" in results:
        row("list_images S3 (moto)", n, results["s3"]["list"])
    row("list_images local", n, results["local"]["list"])
    row("  of which fs.find(detail=True)", n, results["local"]["find"])
    sub = results["local"]["subset"]
    row("list_images local (subset)", sub["list"]["files"], sub["list"])
    row("  ... verify_content", sub["verify"]["files"], sub["verify"])
    row("changes()", n, results["diff"]["changes"])
    row("current_rows()", n, results["diff"]["current_rows"])
    for where, fig in results["parquet"].items():
        row(f"scores.parquet write {where} ({fig['mb']} MB)", n, fig["write"])
        row(f"scores.parquet read {where}", n, fig["read"])
    head = ("operation", "files", "wall s", "cpu s", "us/file", "py heap MB", "RSS +MB", "per million", "load")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if "s3" in results:
        s3 = results["s3"]["list"]
        low, high = (1e6 / KEYS_PER_LIST * s for s in REAL_S3_LIST_SECONDS)
        print(
            f"S3: {s3['list_requests_per_listing']:.0f} LIST requests a listing of {n:,} keys (expected "
            f"{s3['list_requests_expected']}: 1 + ceil(keys / 1,000)), {s3['requests_per_listing']:.0f} requests "
            f"in all; {s3['seconds_per_list_request'] * 1000:.0f} ms of wall per LIST request on moto, whose "
            f"every page reads the whole bucket: not S3's cost. This process's CPU: "
            f"{s3['cpu_seconds'] / n * 1e6:.0f} us a key (parsing the pages, the listing's entries)."
        )
        print(
            f"per million keys: {1e6 / KEYS_PER_LIST:.0f} LIST requests, one after the other; ESTIMATE for real S3 "
            f"at 50-100 ms a request: {low:.0f}-{high:.0f} s of requests, plus the client's CPU "
            f"({s3['cpu_seconds'] / n * 1e6:.0f} s a million keys at the rate above)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--subset", type=int, default=10_000, help="files listed with and without verify_content")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3-repeat", type=int, default=2, help="S3 listings timed (moto pages slowly: see above)")
    parser.add_argument("--no-s3", action="store_true", help="skip moto S3")
    args = parser.parse_args()

    results = {
        "files": args.files,
        "folders": args.folders,
        "file_bytes": FILE_BYTES,
        "cores": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    names = file_names(args.files, args.folders)
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp, ExitStack() as services:
        work = Path(tmp)
        results["local_write_seconds"] = round(write_local(work / "images", names), 1)
        write_local(work / "subset", names[: args.subset])
        parquet_urls = [str(work / "out" / "scores.parquet")]
        if not args.no_s3:
            results["s3_upload_seconds"] = round(services.enter_context(s3_bucket(work, names)), 1)
            results["s3"] = {"list": bench_s3_listing(work, names, args.s3_repeat)}
            parquet_urls.append(f"s3://{BUCKET}/out/scores.parquet")

        local = bench_listing(str(work / "images"), args.repeat)
        listing = local.pop("listing").files
        fs, root = storage.filesystem(str(work / "images"))
        find = measure(lambda: fs.find(root, detail=True), args.repeat, traced=True)
        find.pop("result")
        subset = {
            "list": bench_listing(str(work / "subset"), args.repeat),
            "verify": bench_listing(str(work / "subset"), args.repeat, verify_content=True),
        }
        for fig in subset.values():
            fig.pop("listing")
        results["local"] = {"list": local, "find": find, "subset": subset}

        diff = bench_diff(listing, args.repeat)
        final = diff.pop("final")
        results["diff"] = diff
        (work / "out").mkdir()
        results["parquet"] = bench_parquet(final, parquet_urls, args.repeat)
    results["load_average_end"] = os.getloadavg()
    report(results)
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
