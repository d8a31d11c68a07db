"""Drift on scoring jobs (issue 23's "Must show" for item 2), on real photos.

One model, trained as a user trains it: ``retrain run`` on hymenoptera ``train/`` (SqueezeNet,
the Caffe ImageNet weights in ../shared/weights, transfer mode, ``--epochs`` epochs), whose
evaluation stores the reference profile of its held-out images in the model file. Then, each a
real scoring job (``retrain.score``, the command's code, engine ``auto``: the fastest one the
engine gate validated here) into its own output, reading its ``drift.json``:

- ``val/``: hymenoptera's own validation photos (153), never seen in training: no drift expected;
- ``val/`` darkened (x 0.35) and blurred (Gaussian, radius 3): drift expected;
- MerchData's 75 images (other objects): drift expected.

The false-alarm rate: 20 random halves of ``val/`` (seeded), each judged by
``tasks.drift.judge`` on the outputs of one pass of the job's engine over ``val/`` (what a
job on that half would compute: the verdict is a function of the images' predictions and
embeddings), with float32 torch and with the auto engine.

The overhead at 2,000 images: ``val/`` and ``train/`` copied under new names up to 2,000
files; the same job (a fresh output each time) with the model file and with the same model
file less its reference profile (which scores exactly as before drift existed: no embeddings
kept, no tests), alternated, ``--repeats`` times each after one warm-up each (the engine
gate validates each file once), both on the engine ``auto`` chose for the model. The
figure: the median wall with drift over the median without.

    .venv/bin/python benchmarks/bench_drift.py            # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_drift.py --repeats 1 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"
MERCH = SHARED / "data" / "MerchData.zip"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
HALVES = 20
OVERHEAD_IMAGES = 2000


def darkened_copy(source: Path, out: Path) -> Path:
    from PIL import Image, ImageFilter

    for path in sorted(source.rglob("*.jpg")):
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path).convert("RGB")
        dark = Image.fromarray((np.asarray(image) * 0.35).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
        dark.save(target, quality=90)
    return out


def copies(sources: list[Path], out: Path, count: int) -> Path:
    """``count`` image files under ``out``: the sources' JPEGs copied round-robin, renamed."""
    files = [p for source in sources for p in sorted(source.rglob("*.jpg"))]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shutil.copyfile(files[i % len(files)], out / f"{i:05d}.jpg")
    return out


def tests_of(drift: dict) -> dict:
    return {
        "drift": drift["drift"],
        "reason": drift.get("reason"),
        "images": drift["images"],
        **{t["name"]: {"statistic": t["statistic"], "p_value": t["p_value"]} for t in drift["tests"]},
        "threshold": drift["tests"][0]["threshold"] if drift["tests"] else None,
    }


