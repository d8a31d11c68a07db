"""retrain: retrain pretrained image networks to classify new image sets.

The package maps the project's folders in: ``retrain.flows`` (flows/: the Prefect flows and
the CLI) and ``retrain.tasks`` (tasks/: one plain module per pipeline stage). The functions
below are the notebook API; each one is what the ``retrain`` command of the same name runs.
Heavy imports (torch, Prefect, Dask) happen on first call, so ``import retrain`` is instant.

    import retrain
    summary = retrain.run("MerchData.zip", network="squeezenet-caffe", weights="squeezenet.pth")
    retrain.classify(summary["run_id"], "new.jpg")      # {"label": ..., "score": ..., "scores": ...}
    retrain.evaluate(summary["model"], "more-images/")  # accuracy, per-class metrics, confusion
    retrain.score(summary["run_id"], "big-folder/")     # batch scoring on Dask
    retrain.export(summary["model"], "model.onnx")      # ONNX (or TorchScript) for other runtimes
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "evaluate", "classify", "score", "export"]


def _store(store: str | None) -> str:
    from retrain.tasks import storage

    return storage.absolute(store or storage.default_store())


def _local_server() -> None:
    """Use the local Prefect server (``retrain server start``) when no API is set, as the
    ``retrain`` command does. Effective until Prefect is first imported in this process (it
    reads its settings then)."""
    from retrain.tasks.server import use_local_server

    use_local_server()


def run(data: str | None = None, store: str | None = None, **settings: Any) -> dict:
    """Retrain on ``data`` (a zip or a folder of class folders, any fsspec URL; the generated
    sample set when None) as a Prefect flow run. ``settings`` are the flow's parameters
    (``network``, ``weights``, ``mode``, ``split_fractions``, ``options`` — a dict of
    training options such as ``{"max_epochs": 5}`` —, ``augmentation``, ``run_id``, ...).
    Returns the run summary (run_id, model, accuracies, ...)."""
    _local_server()
    from retrain.flows.retrain import retrain_flow

    return retrain_flow(data=data, store=_store(store), **settings)


def evaluate(model: str, data: str, store: str | None = None) -> dict:
    """Accuracy, per-class precision/recall and the confusion matrix of ``model`` (a model file
    URL or a run id in ``store``) on the labelled images in ``data``."""
    from retrain.tasks import storage
    from retrain.tasks.datastore import index_images, materialize
    from retrain.tasks.evaluation import evaluate_model
    from retrain.tasks.model_file import load_model_file
    from retrain.tasks.runs import resolve_model

    store = _store(store)
    loaded = load_model_file(resolve_model(model, store))
    index = index_images(materialize(storage.absolute(data), store))
    result, _ = evaluate_model(loaded, index.images)
    return {**result.to_dict(), "skipped": len(index.skipped)}


def classify(model: str, image: str, store: str | None = None) -> dict:
    """Label and score of one image: ``{"label", "score", "scores": {class: score}}``."""
    from retrain.tasks import storage
    from retrain.tasks.evaluation import classify_image
    from retrain.tasks.model_file import load_model_file
    from retrain.tasks.runs import resolve_model

    loaded = load_model_file(resolve_model(model, _store(store)))
    result = classify_image(loaded.model, loaded.preprocessing, loaded.classes, storage.absolute(image))
    return {"label": result.label, "score": result.score, "scores": result.scores}


def score(model: str, images: str, out: str | None = None, store: str | None = None, **settings: Any) -> dict:
    """Batch-score every image below ``images`` on Dask (a local cluster, or ``dask_address``)
    into ``out``; returns the job summary (scores URL, counts, images/s)."""
    _local_server()
    from retrain.flows.score import score_flow

    return score_flow(model=model, images=images, out=out, store=_store(store), **settings)


def export(model: str, out: str, fmt: str = "onnx", store: str | None = None) -> str:
    """Write ``model`` to ``out`` as ONNX (class names, input size and preprocessing in its
    metadata; dynamic batch axis) or TorchScript; returns the URL written."""
    from retrain.tasks import storage
    from retrain.tasks.export import export_model
    from retrain.tasks.inference import load_checked
    from retrain.tasks.runs import resolve_model

    model_url = resolve_model(model, _store(store))
    loaded, _ = load_checked(model_url)
    return export_model(loaded, storage.absolute(out), fmt, storage.sha256_of(model_url))
