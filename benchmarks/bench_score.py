"""Batch scoring, end to end: cold `retrain score` against a tuned PyTorch DataLoader loop, per
engine, on real photos.

The data: JPEG photos of mixed sizes (300-1000 px; random crops, flips and resizes of the 397
hymenoptera photos in ../shared), generated into a temporary folder: 5,000 and, as hard links
to the first of them, 2,000. The model: SqueezeNet (the Caffe ImageNet weights in
../shared/weights) retrained on hymenoptera train/ by `retrain run` (transfer mode), so the
engines have the run's held-out images to be validated on and its training images to be
calibrated on. All in one run, one after the other:

- peer: a fresh ``python`` process running a DataLoader loop tuned as a careful user would:
  worker processes = cores, batch 32, channels_last, inference_mode, torchvision's JPEG decoder;
  its process wall time, and its images/s from the first batch to the last.
- retrain score, each as a user meets it, in a fresh ``retrain`` process (process wall time, and
  images/s while scoring: ``images_per_second_scoring``), ``--engine auto``:
  - first score of a new model: a model trained just before (its own seed per count), scored
    for the first time, with the local server its training command left running;
  - later score: the same model again (a fresh output folder), the server up (resident process);
  - cold, new Prefect home: the first command on a new PREFECT_HOME, which starts the local
    server for later commands (stopped after the measurement);
  - cold, new Prefect home, ``RETRAIN_AUTO_SERVER=0``: Prefect's temporary API started inside
    the command (what every command paid before the local server started itself).
  Then every engine of ``--engines`` on the smallest count (server up).
- label agreement of each engine with float32 torch on the smallest count (from their
  scores.parquet), and accuracy per engine on hymenoptera val/ (``retrain evaluate --engine``).

Other work on the machine makes absolute figures noisy: the ratios within one run are what
count, and the load average is printed next to them. Run from the project root:

    .venv/bin/python benchmarks/bench_score.py                        # 5,000 and 2,000 photos
    .venv/bin/python benchmarks/bench_score.py --counts 300,100 --engines none   # a smoke run
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
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"
PHOTOS = SHARED / "data" / "hymenoptera_data"
BIN = Path(sys.executable).parent

PEER = r"""
import sys, time, torch, torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg, read_file, ImageReadMode
import torchvision.transforms.v2.functional as F

model_path, listing, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
record = torch.load(model_path, weights_only=True)
prep = record["preprocessing"]
size = prep["input_size"]

class Photos(Dataset):
    def __init__(self, files): self.files = files
    def __len__(self): return len(self.files)
    def __getitem__(self, i):
        image = decode_jpeg(read_file(self.files[i]), mode=ImageReadMode.RGB)
        return F.resize(image, size, antialias=True)

