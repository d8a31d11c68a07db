"""The engine gate: each reduced-precision engine (and the scaled JPEG decoder) is validated
once per model against float32 torch on the run's held-out images; ``auto`` picks the fastest
engine that passed on this hardware.

What it keeps, beside the model file and keyed by its sha256::

    <model folder>/<model name>.engines/<sha256[:16]>/
        validation.json   per engine: label agreement with torch, accuracy, max score
                          difference, passed; per decoder the same; speeds per hardware
        model.onnx        the float32 export (what the onnx engine runs)
        model-int8.onnx   static QDQ int8, calibrated on the run's training images

Held-out images are the run's validation and test images (``split.parquet`` beside the model);
calibration images are its training images. A model file with no run beside it has nothing to
validate on: ``auto`` then runs float32 torch, and forcing another engine says it is unvalidated.
A failed engine is never picked automatically; forcing one says so.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from retrain.tasks import storage
from retrain.tasks.export import onnx_bytes, quantize_int8
from retrain.tasks.inference import (
    ENGINE_CHOICES,
    EngineError,
    Predictor,
    build_predictor,
    hardware_key,
    image_loader,
    load_checked,
    supported_engines,
)
from retrain.tasks.networks import resolve_device

MIN_AGREEMENT = 0.995  # label agreement with float32 torch on the held-out images
MAX_ACCURACY_DROP = 0.005  # accuracy at most half a point below float32 torch
MAX_HELD_OUT = 400  # enough to see a 0.5 % disagreement, few enough to decode in seconds
CALIBRATION_IMAGES = 64
SPEED_BATCH, SPEED_SECONDS = 8, 0.6  # forward-only rate: one thread, batches of 8 (a worker's)
GATE_VERSION = 3  # 3: int8 keeps its stem convolutions in float32; scaled decoding at twice the input


@dataclass
class EngineChoice:
    """What the driver hands every worker: the engine, its ONNX file, the decoder, and why."""

    engine: str
    onnx_url: str | None = None
    decoder: str = "exact"
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def engines_dir(model_url: str, sha256: str) -> str:
    folder, name = posixpath.split(model_url)
    return storage.join(folder, f"{posixpath.splitext(name)[0]}.engines", sha256[:16])


def _fallback_dir(sha256: str) -> str:
    return os.path.join(tempfile.gettempdir(), "retrain-engines", sha256[:16])


def held_out_and_calibration(model_url: str) -> tuple[pd.DataFrame | None, list[str]]:
    """The run's held-out images (path, label) and training image paths, from the
    ``split.parquet`` beside the model; (None, []) for a model file with no run beside it."""
    split_url = storage.join(posixpath.dirname(model_url), "split.parquet")
    if not storage.exists(split_url):
        return None, []
    split = storage.read_parquet(split_url)
    held = split[split["split"].isin(["val", "test"])][["path", "label"]]
    held = held.sample(n=min(len(held), MAX_HELD_OUT), random_state=0) if len(held) else held
    train = split[split["split"] == "train"]["path"]
    train = train.sample(n=min(len(train), CALIBRATION_IMAGES), random_state=0)
    return held.reset_index(drop=True), list(train)


def _decode_all(paths: list[str], decoder: str, size: tuple[int, int]) -> torch.Tensor:
    load = image_loader(decoder, size)
    return torch.stack([load(storage.read_bytes(p)) for p in paths]) if paths else torch.empty(0, 3, *size)


def compare(reference: torch.Tensor, candidate: torch.Tensor, labels: list[int] | None) -> dict:
    """Agreement of the top labels, accuracy of both, the largest score difference, verdict."""
    ref, cand = reference.argmax(1), candidate.argmax(1)
    agreement = float((ref == cand).float().mean()) if len(ref) else 0.0
    out = {
        "images": len(ref),
        "agreement": agreement,
        "max_score_difference": float((reference - candidate).abs().max()),
    }
    drop = 0.0
    if labels is not None and len(labels):
        truth = torch.tensor(labels)
        out["reference_accuracy"] = float((ref == truth).float().mean())
        out["accuracy"] = float((cand == truth).float().mean())
        drop = out["reference_accuracy"] - out["accuracy"]
    out["passed"] = bool(len(ref) and agreement >= MIN_AGREEMENT and drop <= MAX_ACCURACY_DROP)
    return out


def forward_rate(predictor: Predictor, seconds: float = SPEED_SECONDS) -> float:
    """Images per second of the forward pass alone, on one thread, batches of 8."""
    pixels = torch.randint(0, 256, (SPEED_BATCH, 3, *predictor.preprocessing.input_size), dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor.scores(pixels)  # warm-up: first-call allocation and kernel selection
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            predictor.scores(pixels)
            count += SPEED_BATCH
        return count / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def _write_artifacts(folder: str, loaded, sha256: str, calibration: list[np.ndarray]) -> dict[str, str]:
    fp32 = onnx_bytes(loaded, sha256)
    files = {"onnx": storage.write_bytes(storage.join(folder, "model.onnx"), fp32)}
    if calibration:
        files["onnx-int8"] = storage.write_bytes(
            storage.join(folder, "model-int8.onnx"), quantize_int8(fp32, calibration)
        )
    return files


def validate_engines(
    model_url: str,
    sha256: str,
    held_out: pd.DataFrame | None = None,
    calibration: list[str] | None = None,
    device: torch.device | None = None,
    folder: str | None = None,
) -> dict:
    """Validate every engine this hardware offers against float32 torch and write
    ``validation.json`` (and the ONNX files) into ``folder``. Returns the record."""
    device = device or resolve_device("auto")
    folder = folder or engines_dir(model_url, sha256)
    if held_out is None:
        held_out, calibration = held_out_and_calibration(model_url)
    loaded, _ = load_checked(model_url)
    size = loaded.preprocessing.input_size
    reference = build_predictor(loaded, "torch", device=device)
    calib_pixels = _decode_all(list(calibration or [])[:CALIBRATION_IMAGES], "exact", size)
    calib = [
        reference.network_input(calib_pixels[i : i + 8][:, reference.affine.channels]).contiguous().numpy()
        for i in range(0, len(calib_pixels), 8)
    ]
    files = _write_artifacts(folder, loaded, sha256, calib)
    record: dict = {
        "gate_version": GATE_VERSION,
        "model_sha256": sha256,
        "files": {k: posixpath.basename(v) for k, v in files.items()},
        "engines": {},
        "decoders": {},
        "speeds": {},
        "validated": held_out is not None and len(held_out) > 0,
    }
    if not record["validated"]:
        record["note"] = "no held-out images beside the model (no split.parquet): only float32 torch is trusted"
    else:
        labels = [loaded.classes.index(lbl) if lbl in loaded.classes else -1 for lbl in held_out["label"]]
        paths = list(held_out["path"])
        ref_scores = reference.scores(_decode_all(paths, "exact", size))
        record["engines"]["torch"] = compare(ref_scores, ref_scores, labels)
        record["decoders"]["scaled"] = compare(ref_scores, reference.scores(_decode_all(paths, "scaled", size)), labels)
        pixels = _decode_all(paths, "exact", size)
        for engine in supported_engines(device):
            if engine == "torch" or (engine.startswith("onnx") and engine not in files):
                continue
            candidate = build_predictor(loaded, engine, files.get(engine), device)
            record["engines"][engine] = compare(ref_scores, candidate.scores(pixels), labels)
    record["speeds"][hardware_key(device)] = measure_speeds(loaded, folder, record, device)
    storage.write_json(storage.join(folder, "validation.json"), record)
    return record


def measure_speeds(loaded, folder: str, record: dict, device: torch.device) -> dict[str, float]:
    speeds = {"torch": forward_rate(build_predictor(loaded, "torch", device=device))}
    for engine in supported_engines(device):
        if engine == "torch" or (engine.startswith("onnx") and engine not in record["files"]):
            continue
        onnx_url = storage.join(folder, record["files"][engine]) if engine.startswith("onnx") else None
        speeds[engine] = forward_rate(build_predictor(loaded, engine, onnx_url, device))
    return {k: round(v, 1) for k, v in speeds.items()}


def existing_record(model_url: str, sha256: str, device: torch.device) -> tuple[dict, str] | None:
    for folder in (engines_dir(model_url, sha256), _fallback_dir(sha256)):
        url = storage.join(folder, "validation.json")
        if storage.exists(url):
            record = storage.read_json(url)
            if record.get("gate_version") == GATE_VERSION and hardware_key(device) in record.get("speeds", {}):
                return record, folder
    return None


def _can_validate(model_url: str, held: dict) -> bool:
    if held.get("held_out") is not None:
        return len(held["held_out"]) > 0
    return storage.exists(storage.join(posixpath.dirname(model_url), "split.parquet"))


def engine_record(model_url: str, sha256: str, device: torch.device | None = None, **held) -> tuple[dict, str]:
    """The validation record of this model (made now when there is none, or none with speeds
    for this hardware) and the folder it lives in. A store that cannot be written (a model in a
    read-only folder) keeps it in a local temporary folder instead."""
    device = device or resolve_device("auto")
    found = existing_record(model_url, sha256, device)
    if found is not None:
        return found
    try:
        return validate_engines(model_url, sha256, device=device, **held), engines_dir(model_url, sha256)
    except (PermissionError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        folder = _fallback_dir(sha256)
        return validate_engines(model_url, sha256, device=device, folder=folder, **held), folder


def choose_engine(
    model_url: str, sha256: str, requested: str = "auto", device: torch.device | None = None, **held
) -> EngineChoice:
    """The engine (and decoder) a job runs: ``auto`` = the fastest that passed on this
    hardware; a named one as asked, saying when it failed or was never validated."""
    if requested not in ENGINE_CHOICES:
        raise EngineError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {requested!r}")
    device = device or resolve_device("auto")
    offered = supported_engines(device)
    if requested != "auto" and requested not in offered:
        raise EngineError(
            f"engine {requested} cannot run on this {device.type} ({hardware_key(device)}); "
            f"engines here: {', '.join(offered)}"
        )
    if requested == "torch":  # the reference needs no validation; a decoder verdict is used if there is one
        found = existing_record(model_url, sha256, device)
        scaled = found is not None and found[0].get("decoders", {}).get("scaled", {}).get("passed")
        return EngineChoice("torch", None, "scaled" if scaled else "exact", "float32 reference, as asked")
    if (
        requested == "auto"
        and existing_record(model_url, sha256, device) is None
        and not _can_validate(model_url, held)
    ):
        return EngineChoice("torch", None, "exact", "float32 torch: no held-out images to validate other engines on")
    record, folder = engine_record(model_url, sha256, device, **held)
    decoder = "scaled" if record.get("decoders", {}).get("scaled", {}).get("passed") else "exact"
    speeds = record["speeds"].get(hardware_key(device), {})
    verdicts = record.get("engines", {})
    if requested == "auto":
        passed = [e for e in offered if e == "torch" or verdicts.get(e, {}).get("passed")]
        engine = max(passed, key=lambda e: speeds.get(e, 0.0))
        reason = f"fastest validated engine here ({speeds.get(engine, 0):.0f} images/s forward-only, one thread)"
        if not record.get("validated"):
            reason = record.get("note", "not validated")
    else:
        engine = requested
        verdict = verdicts.get(engine)
        if verdict is None:
            reason = f"forced: {engine} is NOT validated for this model ({record.get('note', 'no verdict')})"
        elif not verdict["passed"]:
            reason = (
                f"forced: {engine} FAILED validation (label agreement {verdict['agreement']:.4f}, "
                f"accuracy {verdict.get('accuracy', float('nan')):.4f} vs {verdict.get('reference_accuracy', float('nan')):.4f})"
            )
        else:
            reason = f"validated (label agreement {verdict['agreement']:.4f}), as asked"
    if engine.startswith("onnx") and engine not in record["files"]:
        raise EngineError(f"engine {engine} needs calibration images (the run's training images); this model has none")
    onnx_url = storage.join(folder, record["files"][engine]) if engine.startswith("onnx") else None
    return EngineChoice(engine, onnx_url, decoder, reason)
