"""Batch scoring: `retrain score` against a naive loop and against the model's forward-only rate.

On a folder of JPEG photos of mixed sizes (generated once and cached: random crops, flips and
sizes of 300-1000 px from the real hymenoptera photos in ../shared, or drawn shapes when that
is absent), with the original Caffe SqueezeNet 1.1 ImageNet classifier (1000 classes) as the
model file, all in one run:

- naive: one process, PIL decode, torchvision transforms (Resize, PILToTensor, BGR, Normalize),
  default memory layout, batch 32, torch's default threads: the way the tutorials do it.
- retrain score: :func:`tasks.scoring.score_images` (the code the flow runs, without Prefect's
  API start-up), on a local Dask cluster of one process per core; the time is the whole job:
  cluster start-up, listing, scoring, writing parts, consolidation.
- retrain score on a running cluster: the same job with ``dask_address`` on a ``dask scheduler``
  and ``dask worker`` processes started before and warmed up by a small job (how a team with a
  persistent cluster runs it): what is left is decoding and orchestration.
- retrain score (CLI): ``retrain score ... --json`` in a subprocess, with its own Prefect API
  (``--no-cli`` leaves it out); images_per_second from its JSON, and the wall time.
- forward only: the model's forward passes on ready tensors (channels_last, inference_mode,
  same mini-batch), both as one process with torch's threads and as one process per core with
  one thread each, measured before and after the rest; the best of these is the reference.

Other work on the machine makes absolute figures noisy; the ratios within one run are what
count. Run from the project root:

    .venv/bin/python benchmarks/bench_score.py                 # 5,000 photos
    .venv/bin/python benchmarks/bench_score.py --count 1000    # a quicker run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"
PHOTOS = SHARED / "data" / "hymenoptera_data"
DATA = ROOT / "benchmarks" / "data"
RESULTS = ROOT / "benchmarks" / "results"


# ---- the data: photos of mixed sizes ---------------------------------------------------------


def _make_photos(job: tuple[int, int, list[str], str]) -> int:
    start, stop, sources, folder = job
    made = 0
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        width, height = (int(v) for v in rng.integers(300, 1001, 2))
        if sources:
            with Image.open(sources[i % len(sources)]) as im:
                im = im.convert("RGB")
                w, h = im.size
                cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                photo = im.crop((x, y, x + cw, y + ch)).resize((width, height), Image.BICUBIC)
                if rng.random() < 0.5:
                    photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            from retrain.tasks.samples import SHAPES, draw_shape

            photo = draw_shape(SHAPES[i % 3], max(width, height), rng).resize((width, height))
        path = Path(folder) / f"{i // 1000:03d}" / f"photo_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path, format="JPEG", quality=int(rng.integers(80, 96)))
        made += 1
    return made


def ensure_photos(count: int, workers: int) -> Path:
    """``count`` JPEGs in ``benchmarks/data/photos-<count>/`` (git-ignored), made once."""
    folder = DATA / f"photos-{count}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / ".gitignore").write_text("*\n")
    shutil.rmtree(folder, ignore_errors=True)
    sources = sorted(str(p) for p in PHOTOS.rglob("*.jpg")) if PHOTOS.exists() else []
    print(
        f"generating {count:,} photos of 300-1000 px in {folder} "
        f"({'from ' + str(len(sources)) + ' hymenoptera photos' if sources else 'drawn shapes'}) ...",
        flush=True,
    )
    step = max(1, count // (workers * 8))
    jobs = [(s, min(s + step, count), sources, str(folder)) for s in range(0, count, step)]
    with mp.get_context("spawn").Pool(workers) as pool:
        made = sum(pool.map(_make_photos, jobs))
    assert made == count
    marker.write_text(str(count))
    return folder


def ensure_model(path: Path) -> tuple[Path, list[str]]:
    """The Caffe SqueezeNet 1.1 ImageNet classifier as a retrain model file."""
    from retrain.tasks.networks import build_network, get_spec, model_record, save_model_file
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    if not WEIGHTS.exists():
        sys.exit(f"{WEIGHTS} is not here: the benchmark needs ../shared/weights")
    spec = get_spec("squeezenet-caffe")
    classes = list(_IMAGENET_CATEGORIES)
    model, origin = build_network(spec.name, len(classes), weights=str(WEIGHTS))
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))  # the ImageNet head as well
    save_model_file(str(path), model_record(model, spec, classes, origin))
    return path, classes


# ---- the naive baseline ------------------------------------------------------------------------


def naive(files: list[str], model_path: Path, batch_size: int = 32) -> dict:
    """PIL decode, torchvision transforms, default memory layout, batch 32, one process."""
    import torchvision.transforms as T
    from retrain.tasks.networks import load_model_file

    loaded = load_model_file(str(model_path))
    model, prep = loaded.model.eval(), loaded.preprocessing
    transform = T.Compose(
        [
            T.Resize(prep.input_size),
            T.PILToTensor(),
            T.Lambda(lambda x: x.flip(0).float()),  # RGB -> BGR, 0-255 (the Caffe weights' input)
            T.Normalize(mean=prep.mean, std=prep.std),
        ]
    )
    started, cpu = time.perf_counter(), time.process_time()
    labels = []
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[i : i + batch_size]])
            labels += model(batch).argmax(1).tolist()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "images": len(files),
        "seconds": seconds,
        "images_per_second": len(files) / seconds,
        "cpu_ms_per_image": 1000 * cpu / len(files),
        "threads": torch.get_num_threads(),
    }


# ---- forward only ------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (Dask workers, pools)."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _forward_loop(model_path: str, batch: int, seconds: float, threads: int, barrier) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of forward passes on one ready batch."""
    torch.set_num_threads(threads)
    from retrain.tasks.networks import load_model_file

    loaded = load_model_file(model_path)
    model = loaded.model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, *loaded.preprocessing.input_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up
        if barrier is not None:
            barrier.wait()
        done, cpu, started = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(x)
            done += batch
        return done, time.perf_counter() - started, time.process_time() - cpu


