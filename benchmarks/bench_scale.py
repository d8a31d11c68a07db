"""Training at scale (issue 12): `retrain run` (transfer) on 2,400, 9,600 and 38,400 real-photo
crops; wall time, peak memory and wall time per image for each; accuracy on the smallest set
against another `retrain` (the main branch's, say); feature extraction on a 2-worker Dask
cluster against in process.

The data: 12 classes, generated into a work folder (deterministically: image i of a class is
the same at every size, so a smaller set is the first images of a larger one): crops of the
photos in ../shared (hymenoptera's ants and bees, MerchData's cap, cube, playing cards and
screwdriver), each class upright and turned a quarter, randomly cropped (60-100 % of each
side), flipped, resized (longer side 256-448 px) and saved as JPEG (quality 85-95).

Each size: ``retrain run DATA --network squeezenet-caffe --weights ../shared/weights/...
--max-epochs 2 --seed 0 --no-promote --json`` in a fresh process with its own store, on one
local Prefect server started for the benchmark (``--prefect temporary``: each run starts
Prefect's temporary API, in its wall time); peak RSS of that process (its
``ru_maxrss``) and of its whole process tree (psutil, polled every 0.2 s); its CPU seconds
(user + system: what other work on the machine changes least); the stages' own seconds from
the run's training.json and history.csv. Goals: peak RSS at the largest size <= 1.5x the
smallest; wall time per image at the largest <= 1.5x the smallest. Validation covers the whole
validation split each time, so with retrain's default (every 5 iterations) its cost grows as
the square of the set; ``--validation-frequency 1 --validation-frequency-unit epoch`` makes it
grow as the set does. Accuracy against another retrain (``--main-retrain``) on the smallest
set is measured with retrain's default flags on both.

Transfer features on the fastest validated engine (issue 25): each size is run twice, with
retrain's default ``--feature-engine auto`` and with ``--feature-engine torch`` (float32
features); the report's ``feature_engines`` gives, per size, the feature stage's images/s
(training images x views + validation images over its seconds, and with the engine's float32
check added), the test accuracy of each, the engine chosen and its gate's figures. The issue's
figures: ``--sizes 9600,38400 --no-main --no-dask``; quickest: ``--sizes 2400 --no-main --no-dask``.

Then, on the smallest size's shards: transfer mode's feature extraction in this process and on
a local Dask cluster of 2 worker processes (one thread each): seconds of each (the cluster's
start-up apart) and the largest absolute difference between their features.

Other work on the machine makes absolute figures noisy; run it niced, on a quiet machine for
the figures that count:

    nice .venv/bin/python benchmarks/bench_scale.py --sizes 2400,9600
    nice .venv/bin/python benchmarks/bench_scale.py                      # 2,400, 9,600 and 38,400
    .venv/bin/python benchmarks/bench_scale.py --validation-frequency 1 --validation-frequency-unit epoch
    .venv/bin/python benchmarks/bench_scale.py --sizes 2400 --no-main --no-dask   # quickest

Disk: the 38,400 set takes about 1.5 GB of JPEGs, its image shards 6 GB and, while it
trains, its feature shards 10 GB (a size's store is deleted once measured, unless --keep).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
MERCH_ZIP = SHARED / "data" / "MerchData.zip"
BIN = Path(sys.executable).parent
MAIN_RETRAIN = ROOT.parent / "main" / ".venv" / "bin" / "retrain"
SOURCES = ("ants", "bees", "MathWorks Cap", "MathWorks Cube", "MathWorks Playing Cards", "MathWorks Screwdriver")
CLASSES = [f"{name.split()[-1].lower()}-{turn}" for name in SOURCES for turn in ("upright", "turned")]


# ---- data ---------------------------------------------------------------------------------------


def source_photos(work: Path) -> dict[str, list[str]]:
    merch = work / "merch"
    if not merch.exists():
        with zipfile.ZipFile(MERCH_ZIP) as archive:
            archive.extractall(merch)
    found = {}
    for name in SOURCES:
        root = HYMENOPTERA if name in ("ants", "bees") else merch
        found[name] = sorted(str(p) for p in root.rglob("*.jpg") if p.parent.name == name)
        assert found[name], f"no photos of {name} under {root}"
    return found


def _make_class(job: tuple[int, int, int, list[str], str]) -> int:
    import numpy as np
    from PIL import Image

    c, start, stop, photos, folder = job
    name = CLASSES[c]
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    opened: dict[str, Image.Image] = {}
    for i in range(start, stop):
        path = out / f"{name}_{i:05d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng([c, i])
        source = photos[int(rng.integers(len(photos)))]
        if source not in opened:
            with Image.open(source) as im:
                opened[source] = im.convert("RGB")
        im = opened[source]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        longer = int(rng.integers(256, 449))
        scale = longer / max(cw, ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((max(1, round(cw * scale)), max(1, round(ch * scale))))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if name.endswith("-turned"):
            crop = crop.transpose(Image.ROTATE_90)
        tmp = path.with_suffix(".tmp")
        crop.save(tmp, format="JPEG", quality=int(rng.integers(85, 96)))
        os.replace(tmp, path)
    return stop - start


def make_crops(work: Path, size: int) -> Path:
    """``work/crops-<size>/<class>/<class>_NNNNN.jpg``, size / 12 images a class."""
    folder = work / f"crops-{size}"
    per_class = size // len(CLASSES)
    marker = folder / ".complete"
    if marker.exists():
        return folder
    photos = source_photos(work)
    step = 100
    jobs = [
        (c, s, min(s + step, per_class), photos[SOURCES[c // 2]], str(folder))
        for c in range(len(CLASSES))
        for s in range(0, per_class, step)
    ]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        assert sum(pool.map(_make_class, jobs)) == per_class * len(CLASSES)
    marker.write_text("")
    print(f"generated {size} crops in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    return folder


# ---- one measured run -----------------------------------------------------------------------------


def measured(command: list[str], env: dict, log: Path) -> dict:
    """Run ``command``; its wall seconds, exit status, its own peak RSS (ru_maxrss) and the
    peak RSS of its process tree (polled)."""
    import psutil

    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak_tree = [0]
    done = threading.Event()

    def poll() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                break
            peak_tree[0] = max(peak_tree[0], total)
            done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    lines = log.read_text(errors="replace").strip().splitlines()
    result = None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except ValueError:
                pass
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # its own and its reaped children's
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 0),  # Linux: KiB
        "peak_tree_rss_mib": round(peak_tree[0] / 2**20, 0),
        "result": result,
    }


def run_args(data: Path, store: Path, epochs: int, extra: list[str]) -> list[str]:
    return [
        "run",
        str(data),
        "--store",
        str(store),
        "--network",
        "squeezenet-caffe",
        "--weights",
        str(WEIGHTS),
        "--max-epochs",
        str(epochs),
        "--seed",
        "0",
        "--no-promote",
        *extra,
        "--json",
    ]


def clean_env(work: Path) -> dict:
    """The benchmark's own PREFECT_HOME (not the user's server): every run uses the local
    server started there (``--prefect server``), or starts its own temporary API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    home = work / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env["PREFECT_HOME"] = str(home)
    # Each run in a process of its own: through the server's resident process (retrain/resident.py)
    # the work would happen in a fork that is not this benchmark's child, so neither its peak
    # memory nor its CPU seconds would be measured.
    env["RETRAIN_RESIDENT"] = "0"
    return env