def false_alarms(model_url: str, engine_choice, folder: Path, seed: int = 0) -> dict:
    """20 random halves of ``folder`` judged against the model's reference, from one pass of
    ``engine_choice``'s predictor."""
    import torch

    from retrain.tasks import drift
    from retrain.tasks.evaluation import predict_images
    from retrain.tasks.inference import build_predictor, load_checked

    loaded, record = load_checked(model_url)
    predictor = build_predictor(loaded, engine_choice.engine, engine_choice.onnx_url, decoder=engine_choice.decoder)
    paths = [str(p) for p in sorted(folder.rglob("*.jpg"))]
    scores, embeddings = predict_images(predictor, paths)
    confidence, labels = scores.max(1)
    rng = np.random.default_rng(seed)
    verdicts = []
    for _ in range(HALVES):
        half = torch.from_numpy(rng.permutation(len(paths))[: len(paths) // 2])
        counts = {c: int((labels[half] == i).sum()) for i, c in enumerate(loaded.classes)}
        result = drift.judge(
            record["reference"], loaded.classes, counts, confidence[half].numpy(), embeddings[half].numpy()
        )
        verdicts.append(tests_of(result))
    alarms = sum(bool(v["drift"]) for v in verdicts)
    return {
        "engine": engine_choice.engine,
        "halves": HALVES,
        "images_per_half": len(paths) // 2,
        "false_alarms": alarms,
        "rate": alarms / HALVES,
        "min_p": {name: min(v[name]["p_value"] for v in verdicts) for name in ("class_mix", "confidence", "embedding")},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "drift.json"))
    parser.add_argument("--skip-verdicts", action="store_true", help="only the overhead (after training)")
    args = parser.parse_args(argv)
    if not (WEIGHTS.exists() and MERCH.exists() and HYMENOPTERA.exists()):
        sys.exit(f"needs ../shared (weights, MerchData.zip, hymenoptera_data): not found under {SHARED}")

    import torch

    import retrain
    from retrain.tasks import storage
    from retrain.tasks.engine_gate import choose_engine
    from retrain.tasks.model_file import read_model_record, save_model_file

    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    record: dict = {"cores": os.cpu_count(), "epochs": args.epochs, "load_average_start": list(os.getloadavg())}
    try:
        started = time.perf_counter()
        run = retrain.run(
            str(HYMENOPTERA / "train"),
            store=str(work / "store"),
            network="squeezenet-caffe",
            weights=str(WEIGHTS),
            mode="transfer",
            options={"max_epochs": args.epochs},
            promote=False,
        )
        model = run["model_url"]
        reference = read_model_record(model)["reference"]
        record["model"] = {
            "test_accuracy": run.get("test_accuracy"),
            "reference_images": reference["images"],
            "reference_split": reference["split"],
            "reference_embeddings": list(reference["embeddings"].shape),
            "run_seconds": round(time.perf_counter() - started, 1),
        }
        with zipfile.ZipFile(MERCH) as archive:
            archive.extractall(work)
        folders = {
            "val": HYMENOPTERA / "val",
            "val_darkened_blurred": darkened_copy(HYMENOPTERA / "val", work / "dark"),
            "merchdata": work / "MerchData",
        }
        record["jobs"] = {}
        for name, folder in folders.items() if not args.skip_verdicts else []:
            t = time.perf_counter()
            summary = retrain.score(model, str(folder), score_out=str(work / "out" / name))
            record["jobs"][name] = {
                **tests_of(summary["drift"]),
                "engine": summary["engine"],
                "seconds": round(time.perf_counter() - t, 2),
            }
            print(name, json.dumps(record["jobs"][name]), flush=True)

        sha = storage.sha256_of(model)
        auto = choose_engine(model, sha, "auto")
        if not args.skip_verdicts:
            record["false_alarms"] = [
                false_alarms(model, choose_engine(model, sha, "torch"), HYMENOPTERA / "val"),
                *([false_alarms(model, auto, HYMENOPTERA / "val")] if auto.engine != "torch" else []),
            ]
            print("false alarms", json.dumps(record["false_alarms"]), flush=True)

        # overhead: the model file with and without its reference profile, at 2,000 images
        plain = dict(read_model_record(model))
        plain.pop("reference")
        plain_url = save_model_file(str(Path(model).with_name("model-no-reference.pt")), plain)
        images = copies([HYMENOPTERA / "val", HYMENOPTERA / "train"], work / "many", OVERHEAD_IMAGES)
        walls: dict[str, list[float]] = {"with_drift": [], "without": []}
        parts: dict[str, list[dict]] = {"with_drift": [], "without": []}
        # one engine for both (the gate could choose differently for the two files under load)
        engine = auto.engine
        for repeat in range(args.repeats + 1):  # the first of each: warm-up (engine gate)
            for kind, url in (("without", plain_url), ("with_drift", model)):
                out = work / "overhead" / f"{kind}-{repeat}"
                t = time.perf_counter()
                summary = retrain.score(url, str(images), score_out=str(out), engine=engine)
                wall = time.perf_counter() - t
                if repeat:
                    walls[kind].append(wall)
                    parts[kind].append(
                        {
                            "wall": round(wall, 2),
                            "forward_seconds": summary.get("forward_seconds"),
                            "scoring_seconds": summary.get("scoring_seconds"),
                            "drift_seconds": summary["drift"].get("seconds"),
                        }
                    )
                print(kind, repeat, round(wall, 2), summary["engine"], json.dumps(summary["drift"].get("seconds")))
        with_drift, without = statistics.median(walls["with_drift"]), statistics.median(walls["without"])
        record["overhead"] = {
            "images": OVERHEAD_IMAGES,
            "walls": walls,
            "runs": parts,
            "median_with_drift": round(with_drift, 2),
            "median_without": round(without, 2),
            "ratio": round(with_drift / without, 3),
            "engine": summary["engine"],
        }
        record["load_average_end"] = list(os.getloadavg())
        record["torch_threads"] = torch.get_num_threads()
        Path(args.json_out).write_text(json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
