"""DDP check (issue 12), part of benchmarks/gpu_check.sh: fine-tunes the same run in one process
and with DistributedDataParallel, and checks that the final weights agree.

On a machine with 2 or more GPUs the DDP run is ``train_run`` with ``processes`` = the GPU count
(NCCL, one process per GPU, what ``retrain run --mode finetune`` does there by itself); with one
GPU it is the same launcher with one NCCL rank (NCCL refuses two ranks on one GPU): DDP's
wrapper, gradient hooks and keyed dropout on CUDA, without the split. Without a GPU: 2 gloo
processes on the CPU (what tests/test_distributed.py checks on tiny images).

    python benchmarks/ddp_check.py IMAGE_FOLDER WEIGHTS_FILE [JSON_OUT]
Environment: DDP_CHECK_EPOCHS (default 2), DDP_CHECK_BATCH (default 32), DDP_CHECK_LEARN_RATE
(default 1e-4, solver sgdm).

Agreement: on the GPU training runs in bf16 autocast and cuDNN may pick other kernels in another
process, so the check is relative: the largest weight difference between the runs must be under
DDP_CHECK_RELATIVE (default 0.05) of the largest change training made to any weight. On the CPU
(float32) it is float rounding (tests/test_distributed.py: 5e-5 absolute).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

from retrain.tasks import storage
from retrain.tasks.datastore import index_stage, split_stage
from retrain.tasks.model_file import load_model_file
from retrain.tasks.networks import build_network, resolve_device
from retrain.tasks.runs import RunConfig, read_run, start_run
from retrain.tasks.storage import RunLayout
from retrain.tasks.training.distributed import launch
from retrain.tasks.training.stage import _train_rank, train_run


def _run(store: str, images: str, weights: str, processes: int) -> str:
    config = RunConfig(
        data=images,
        dataset=images,
        network="squeezenet-caffe",
        weights=weights,
        mode="finetune",
        split=(0.85, 0.15, 0.0),
        options={
            "max_epochs": int(os.environ.get("DDP_CHECK_EPOCHS", 2)),
            "mini_batch_size": int(os.environ.get("DDP_CHECK_BATCH", 32)),
            # SGD: an update proportional to the gradient, so rounding stays rounding. (Adam moves a
            # weight whose gradient is at rounding level by +-learn rate either way: the same
            # run in 1 and 2 threads differs as much; tests/test_distributed.py.)
            "solver": "sgdm",
            "initial_learn_rate": float(os.environ.get("DDP_CHECK_LEARN_RATE", 1e-4)),
            "checkpoint_frequency": 0,
            "output_network": "last-iteration",
            "processes": processes,
        },
        augmentation={"reflect": True, "max_translation": 30},
    )
    run, lock = start_run(store, config, resume=False)  # the run folder and its lock
    try:
        index_stage(images, run)
        split_stage(run, (0.85, 0.15, 0.0), 0)
    finally:
        lock.release()  # the training below is the run's only writer
    return run


def main() -> int:
    images, weights = sys.argv[1], sys.argv[2]
    out = sys.argv[3] if len(sys.argv) > 3 else None
    device = resolve_device("auto")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    processes = gpus if gpus >= 2 else (1 if gpus == 1 else 2)
    store = tempfile.mkdtemp(prefix="ddp-check-")
    results = {}
    for label in ("one process", "ddp"):
        run = _run(store, images, weights, 1 if label == "one process" else processes)
        started = time.perf_counter()
        if label == "ddp" and processes == 1:  # one GPU: one NCCL rank through the same launcher
            launch(_train_rank, (run, False), 1, device, _Print())
            summary = storage.read_json(RunLayout(run).training)
        else:
            summary = train_run(run)
        seconds = time.perf_counter() - started
        results[label] = {
            "processes": processes if label == "ddp" else 1,
            "backend": ("nccl" if device.type == "cuda" else "gloo") if label == "ddp" else None,
            "seconds": round(seconds, 2),
            "training_seconds": round(summary["seconds"], 2),
            "images_per_second": round(summary["train_images"] * summary["epochs"] / summary["seconds"], 1),
            "val_accuracy": summary["val_accuracy"],
            "weights": load_model_file(summary["trained"]).model.state_dict(),
            "config_processes": read_run(run)["config"]["options"]["processes"],
        }
        print(
            f"  fine-tune, {label} ({results[label]['processes']} x {device.type}): {seconds:6.1f} s in all, "
            f"{results[label]['images_per_second']:8.1f} images/s training, val accuracy {summary['val_accuracy']:.3f}",
            flush=True,
        )
    torch.manual_seed(0)  # the stage's seed: the weights both runs started from
    classes = storage.read_parquet(RunLayout(run).split)["label"].nunique()
    initial = build_network("squeezenet-caffe", classes, weights)[0].state_dict()
    one, ddp = results["one process"].pop("weights"), results["ddp"].pop("weights")
    difference = max((one[k].float() - ddp[k].float()).abs().max().item() for k in one)
    moved = max((one[k].float() - initial[k].float()).abs().max().item() for k in one)
    limit = float(os.environ.get("DDP_CHECK_RELATIVE", 0.05))
    ok = difference <= limit * moved
    print(
        f"  DDP against one process: largest weight difference {difference:.3g}, "
        f"{difference / moved:.2%} of the largest change training made ({moved:.3g}): "
        + ("ok" if ok else f"TOO LARGE (limit {limit:.0%})")
    )
    report = {"runs": results, "max_weight_difference": difference, "max_weight_change": moved, "ok": ok}
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


class _Print:
    """The launcher's logger here: rank 0's records printed."""

    def log(self, level: int, message: str) -> None:
        if level >= 20:
            print("   ", message, flush=True)


if __name__ == "__main__":  # the ranks are spawned: they import this file without running it
    sys.exit(main())
