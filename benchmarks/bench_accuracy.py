"""Accuracy over seeds on the ../shared data sets, through the `retrain` command as a user
runs it (issue 2's figures). Not a test: it takes minutes.

    .venv/bin/python benchmarks/bench_accuracy.py [--merch-seeds 0 1 2 3 4] [--hymenoptera-seeds 0 1 2]

Each run is one `retrain run` process, as a user types it: its wall time includes starting
Prefect's temporary local API (unless PREFECT_API_URL points at a server); the flow's own
seconds are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"
RETRAIN = [sys.executable, "-m", "retrain.cli"]


def retrain(*args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([*RETRAIN, *args, "--json"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"retrain {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--merch-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--hymenoptera-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="*", default=["transfer", "finetune"])
    parser.add_argument("--store", default="/tmp/retrain-bench-accuracy")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.json"))
    args = parser.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{WEIGHTS} is missing: this benchmark needs ../shared")
    common = ["--store", args.store, "--network", "squeezenet-caffe", "--weights", str(WEIGHTS), "--fresh"]
    results: dict = {"merch": [], "hymenoptera": []}
    for seed in args.merch_seeds:
        run, wall = retrain("run", str(SHARED / "data" / "MerchData.zip"), *common, "--seed", str(seed))
        results["merch"].append(
            {"seed": seed, "test_accuracy": run["test_accuracy"], "flow_seconds": run["seconds"], "wall_seconds": wall}
        )
        print(
            f"MerchData seed {seed}: test accuracy {run['test_accuracy']:.4f}, "
            f"flow {run['seconds']:.1f} s, wall {wall:.1f} s",
            flush=True,
        )
    hymenoptera = SHARED / "data" / "hymenoptera_data"
    for mode in args.modes:
        for seed in args.hymenoptera_seeds:
            run, wall = retrain(
                "run",
                str(hymenoptera / "train"),
                *common,
                "--mode",
                mode,
                "--seed",
                str(seed),
                "--split",
                "0.85,0.15,0",
            )
            evaluation, _ = retrain("evaluate", run["model_url"], str(hymenoptera / "val"))
            results["hymenoptera"].append(
                {
                    "mode": mode,
                    "seed": seed,
                    "val_accuracy": evaluation["data_accuracy"],
                    "flow_seconds": run["seconds"],
                    "wall_seconds": wall,
                }
            )
            print(
                f"hymenoptera {mode} seed {seed}: val/ accuracy {evaluation['accuracy']:.4f}, "
                f"flow {run['seconds']:.1f} s, wall {wall:.1f} s",
                flush=True,
            )
    if results["merch"]:
        accs = [r["test_accuracy"] for r in results["merch"]]
        print(f"MerchData mean test accuracy {statistics.mean(accs):.4f} over seeds {args.merch_seeds}")
    for mode in args.modes:
        accs = [r["val_accuracy"] for r in results["hymenoptera"] if r["mode"] == mode]
        if accs:
            print(f"hymenoptera {mode}: mean val/ accuracy {statistics.mean(accs):.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    main()
