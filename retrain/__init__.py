"""retrain: retrain pretrained image networks to classify new image sets.

The functions below are the Python API and the one implementation of each operation: the
``retrain`` command of the same name (:mod:`retrain.cli`) parses its arguments, calls the
function with them and prints its answer, so the same arguments give the same result (and
the same engine) either way. The package maps the project's folders in: ``retrain.flows``
(flows/: the Prefect flows) and ``retrain.tasks`` (tasks/: one plain module per pipeline stage).
Heavy imports (torch, Prefect, Dask) happen on first call, so ``import retrain`` is instant.

    import retrain
    summary = retrain.run("MerchData.zip", network="squeezenet-caffe", weights="squeezenet.pth")
    retrain.classify(summary["run_id"], "new.jpg")          # {"label": ..., "score": ..., "scores": ...}
    retrain.evaluate(summary["model_url"], "more-images/")  # data_accuracy, per-class metrics, confusion
    retrain.score(summary["run_id"], "big-folder/")         # batch scoring on Dask
    retrain.export(summary["model_url"], "model.onnx")      # ONNX (or TorchScript) for other runtimes

Parameters are named as the command's flags (``split``, ``score_out``, ``dask_workers``,
``format``) and answers use the keys of its ``--json`` (:mod:`retrain.answers`).
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

from retrain.answers import evaluation_answer, rounded, run_answer, score_answer

__all__ = ["run", "evaluate", "classify", "score", "export"]


def _store(store: str | None) -> str:
    from retrain.tasks import storage

    return storage.absolute(store or storage.default_store())


def _local_server() -> None:
    """Use the local Prefect server (``retrain server start``) when no API is set, as the
    ``retrain`` command does. Effective until Prefect is first imported in this process (it
    reads its settings then)."""
    from retrain.server import use_local_server

    use_local_server()


def run(data: str | None = None, store: str | None = None, **settings: Any) -> dict:
    """Retrain on ``data`` (a zip or a folder of class folders, any fsspec URL; the generated
    sample set when None) as a Prefect flow run. ``settings`` are the flow's parameters
    (``network``, ``weights``, ``mode``, ``split``, ``options`` — a dict of training options
    such as ``{"max_epochs": 5}`` —, ``augmentation``, ``run_id``, ``model_name``,
    ``score_folder``, ``score_out``, ``dask_workers``, ``label_issues``: "find", "exclude" or
    "off", ...) and training options given flat (``max_epochs=5``). Returns what ``retrain run
    --json`` prints, and more (run_id, model_url, run_url, test_accuracy, label_issues, ...)."""
    import inspect

    from retrain.checks import run_settings

    _local_server()
    from retrain.flows.pipeline import retrain_flow
    from retrain.orchestrator import prepare_for_flows

    settings = run_settings(settings, inspect.signature(retrain_flow.fn).parameters)
    prepare_for_flows()
    return run_answer(retrain_flow(data=data, store=_store(store), **settings))


def evaluate(model: str, data: str, store: str | None = None, engine: str = "auto", chart: str | None = None) -> dict:
    """Accuracy, per-class precision/recall and the confusion matrix of ``model`` (a model file
    URL or a run id in ``store``) on the labelled images in ``data``, with ``engine`` (auto: the
    fastest validated for this model here; torch: the float32 reference). ``chart``: also write
    the confusion chart PNG there. Returns what ``retrain evaluate --json`` prints
    (``data_accuracy`` on its ``images``, ``per_class``, ``confusion``, ``engine``, ...)."""
    from retrain.tasks import storage
    from retrain.tasks.datastore import index_images, materialize
    from retrain.tasks.evaluation import evaluate_model
    from retrain.tasks.reports import confusion_chart
    from retrain.tasks.runs import resolve_model

    started = time.perf_counter()
    store = _store(store)
    loaded, predictor, choice = _predictor(resolve_model(model, store), engine)
    index = index_images(materialize(storage.absolute(data), store))
    result, _ = evaluate_model(loaded, index.images, predictor=predictor)
    if chart:
        confusion_chart(result.confusion, result.classes, chart)
    return evaluation_answer(
        {
            **result.to_dict(),
            "engine": predictor.engine,
            "engine_reason": choice.reason if choice else "float32 reference, as asked",
            "skipped": len(index.skipped),
            "seconds": time.perf_counter() - started,
        }
    )


def _predictor(model_url: str, engine: str):
    """The model's predictor with ``engine`` and the engine gate's choice (None for torch)."""
    from retrain.tasks import storage
    from retrain.tasks.engine_gate import choose_engine
    from retrain.tasks.inference import build_predictor, load_checked

    loaded, _ = load_checked(model_url)
    choice = choose_engine(model_url, storage.sha256_of(model_url), engine) if engine != "torch" else None
    if choice is not None and choice.reason.startswith("forced"):  # a named engine that failed validation
        print(f"retrain: warning: {choice.reason}", file=sys.stderr)
    predictor = (
        build_predictor(loaded, choice.engine, choice.onnx_url, decoder=choice.decoder)
        if choice
        else build_predictor(loaded)
    )
    return loaded, predictor, choice


def classify(model: str, image: str, store: str | None = None, explain: str | None = None) -> dict:
    """Label and score of one image: ``{"label", "score", "scores": {class: score}}``, and with
    ``explain`` (a PNG URL) its Grad-CAM overlay written there (``"explanation"``)."""
    from retrain.tasks import storage
    from retrain.tasks.evaluation import classify_with
    from retrain.tasks.inference import build_predictor, load_checked
    from retrain.tasks.runs import resolve_model

    loaded, _ = load_checked(resolve_model(model, _store(store)))
    result = classify_with(build_predictor(loaded), storage.absolute(image))
    answer = {"label": result.label, "score": result.score, "scores": result.scores}
    if explain:
        from retrain.tasks.explain import explain_image

        answer["explanation"] = explain_image(loaded, storage.absolute(image), explain)["explanation"]
    return rounded(answer)


def score(
    model: str,
    images: str,
    score_out: str | None = None,
    store: str | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    mini_batch_size: int | None = None,
    top_k: int | None = None,
    partition_size: int | None = None,
    engine: str = "auto",
    progress: bool = False,
    verify_content: bool = False,
    to_label: int | None = None,
    **deprecated: Any,
) -> dict:
    """Batch-score every image below ``images`` (a folder, searched recursively, or a list file)
    on Dask — a local cluster of ``dask_workers`` processes, or the one at ``dask_address`` —
    into ``score_out`` (default ``<store>/scores/<job-id>``, one per model and folder), as a
    Prefect flow run. Rerun with the same ``score_out`` to score what changed since: new and
    changed images (by size and version; with ``verify_content`` by content hash) are scored,
    deleted ones' rows dropped. ``to_label``: the least certain images listed in
    ``<score_out>/to_label.csv``, to label and give back with ``run(..., labels=TABLE)`` (0:
    none). ``mini_batch_size``, ``partition_size`` and ``to_label``: None for scoring's
    defaults. ``out`` and ``workers``: the old names of ``score_out`` and ``dask_workers``
    (deprecated). Returns what ``retrain score --json`` prints, and more (scores_url,
    score_out, images: new, changed, deleted, unchanged, images_per_second, engine, to_label)."""
    old = _deprecated_names("score", deprecated, {"out": "score_out", "workers": "dask_workers"})
    score_out = old.get("score_out", score_out)
    dask_workers = old.get("dask_workers", dask_workers)
    from retrain.early_api import start_early_api
    from retrain.tasks import storage
    from retrain.tasks.scoring.cluster import LocalClusterStart
    from retrain.tasks.scoring.layout import (
        DEFAULT_MINI_BATCH_SIZE,
        DEFAULT_PARTITION_SIZE,
        DEFAULT_TO_LABEL,
        check_output,
    )
    from retrain.tasks.scoring.run import holds_scores

    _local_server()
    store = _store(store)
    if score_out:  # a folder that is not the job's is refused at once, not after the start-ups
        check_output(storage.absolute(score_out), storage.absolute(images))
    # Three start-ups at once instead of one after the other: the local Dask cluster (its
    # workers spawn and import torch), Prefect's temporary API (a uvicorn process), and this
    # process importing the flow. A rerun into an output that holds scores starts no cluster
    # here: it usually has few images to score (tasks/scoring/run.py decides once it knows).
    api = start_early_api()
    target = score_out or _default_scores_out(model, images, store)
    rerun = target is not None and holds_scores(storage.absolute(target))
    early = LocalClusterStart(dask_workers) if not dask_address and not rerun else None  # closed here
    starting = [
        *(["Prefect's temporary API"] if api is not None else []),
        *([f"{early.workers} Dask workers"] if early is not None else []),
    ]
    if progress and starting:  # the silent seconds (10-30) before the flow's first line, said
        print(f"starting {' and '.join(starting)}...", file=sys.stderr)
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from retrain.flows.score import score_flow
        from retrain.orchestrator import prepare_for_flows

        prepare_for_flows()
        url = api.wait() if api is not None else None
        with temporary_settings({PREFECT_API_URL: url} if url else {}):
            summary = score_flow(
                model=model,
                images=images,
                out=score_out,
                store=store,
                dask_address=dask_address,
                workers=dask_workers,
                mini_batch_size=DEFAULT_MINI_BATCH_SIZE if mini_batch_size is None else mini_batch_size,
                top_k=top_k,
                partition_size=DEFAULT_PARTITION_SIZE if partition_size is None else partition_size,
                progress=progress,
                engine=engine,
                cluster=early,
                verify_content=verify_content,
                to_label=DEFAULT_TO_LABEL if to_label is None else to_label,
            )
    finally:
        if early is not None:
            early.close()
        if api is not None:
            api.stop()
    if url:
        # The temporary API ended with this call: its UI page is gone (Prefect derives a UI
        # URL from the API's; overriding PREFECT_UI_URL for the flow instead left Prefect's
        # events worker undrainable at the end of an in-process caller).
        summary["ui_url"] = None
    return score_answer(summary)


def _deprecated_names(function: str, given: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The values of old keyword names in ``given`` under their new names, each with a
    DeprecationWarning (they go in the next release); a name that never was is a TypeError,
    as Python's own."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"retrain.{function}() got an unexpected keyword argument {unknown[0]!r}")
    for old, new in names.items():
        if old in given:
            warnings.warn(f"retrain.{function}({old}=...) is deprecated: use {new}=", DeprecationWarning, stacklevel=3)
    return {names[old]: value for old, value in given.items()}


def _default_scores_out(model: str, images: str, store: str) -> str | None:
    """Where ``score_flow`` scores when no ``score_out`` is given (None when the model is not found:
    the flow then says so)."""
    from retrain.tasks import storage
    from retrain.tasks.runs import resolve_model
    from retrain.tasks.scoring.layout import default_out

    try:
        model_url = storage.absolute(resolve_model(model, storage.absolute(store)))
        return default_out(storage.absolute(store), storage.sha256_of(model_url), storage.absolute(images))
    except (FileNotFoundError, ValueError):
        return None


def export(
    model: str,
    out: str,
    format: str = "onnx",  # noqa: A002  (the --format flag's name)
    store: str | None = None,
    with_preprocessing: bool = False,
    **deprecated: Any,
) -> dict:
    """Write ``model`` to ``out`` as ONNX (class names, input size, preprocessing and resize in
    its metadata; dynamic batch axis) or TorchScript (``format="torchscript"``; ``fmt``: its
    old, deprecated name).
    ``with_preprocessing`` (ONNX): the graph takes decoded uint8 RGB pixels (N x H x W x 3, any
    H and W), resizes and normalises them as retrain does and returns probabilities. A run's
    model exported to ONNX is also checked against torch on the run's held-out images
    (``"test_split"``). Returns ``{"out", "format", "classes"[, "test_split"]}``."""
    import posixpath

    from retrain.tasks import storage
    from retrain.tasks.export import export_model
    from retrain.tasks.inference import load_checked
    from retrain.tasks.runs import resolve_model

    fmt = _deprecated_names("export", deprecated, {"fmt": "format"}).get("format", format)
    model_url = resolve_model(model, _store(store))
    loaded, _ = load_checked(model_url)
    written = export_model(loaded, storage.absolute(out), fmt, storage.sha256_of(model_url), with_preprocessing)
    result = {"out": written, "format": fmt, "classes": list(loaded.classes)}
    if with_preprocessing:
        result["with_preprocessing"] = True
    split_url = storage.RunLayout(posixpath.dirname(model_url)).split  # the run folder beside the model
    if fmt == "onnx" and storage.exists(split_url):  # a run's model: check on its test split
        from retrain.tasks.datastore import held_out
        from retrain.tasks.export import check_export, check_pixels_export

        test, which = held_out(storage.read_parquet(split_url))
        check = check_pixels_export if with_preprocessing else check_export
        if len(test):
            result["test_split"] = {"split": which, **check(loaded, written, list(test["path"]))}
    return result
