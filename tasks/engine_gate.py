"""The engine gate: each reduced-precision engine (and the scaled JPEG decoder) is validated
once per model against float32 torch on the run's own images; ``auto`` picks the fastest
engine that passed on this hardware.

When: the retraining flow validates the model it publishes (its "validate engines" step,
:func:`validate_run`), so scoring only reads the record. A model with no record for this
hardware (published before that step, or copied to another machine) is validated on first
use (:func:`engine_record`), as before.

What it keeps, beside the model file and keyed by its sha256::

    <model folder>/<model name>.engines/<sha256[:16]>/
        validation.json   the rule it was judged by; the images (how many, from which split);
                          per engine: label agreement with torch, disagreements and how many the
                          rule allowed, held-out accuracy, max score difference, passed; per
                          decoder the same; speeds per hardware
        model.onnx        the float32 export (what the onnx engine runs)
        model-int8.onnx   static QDQ int8, calibrated on the run's training images

The images: label agreement needs no labels, so it is measured on every image the run has
(train, val and test from ``split.parquet`` beside the model) up to ``AGREEMENT_IMAGES``; above
that, a seeded sample that keeps the held-out images first. Accuracy (which does need labels the
model has not learnt) is judged on the held-out part of them only (``datastore.is_held_out``: val
and test). Their exact pixels are read back from the run's image shards, where training
decoded every image of the split with the one loader at the input size (tasks/training/
shards.py): the gate decodes none of them again, and judges on the very pixels evaluation and
training saw. Where there are no shards (a model with no run's training record beside it, a
store that is not a local disk), each image is decoded once for all engines. Either way the
pixels are the exact loader's, so the rule below (and ``GATE_VERSION``) is unchanged. The
scaled decoder's check decodes the JPEGs its own way and scores again only those whose pixels
differ from the exact ones (for any other file its pixels are the exact ones). The int8
calibration images are training images of that same set: calibration sets activation ranges,
not weights, so agreeing on them is hardly easier than on others.

The rule (``GATE_VERSION`` 4): an engine passes when it gives float32 torch's top label on at
least 99.5 % of n images, n >= ``MIN_GATE_IMAGES``, and its held-out accuracy is at most half a
point lower. In numbers: floor(0.005 n) disagreements allowed, so below 200 images every label
must agree (one disagreement in 75 images is already 98.7 %); 5 of 1,000. Fewer than
``MIN_GATE_IMAGES`` images cannot establish anything (an engine that changes one label in ten
would agree on all of them one time in eight): every engine but torch is refused.

A record made by another rule (an older gate that judged on a few held-out images) is not
trusted: it is keyed on :func:`gate_rule` and made again. A model file with no run beside it
has nothing to validate on: ``auto`` then runs float32 torch, and forcing another engine says
it is unvalidated. A failed engine is never picked automatically; forcing one says so.
"""

from __future__ import annotations

import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from retrain.tasks import storage
from retrain.tasks.datastore import is_held_out
from retrain.tasks.export import onnx_bytes, quantize_int8
from retrain.tasks.inference import (
    EngineError,
    Predictor,
    build_predictor,
    hardware_key,
    load_checked,
    supported_engines,
)
from retrain.tasks.networks import resolve_device
from retrain.tasks.preprocessing import load_image, scaled_decoder_applies
from retrain.tasks.vocabulary import ENGINE_CHOICES

MIN_AGREEMENT = 0.995  # top label as float32 torch's on at least 99.5 % of the gate's images
MIN_GATE_IMAGES = 20  # below this no verdict: every engine but torch is refused
MAX_ACCURACY_DROP = 0.005  # held-out accuracy at most half a point below float32 torch
AGREEMENT_IMAGES = 1000  # 5 disagreements allowed; decoded once, they take seconds per engine
CALIBRATION_IMAGES = 64
DECODE_CHUNK = 64  # images decoded and scored by every engine at a time
SPEED_BATCH, SPEED_SECONDS = 8, 0.6  # forward-only rate: one thread, batches of 8 (a worker's)
GATE_VERSION = 5  # 5: ONNX files give the embedding too; 4: all the run's images (up to 1,000); 3: 400 held-out


def gate_rule() -> dict:
    """What a verdict depends on besides the model: a record made under another rule is stale."""
    return {
        "version": GATE_VERSION,
        "min_agreement": MIN_AGREEMENT,
        "min_images": MIN_GATE_IMAGES,
        "max_accuracy_drop": MAX_ACCURACY_DROP,
        "images": AGREEMENT_IMAGES,
        "calibration_images": CALIBRATION_IMAGES,
    }


