"""Apply ``deployments/prefect.yaml`` in one command: ``retrain deploy``.

Fills the file's ``{{ $RETRAIN_* }}`` placeholders (flags, then the environment, then the
defaults below), creates the work pools it names that do not exist yet (``process`` pools by
default; the GPU pool from a base job template such as ``infra/k8s/gpu-work-pool.json``), and
runs ``prefect deploy`` from the project root. A deployment whose entrypoint module is not
in this installation is skipped with a note.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from retrain.tasks import storage
from retrain.tasks.request import DEFAULTS
from retrain.tasks.vocabulary import MODES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
_PLACEHOLDER = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def placeholder_defaults() -> dict[str, tuple[str, str]]:
    """Each placeholder of prefect.yaml: (default, what it is). The run's choices default to
    :data:`tasks.request.DEFAULTS`, as the flow's parameters do."""
    return {
        "RETRAIN_DATA": ("", "data set URL the schedule retrains on (empty: the generated sample set)"),
        "RETRAIN_STORE": (storage.absolute(storage.default_store()), "store URL every worker reaches"),
        "RETRAIN_NETWORK": (DEFAULTS.network, "network to retrain"),
        "RETRAIN_WEIGHTS": (DEFAULTS.weights, "default, none, or a state-dict file URL"),
        "RETRAIN_MODE": (DEFAULTS.mode, " | ".join(MODES)),
        "RETRAIN_MODEL_NAME": (
            "",
            "model name for promotion, the model scheduled scoring uses, and whose drift starts a retraining "
            "(empty: the data set's name and a key of its classes; no drift trigger)",
        ),
        "RETRAIN_TRAIN_DEPLOYMENT": ("train/gpu", "deployment that trains (empty: train in the retrain run)"),
        "RETRAIN_CRON": ("0 3 * * 1", "when to retrain (cron)"),
        "RETRAIN_TIMEZONE": ("UTC", "time zone of the cron schedules (--cron, --score-cron)"),
        "RETRAIN_CPU_POOL": ("cpu", "work pool of the retraining and scoring runs"),
        "RETRAIN_GPU_POOL": ("gpu", "work pool of the training runs"),
        "RETRAIN_DASK_ADDRESS": ("", "Dask scheduler of batch scoring (empty: a local cluster per run)"),
        "RETRAIN_SCORE_IMAGES": (
            "",
            "images folder URL that batch scoring scores on a schedule with the model promoted as --model-name "
            "(empty: no scheduled scoring)",
        ),
        "RETRAIN_SCORE_CRON": (
            "0 * * * *",
            "when to score --score-images (cron); each run scores only new and changed images",
        ),
        "RETRAIN_CODE_DIR": (str(PROJECT_ROOT), "where workers find the project (their working directory)"),
    }


# Placeholders that follow from the others (never a flag): the scoring schedule is active only
# when there is a folder to score, the drift trigger only when there is a model name to match.
DERIVED_PLACEHOLDERS = ("RETRAIN_SCORE_ACTIVE", "RETRAIN_DRIFT_ACTIVE")


def deployment_env(values: dict[str, str | None] | None = None) -> dict[str, str]:
    """The placeholders' values: ``values`` (flags) over the environment over the defaults, and
    the :data:`DERIVED_PLACEHOLDERS` from them."""
    env = {}
    for name, (default, _) in placeholder_defaults().items():
        given = (values or {}).get(name)
        env[name] = given if given is not None else os.environ.get(name, default)
    if env["RETRAIN_SCORE_IMAGES"] and not env["RETRAIN_MODEL_NAME"]:
        # Each scheduled run scores with the model current under a name; without one there is none to follow.
        raise ValueError(
            "scheduled scoring (--score-images) scores with a promoted model: give its name with --model-name "
            "(`retrain models` lists them; the scheduled retraining promotes under the same name)"
        )
    env["RETRAIN_SCORE_ACTIVE"] = "true" if env["RETRAIN_SCORE_IMAGES"] else "false"
    env["RETRAIN_DRIFT_ACTIVE"] = "true" if env["RETRAIN_MODEL_NAME"] else "false"
    return env


def _substitute(value, env: dict[str, str]):
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: env.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    return value


