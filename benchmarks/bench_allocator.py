"""glibc malloc settings (tasks/allocator.py): with them against glibc's defaults.

Each measurement runs in a fresh process, alternating ``RETRAIN_MALLOC_TUNING=0`` (glibc's
defaults) and the project's settings, ``--repeats`` times each:

- training: ``tasks.training.train`` fine-tuning SqueezeNet (Caffe layout, 227 px) on random
  images, batch 32, the classic loop, torch's default threads: seconds per iteration.
- inference: ``tasks.scoring.partition.score_paths`` (read, decode, resize, forward in mini-batches of
  8, one torch thread) over photos, in the environment Dask's nanny gives each worker
  (``MALLOC_TRIM_THRESHOLD_=65536``): CPU ms per image.

Page faults come from ``getrusage``. Other work on the machine makes times noisy; the ratio of
the medians within one run is the figure. Run from the project root:

    .venv/bin/python benchmarks/bench_allocator.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT / "benchmarks" / "data" / "photos-5000"  # made by bench_score.py


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child_training(iterations: int) -> dict:
    import torch

    from retrain.tasks.networks import build_network, get_spec
    from retrain.tasks.preprocessing import Augmentation
    from retrain.tasks.training import TrainingData, TrainingOptions, train

    spec = get_spec("squeezenet-caffe")
    size = spec.preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    n = 32 * iterations
    data = TrainingData(
        torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=generator),
        torch.randint(0, 5, (n,), generator=generator),
        torch.randint(0, 256, (8, 3, *size), dtype=torch.uint8, generator=generator),
        torch.randint(0, 5, (8,), generator=generator),
    )
    model, _ = build_network(spec.name, 5, "none")
    options = TrainingOptions(
        max_epochs=2,
        mini_batch_size=32,
        classic_loop=True,
        checkpoint_frequency=0,
        validation_frequency=10_000,
        execution_environment="cpu",
    )
    faults, started = _faults(), time.perf_counter()
    train(model, spec, spec.preprocessing, data, "finetune", options, Augmentation())
    seconds = time.perf_counter() - started
    return {
        "seconds_per_iteration": seconds / (2 * iterations),
        "faults_per_iteration": (_faults() - faults) / (2 * iterations),
    }


def child_inference(count: int) -> dict:
    import torch

    from retrain.tasks.allocator import tune_allocator
    from retrain.tasks.inference import build_predictor
    from retrain.tasks.model_file import model_from_record, model_record
    from retrain.tasks.networks import build_network, get_spec
    from retrain.tasks.scoring import score_paths

    torch.set_num_threads(1)
    spec = get_spec("squeezenet-caffe")
    model, origin = build_network(spec.name, 1000, "none")
    record = model_record(model, spec, [f"c{i}" for i in range(1000)], origin)
    scoring = build_predictor(model_from_record(record, source="benchmark"), device=torch.device("cpu"))
    tune_allocator("inference")  # what scoring.partition.score_partition does in a worker
    if PHOTOS.exists():
        paths = sorted(str(p) for p in PHOTOS.rglob("*.jpg"))[:count]
    else:
        from retrain.tasks.samples import make_shapes_dataset

        folder = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-allocator-shapes"
        if not folder.exists():
            make_shapes_dataset(str(folder), count // 3 + 1, 640, 0)
        paths = sorted(str(p) for p in folder.rglob("*.jpg"))[:count]
    score_paths(paths[:16], scoring)  # warm-up
    faults, cpu = _faults(), time.process_time()
    score_paths(paths, scoring)
    cpu = time.process_time() - cpu
    return {
        "cpu_ms_per_image": 1000 * cpu / len(paths),
        "faults_per_image": (_faults() - faults) / len(paths),
        "images": len(paths),
    }


def run_child(workload: str, tuned: bool, size: int) -> dict:
    env = {**os.environ, "RETRAIN_MALLOC_TUNING": "1" if tuned else "0"}
    if workload == "inference":
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"  # as Dask's nanny starts every worker
    done = subprocess.run(
        [sys.executable, __file__, "--child", workload, "--size", str(size)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6, help="training iterations per epoch (2 epochs)")
    parser.add_argument("--images", type=int, default=600, help="photos scored per inference run")
    parser.add_argument("--child", choices=["training", "inference"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_training(args.size) if args.child == "training" else child_inference(args.size)
        print(json.dumps(result))
        return

    results: dict = {"load_average_start": os.getloadavg()}
    for workload, size, key in (
        ("training", args.iterations, "seconds_per_iteration"),
        ("inference", args.images, "cpu_ms_per_image"),
    ):
        runs: dict[str, list[dict]] = {"defaults": [], "tuned": []}
        for repeat in range(args.repeats):
            order = ("defaults", "tuned") if repeat % 2 == 0 else ("tuned", "defaults")
            for label in order:
                runs[label].append(run_child(workload, label == "tuned", size))
                print(f"{workload} {label}: {runs[label][-1]}", flush=True)
        medians = {label: statistics.median(r[key] for r in rs) for label, rs in runs.items()}
        faults = {
            label: statistics.median(r[next(k for k in r if k.startswith("faults"))] for r in rs)
            for label, rs in runs.items()
        }
        results[workload] = {
            "runs": runs,
            key: medians,
            "faults": faults,
            "speedup": medians["defaults"] / medians["tuned"],
        }
        print(
            f"== {workload}: {key} {medians['defaults']:.3f} with glibc's defaults, {medians['tuned']:.3f} "
            f"tuned: {medians['defaults'] / medians['tuned']:.2f}x; page faults {faults['defaults']:.0f} vs "
            f"{faults['tuned']:.0f}",
            flush=True,
        )
    results["load_average_end"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / f"allocator-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