def allowed_disagreements(images: int) -> int | None:
    """How many of ``images`` labels an engine may change and still pass; None: too few images
    to judge. floor(0.005 n): none below 200 images, 5 of 1,000."""
    if images < MIN_GATE_IMAGES:
        return None
    return int(round(images * (1 - MIN_AGREEMENT), 9))


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


def gate_images(model_url: str) -> tuple[pd.DataFrame | None, list[str]]:
    """The images the gate judges on (path, label, split) and the int8 calibration images
    (training images among them), from the ``split.parquet`` beside the model; (None, []) for a
    model file with no run beside it. Every image of the run up to ``AGREEMENT_IMAGES``; above
    that a seeded sample, held-out images first (up to all but the calibration's share), the
    rest training images."""
    split_url = storage.RunLayout(posixpath.dirname(model_url)).split
    if not storage.exists(split_url):
        return None, []
    rows = storage.read_parquet(split_url)[["path", "label", "split"]]
    if len(rows) > AGREEMENT_IMAGES:
        is_held = is_held_out(rows)
        held, train = (part.sample(frac=1.0, random_state=0) for part in (rows[is_held], rows[~is_held]))
        n_held = min(len(held), max(AGREEMENT_IMAGES - len(train), AGREEMENT_IMAGES - CALIBRATION_IMAGES))
        rows = pd.concat([held.iloc[:n_held], train.iloc[: AGREEMENT_IMAGES - n_held]])
    train = rows[rows["split"] == "train"]["path"]
    calibration = train.sample(n=min(len(train), CALIBRATION_IMAGES), random_state=0)
    return rows.reset_index(drop=True), list(calibration)


def _held_out_mask(images: pd.DataFrame) -> torch.Tensor:
    """Which gate images may judge accuracy: the held-out ones (all, for a table with no split)."""
    if "split" not in images.columns:
        return torch.ones(len(images), dtype=torch.bool)
    return torch.tensor(is_held_out(images).to_numpy(), dtype=torch.bool)


def compare(
    reference: torch.Tensor, candidate: torch.Tensor, labels: list[int] | None, held_out: torch.Tensor | None = None
) -> dict:
    """Top-label agreement on every image, accuracy of both on the ``held_out`` ones (all when
    None), the largest score difference, and the verdict by the gate's rule."""
    ref, cand = reference.argmax(1), candidate.argmax(1)
    images, disagreements = len(ref), int((ref != cand).sum())
    allowed = allowed_disagreements(images)
    out = {
        "images": images,
        "disagreements": disagreements,
        "allowed_disagreements": allowed,
        "agreement": 1 - disagreements / images if images else 0.0,
        "max_score_difference": float((reference - candidate).abs().max()) if images else 0.0,
    }
    drop = 0.0
    if labels is not None and images:
        held = held_out if held_out is not None else torch.ones(images, dtype=torch.bool)
        truth = torch.tensor(labels)[held]
        out["held_out_images"] = int(held.sum())
        if len(truth):
            out["reference_accuracy"] = float((ref[held] == truth).float().mean())
            out["accuracy"] = float((cand[held] == truth).float().mean())
            drop = out["reference_accuracy"] - out["accuracy"]
    out["passed"] = allowed is not None and disagreements <= allowed and drop <= MAX_ACCURACY_DROP
    return out


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def forward_rate(predictor: Predictor, seconds: float = SPEED_SECONDS) -> float:
    """Images per second of the forward pass alone, on one thread, batches of 8."""
    pixels = torch.randint(0, 256, (SPEED_BATCH, 3, *predictor.preprocessing.input_size), dtype=torch.uint8)
    with _one_thread():
        predictor.scores(pixels)  # warm-up: first-call allocation and kernel selection
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            predictor.scores(pixels)
            count += SPEED_BATCH
        return count / (time.perf_counter() - started)


def _write_artifacts(folder: str, loaded, sha256: str, calibration: list[np.ndarray]) -> dict[str, str]:
    fp32 = onnx_bytes(loaded, sha256)
    files = {"onnx": storage.write_bytes(storage.join(folder, "model.onnx"), fp32)}
    if calibration:
        files["onnx-int8"] = storage.write_bytes(
            storage.join(folder, "model-int8.onnx"), quantize_int8(fp32, calibration)
        )
    return files