def _forward_worker(args) -> tuple[int, float, float]:
    return _forward_loop(*args)


def forward_only(
    model_path: Path, seconds: float, processes: int, per_core_batches=(8, 16, 32), one_process_batches=(32, 64)
) -> dict:
    """The model's forward passes on ready channels_last batches, inference_mode: as one
    process per core with one thread each (how retrain score runs it) and as one process
    with torch's threads, at several batch sizes. The best rate is the reference."""
    configs = []
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(processes) as pool:
        for batch in per_core_batches:
            barrier = manager.Barrier(processes)
            runs = pool.map(_forward_worker, [(str(model_path), batch, seconds, 1, barrier)] * processes)
            images = sum(r[0] for r in runs)
            configs.append(
                {
                    "processes": processes,
                    "threads": 1,
                    "batch": batch,
                    "images_per_second": sum(r[0] / r[1] for r in runs),
                    "cpu_ms_per_image": 1000 * sum(r[2] for r in runs) / images,
                }
            )
    for batch in one_process_batches:
        images, wall, cpu = _forward_loop(str(model_path), batch, seconds, os.cpu_count() or 1, None)
        configs.append(
            {
                "processes": 1,
                "threads": os.cpu_count() or 1,
                "batch": batch,
                "images_per_second": images / wall,
                "cpu_ms_per_image": 1000 * cpu / images,
            }
        )
    best = max(configs, key=lambda c: c["images_per_second"])
    leanest = min(configs, key=lambda c: c["cpu_ms_per_image"])
    return {
        "configs": configs,
        "images_per_second": best["images_per_second"],
        "best": best,
        "cpu_ms_per_image": leanest["cpu_ms_per_image"],
        "leanest": leanest,
    }


# ---- retrain score --------------------------------------------------------------------------------


def retrain_score(model_path: Path, folder: Path, out: Path, workers: int, mini_batch: int, partition: int) -> dict:
    from retrain.tasks.scoring import score_images

    shutil.rmtree(out, ignore_errors=True)
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = score_images(
        str(model_path), str(folder), str(out), workers=workers, mini_batch_size=mini_batch, partition_size=partition
    )
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    assert summary["images"] == summary["scored"], summary["failures"][:3]
    return {
        "images": summary["images"],
        "seconds": seconds,
        "images_per_second": summary["images"] / seconds,
        "cpu_ms_per_image": 1000 * cpu / summary["images"],
        "worker_decode_seconds": summary["decode_seconds"],
        "worker_forward_seconds": summary["forward_seconds"],
        "top_labels": dict(list(summary["labels"].items())[:5]),
    }


