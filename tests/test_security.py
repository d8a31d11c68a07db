"""A deployment nobody can walk into (infra/): the Prefect API asks for its auth string, Dask
speaks TLS only to peers holding a certificate of the cluster's own CA (infra/make-certs.sh),
compose refuses to start without its secrets, and only the UI port is published, on 127.0.0.1
unless configured.

The cluster test starts `dask scheduler` and `dask worker` as processes with compose.yaml's
own TLS settings (its DASK_DISTRIBUTED__COMM__* variables, the certificates' folder it mounts
mapped to one made by make-certs.sh), scores a folder through it with `retrain score
--dask-address tls://...` configured as compose's CPU worker is, and shows clients without a
certificate of that CA refused. The full stack in containers: benchmarks/infra_up.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml

from tests._services import free_port, retrain_cli, start, stop, tool, wait_port

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PREFECT_API_AUTH_STRING")
ROLES = ("scheduler", "worker", "client")


def _services(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((INFRA / name).read_text())["services"]


def make_certs(folder: Path) -> Path:
    """The documented step: ``bash infra/make-certs.sh FOLDER``."""
    if not shutil.which("openssl"):
        pytest.skip("infra/make-certs.sh needs openssl")
    done = subprocess.run(["bash", str(INFRA / "make-certs.sh"), str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder


def compose_tls_env(service: str, certs: Path) -> dict[str, str]:
    """The Dask settings of a compose.yaml service, its certificates' folder (the bind mount's
    target in the container) replaced by ``certs``."""
    spec = _services()[service]
    (mount,) = [v for v in spec["volumes"] if isinstance(v, dict) and v["type"] == "bind"]
    env = {k: str(v) for k, v in spec["environment"].items() if k.startswith("DASK_")}
    assert env, f"{service} has no Dask settings"
    return {k: v.replace(mount["target"], str(certs)) for k, v in env.items()}


def _without_dask_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "PREFECT_"))}


def _compose_tool() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no docker compose / docker-compose to check the file with")


def _compose_config(env: dict[str, str], *files: str) -> subprocess.CompletedProcess:
    command = [*_compose_tool(), "--project-directory", str(INFRA)]
    for name in ("compose.yaml", *files):
        command += ["-f", str(INFRA / name)]
    command += ["--env-file", str(INFRA / ".env.example"), "config"]
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**base, **env})


# ---- the certificates ---------------------------------------------------------------------------


def test_make_certs_signs_each_role_and_keeps_no_ca_key(tmp_path):
    certs = make_certs(tmp_path / "certs")
    assert sorted(p.name for p in certs.iterdir()) == sorted(
        ["ca.crt", *(f"{r}.{e}" for r in ROLES for e in ("crt", "key"))]
    )
    for role in ROLES:  # signed by the CA, and a key that goes with the certificate
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / f"{role}.crt")],
            capture_output=True,
            text=True,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        ssl.create_default_context().load_cert_chain(certs / f"{role}.crt", certs / f"{role}.key")
        assert (certs / f"{role}.key").stat().st_mode & 0o007 == 0, "a key readable by others"
    again = subprocess.run(["bash", str(INFRA / "make-certs.sh"), str(certs)], capture_output=True, text=True)
    assert again.returncode != 0 and "already has certificates" in again.stderr


def test_secrets_and_certificates_are_never_committed():
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["infra/.env", "infra/certs/ca.crt", "infra/certs/client.key"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == paths
    example = dict(
        line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if line[:1].isalpha()
    )
    assert all(example[name] == "" for name in SECRETS), "a secret with a value in .env.example"


# ---- compose: no default passwords, API authentication, TLS, published ports ---------------------


@pytest.mark.parametrize("missing", SECRETS)
def test_compose_config_fails_when_a_secret_is_not_set(missing):
    others = {name: "a-secret" for name in SECRETS if name != missing}
    for env in (others, {**others, missing: ""}):  # unset, or set empty
        checked = _compose_config(env)
        assert checked.returncode != 0, f"compose accepted no {missing}"
        assert f"set {missing}" in checked.stderr, checked.stderr
    # (with all three set it passes: test_only_the_ui_port_is_published_...)


def test_no_password_has_a_default():
    for name in ("compose.yaml", "compose.test.yaml"):
        text = (INFRA / name).read_text()
        assert not re.search(r"\$\{(\w*PASSWORD|\w*AUTH_STRING)[:]?-", text), f"{name}: a secret with a default"
        assert "change-me" not in text


def test_prefect_api_asks_for_the_auth_string_and_its_clients_send_it():
    services = _services()
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    clients = [name for name, spec in services.items() if "PREFECT_API_URL" in spec.get("environment", {})]
    assert {"worker-cpu", "worker-gpu", "deploy"} <= set(clients)
    for name in clients:
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]
    gpu_on_cpu = _services("compose.test.yaml")["worker-gpu-on-cpu"]["environment"]
    assert gpu_on_cpu["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]


def test_dask_speaks_tls_only_with_each_role_certificate():
    services = _services()
    for name in ("dask-scheduler", "dask-worker", "worker-cpu"):
        env = compose_tls_env(name, Path("/certs"))
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
        assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == "/certs/ca.crt"
        for role in ROLES:
            assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__CERT"] == f"/certs/{role}.crt"
            assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__KEY"] == f"/certs/{role}.key"
        (mount,) = [v for v in services[name]["volumes"] if isinstance(v, dict)]
        assert mount["read_only"] is True
    assert services["dask-scheduler"]["command"][:4] == ["dask", "scheduler", "--protocol", "tls"]
    text = (INFRA / "compose.yaml").read_text()
    assert "tcp://" not in text and services["dask-worker"]["command"][2].startswith("tls://")
    for name in ("worker-cpu", "deploy"):
        assert services[name]["environment"]["RETRAIN_DASK_ADDRESS"].startswith("tls://dask-scheduler:")


def test_only_the_ui_port_is_published_and_on_localhost_unless_configured():
    published = {name: spec["ports"] for name, spec in _services().items() if spec.get("ports")}
    assert list(published) == ["prefect-server"]
    (port,) = published["prefect-server"]
    assert port.startswith("${RETRAIN_UI_BIND:-127.0.0.1}:")
    for name, spec in _services("compose.ports.yaml").items():  # the operator's opt-in, also local
        assert all(p.startswith("${RETRAIN_PORTS_BIND:-127.0.0.1}:") for p in spec["ports"]), name

    def host_ips(env: dict[str, str], *files: str) -> dict[str, set[str]]:
        checked = _compose_config({name: "a-secret" for name in SECRETS} | env, *files)
        assert checked.returncode == 0, checked.stderr
        found = {}
        for name, spec in yaml.safe_load(checked.stdout)["services"].items():
            # Compose v1 writes "IP:published:target/tcp", v2 a mapping with host_ip
            ips = {p["host_ip"] if isinstance(p, dict) else p.rsplit(":", 2)[0] for p in spec.get("ports", [])}
            if ips:
                found[name] = ips
        return found

    assert host_ips({}) == {"prefect-server": {"127.0.0.1"}}
    assert host_ips({"RETRAIN_UI_BIND": "192.0.2.7"}) == {"prefect-server": {"192.0.2.7"}}
    assert set(host_ips({}, "compose.ports.yaml")) == {"prefect-server", "minio", "dask-scheduler"}
    assert all(ips == {"127.0.0.1"} for ips in host_ips({}, "compose.ports.yaml").values())


# ---- Kubernetes: the same settings ----------------------------------------------------------------


def test_kubernetes_manifests_use_compose_tls_settings_and_the_api_auth_string():
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "dask-cluster.yaml").read_text()) if d]
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    assert len(pods) == 2
    for pod in pods:
        (container,) = pod["containers"]
        (mount,) = container["volumeMounts"]
        env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("DASK_")}
        assert env == compose_tls_env("dask-scheduler", Path(mount["mountPath"]))
        (volume,) = pod["volumes"]
        assert volume["name"] == mount["name"] and volume["secret"]["secretName"] == "dask-tls"
        assert "tcp://" not in " ".join(container["args"])
    namespace = [d for d in yaml.safe_load_all((INFRA / "k8s" / "namespace.yaml").read_text()) if d]
    (worker,) = [d for d in namespace if d["kind"] == "Deployment"]
    env = {e["name"]: e for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"] == {"name": "prefect-auth", "key": "auth-string"}


def test_a_tls_address_without_client_certificate_settings_says_what_is_missing():
    import dask
    import distributed  # noqa: F401  (its settings' defaults, before dask.config.set)

    from retrain.tasks.scoring.cluster import check_tls_settings
    from retrain.tasks.scoring.layout import ScoringError

    check_tls_settings("tcp://127.0.0.1:8786")  # not TLS: nothing to check
    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        with pytest.raises(ScoringError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
            check_tls_settings("tls://127.0.0.1:8786")
    with dask.config.set({"distributed.comm.tls.ca-file": "/c/ca.crt", "distributed.comm.tls.client.cert": "/c/c.crt"}):
        check_tls_settings("tls://127.0.0.1:8786")


# ---- a TLS cluster with compose.yaml's settings ------------------------------------------------------


def _dask_cli(args: list[str], env: dict[str, str], log: Path):
    return start([tool("dask"), *args], log, {**env, "OMP_NUM_THREADS": "1"})


@pytest.mark.services
@pytest.mark.timeout(900)
def test_tls_cluster_with_compose_settings_scores_a_folder_and_refuses_clients_without_certificates(
    tmp_path, random_model_file, prefect_api
):
    from distributed import Client
    from distributed.security import Security
    from prefect.settings import PREFECT_API_URL

    from retrain.tasks.samples import make_shapes_dataset

    certs = make_certs(tmp_path / "certs")
    other_ca = make_certs(tmp_path / "other-ca")  # a certificate this cluster never signed
    # the commands use the session's Prefect API (no temporary one each: minutes on a busy machine)
    base = {**_without_dask_settings(), "PREFECT_API_URL": prefect_api or PREFECT_API_URL.value()}
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    scheduler_log, worker_log = tmp_path / "dask-scheduler.log", tmp_path / "dask-worker.log"
    command = _services()["dask-scheduler"]["command"]  # dask scheduler --protocol tls ...
    scheduler = _dask_cli(
        [*command[1:4], "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        {**base, **compose_tls_env("dask-scheduler", certs)},
        scheduler_log,
    )
    worker = None
    try:
        wait_port(port, scheduler, scheduler_log, "dask scheduler (TLS)")
        worker = _dask_cli(
            ["worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            {**base, **compose_tls_env("dask-worker", certs)},
            worker_log,
        )
        ours = Security(
            require_encryption=True,
            tls_ca_file=str(certs / "ca.crt"),
            tls_client_cert=str(certs / "client.crt"),
            tls_client_key=str(certs / "client.key"),
        )
        with Client(address, security=ours, timeout="60s") as client:
            client.wait_for_workers(1, timeout=180)

        # `retrain score` set up as compose's CPU worker is: its Dask client settings
        images = make_shapes_dataset(str(tmp_path / "images"), per_class=2, size=40, seed=5)
        out = str(tmp_path / "scores")
        client_env = {**base, **compose_tls_env("worker-cpu", certs)}
        args = ["score", random_model_file, images, "--out", out, "--dask-address", address, "--json"]
        done = retrain_cli(*args, "--partition-size", "3", env=client_env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["images"] == 6 == result["scored"] and result["failed"] == 0
        with Client(address, security=ours, timeout="30s") as client:  # the partitions ran there
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        assert any(p.startswith("score") for p in prefixes), prefixes

        # the same command without the certificates: refused, saying what is missing
        refused = retrain_cli(*args[:4], str(tmp_path / "refused"), *args[5:], env=base, timeout=600)
        assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
        error = json.loads(refused.stdout.strip().splitlines()[-1])["error"]
        assert "TLS Dask scheduler" in error and "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT" in error

        # the scheduler itself refuses: TLS without a client certificate (a Dask listener that
        # let it in would write its handshake first: the read gets bytes) ...
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        context.check_hostname = False  # Dask's certificates name roles, not hosts
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.recv(1)
        # ... a client whose certificate another CA signed, and one without TLS
        theirs = Security(
            require_encryption=True,
            tls_ca_file=str(other_ca / "ca.crt"),
            tls_client_cert=str(other_ca / "client.crt"),
            tls_client_key=str(other_ca / "client.key"),
        )
        with pytest.raises(OSError, match="TLS certificate does not match"):
            Client(address, security=theirs, timeout="15s")
        plain = Security(require_encryption=False, tls_ca_file=None, tls_client_cert=None, tls_client_key=None)
        with pytest.raises(OSError):
            Client(f"tcp://127.0.0.1:{port}", security=plain, timeout="15s")
        log = scheduler_log.read_text()  # what the scheduler said of each
        assert "peer did not return a certificate" in log and "unknown ca" in log
    finally:
        if worker is not None:
            stop(worker)
        stop(scheduler)
