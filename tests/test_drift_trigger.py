"""Retraining that knows when (flows/drift_events.py, deployments/prefect.yaml's trigger).

Fast: which model a job's event is about, and no event without a drift verdict.
Services: a real ``prefect server`` (its triggers and actions services on), ``retrain/scheduled``
deployed by ``retrain deploy`` with its drift trigger, and ``retrain score`` of a folder of noise
with the model promoted under the trigger's name: the job finds drift, its event makes the
automation create a flow run of the retrain deployment, once per cooldown.
"""

from __future__ import annotations

import glob
import json
import posixpath
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.flows.drift_events import EVENT, emit_drift_event, promoted_name
from retrain.tasks import promotion, storage
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.scoring.layout import JobLayout
from tests._services import prefect_server, retrain_cli

MODEL_NAME = "shapes"


def promote_model_with_reference(store: str, images: str, run_id: str = "r1") -> str:
    """A random-weights shapes model with its drift reference profile taken on ``images`` (as
    evaluation takes it on held-out images), published as run ``run_id`` and current under
    :data:`MODEL_NAME` (a current.json with the fields scoring reads: the gate itself is
    tests/test_promotion.py's). Returns the model file's URL."""
    import torch

    from retrain.tasks.drift import reference_profile
    from retrain.tasks.evaluation import predict_images, reference_predictor
    from retrain.tasks.model_file import load_model_file, model_record, save_model_file
    from retrain.tasks.networks import build_network, get_spec

    torch.manual_seed(0)
    spec = get_spec("squeezenet-caffe")
    model, origin = build_network(spec.name, 3, weights="none")
    record = model_record(model, spec, ["circle", "square", "triangle"], origin)
    url = storage.StoreLayout(store).run(run_id).model
    save_model_file(url, record)
    loaded = load_model_file(url)
    scores, embeddings = predict_images(reference_predictor(loaded), sorted(glob.glob(f"{images}/*/*.jpg")))
    save_model_file(url, {**record, "reference": reference_profile(scores, embeddings, loaded.classes, "val+test")})
    storage.write_json(
        promotion.model_layout(store, MODEL_NAME).current, {"model": MODEL_NAME, "run_id": run_id, "model_url": url}
    )
    return url


def noise_folder(folder: Path, count: int = 60) -> str:
    """``count`` images of noise: nothing like the shapes the model's reference saw."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"noise_{i:03d}.jpg")
    return str(folder)


def test_the_event_is_about_the_promoted_model_only_while_the_job_scored_its_current_file(tmp_path):
    store = str(tmp_path / "store")
    current = storage.StoreLayout(store).run("r2").model
    storage.write_json(promotion.model_layout(store, MODEL_NAME).current, {"model_url": current})
    assert promoted_name(MODEL_NAME, store, current) == MODEL_NAME
    assert promoted_name(MODEL_NAME, store, storage.StoreLayout(store).run("r1").model) is None  # replaced meanwhile
    assert promoted_name(current, store, current) is None  # a file URL
    assert promoted_name("r2", store, current) is None  # a run id
    for verdict in (False, None):  # no drift, or no verdict: nothing to emit (no Prefect API needed)
        assert emit_drift_event({"drift": {"drift": verdict}}, MODEL_NAME) is None


@pytest.mark.services
def test_a_drifted_scoring_job_starts_one_retraining_of_its_model(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store = str(tmp_path / "store")
    model_url = promote_model_with_reference(store, make_shapes_dataset(str(tmp_path / "ref"), 10, 48, seed=1))
    new = noise_folder(tmp_path / "new")
    with prefect_server(tmp_path) as server:
        env = server["env"]
        deployed = retrain_cli("deploy", "--only", "scheduled", "--model-name", MODEL_NAME, "--store", store, env=env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        with temporary_settings({PREFECT_API_URL: server["api_url"]}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("retrain/scheduled")
            [automation] = client.read_automations_by_name("retrain-on-drift")
            assert automation.enabled and automation.trigger.expect == {EVENT}
            assert automation.trigger.match.get("prefect.resource.id") == [f"retrain.model.{MODEL_NAME}"]

            # the job names the model as scheduled scoring does: by its promoted name
            scored = retrain_cli("score", MODEL_NAME, new, "--store", store, "--engine", "torch", "--json", env=env)
            assert scored.returncode == 0, scored.stdout + scored.stderr
            printed = json.loads(scored.stdout.strip().splitlines()[-1])
            assert printed["drift"]["drift"] is True, printed["drift"]
            summary = storage.read_json(JobLayout(posixpath.dirname(printed["scores_url"])).summary)

            def triggered() -> list:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )  # the cron's runs too: only the automation's count
                return [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]

            deadline = time.monotonic() + 60
            while not triggered() and time.monotonic() < deadline:
                time.sleep(0.5)
            [run] = triggered() or [None]
            assert run is not None, server["log"].read_text()[-3000:]
            assert run.created_by.id == automation.id
            assert run.parameters["model_name"] == MODEL_NAME  # the deployment's own parameters, as the cron's

            # the job's event, as a person finds it in the UI's event feed
            [event] = _events(client, deadline)
            assert event["resource"]["prefect.resource.id"] == f"retrain.model.{MODEL_NAME}"
            assert event["resource"]["retrain.model"] == model_url
            assert event["payload"]["drift_json"] == JobLayout(summary["out"]).drift
            assert [t["p_value"] for t in event["payload"]["tests"]] == [
                t["p_value"] for t in summary["drift"]["tests"]
            ]
            roles = {r["prefect.resource.role"] for r in event["related"]}
            assert {"scores", "flow-run", "flow"} <= roles, roles  # the scoring job and its flow run

            # the same verdict again within the cooldown, and about the file alone: no other run
            EventsWorker.drain_all()  # a worker bound to another API is not reused
            again, file_only = emit_drift_event(summary, MODEL_NAME), emit_drift_event(summary, None)
            assert again.resource.id == f"retrain.model.{MODEL_NAME}"
            assert file_only.resource.id == "retrain.model-file." + summary["model_sha256"][:12]
            assert {"confidence", "embedding"} & set(again.payload["drifted_tests"])
            EventsWorker.drain_all(timeout=30)
            time.sleep(3)  # both evaluated by now
            assert len(triggered()) == 1


def _events(client, deadline: float) -> list[dict]:
    """The drift events the server stored (its event persister writes them a few seconds late)."""
    while True:
        response = client.request("POST", "/events/filter", json={"filter": {"event": {"name": [EVENT]}}})
        events = response.json()["events"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)
