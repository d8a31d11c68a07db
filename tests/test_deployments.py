"""Deployments.

Fast tests: prefect.yaml's placeholders and defaults, the batch deployment's scoring schedule
(as Prefect reads it), ``retrain deploy``'s refusals, and the retrain flow's wait on a training
deployment that fails. (The promotion gate itself:
tests/test_promotion.py.)

Integration (../shared): a real ``prefect server``, ``retrain deploy``, two process workers
(a CPU pool and a stand-in for the GPU pool), the scheduled-retraining deployment run on
MerchData with its train step on the GPU pool, promoted; then a worse run, not promoted.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrain.tasks import promotion, storage
from tests.conftest import CAFFE_WEIGHTS, MERCH_ZIP, need

CLASSES = ["circle", "square", "triangle"]


def test_prefect_yaml_names_three_deployments_with_every_placeholder_known():
    import yaml

    from retrain import deploy

    used = set(deploy._PLACEHOLDER.findall(json.dumps(yaml.safe_load(deploy.PREFECT_FILE.read_text()))))
    known = set(deploy.placeholder_defaults()) | set(deploy.DERIVED_PLACEHOLDERS)
    assert used <= known, used - known
    env = deploy.deployment_env({"RETRAIN_DATA": "s3://b/MerchData.zip", "RETRAIN_GPU_POOL": "k8s-gpu"})
    found = {d["name"]: d for d in deploy.read_deployments(env=env)}
    assert set(found) == {"scheduled", "gpu", "batch"}
    assert found["scheduled"]["entrypoint"] == "retrain.flows.pipeline:retrain_flow"
    assert found["gpu"]["entrypoint"] == "retrain.flows.train:train_flow"
    assert found["batch"]["entrypoint"] == "retrain.flows.score:score_flow"
    assert all(d["available"] for d in found.values())
    assert found["scheduled"]["parameters"]["data"] == "s3://b/MerchData.zip"
    assert found["scheduled"]["parameters"]["train_deployment"] == "train/gpu"
    assert found["scheduled"]["schedules"][0]["cron"] == "0 3 * * 1"
    assert found["gpu"]["work_pool"] == "k8s-gpu" and found["scheduled"]["work_pool"] == "cpu"
    # batch scoring: a schedule that scores a folder with the promoted model, inactive without a
    # folder; never an `out`: the default output is fixed per model content and folder
    [scoring] = found["batch"]["schedules"]
    assert scoring["cron"] == "0 * * * *" and scoring["active"] == "false"
    assert set(scoring["parameters"]) == {"model", "images"}
    assert "out" not in found["batch"]["parameters"] and "out" not in scoring["parameters"]
    assert "{{" not in json.dumps(list(found.values()))
    # the parameters each deployment sets are parameters of its flow
    from retrain.flows.pipeline import retrain_flow
    from retrain.flows.train import train_flow

    flows = {"scheduled": retrain_flow, "gpu": train_flow}
    if found["batch"]["available"]:
        from retrain.flows.score import score_flow

        flows["batch"] = score_flow
    for name, fn in flows.items():
        accepted = set(fn.parameters.properties)
        given = set(found[name]["parameters"]).union(*(s.get("parameters", {}) for s in found[name]["schedules"]))
        assert given <= accepted, (name, given - accepted)


def test_scheduled_scoring_follows_the_promoted_model_and_is_off_without_a_folder(monkeypatch):
    """`retrain deploy --score-images URL --model-name NAME` turns the batch schedule on with
    those parameters, as Prefect itself reads the file (its own templating and schedule models,
    as `prefect deploy` calls them); without a folder it is deployed inactive; a folder without
    a model name is refused."""
    import yaml
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.utilities.templating import apply_values

    from retrain import deploy
    from retrain.cli import build_parser

    def batch_schedule(argv: list[str]) -> DeploymentScheduleCreate:
        args = build_parser().parse_args(["deploy", *argv])
        env = deploy.deployment_env({name: getattr(args, name) for name in deploy.placeholder_defaults()})
        config = yaml.safe_load(deploy.PREFECT_FILE.read_text())
        [batch] = [d for d in config["deployments"] if d["name"] == "batch"]
        with monkeypatch.context() as patch:
            for name, value in env.items():  # the environment `retrain deploy` runs `prefect deploy` in
                patch.setenv(name, value)
            [schedule] = apply_values(batch, {}, remove_notset=False)["schedules"]
        RawScheduleConfig(**schedule)
        return DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(schedule))

    on = batch_schedule(["--score-images", "s3://b/new/", "--model-name", "MerchData", "--score-cron", "*/15 * * * *"])
    assert on.active is True and on.schedule.cron == "*/15 * * * *"
    assert on.parameters == {"model": "MerchData", "images": "s3://b/new/"}
    off = batch_schedule([])
    assert off.active is False and off.schedule.cron == "0 * * * *"
    with pytest.raises(ValueError, match="give its name with --model-name"):
        deploy.deployment_env({"RETRAIN_SCORE_IMAGES": "s3://b/new/", "RETRAIN_MODEL_NAME": ""})


def test_deploy_refuses_without_a_server_or_with_an_unknown_deployment(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from retrain.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["deploy"]) == 2
    assert "needs a running Prefect server" in capsys.readouterr().err
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["deploy", "--only", "nightly"]) == 2
    assert "no deployment named nightly" in capsys.readouterr().err


def test_training_deployment_that_fails_fails_the_retrain_run_clearly(monkeypatch):
    import prefect.deployments

    import retrain.flows.pipeline as retrain

    calls = []

    def fake_run_deployment(name, parameters, **kwargs):
        calls.append((name, parameters))
        state = SimpleNamespace(name="Crashed", message="worker lost", is_completed=lambda: False)
        return SimpleNamespace(name="tiny-otter", id="42", state=state)

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    monkeypatch.setattr(retrain, "get_run_logger", lambda: logging.getLogger("test"))
    with pytest.raises(
        RuntimeError,
        match=r"training deployment 'train/gpu': flow run tiny-otter \(42\) "
        r"ended Crashed: worker lost",
    ):
        retrain.train_on_deployment("train/gpu", "s3://bucket/store/runs/r1")
    assert calls == [("train/gpu", {"run_url": "s3://bucket/store/runs/r1"})]


# ---- integration: a real server, `retrain deploy`, process workers --------------------------------


@pytest.mark.integration
@pytest.mark.services
def test_scheduled_retraining_on_workers_promotes_only_a_better_model(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests._services import postgres, prefect_server, start_worker, stop

    zip_path, weights = str(need(MERCH_ZIP)), str(need(CAFFE_WEIGHTS))
    store = str(tmp_path / "store")
    timings = {}
    started = time.perf_counter()
    # PostgreSQL under the server, as in infra/compose.yaml (SQLite where it is not installed)
    with postgres() as database_url, prefect_server(tmp_path, database_url) as server:
        timings[f"server start ({server['database']})"] = time.perf_counter() - started
        env = server["env"]
        t = time.perf_counter()
        deploying = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retrain.cli",
                "deploy",
                "--data",
                zip_path,
                "--store",
                store,
                "--network",
                "squeezenet-caffe",
                "--weights",
                weights,
                "--cron",
                "0 3 1 1 *",
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        workers = []
        try:
            with temporary_settings({PREFECT_API_URL: server["api_url"]}):
                # `retrain deploy` creates the pools first, then runs `prefect deploy` (which
                # loads the flows: slow); the workers start meanwhile, once their pools exist
                _wait_for_pools(["cpu", "gpu"], deploying)
                workers = [start_worker(pool, env, tmp_path / f"worker-{pool}.log") for pool in ("cpu", "gpu")]
                out, err = deploying.communicate(timeout=300)
                timings["retrain deploy"] = time.perf_counter() - t
                assert deploying.returncode == 0, out + err
                result = json.loads(out.strip().splitlines()[-1])
                assert {"retrain/scheduled", "train/gpu"} <= set(result["deployments"])
                assert result["work_pools_created"] == ["cpu", "gpu"]
                if (Path(__file__).resolve().parents[1] / "flows" / "score.py").exists():
                    assert "score/batch" in result["deployments"]
                with get_client(sync_client=True) as client:
                    scheduled = client.read_deployment_by_name("retrain/scheduled")
                assert scheduled.schedules[0].schedule.cron == "0 3 1 1 *" and scheduled.schedules[0].active
                assert scheduled.work_pool_name == "cpu" and scheduled.parameters["train_deployment"] == "train/gpu"
                # the server accepts the Kubernetes GPU pool's base job template as well
                from retrain.deploy import ensure_work_pool

                assert ensure_work_pool("gpu-k8s", "kubernetes", str(INFRA / "k8s" / "gpu-work-pool.json"))
                with get_client(sync_client=True) as client:
                    k8s_pool = client.read_work_pool("gpu-k8s")
                assert k8s_pool.type == "kubernetes"
                assert "gpu_count" in k8s_pool.base_job_template["variables"]["properties"]

                # 1. the scheduled deployment, run now; its train step runs on the GPU pool
                t = time.perf_counter()
                good = run_deployment(
                    "retrain/scheduled",
                    parameters={"options": {"max_epochs": 3, "seed": 0}},
                    timeout=420,
                    poll_interval=2,
                )
                timings["good run (train on gpu pool)"] = time.perf_counter() - t
                assert good.state.is_completed(), _logs(tmp_path, good)
                with get_client(sync_client=True) as client:
                    children = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"]))
                    )
                assert len(children) == 1 and children[0].state.is_completed()
                assert children[0].work_pool_name == "gpu" and children[0].parent_task_run_id is not None

                (run1,) = [r["run_id"] for r in _runs(store)]
                first = storage.read_json(storage.StoreLayout(store).run(run1).promotion)
                assert first["promoted"] and first["reason"] == "no current model"
                current = promotion.read_current(store, first["model"])
                assert current["run_id"] == run1

                # 2. a worse run (from scratch, one epoch, trained in process) is not promoted
                t = time.perf_counter()
                worse = run_deployment(
                    "retrain/scheduled",
                    parameters={
                        "mode": "scratch",
                        "weights": "none",
                        "train_deployment": "",
                        "options": {"max_epochs": 1, "seed": 0},
                    },
                    timeout=420,
                    poll_interval=2,
                )
                timings["worse run (train in process)"] = time.perf_counter() - t
                assert worse.state.is_completed(), _logs(tmp_path, worse)
        finally:
            if deploying.poll() is None:
                stop(deploying)
            for w in workers:
                stop(w)

    run2 = [r["run_id"] for r in _runs(store) if r["run_id"] != run1][0]
    second = storage.read_json(storage.StoreLayout(store).run(run2).promotion)
    assert not second["promoted"] and second["action"] == "keep"
    assert second["candidate_score"] < second["current_score"]
    # same data, same seed: the same held-out split, so the current model scores what it did
    assert second["current_score"] == pytest.approx(first["candidate_score"])
    assert second["images"] == first["images"] > 0
    assert second["model"] == first["model"] and first["model"].startswith("MerchData-")
    assert promotion.read_current(store, first["model"])["run_id"] == run1
    assert [h["promoted"] for h in promotion.history(store, first["model"])] == [True, False]
    print(
        "\n"
        + json.dumps(
            {
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
                "good": first["candidate_score"],
                "worse": second["candidate_score"],
                "held_out_images": first["images"],
            }
        )
    )


def _wait_for_pools(names: list[str], deploying: subprocess.Popen, timeout: float = 180) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if set(names) <= {p.name for p in client.read_work_pools()}:
                return
            if deploying.poll() is not None:
                raise AssertionError(
                    "retrain deploy ended before creating the work pools:\n"
                    + deploying.stdout.read()
                    + deploying.stderr.read()
                )
            time.sleep(0.5)
    raise TimeoutError(f"work pools {names} were not created within {timeout} s")


def _runs(store: str) -> list[dict]:
    from retrain.tasks.runs import list_runs

    return list_runs(store)


def _logs(tmp_path: Path, flow_run) -> str:
    return f"flow run {flow_run.name} ended {flow_run.state}\n" + "\n".join(
        p.read_text()[-4000:] for p in sorted(tmp_path.glob("worker-*.log"))
    )


# ---- infra/: the compose file, the image, the Kubernetes manifests --------------------------------

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_compose_file_has_every_service_and_validates():
    import shutil

    import yaml

    from retrain.deploy import placeholder_defaults

    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {
        "postgres",
        "prefect-server",
        "minio",
        "minio-setup",
        "dask-scheduler",
        "dask-worker",
        "worker-cpu",
        "worker-gpu",
        "deploy",
    } <= set(services)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["profiles"] == ["gpu"]
    # the workers serve the pools prefect.yaml deploys to, and reach the store and the API
    defaults = placeholder_defaults()
    assert services["worker-cpu"]["command"][3:5] == ["--pool", defaults["RETRAIN_CPU_POOL"][0]]
    assert gpu["command"][3:5] == ["--pool", defaults["RETRAIN_GPU_POOL"][0]]
    for name in ("worker-cpu", "worker-gpu", "dask-worker", "deploy"):
        env = services[name]["environment"]
        assert env["AWS_ENDPOINT_URL"] == "http://minio:${MINIO_PORT:-9000}" and env["RETRAIN_STORE"].startswith(
            "s3://"
        )
        assert env["PREFECT_API_URL"] == "http://prefect-server:${PREFECT_PORT:-4200}/api"

    # the Compose tools' own schema check, where one is installed (no engine needed)
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):  # Compose v1 (Debian's docker-compose 1.29)
        command = ["docker-compose"]
    else:
        pytest.skip("no docker compose / docker-compose to validate the file with")
    # .env.example leaves the secrets empty (compose refuses to start without them:
    # tests/test_security.py); set here as a user sets them in infra/.env
    secrets = {
        "POSTGRES_PASSWORD": "pg-secret",
        "MINIO_ROOT_PASSWORD": "s3-secret",
        "PREFECT_API_AUTH_STRING": "admin:x",
    }
    for profile in ([], ["--profile", "gpu"]):
        checked = subprocess.run(
            [
                *command,
                "--project-directory",
                str(INFRA),
                "-f",
                str(INFRA / "compose.yaml"),
                *profile,
                "--env-file",
                str(INFRA / ".env.example"),
                "config",
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **secrets},
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dockerfile_copies_what_exists():
    dockerfile = (INFRA / "Dockerfile").read_text()
    root = INFRA.parent
    copied = [
        part
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line  # not from another stage
        for part in line.split()[1:-1]
    ]
    assert {"pyproject.toml", "retrain", "flows", "tasks", "deployments"} <= set(copied)
    missing = [p for p in copied if not (root / p).exists()]
    assert not missing, missing
    ignore = (root / ".dockerignore").read_text().split()
    assert all(f"!{p}" in ignore or f"!{p}/" in ignore for p in copied)


def _gpu_template() -> dict:
    return json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())


def test_gpu_work_pool_template_renders_a_valid_gpu_job():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = _gpu_template()
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables), used - set(variables)
    values = {k: v["default"] for k, v in variables.items() if "default" in v}
    values.update(name="train-gpu-run", command="prefect flow-run execute")
    manifest = apply_values(template["job_configuration"]["job_manifest"], values)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "retrain:latest" and manifest["metadata"]["namespace"] == "retrain"
    # what the Kubernetes worker does to env and args before it submits the Job
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = container["args"].split()
    manifest["metadata"]["labels"] = {}
    # prefect-kubernetes requires parallelism/completions in the pod spec (its validator
    # compares against its own default manifest); the API server ignores them there
    pod = manifest["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", ["dask-cluster.yaml", "namespace.yaml"])
def test_kubernetes_manifests_validate(name):
    import yaml

    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / name).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    if name == "dask-cluster.yaml":
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert {("Service", "dask-scheduler"), ("Deployment", "dask-scheduler"), ("Deployment", "dask-worker")} <= kinds