if __name__ == "__main__":
    files = open(listing).read().split()
    model = torchvision.models.squeezenet1_1(num_classes=len(record["classes"]))
    model.load_state_dict(record["state_dict"])
    model = model.eval().to(memory_format=torch.channels_last)
    order = [2, 1, 0] if prep["channel_order"] == "BGR" else [0, 1, 2]
    mean = torch.tensor(prep["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(prep["std"]).view(1, 3, 1, 1)
    loader = DataLoader(Photos(files), batch_size=32, num_workers=workers)
    labels, first = [], None
    with torch.inference_mode():
        for batch in loader:
            first = first or time.perf_counter()
            x = ((batch[:, order].float() * prep["scale"] - mean) / std).contiguous(memory_format=torch.channels_last)
            labels += model(x).argmax(1).tolist()
    print(len(labels), len(labels) / (time.perf_counter() - first))
"""


# ---- data and model -------------------------------------------------------------------------


def _make_photos(job: tuple[int, int, list[str], str]) -> int:
    import numpy as np
    from PIL import Image

    start, stop, sources, folder = job
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        width, height = (int(v) for v in rng.integers(300, 1001, 2))
        with Image.open(sources[i % len(sources)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            photo = im.crop((x, y, x + cw, y + ch)).resize((width, height), Image.BICUBIC)
            if rng.random() < 0.5:
                photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        path = Path(folder) / f"{i // 1000:03d}" / f"photo_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path, format="JPEG", quality=int(rng.integers(80, 96)))
    return stop - start


def make_photos(work: Path, counts: list[int]) -> dict[int, Path]:
    """The largest count made from the hymenoptera photos; the smaller ones hard-link its first files."""
    sources = sorted(str(p) for p in PHOTOS.rglob("*.jpg"))
    top = max(counts)
    folder = work / f"photos-{top}"
    step = max(1, top // 32)
    jobs = [(s, min(s + step, top), sources, str(folder)) for s in range(0, top, step)]
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        assert sum(pool.map(_make_photos, jobs)) == top
    folders = {top: folder}
    files = sorted(folder.rglob("*.jpg"))
    for count in counts:
        if count != top:
            sub = work / f"photos-{count}"
            for f in files[:count]:
                (sub / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                os.link(f, sub / f.relative_to(folder))
            folders[count] = sub
    return folders


def cli(args: list[str], env: dict | None = None) -> tuple[dict, float]:
    """``retrain ARGS --json`` in a fresh process: (its JSON, its wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "retrain"), *args, "--json"], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"retrain {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def train_model(store: Path, env: dict, seed: int) -> str:
    result, wall = cli(
        [
            "run",
            str(PHOTOS / "train"),
            "--store",
            str(store),
            "--network",
            "squeezenet-caffe",
            "--weights",
            str(WEIGHTS),
            "--mode",
            "transfer",
            "--max-epochs",
            "6",
            "--no-promote",
            "--seed",
            str(seed),
        ],
        env,
    )
    print(
        f"trained on hymenoptera train/ (seed {seed}) in {wall:.0f} s: test accuracy {result['test_accuracy']:.3f}",
        flush=True,
    )
    return result["model_url"]


def new_home(work: Path, name: str, auto_server: bool) -> dict:
    """An environment with a new, empty PREFECT_HOME and no API set: a first command there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RETRAIN_AUTO_SERVER"}
    env.update(PREFECT_HOME=str(work / name), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    if not auto_server:
        env["RETRAIN_AUTO_SERVER"] = "0"
    return env


def stop_server(env: dict) -> None:
    subprocess.run([str(BIN / "retrain"), "server", "stop"], env=env, capture_output=True, cwd=ROOT)


# ---- the measurements -----------------------------------------------------------------------


def peer(model: str, folder: Path, workers: int) -> dict:
    listing = folder.parent / f"{folder.name}.txt"
    listing.write_text("\n".join(sorted(str(p) for p in folder.rglob("*.jpg"))))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEER, model, str(listing), str(workers)], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    images, rate = done.stdout.split()
    return {"images": int(images), "wall_seconds": wall, "images_per_second": float(rate)}


def score(model: str, folder: Path, out: Path, engine: str, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result, wall = cli(["score", model, str(folder), "--score-out", str(out), "--engine", engine], env)
    return {**result, "wall_seconds": wall, "load": os.getloadavg()[0]}


def agreement(reference: Path, other: Path) -> float:
    import pandas as pd

    a = pd.read_parquet(reference / "scores.parquet", columns=["path", "label"]).set_index("path")["label"]
    b = pd.read_parquet(other / "scores.parquet", columns=["path", "label"]).set_index("path")["label"]
    return float((a == b.reindex(a.index)).mean())


# The rows of each count: (key, what it is).
ROWS = (
    ("first", "first score of a new model"),
    ("later", "later score (server up)"),
    ("cold_auto", "cold, new home (starts server)"),
    ("cold_temporary", "cold, new home, AUTO_SERVER=0"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="5000,2000", help="photo counts (default 5000,2000)")
    parser.add_argument(
        "--engines", default="torch,onnx,onnx-int8", help="engines to score the smallest count with (none: skip)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if not (WEIGHTS.exists() and PHOTOS.exists()):
        sys.exit("the benchmark needs ../shared/weights and ../shared/data/hymenoptera_data")
    counts = sorted({int(c) for c in args.counts.split(",")}, reverse=True)
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    env = new_home(work, "prefect", auto_server=True)  # the user's home: its first command starts the server
    homes = [env]
    results: dict = {
        "cores": os.cpu_count(),
        "workers": args.workers,
        "load_average_start": os.getloadavg(),
        "json_out": args.json_out,
    }
    try:
        folders = make_photos(work, counts)
        for i, count in enumerate(counts):
            folder = folders[count]
            model = train_model(work / "store", env, seed=i)
            results[f"model_{count}"] = model
            results[f"peer_{count}"] = peer(model, folder, args.workers)
            results[f"first_{count}"] = score(model, folder, work / f"out-first-{count}", "auto", env)
            results[f"later_{count}"] = score(model, folder, work / f"out-later-{count}", "auto", env)
            cold = new_home(work, f"prefect-cold-{count}", auto_server=True)
            homes.append(cold)
            results[f"cold_auto_{count}"] = score(model, folder, work / f"out-cold-auto-{count}", "auto", cold)
            stop_server(cold)
            temporary = new_home(work, f"prefect-temporary-{count}", auto_server=False)
            results[f"cold_temporary_{count}"] = score(model, folder, work / f"out-cold-tmp-{count}", "auto", temporary)
            p = results[f"peer_{count}"]
            for key, what in ROWS:
                s = results[f"{key}_{count}"]
                print(
                    f"{count:,} photos, {what}: {s['wall_seconds']:.1f} s, {s['wall_seconds'] / p['wall_seconds']:.2f}x "
                    f"the peer's {p['wall_seconds']:.1f} s ({s['images_per_second_scoring']:.0f} against "
                    f"{p['images_per_second']:.0f} img/s, engine {s['engine']}); load {s['load']:.1f}",
                    flush=True,
                )
        small, model = counts[-1], results[f"model_{counts[-1]}"]
        engines = {}
        for engine in [] if args.engines == "none" else args.engines.split(","):
            engines[engine] = score(model, folders[small], work / f"out-{engine}-{small}", engine, env)
            engines[engine]["accuracy_val"] = cli(["evaluate", model, str(PHOTOS / "val"), "--engine", engine], env)[0][
                "accuracy"
            ]
        if "torch" in engines:
            for engine, r in engines.items():
                r["agreement_with_torch"] = agreement(work / f"out-torch-{small}", work / f"out-{engine}-{small}")
        results["engines"] = engines
        from retrain.tasks import storage
        from retrain.tasks.engine_gate import engines_dir

        record_url = storage.join(engines_dir(model, storage.sha256_of(model)), "validation.json")
        results["validation"] = storage.read_json(record_url) if storage.exists(record_url) else {}
    finally:
        for home in homes:
            stop_server(home)
        results["load_average_end"] = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)
    report(results, counts)


def report(results: dict, counts: list[int]) -> None:
    print(f"\n{'':<44}{'wall s':>9}{'img/s scoring':>15}{'vs peer wall':>14}{'load':>6}")
    for count in counts:
        p = results[f"peer_{count}"]
        print(f"{f'peer (DataLoader), {count:,}':<44}{p['wall_seconds']:>9.1f}{p['images_per_second']:>15.1f}")
        for key, what in ROWS:
            s = results[f"{key}_{count}"]
            print(
                f"{f'{what}, {count:,}':<44}{s['wall_seconds']:>9.1f}{s['images_per_second_scoring']:>15.1f}"
                f"{s['wall_seconds'] / p['wall_seconds']:>14.2f}{s['load']:>6.1f}"
            )
    if results["engines"]:
        speeds = next(iter(results["validation"].get("speeds", {}).values()), {})
        print(
            f"\n{'engine':<12}{'wall s':>9}{'img/s scoring':>15}{'agree/torch':>13}{'val acc':>9}{'fwd 1 thr':>11}{'gate':>7}"
        )
        for engine, r in results["engines"].items():
            verdict = results["validation"].get("engines", {}).get(engine, {})
            print(
                f"{engine:<12}{r['wall_seconds']:>9.1f}{r['images_per_second_scoring']:>15.1f}"
                f"{r.get('agreement_with_torch', float('nan')):>13.4f}{r['accuracy_val']:>9.4f}"
                f"{speeds.get(engine, 0):>11.1f}{'pass' if verdict.get('passed') else 'FAIL':>7}"
            )
        decoder = results["validation"].get("decoders", {}).get("scaled", {})
        print(f"scaled JPEG decoding: agreement {decoder.get('agreement', 0):.4f}, passed {decoder.get('passed')}")
    print(
        f"load average {results['load_average_start'][0]:.1f} at the start, {results['load_average_end'][0]:.1f} at the end"
    )
    out = Path(
        results.get("json_out") or ROOT / "benchmarks" / "results" / f"score-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