def retrain_score_on_cluster(
    model_path: Path, folder: Path, work: Path, workers: int, mini_batch: int, partition: int
) -> dict:
    """The same job on a cluster that is already up and has scored before, as a team's
    persistent Dask cluster is (``retrain score --dask-address``): a ``dask scheduler`` and
    ``dask worker`` processes, one per core with one thread each, that first score a warm-up
    list (the first partitions' images), so the timed job pays no process start-up, imports or
    model loading.
    CPU time: the driver's and the workers' (read in the workers) during the timed job."""
    from retrain.tasks.scoring import score_images

    from tests._services import dask_cluster

    def worker_cpu() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    warm_list = work / "warm-up.txt"
    warm_list.write_text("\n".join(files[: workers * partition]) + "\n")
    out = work / "out-cluster"
    shutil.rmtree(out, ignore_errors=True)
    with dask_cluster(work / "cluster", workers=workers) as address:
        from distributed import Client

        score_images(
            str(model_path),
            str(warm_list),
            str(work / "out-warm-up"),
            dask_address=address,
            mini_batch_size=mini_batch,
            partition_size=partition,
        )
        with Client(address, timeout="30s") as client:
            before = sum(client.run(worker_cpu).values())
            started, cpu = time.perf_counter(), time.process_time()
            summary = score_images(
                str(model_path),
                str(folder),
                str(out),
                dask_address=address,
                mini_batch_size=mini_batch,
                partition_size=partition,
            )
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            cpu += sum(client.run(worker_cpu).values()) - before
    assert summary["images"] == summary["scored"], summary["failures"][:3]
    return {
        "images": summary["images"],
        "seconds": seconds,
        "images_per_second": summary["images"] / seconds,
        "cpu_ms_per_image": 1000 * cpu / summary["images"],
        "address": address,
    }


def retrain_score_cli(model_path: Path, folder: Path, out: Path, workers: int, mini_batch: int, partition: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        str(Path(sys.executable).parent / "retrain"),
        "score",
        str(model_path),
        str(folder),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--mini-batch-size",
        str(mini_batch),
        "--partition-size",
        str(partition),
        "--json",
    ]
    started, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"retrain score failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        **result,
        "wall_seconds": wall,
        "cpu_ms_per_image": 1000 * cpu / result["images"],
        "command": " ".join(command),
    }


# ---- the run ----------------------------------------------------------------------------------------


