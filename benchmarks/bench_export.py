"""`retrain export --with-preprocessing` on real photos (issue 25 item 4's "Must show"): label
agreement of ONNX Runtime alone, fed raw decoded pixels, with retrain's float32 torch scoring.

One model, trained as a user trains it (``retrain.run`` on hymenoptera ``train/``: SqueezeNet,
the Caffe ImageNet weights in ../shared/weights, transfer mode, ``--epochs`` epochs), or
``--model``. The photos: hymenoptera ``train/`` and ``val/`` JPEGs copied round-robin under new
names up to ``--images`` files (bench_drift's ``copies``; 396 distinct photos repeated).

- Reference: what ``retrain score --engine torch`` computes, the torch predictor on retrain's
  loader's pixels (``load_images``), with each decoder: the exact one, and the scaled (DCT) one
  that scoring uses where the engine gate validated it for the model (the file says which).
- Exported: ``retrain.export(model, out, with_preprocessing=True)``; from there only PIL and
  onnxruntime, as a client without retrain: ``Image.open(path).convert("RGB")`` as an array,
  one image per call at its own size, the graph's ``probabilities``.

Figures: label agreement with each reference (goal >= 99.5 %), the disagreeing files, the
largest probability difference, how many photos carry an EXIF rotation (which a client must
apply, as retrain's loader does; PIL's decode alone does not), milliseconds per image.

    .venv/bin/python benchmarks/bench_export.py                  # ~70 s on 2 cores
    .venv/bin/python benchmarks/bench_export.py --model runs/.../model.pt --images 500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_drift import HYMENOPTERA, WEIGHTS, copies  # noqa: E402


def client_probabilities(onnx_path: str, paths: list[Path]) -> tuple[np.ndarray, float]:
    """What a client with only PIL and onnxruntime computes: (probabilities, ms per image)."""
    import onnxruntime as ort
    from PIL import Image

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    out, started = [], time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))[None]
        out.append(session.run(["probabilities"], {"images": pixels})[0][0])
    return np.stack(out), 1000 * (time.perf_counter() - started) / max(len(paths), 1)


def exif_rotated(paths: list[Path]) -> int:
    from PIL import Image

    count = 0
    for path in paths:
        with Image.open(path) as image:
            count += image.getexif().get(0x0112, 1) not in (1, None)
    return count


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(reference: np.ndarray, exported: np.ndarray, names: list[str]) -> dict:
    same = reference.argmax(1) == exported.argmax(1)
    return {
        "images": len(names),
        "same_labels": int(same.sum()),
        "agreement_percent": round(100 * float(same.mean()), 2),
        "max_probability_difference": float(np.abs(reference - exported).max()),
        "disagreeing": sorted({names[i] for i in np.flatnonzero(~same)}),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model file (default: train one on hymenoptera train/)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "export.json"))
    args = parser.parse_args(argv)
    if not HYMENOPTERA.exists() or (args.model is None and not WEIGHTS.exists()):
        sys.exit(
            f"needs ../shared (hymenoptera_data, and the Caffe weights to train): not found under {HYMENOPTERA.parent}"
        )

    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        record = measure(args, Path(work))
    for name, figures in record["against"].items():
        print(
            f"{name}: {figures['same_labels']}/{figures['images']} labels agree ({figures['agreement_percent']} %), "
            f"largest probability difference {figures['max_probability_difference']:.2e}; "
            f"disagreeing files: {figures['disagreeing'] or 'none'}"
        )
    print(f"photos: {json.dumps(record['photos'])}; client {record['client_ms_per_image']:.1f} ms per image")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {args.json_out}")
    return record


def measure(args: argparse.Namespace, work: Path) -> dict:
    import torch

    import retrain
    from retrain.tasks import storage
    from retrain.tasks.engine_gate import choose_engine
    from retrain.tasks.inference import build_predictor, load_checked
    from retrain.tasks.preprocessing import load_images

    record: dict = {"cores": os.cpu_count(), "load_average_start": list(os.getloadavg())}
    model = args.model
    if model is None:
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
        record["training"] = {"epochs": args.epochs, "test_accuracy": run.get("test_accuracy")}
        record["training"]["seconds"] = round(time.perf_counter() - started, 1)
    record["model"] = args.model or "trained on hymenoptera train/ (a temporary store)"

    started = time.perf_counter()
    exported = retrain.export(model, str(work / "pixels.onnx"), with_preprocessing=True)
    record["export"] = {"seconds": round(time.perf_counter() - started, 1), "test_split": exported.get("test_split")}

    folder = copies([HYMENOPTERA / "train", HYMENOPTERA / "val"], work / "photos", args.images)
    paths = sorted(folder.glob("*.jpg"))
    sources = {_digest(p): str(p.relative_to(HYMENOPTERA)) for p in sorted(HYMENOPTERA.rglob("*.jpg"))}
    names = [sources[_digest(p)] for p in paths]  # each copy by the photo it copies
    record["photos"] = {
        "files": len(paths),
        "distinct": len(set(names)),
        "exif_rotated": exif_rotated(paths),
    }
    client, record["client_ms_per_image"] = client_probabilities(exported["out"], paths)

    loaded, _ = load_checked(model)
    predictor = build_predictor(loaded, "torch", device=torch.device("cpu"))
    size = loaded.preprocessing.input_size
    urls = [str(p) for p in paths]
    record["score_engine_torch_decoder"] = choose_engine(model, storage.sha256_of(model), "torch").decoder
    record["against"] = {
        f"torch, {decoder} decoder": compare(predictor.scores(load_images(urls, size, decoder)).numpy(), client, names)
        for decoder in ("exact", "scaled")
    }
    record["load_average_end"] = list(os.getloadavg())
    return record


if __name__ == "__main__":
    main()