def prefect_server(work: Path, action: str) -> None:
    """``retrain server start|stop`` in the benchmark's PREFECT_HOME."""
    import socket

    args = [str(BIN / "retrain"), "server", action]
    if action == "start":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args += ["--port", str(s.getsockname()[1])]
    done = subprocess.run(args, env=clean_env(work), capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and action == "start":
        raise RuntimeError(f"retrain server start failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")


def stage_seconds(store: Path) -> dict:
    runs = sorted(store.glob("runs/*/training.json"))
    if not runs:
        return {}
    training = json.loads(runs[-1].read_text())
    cache = training.get("feature_cache") or {}
    shards = training.get("image_shards") or {}
    iterations = training.get("iterations")
    steps = {}
    try:
        import numpy as np
        import pandas as pd

        history = pd.read_csv(runs[-1].parent / "history.csv")
        step = np.diff(history["seconds"].to_numpy(), prepend=np.nan)
        validated = history["val_loss"].notna().to_numpy()
        # A record's seconds are taken before its validation: that lands in the next step.
        after = np.concatenate([[False], validated[:-1]])
        median = float(np.nanmedian(step[~after]))
        steps = {
            "median_step_ms": round(1000 * median, 1),
            "validations": int(validated.sum()),
            "validation_s": round(float(np.nansum(step[after]) - median * after.sum()), 1),
        }
    except (OSError, ValueError, KeyError):
        pass
    return {
        "train_images": training.get("train_images"),
        "image_shards_s": shards.get("seconds"),
        "feature_cache_s": cache.get("seconds"),
        "feature_cache_location": cache.get("location"),
        "feature_engine": cache.get("engine"),
        "feature_images_per_s": cache.get("images_per_second"),
        "feature_gate": cache.get("gate"),
        "training_s": round(training.get("seconds", 0), 1),
        "iterations": iterations,
        **steps,
    }


def validation_flags(args) -> list[str]:
    """retrain's validation flags the benchmark was given (none: retrain's defaults)."""
    flags = ["--validation-frequency", str(args.validation_frequency)] if args.validation_frequency else []
    return flags + (
        ["--validation-frequency-unit", args.validation_frequency_unit] if args.validation_frequency_unit else []
    )


def bench_size(
    size: int, args, work: Path, retrain: Path | None = None, extra: list[str] | None = None, label: str = ""
) -> dict:
    """One measured ``retrain run`` on ``size`` crops with ``extra`` flags, in a fresh store:
    this checkout's retrain, or another one (``retrain``: its store is removed once measured)."""
    data = make_crops(work, size)
    name = (f"{size}" if retrain is None else f"main {size}") + (" defaults" if extra == [] else "")
    name += f" {label}" if label else ""
    slug = name.replace(" ", "-")
    store = work / f"store-{slug}"
    shutil.rmtree(store, ignore_errors=True)
    flags = validation_flags(args) if extra is None else extra
    command = [str(retrain or BIN / "retrain"), *run_args(data, store, args.max_epochs, flags)]
    print(f"[{name}] {' '.join(command)}", flush=True)
    log = work / f"run-{slug}.log"
    record = measured(command, clean_env(work), log)
    if record["rc"] != 0:
        raise RuntimeError(f"{command[0]} run on {size} images failed: see {log}")
    result = record.pop("result")
    record.update(
        images=size,
        wall_per_image_ms=round(1000 * record["wall_s"] / size, 2),
        cpu_per_image_ms=round(1000 * record["cpu_s"] / size, 2),
        test_accuracy=result["test_accuracy"],
        val_accuracy=result["val_accuracy"],
        run=result["run_url"],
    )
    record["flags"] = flags
    if retrain is None:
        record["stages"] = stage_seconds(store)
    if retrain is not None or extra is not None:  # a comparison run: nothing else reads its store
        shutil.rmtree(store, ignore_errors=True)
    print(f"[{name}] {json.dumps(record)}", flush=True)
    return record


# ---- feature extraction: in process vs a 2-worker Dask cluster --------------------------------------


def bench_dask(store: Path, run_dir: Path, work: Path, workers: int) -> dict:
    import numpy as np
    import torch

    from retrain.tasks import storage
    from retrain.tasks.networks import build_network, get_spec
    from retrain.tasks.preprocessing import Augmentation
    from retrain.tasks.training.body_head import split_at_head
    from retrain.tasks.training.cluster import ClusterRequest, LazyCluster
    from retrain.tasks.training.data import load_training_data
    from retrain.tasks.training.feature_cluster import ClusterBody
    from retrain.tasks.training.features import build_feature_cache
    from retrain.tasks.training.options import TrainingOptions

    config = storage.read_json(str(run_dir / "run.json"))["config"]
    options = TrainingOptions.from_dict(config["options"])
    augmentation = Augmentation(**config["augmentation"])
    spec = get_spec(config["network"])
    split = storage.read_parquet(str(run_dir / "split.parquet"))
    classes = sorted(split["label"].unique())
    torch.manual_seed(options.seed)
    model, _ = build_network(spec.name, len(classes), config["weights"])
    model.to(memory_format=torch.channels_last)
    body = split_at_head(model, spec).body
    data = load_training_data(split, classes, spec.preprocessing.input_size, str(store))
    views = options.cache_views(augmentation)
    common = (body, data, spec.preprocessing, augmentation, views, options.seed, torch.device("cpu"))
    folders = {name: work / f"features-{name}" for name in ("in-process", "dask")}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    local = build_feature_cache(*common, memory_bytes=0, folder=str(folders["in-process"]))
    local_s = time.perf_counter() - t
    cluster = LazyCluster(ClusterRequest(workers=workers))
    try:
        t = time.perf_counter()
        client = cluster.client()
        client.wait_for_workers(workers, timeout=300)
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        remote = build_feature_cache(
            *common,
            memory_bytes=0,
            folder=str(folders["dask"]),
            cluster=ClusterBody(lambda: client, model, spec.name, len(classes), "cpu"),
        )
        dask_s = time.perf_counter() - t
    finally:
        cluster.close()
    n, m = len(data.train_targets), len(data.val_targets)
    diff, equal = 0.0, True
    for view in range(views + 1):
        for start in range(0, n, 256):
            idx = torch.arange(start, min(start + 256, n))
            v = torch.full_like(idx, view)
            a, b = local.train_batch(v, idx).float(), remote.train_batch(v, idx).float()
            diff = max(diff, float((a - b).abs().max()))
            equal = equal and torch.equal(a, b)
    for a, b in zip(local.val_batches(256), remote.val_batches(256)):
        diff = max(diff, float((a.float() - b.float()).abs().max()))
        equal = equal and torch.equal(a, b)
    images = (views + 1) * n + m
    record = {
        "images_x_views": images,
        "in_process_s": round(local_s, 1),
        "in_process_threads": torch.get_num_threads(),
        "dask_workers": workers,
        "dask_cluster_start_s": round(start_s, 1),
        "dask_s": round(dask_s, 1),
        "in_process_images_per_s": round(images / local_s, 1),
        "dask_images_per_s": round(images / dask_s, 1),
        "max_abs_diff": diff,
        "bitwise_equal": bool(equal),
        "feature_bytes": int(np.prod(local.train.shape[2:])) * 2 * images,
    }
    local.close(delete=True)
    remote.close(delete=True)
    data.close()
    print(f"[dask] {json.dumps(record)}", flush=True)
    return record


# ---- report ---------------------------------------------------------------------------------------


def feature_engines(chosen: dict, float32: dict) -> dict:
    """The feature stage and test accuracy of a size's run on the chosen engine against its run
    on float32 features."""

    def stage(record: dict) -> dict:
        stages = record["stages"]
        images_per_s = stages.get("feature_images_per_s")
        gate = stages.get("feature_gate") or {}
        with_check = None
        if images_per_s and stages.get("feature_cache_s"):
            images = images_per_s * stages["feature_cache_s"]
            with_check = round(images / (stages["feature_cache_s"] + gate.get("seconds", 0.0)), 1)
        return {
            "engine": stages.get("feature_engine"),
            "feature_images_per_s": images_per_s,
            "feature_images_per_s_with_check": with_check,
            "feature_s": stages.get("feature_cache_s"),
            "test_accuracy": record["test_accuracy"],
            "val_accuracy": record["val_accuracy"],
            "gate": gate or None,
        }

    a, b = stage(chosen), stage(float32)
    speedup = None
    if a["feature_images_per_s_with_check"] and b["feature_images_per_s"]:
        speedup = round(a["feature_images_per_s_with_check"] / b["feature_images_per_s"], 2)
    return {"images": chosen["images"], "chosen": a, "float32": b, "feature_speedup_with_check": speedup}


def goals(records: list[dict]) -> dict:
    if len(records) < 2:
        return {}
    small, large = records[0], records[-1]
    rss = large["peak_rss_mib"] / small["peak_rss_mib"]
    per_image = large["wall_per_image_ms"] / small["wall_per_image_ms"]
    cpu_per_image = large["cpu_per_image_ms"] / small["cpu_per_image_ms"]
    return {
        "cpu_per_image_ratio": round(cpu_per_image, 2),
        "sizes": [small["images"], large["images"]],
        "peak_rss_ratio": round(rss, 2),
        "peak_rss_goal_met": rss <= 1.5,
        "wall_per_image_ratio": round(per_image, 2),
        "wall_per_image_goal_met": per_image <= 1.5,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2400,9600,38400", help="comma-separated set sizes (multiples of 12)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument(
        "--validation-frequency",
        type=int,
        default=None,
        help="retrain's --validation-frequency (default: retrain's, 5 iterations: validation then costs "
        "(iterations / 5) x validation images, which grows as the square of the set's size)",
    )
    parser.add_argument(
        "--validation-frequency-unit",
        choices=("iteration", "epoch"),
        default=None,
        help="retrain's --validation-frequency-unit (epoch: validation grows with the set, as the rest does)",
    )
    parser.add_argument("--main-retrain", default=str(MAIN_RETRAIN), help="the retrain to compare accuracy with")
    parser.add_argument("--no-main", action="store_true", help="skip the comparison with --main-retrain")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask vs in-process feature extraction")
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument(
        "--no-float32",
        action="store_true",
        help="skip each size's second run on float32 features (--feature-engine torch)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each size's store")
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    parser.add_argument(
        "--prefect",
        choices=("server", "temporary"),
        default="server",
        help="server: one local Prefect server for every run (its start-up not timed); "
        "temporary: each run starts Prefect's temporary API (in its wall time)",
    )
    args = parser.parse_args()
    if not WEIGHTS.exists():
        print(f"skipped: {WEIGHTS} is not here (../shared)")
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if any(s % len(CLASSES) for s in sizes):
        parser.error(f"sizes must be multiples of {len(CLASSES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "load_average_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "max_epochs": args.max_epochs,
        "prefect": args.prefect,
    }
    if args.prefect == "server":
        prefect_server(work, "start")
    try:
        records, engines = [], []
        for size in sizes:
            records.append(bench_size(size, args, work))
            if not args.no_float32:
                float32 = ["--feature-engine", "torch"]
                engines.append(
                    feature_engines(
                        records[-1],
                        bench_size(size, args, work, extra=validation_flags(args) + float32, label="float32"),
                    )
                )
                print(f"[{size} engines] {json.dumps(engines[-1])}", flush=True)
            if not args.keep and size != sizes[0]:  # the smallest's is the Dask comparison's
                shutil.rmtree(work / f"store-{size}", ignore_errors=True)
        report["runs"] = records
        report["goals"] = goals(records)
        if engines:
            report["feature_engines"] = engines
        if not args.no_main and Path(args.main_retrain).exists():
            # Both with retrain's default validation flags (the other retrain may not know ours).
            ours = records[0] if not validation_flags(args) else bench_size(sizes[0], args, work, extra=[])
            main_record = bench_size(sizes[0], args, work, Path(args.main_retrain), extra=[])
            report["main"] = main_record
            report["accuracy_vs_main"] = {
                "images": sizes[0],
                "test_accuracy": ours["test_accuracy"],
                "main_test_accuracy": main_record["test_accuracy"],
                "val_accuracy": ours["val_accuracy"],
                "main_val_accuracy": main_record["val_accuracy"],
                "peak_rss_mib": ours["peak_rss_mib"],
                "main_peak_rss_mib": main_record["peak_rss_mib"],
            }
        if not args.no_dask:
            run_dir = Path(records[0]["run"])
            report["dask_features"] = bench_dask(work / f"store-{sizes[0]}", run_dir, work, args.dask_workers)
        report["load_average_end"] = os.getloadavg()
    finally:
        if args.prefect == "server":
            prefect_server(work, "stop")
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