def main() -> None:
    from retrain.tasks.scoring import DEFAULT_MINI_BATCH_SIZE, DEFAULT_PARTITION_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="photos to score (default 5,000)")
    parser.add_argument(
        "--baseline-count",
        type=int,
        default=1500,
        help="photos the naive loop scores (its rate is steady; default 1,500)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mini-batch-size", type=int, default=DEFAULT_MINI_BATCH_SIZE)
    parser.add_argument("--partition-size", type=int, default=DEFAULT_PARTITION_SIZE)
    parser.add_argument(
        "--forward-seconds",
        type=float,
        default=8.0,
        help="length of each forward-only measurement (5 configurations, before and after)",
    )
    parser.add_argument("--no-cli", action="store_true", help="leave out the `retrain score` subprocess run")
    parser.add_argument("--json-out", default=None, help="results file (default benchmarks/results/score-<time>.json)")
    args = parser.parse_args()

    folder = ensure_photos(args.count, args.workers)
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    sizes = [p.stat().st_size for p in map(Path, files)]
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    model_path, _ = ensure_model(work / "squeezenet-imagenet.pt")
    print(
        f"{len(files):,} photos ({sum(sizes) / 2**20:.0f} MiB, mean {np.mean(sizes) / 1024:.0f} KiB); "
        f"{os.cpu_count()} cores; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    results: dict = {
        "count": len(files),
        "cores": os.cpu_count(),
        "workers": args.workers,
        "mini_batch_size": args.mini_batch_size,
        "partition_size": args.partition_size,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "data": str(folder),
        "load_average_start": os.getloadavg(),
    }
    print("forward only (before) ...", flush=True)
    results["forward_before"] = forward_only(model_path, args.forward_seconds, args.workers)
    print("naive baseline ...", flush=True)
    rng = np.random.default_rng(0)
    subset = sorted(rng.choice(files, size=min(args.baseline_count, len(files)), replace=False).tolist())
    results["naive"] = naive(subset, model_path)
    print("retrain score ...", flush=True)
    results["retrain_score"] = retrain_score(
        model_path, folder, work / "out", args.workers, args.mini_batch_size, args.partition_size
    )
    print("retrain score on a running cluster ...", flush=True)
    results["retrain_score_cluster"] = retrain_score_on_cluster(
        model_path, folder, work, args.workers, args.mini_batch_size, args.partition_size
    )
    if not args.no_cli:
        print("retrain score (CLI) ...", flush=True)
        results["retrain_score_cli"] = retrain_score_cli(
            model_path, folder, work / "out-cli", args.workers, args.mini_batch_size, args.partition_size
        )
    print("forward only (after) ...", flush=True)
    results["forward_after"] = forward_only(model_path, args.forward_seconds, args.workers)
    results["load_average_end"] = os.getloadavg()

    before, after = results["forward_before"], results["forward_after"]
    forward = max(before["images_per_second"], after["images_per_second"])
    forward_cpu = min(before["cpu_ms_per_image"], after["cpu_ms_per_image"])
    ours, naive_ = results["retrain_score"], results["naive"]
    results["ratios"] = {
        "score_vs_naive": ours["images_per_second"] / naive_["images_per_second"],
        "score_vs_forward_only": ours["images_per_second"] / forward,
        "score_vs_forward_only_mean": ours["images_per_second"]
        / np.mean([before["images_per_second"], after["images_per_second"]]),
        "cpu_score_vs_naive": naive_["cpu_ms_per_image"] / ours["cpu_ms_per_image"],
        "cpu_score_vs_forward_only": forward_cpu / ours["cpu_ms_per_image"],
    }
    warm = results["retrain_score_cluster"]
    results["ratios"]["cluster_vs_forward_only"] = warm["images_per_second"] / forward
    results["ratios"]["cpu_cluster_vs_forward_only"] = forward_cpu / warm["cpu_ms_per_image"]
    if "retrain_score_cli" in results:
        cli = results["retrain_score_cli"]
        results["ratios"]["cli_vs_naive"] = cli["images_per_second"] / naive_["images_per_second"]
        results["ratios"]["cli_vs_forward_only"] = cli["images_per_second"] / forward

    rows = []
    for c in before["configs"]:
        match = next(d for d in after["configs"] if (d["processes"], d["batch"]) == (c["processes"], c["batch"]))
        rows.append(
            (
                f"forward only, {c['processes']} process(es) x {c['threads']} thread(s), batch {c['batch']}",
                f"{c['images_per_second']:.1f} / {match['images_per_second']:.1f}",
                f"{c['cpu_ms_per_image']:.1f} / {match['cpu_ms_per_image']:.1f}",
            )
        )
    rows.append(
        (
            f"naive: PIL, transforms, NCHW, batch 32 ({len(subset):,} photos)",
            f"{naive_['images_per_second']:.1f}",
            f"{naive_['cpu_ms_per_image']:.1f}",
        )
    )
    rows.append(
        (
            f"retrain score, whole job ({len(files):,} photos, {ours['seconds']:.1f} s)",
            f"{ours['images_per_second']:.1f}",
            f"{ours['cpu_ms_per_image']:.1f}",
        )
    )
    rows.append(
        (
            f"retrain score on a running cluster ({warm['seconds']:.1f} s)",
            f"{warm['images_per_second']:.1f}",
            f"{warm['cpu_ms_per_image']:.1f}",
        )
    )
    if "retrain_score_cli" in results:
        cli = results["retrain_score_cli"]
        rows.append(
            (
                f"retrain score CLI (flow {cli['seconds']:.1f} s; {cli['wall_seconds']:.1f} s with Prefect start-up)",
                f"{cli['images_per_second']:.1f}",
                f"{cli['cpu_ms_per_image']:.1f}",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"\n{'(forward only: before / after)':<{width}}  {'images/s':>13}  {'CPU ms/image':>13}")
    for name, rate, cpu in rows:
        print(f"{name:<{width}}  {rate:>13}  {cpu:>13}")
    r = results["ratios"]
    print(
        f"\nretrain score / naive:        {r['score_vs_naive']:.2f}x images/s   "
        f"({r['cpu_score_vs_naive']:.2f}x by CPU time per image)   goal >= 2"
    )
    print(
        f"retrain score / forward only: {r['score_vs_forward_only']:.2f}x images/s of the best "
        f"({r['score_vs_forward_only_mean']:.2f}x of the mean of before/after; "
        f"{r['cpu_score_vs_forward_only']:.2f}x by CPU time per image)   goal >= 0.8"
    )
    print(
        f"on a running cluster / forward only: {r['cluster_vs_forward_only']:.2f}x images/s "
        f"({r['cpu_cluster_vs_forward_only']:.2f}x by CPU time per image)"
    )
    print(
        f"load average: {results['load_average_start'][0]:.1f} at the start, {results['load_average_end'][0]:.1f} "
        f"at the end (other work on the machine makes images/s noisy; CPU time per image much less so)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = Path(args.json_out) if args.json_out else RESULTS / f"score-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {target}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
