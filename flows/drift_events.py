"""The drift event: what a scoring job that found drift tells Prefect, so that an automation can
act on it (``deployments/prefect.yaml`` gives ``retrain/scheduled`` a trigger on it).

A job whose ``drift.json`` says ``drift: true`` emits one ``retrain.drift.detected`` event about
the model it scored with. The event's resource is the model, under the name it is promoted as
when the job named it (``retrain.model.<name>``: the id the trigger matches), else under its
file (``retrain.model-file.<sha256 prefix>``: visible in the UI, retrains nothing). The scoring
job's output is a related resource; Prefect adds the flow run, its flow and deployment. The
payload carries what a person reading the event needs to judge it without opening files: the
model file and its hash, the job's output and images, and each test's statistic, p-value and
threshold. The retraining it starts needs none of it: it runs with its deployment's parameters,
as its cron does, and its model still has to pass the promotion gate.

Prefect stays here (flows/); the verdict itself comes from the plain scoring code.
"""

from __future__ import annotations

import logging

from prefect.events import Event, emit_event

from retrain.tasks import promotion, storage
from retrain.tasks.scoring.layout import JobLayout

EVENT = "retrain.drift.detected"
SHA_PREFIX = 12  # as the scoring job's id (tasks/scoring/layout.default_out) shortens it


def model_resource_id(name: str | None, sha256: str) -> str:
    """The event resource's id: ``retrain.model.<name>`` for a promoted model's name (what the
    deployment trigger matches), else ``retrain.model-file.<sha256 prefix>`` for the file alone."""
    return f"retrain.model.{name}" if name else f"retrain.model-file.{sha256[:SHA_PREFIX]}"


def promoted_name(model: str, store: str, model_url: str) -> str | None:
    """``model`` (the score flow's argument) when it named a promoted model and ``model_url``,
    the file the job scored with, is still that model's current file; else None. Scheduled
    scoring names the promoted model (RETRAIN_MODEL_NAME); a job given a file or a run id, or
    one whose model was replaced while it ran, is about that file only, and retrains nothing."""
    try:
        current = promotion.current_model_url(store, model)
    except promotion.PromotionError:  # a file URL, a run id, or a name nothing was promoted under
        return None
    return model if storage.absolute(current) == model_url else None


def drift_event_fields(summary: dict, model_name: str | None) -> dict:
    """The event's resource, related resources and payload for a scoring job's ``summary``
    (with its ``drift`` verdict), as :func:`prefect.events.emit_event` takes them."""
    drift = summary["drift"]
    resource = {
        "prefect.resource.id": model_resource_id(model_name, summary["model_sha256"]),
        "prefect.resource.name": model_name or summary["model"],
        "retrain.model": summary["model"],
        "retrain.model.sha256": summary["model_sha256"],
    }
    related = [
        {
            "prefect.resource.id": f"retrain.scores.{summary['out']}",
            "prefect.resource.role": "scores",
            "prefect.resource.name": summary["out"],
        }
    ]
    payload = {
        "model": summary["model"],
        "model_name": model_name,
        "model_sha256": summary["model_sha256"],
        "network": summary["network"],
        "out": summary["out"],
        "drift_json": JobLayout(summary["out"]).drift,
        "images_source": summary["images_source"],
        "images": drift["images"],
        "reference_images": drift["reference_images"],
        "alpha": drift["alpha"],
        "drifted_tests": [t["name"] for t in drift["tests"] if t["drift"]],
        "reason": drift.get("reason"),  # e.g. why a test was left out
        "tests": [
            {k: t[k] for k in ("name", "method", "statistic", "p_value", "threshold", "drift")} for t in drift["tests"]
        ],
    }
    return {"resource": resource, "related": related, "payload": payload}


def emit_drift_event(summary: dict, model_name: str | None) -> Event | None:
    """Emit ``retrain.drift.detected`` when the job's verdict (``summary["drift"]``) is drift;
    returns the event, or None when there was no drift (or no Prefect API to send it to).
    ``model_name``: the promoted model's name when the job scored with it
    (:func:`promoted_name`), else None."""
    drift = summary.get("drift") or {}
    if drift.get("drift") is not True:
        return None
    fields = drift_event_fields(summary, model_name)
    event = emit_event(EVENT, **fields)
    _logger().info(
        "drift (%s): %s about %s",
        ", ".join(fields["payload"]["drifted_tests"]),
        f"event {EVENT} {event.id} emitted" if event else f"no Prefect API to send {EVENT} to",
        fields["resource"]["prefect.resource.id"],
    )
    return event


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a flow run (its lines show in the UI), else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
