"""The checks of benchmarks/infra_up.sh against a running stack (infra/compose.yaml with the
test override), from the host: put the data in the bucket, run a deployment and wait for it,
read what it left in the bucket. Each step prints one line of JSON.

    python benchmarks/infra_check.py upload MERCH_ZIP WEIGHTS
    python benchmarks/infra_check.py run DEPLOYMENT [name=value ...]
    python benchmarks/infra_check.py promoted MODEL_NAME
    python benchmarks/infra_check.py scores IMAGES
    python benchmarks/infra_check.py dask ADDRESS
    python benchmarks/infra_check.py refused ADDRESS

Settings come from the environment infra_up.sh exports (infra/test.env and the secrets it
makes): the S3 endpoint and credentials (AWS_*), PREFECT_API_URL and PREFECT_API_AUTH_STRING,
the Dask client's certificate (DASK_DISTRIBUTED__COMM__TLS__*), RETRAIN_BUCKET.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
import zipfile

BUCKET = os.environ.get("RETRAIN_BUCKET", "retrain")
STORE = f"s3://{BUCKET}/store"
NEW_IMAGES = f"s3://{BUCKET}/new"


def s3():
    import s3fs

    return s3fs.S3FileSystem()


def upload(merch_zip: str, weights: str) -> dict:
    """The data set, the weights and a folder of new images (the zip's images, unpacked)."""
    fs = s3()
    fs.put(merch_zip, f"{BUCKET}/data/MerchData.zip")
    fs.put(weights, f"{BUCKET}/weights/{os.path.basename(weights)}")
    images = 0
    with zipfile.ZipFile(merch_zip) as z:
        for name in z.namelist():
            if name.lower().endswith((".jpg", ".jpeg", ".png")):
                fs.pipe(f"{BUCKET}/new/{name}", z.read(name))
                images += 1
    return {"bucket": BUCKET, "images": images, "objects": len(fs.find(BUCKET))}


def run(deployment: str, params: list[str], timeout_s: float = 1800) -> dict:
    """Start ``deployment`` now (as its schedule would) and wait for its end state."""
    from prefect.deployments import run_deployment

    parameters = dict(p.split("=", 1) for p in params)
    started = time.perf_counter()
    flow_run = run_deployment(deployment, parameters=parameters, timeout=timeout_s)
    state = flow_run.state
    result = {
        "deployment": deployment,
        "flow_run": str(flow_run.id),
        "state": state.type.value if state else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not (state and state.is_completed()):
        raise SystemExit(f"{deployment} ended {state and state.type.value}: {state and state.message}")
    return result


def promoted(model_name: str) -> dict:
    """models/<name>/current.json names a run whose model.pt is in the bucket."""
    fs = s3()
    current = json.loads(fs.cat(f"{BUCKET}/store/models/{model_name}/current.json"))
    model_url = current["model_url"]
    if not fs.exists(model_url):
        raise SystemExit(f"promoted model {model_url} is not in the bucket")
    decision = json.loads(fs.cat(f"{BUCKET}/store/runs/{current['run_id']}/promotion.json"))
    return {"run_id": current["run_id"], "model_url": model_url, "promoted": decision["promoted"]}


def scores(images: str) -> dict:
    """The newest scoring job in the store scored every image of ``images``."""
    import pandas as pd

    fs = s3()
    listed = [p for p in fs.find(images) if p.lower().endswith((".jpg", ".jpeg", ".png"))]
    jobs = sorted(fs.glob(f"{BUCKET}/store/scores/*/scores.parquet"), key=lambda p: fs.info(p)["LastModified"])
    if not jobs:
        raise SystemExit("no scores.parquet in the store")
    table = pd.read_parquet(io.BytesIO(fs.cat(jobs[-1])))
    if len(table) != len(listed) or table["error"].notna().any():
        raise SystemExit(
            f"{jobs[-1]}: {len(table)} rows for {len(listed)} images, errors: {table['error'].notna().sum()}"
        )
    return {"scores": f"s3://{jobs[-1]}", "rows": len(table), "labels": table["label"].value_counts().to_dict()}


def dask(address: str) -> dict:
    """The scheduler has its workers, and ran the scoring job's partitions."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        workers = len(client.scheduler_info()["workers"])
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    if not any("score" in p for p in prefixes):
        raise SystemExit(f"the scheduler at {address} ran no scoring task (task prefixes: {prefixes})")
    return {"workers": workers, "task_prefixes": prefixes}


def _api_status(path: str, auth_string: str | None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{os.environ['PREFECT_API_URL']}{path}",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if auth_string:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth_string.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def refused(address: str) -> dict:
    """Nobody walks in: the Prefect API answers only with the auth string; the scheduler at
    ``address`` refuses a client without a certificate, one whose certificate another CA
    signed, and one without TLS."""
    from distributed import Client
    from distributed.security import Security

    result = {
        "api_without_auth": _api_status("/flows/filter", None),
        "api_wrong_auth": _api_status("/flows/filter", "admin:not-the-password"),
        "api_with_auth": _api_status("/flows/filter", os.environ["PREFECT_API_AUTH_STRING"]),
    }
    if (result["api_without_auth"], result["api_wrong_auth"], result["api_with_auth"]) != (401, 401, 200):
        raise SystemExit(f"the Prefect API's authentication: {result}")
    none = Security(require_encryption=False, tls_ca_file=None, tls_client_cert=None, tls_client_key=None)
    attempts = {
        "dask_without_certificate": (address, none),
        "dask_other_ca": (address, Security.temporary()),
        "dask_plain_tcp": (address.replace("tls://", "tcp://"), none),
    }
    for name, (addr, security) in attempts.items():
        try:
            Client(addr, security=security, timeout="15s").close()
        except Exception as exc:  # what the user sees
            result[name] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
        else:
            raise SystemExit(f"{name}: the scheduler at {addr} let the client in")
    with Client(address, timeout="30s") as client:  # the configured client (the CA's client key)
        result["dask_with_certificate_workers"] = len(client.scheduler_info()["workers"])
    return result


def main(argv: list[str]) -> None:
    step, args = argv[0], argv[1:]
    steps = {"upload": upload, "promoted": promoted, "scores": scores, "dask": dask, "refused": refused}
    result = run(args[0], args[1:]) if step == "run" else steps[step](*args)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