def _calibration_inputs(reference: Predictor, pixels: torch.Tensor) -> list[np.ndarray]:
    """int8 calibration batches: the network's input, 8 images each, on the host."""
    return [
        reference.network_input(pixels[i : i + 8][:, reference.affine.channels]).cpu().contiguous().numpy()
        for i in range(0, len(pixels), 8)
    ]


def _gate_scores(
    predictors: dict[str, Predictor],
    paths: list[str],
    decoded: dict[str, torch.Tensor],
    stored: Callable[[list[str]], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scores of every predictor on ``paths``, and float32 torch's on the scaled decoding, a
    chunk at a time (1,000 images at once would hold 155 MB at 227 px, 1 GB at 600 px). The
    exact pixels come from ``stored`` (the run's image shards: :func:`_shard_pixels`) when
    given, else each image is decoded once for all engines (those in ``decoded``, the
    calibration's, not again)."""
    reference = predictors["torch"]
    size = reference.preprocessing.input_size
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in predictors}
    scaled_scores = []
    for start in range(0, len(paths), DECODE_CHUNK):
        chunk = paths[start : start + DECODE_CHUNK]
        data = [storage.read_bytes(p) for p in chunk]
        if stored is not None:
            pixels = stored(chunk)
        else:
            pixels = torch.stack([decoded[p] if p in decoded else load_image(d, size) for p, d in zip(chunk, data)])
        for name, predictor in predictors.items():
            scores[name].append(predictor.scores(pixels))
        scaled_scores.append(_scaled_scores(reference, data, pixels, scores["torch"][-1]))
    return {name: torch.cat(parts) for name, parts in scores.items()}, torch.cat(scaled_scores)


def _scaled_scores(
    reference: Predictor, data: list[bytes], exact: torch.Tensor, exact_scores: torch.Tensor
) -> torch.Tensor:
    """Float32 torch's scores on the scaled decoder's pixels of these files. Only the images
    it decodes its own way (JPEGs) are decoded again, and only those whose pixels then differ
    from the exact ones are scored again: a JPEG under twice the input size is decoded at full
    size, to the exact decoder's pixels (243 of hymenoptera's 245 photos), and the same pixels
    give the same scores."""
    size = reference.preprocessing.input_size
    out = exact_scores.clone()
    differ: dict[int, torch.Tensor] = {}
    for i, d in enumerate(data):
        if scaled_decoder_applies(d):
            pixels = load_image(d, size, "scaled")
            if not torch.equal(pixels, exact[i]):
                differ[i] = pixels
    if differ:
        out[list(differ)] = reference.scores(torch.stack(list(differ.values())))
    return out


@contextmanager
def _shard_pixels(model_url: str, paths: list[str], size: tuple[int, int]) -> Iterator[Callable | None]:
    """The exact pixels of ``paths`` as the run's training decoded them into its image shards
    (tasks/training/shards.py: every image of the split, by the one loader, at the input
    size): read back, not decoded a second time. None when they are not all there: a model
    with no run's training record beside it, shards removed, another input size, or a store
    that is not a local disk (a sample of 1,000 images would copy every shard, 79 MB each, to
    read a few rows of it: decoding them costs less)."""
    from retrain.tasks.training.shards import MANIFEST, PLAN, ShardPlan, ShardSet

    layout = storage.RunLayout(posixpath.dirname(model_url))
    folder = None
    if storage.exists(layout.training) and storage.exists(layout.split):
        folder = (storage.read_json(layout.training).get("image_shards") or {}).get("folder")
    if not folder or not storage.is_local(folder) or not storage.exists(storage.join(folder, MANIFEST)):
        yield None
        return
    plan = storage.read_json(storage.join(folder, PLAN))
    order = sorted(set(storage.read_parquet(layout.split)["path"]))  # the shards' order (shards.py)
    position = {p: i for i, p in enumerate(order)}
    if plan["count"] != len(order) or list(plan["input_size"]) != list(size) or not set(paths) <= position.keys():
        yield None
        return
    shards = ShardSet(ShardPlan(folder, plan["key"], plan["count"], tuple(size), plan["shard_images"]))
    try:
        yield lambda chunk: shards.read(np.array([position[p] for p in chunk], dtype=np.int64))
    finally:
        shards.close()


def _image_counts(images: pd.DataFrame | None) -> dict[str, int]:
    if images is None:
        return {"total": 0}
    counts = {"total": len(images)}
    if "split" in images.columns:
        counts.update({k: int(v) for k, v in images["split"].value_counts().sort_index().items()})
    return counts


def validate_engines(
    model_url: str,
    sha256: str,
    images: pd.DataFrame | None = None,
    calibration: list[str] | None = None,
    device: torch.device | None = None,
    folder: str | None = None,
) -> dict:
    """Validate every engine this hardware offers against float32 torch on ``images`` (path,
    label and optionally split; default :func:`gate_images`) and write ``validation.json`` (and
    the ONNX files) into ``folder``. Returns the record."""
    device = device or resolve_device("auto")
    folder = folder or engines_dir(model_url, sha256)
    if images is None:
        images, calibration = gate_images(model_url)
    loaded, _ = load_checked(model_url)
    size = loaded.preprocessing.input_size
    reference = build_predictor(loaded, "torch", device=device)
    paths = list(images["path"]) if images is not None else []
    calibration = list(calibration or [])[:CALIBRATION_IMAGES]
    with _shard_pixels(model_url, paths + calibration, size) as stored:
        if stored is not None:
            calibration_pixels = dict(zip(calibration, stored(calibration))) if calibration else {}
        else:
            calibration_pixels = {p: load_image(storage.read_bytes(p), size) for p in calibration}
        calib = _calibration_inputs(reference, torch.stack(list(calibration_pixels.values()))) if calibration else []
        files = _write_artifacts(folder, loaded, sha256, calib)
        engines, decoders = _judge(loaded, reference, files, images, calibration_pixels, stored) if paths else ({}, {})
    record: dict = {
        "gate_version": GATE_VERSION,
        "rule": gate_rule(),
        "model_sha256": sha256,
        "images": _image_counts(images),
        "files": {k: posixpath.basename(v) for k, v in files.items()},
        "engines": engines,
        "decoders": decoders,
        "speeds": {},
        "validated": len(paths) > 0,
    }
    if not record["validated"]:
        record["note"] = "no images of the run beside the model (no split.parquet): only float32 torch is trusted"
    record["speeds"][hardware_key(device)] = measure_speeds(loaded, folder, record, device)
    storage.write_json(storage.join(folder, "validation.json"), record)
    return record


def _judge(
    loaded,
    reference: Predictor,
    files: dict[str, str],
    images: pd.DataFrame,
    calibration_pixels: dict[str, torch.Tensor],
    stored: Callable[[list[str]], torch.Tensor] | None,
) -> tuple[dict, dict]:
    """The verdicts on every engine this hardware offers and on the scaled decoder, each
    against float32 torch (``reference``) on ``images``."""
    device = reference.device
    predictors = {"torch": reference}
    for engine in supported_engines(device):
        if engine != "torch" and (engine in files or not engine.startswith("onnx")):
            predictors[engine] = build_predictor(loaded, engine, files.get(engine), device)
    scores, scaled = _gate_scores(predictors, list(images["path"]), calibration_pixels, stored)
    labels = [loaded.classes.index(lbl) if lbl in loaded.classes else -1 for lbl in images["label"]]
    held = _held_out_mask(images)
    ref_scores = scores.pop("torch")
    # float32 torch is the reference: it passes by definition
    engines = {"torch": {**compare(ref_scores, ref_scores, labels, held), "passed": True}}
    engines.update({engine: compare(ref_scores, candidate, labels, held) for engine, candidate in scores.items()})
    return engines, {"scaled": compare(ref_scores, scaled, labels, held)}


def measure_speeds(loaded, folder: str, record: dict, device: torch.device) -> dict[str, float]:
    """Forward-only images per second (:func:`forward_rate`) of float32 torch and of every
    engine that passed here (one that failed is never picked: its speed would decide nothing).
    Each predictor is made on one thread too: an ONNX Runtime session keeps the thread count
    it was made with, and one made on all cores measured 0.6x to 1.9x its one-thread rate on a
    busy 2-core machine (a scoring worker runs one thread)."""
    passed = [e for e, v in record["engines"].items() if e != "torch" and v.get("passed")]
    speeds = {}
    with _one_thread():
        for engine in ["torch", *passed]:
            onnx_url = storage.join(folder, record["files"][engine]) if engine.startswith("onnx") else None
            speeds[engine] = forward_rate(build_predictor(loaded, engine, onnx_url, device))
    return {k: round(v, 1) for k, v in speeds.items()}


def existing_record(model_url: str, sha256: str, device: torch.device) -> tuple[dict, str] | None:
    for folder in (engines_dir(model_url, sha256), _fallback_dir(sha256)):
        url = storage.join(folder, "validation.json")
        if storage.exists(url):
            record = storage.read_json(url)
            if record.get("rule") == gate_rule() and hardware_key(device) in record.get("speeds", {}):
                return record, folder
    return None


def _can_validate(model_url: str, held: dict) -> bool:
    if held.get("images") is not None:
        return len(held["images"]) > 0
    return storage.exists(storage.RunLayout(posixpath.dirname(model_url)).split)


def engine_record(model_url: str, sha256: str, device: torch.device | None = None, **held) -> tuple[dict, str]:
    """The validation record of this model (made now when there is none, or none with speeds
    for this hardware) and the folder it lives in. A store that cannot be written (a model in a
    read-only folder) keeps it in a local temporary folder instead."""
    device = device or resolve_device("auto")
    found = existing_record(model_url, sha256, device)
    if found is not None:
        return found
    # Said before the seconds it takes (exports, int8 calibration, every engine on every image, speeds).
    print("checking the engines for this model (once per model and machine)...", file=sys.stderr, flush=True)
    try:
        return validate_engines(model_url, sha256, device=device, **held), engines_dir(model_url, sha256)
    except (PermissionError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        folder = _fallback_dir(sha256)
        return validate_engines(model_url, sha256, device=device, folder=folder, **held), folder


def _verdict_text(verdict: dict) -> str:
    allowed = verdict["allowed_disagreements"]
    text = (
        f"{verdict['disagreements']} of {verdict['images']} labels differ from float32 torch "
        f"(agreement {verdict['agreement']:.4f}; "
        + (f"{allowed} allowed)" if allowed is not None else f"too few images: the gate needs {MIN_GATE_IMAGES})")
    )
    if "accuracy" in verdict:
        text += (
            f", held-out accuracy {verdict['accuracy']:.4f} vs {verdict['reference_accuracy']:.4f} "
            f"on {verdict['held_out_images']} images"
        )
    return text


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
        images = record.get("images", {}).get("total", 0)
        if not record.get("validated"):
            reason = record.get("note", "not validated")
        elif allowed_disagreements(images) is None:
            reason = (
                f"float32 torch: the run has {images} images to validate other engines on, "
                f"the gate needs at least {MIN_GATE_IMAGES}"
            )
        else:
            reason = f"fastest validated engine here ({speeds.get(engine, 0):.0f} images/s forward-only, one thread)"
            if engine != "torch":
                reason += f": {_verdict_text(verdicts[engine])}"
    else:
        engine = requested
        verdict = verdicts.get(engine)
        if verdict is None:
            reason = f"forced: {engine} is NOT validated for this model ({record.get('note', 'no verdict')})"
        elif not verdict["passed"]:
            reason = f"forced: {engine} FAILED validation ({_verdict_text(verdict)})"
        else:
            reason = f"validated ({_verdict_text(verdict)}), as asked"
    if engine.startswith("onnx") and engine not in record["files"]:
        raise EngineError(f"engine {engine} needs calibration images (the run's training images); this model has none")
    onnx_url = storage.join(folder, record["files"][engine]) if engine.startswith("onnx") else None
    return EngineChoice(engine, onnx_url, decoder, reason)


def validate_run(run_url: str) -> dict:
    """The retraining flow's "validate engines" step: the engines of the model the run
    published, validated now on the run's images (once: a model that has its record keeps
    it), so that scoring only reads ``validation.json``. Returns what the run's summary says
    of it: the engines that passed, the one ``auto`` will use and why, and the record's URL."""
    started = time.perf_counter()
    model_url = storage.RunLayout(run_url).model
    sha256 = storage.sha256_of(model_url)
    device = resolve_device("auto")
    if existing_record(model_url, sha256, device) is None:
        validate_engines(model_url, sha256, device=device)
    record, folder = existing_record(model_url, sha256, device)
    auto = choose_engine(model_url, sha256, "auto", device)
    speeds = record["speeds"][hardware_key(device)]
    passed = [e for e, v in record["engines"].items() if v.get("passed")] or ["torch"]
    return {
        "passed": sorted(passed, key=lambda e: -speeds.get(e, 0.0)),  # fastest first
        "failed": [e for e, v in record["engines"].items() if not v.get("passed")],
        "auto": auto.engine,
        "decoder": auto.decoder,
        "reason": auto.reason,
        "hardware": hardware_key(device),
        "validation_url": storage.join(folder, "validation.json"),
        "seconds": round(time.perf_counter() - started, 3),
    }