def read_deployments(prefect_file: Path = PREFECT_FILE, env: dict[str, str] | None = None) -> list[dict]:
    """The deployments of ``prefect_file`` with placeholders filled: name, entrypoint, work
    pool, and whether the entrypoint's module is installed."""
    config = yaml.safe_load(Path(prefect_file).read_text())
    config = _substitute(config, env if env is not None else deployment_env())
    found = []
    for d in config.get("deployments") or []:
        found.append(
            {
                "name": d["name"],
                "entrypoint": d["entrypoint"],
                "work_pool": (d.get("work_pool") or {}).get("name"),
                "parameters": d.get("parameters") or {},
                "schedules": d.get("schedules") or [],
                "available": _entrypoint_available(d["entrypoint"].split(":", 1)[0]),
            }
        )
    return found


def _entrypoint_available(target: str) -> bool:
    """Whether an entrypoint's module (``retrain.flows.score``) or file is in this installation."""
    if target.endswith(".py"):
        return (PROJECT_ROOT / target).exists()
    try:
        return importlib.util.find_spec(target) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def ensure_work_pool(name: str, pool_type: str = "process", job_template: str | None = None) -> bool:
    """Create work pool ``name`` unless it exists; returns True when it was created.
    ``job_template``: a base job template file (JSON), e.g. the GPU Kubernetes one in infra/."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        if job_template:
            template = json.loads(Path(job_template).read_text())
        elif pool_type == "process":
            from prefect.workers.process import ProcessWorker

            template = ProcessWorker.get_default_base_job_template()
        else:
            raise ValueError(
                f"work pool {name!r} of type {pool_type!r}: give its base job template "
                f"(--gpu-job-template), e.g. infra/k8s/gpu-work-pool.json"
            )
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
        except ObjectAlreadyExists:  # a worker started at the same time made it (compose starts both at once)
            return False
        return True


def apply(
    values: dict[str, str | None] | None = None,
    prefect_file: Path = PREFECT_FILE,
    names: list[str] | None = None,
    create_pools: bool = True,
    cpu_pool_type: str = "process",
    gpu_pool_type: str = "process",
    gpu_job_template: str | None = None,
) -> dict:
    """Create the missing work pools and apply the deployments (all, or ``names``)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError(
            "retrain deploy needs a running Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after `prefect server start`)"
        )
    env = deployment_env(values)
    deployments = read_deployments(prefect_file, env)
    unknown = sorted(set(names or []) - {d["name"] for d in deployments})
    if unknown:
        raise ValueError(
            f"no deployment named {', '.join(unknown)} in {prefect_file} "
            f"(it has {', '.join(d['name'] for d in deployments)})"
        )
    chosen = [d for d in deployments if not names or d["name"] in names]
    skipped = [d for d in chosen if not d["available"]]
    chosen = [d for d in chosen if d["available"]]
    if not chosen:
        raise ValueError("no deployment to apply: their entrypoint modules are not installed")
    created = []
    if create_pools:
        for pool in sorted({d["work_pool"] for d in chosen}):
            gpu = pool == env["RETRAIN_GPU_POOL"]
            if ensure_work_pool(pool, gpu_pool_type if gpu else cpu_pool_type, gpu_job_template if gpu else None):
                created.append(pool)
    command = [
        sys.executable,
        "-m",
        "prefect",
        "deploy",
        "--no-prompt",
        "--prefect-file",
        str(Path(prefect_file).resolve()),
    ]
    for d in chosen:
        command += ["--name", d["name"]]
    proc = subprocess.run(
        command, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"prefect deploy failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return {
        "deployments": deployed_names(chosen),
        "skipped": [f"{d['name']} ({d['entrypoint']} is not installed)" for d in skipped],
        "work_pools_created": created,
        "work_pools": sorted({d["work_pool"] for d in chosen}),
        "store": env["RETRAIN_STORE"],
        "data": env["RETRAIN_DATA"],
        "prefect_file": str(prefect_file),
    }


def deployed_names(chosen: list[dict]) -> list[str]:
    """``flow/deployment`` names, as the API has them, of the deployments just applied."""
    from prefect.client.orchestration import get_client

    wanted = {(d["name"], d["entrypoint"]) for d in chosen}
    with get_client(sync_client=True) as client:
        return sorted(
            f"{client.read_flow(d.flow_id).name}/{d.name}"
            for d in client.read_deployments()
            if (d.name, d.entrypoint) in wanted
        )
