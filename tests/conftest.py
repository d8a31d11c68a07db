"""Shared fixtures and helpers: tiny generated image sets, the ../shared data (skipped when
absent), a small model file, one Prefect API and one S3 server (moto) for the whole session, an
in-process Dask cluster; image encoding, zipping, and calling the CLI in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# No command of the suite starts the local Prefect server for later ones (retrain/server.py,
# start_for_command): it would outlive the test. The one test of that start unsets this.
os.environ.setdefault("RETRAIN_AUTO_SERVER", "0")
# Failed commands write their tracebacks to log files (retrain/cli.py): here, not in ~/.local/state.
os.environ.setdefault("RETRAIN_LOG_DIR", tempfile.mkdtemp(prefix="retrain-test-logs-"))

from retrain.tasks.model_file import model_record, save_model_file
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.samples import make_shapes_dataset  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MERCH_ZIP = SHARED / "data" / "MerchData.zip"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
CAFFE_WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"


# Tests that use these fixtures start servers or browsers (moto, Dask processes, Chromium,
# PostgreSQL, a Prefect server): they are `services` tests, so `pytest -m "not services"` is the
# quick loop. Tests that kill processes carry the mark themselves.
SERVICE_FIXTURES = {"moto", "s3", "s3_endpoint", "dask_processes", "chromium", "prefect_server"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(autouse=True)
def _engines_validated_on_first_use(request, monkeypatch):
    """The retrain flow's "validate engines" step (export, int8 calibration, every engine on
    every image: seconds a run) is left to scoring's first use, as for a model published before
    that step, except in the tests marked ``validates_engines`` (tests/test_engine_gate.py
    checks the step): some fifty flows here would each pay for it. In-process flows only; a
    ``retrain run`` subprocess validates."""
    if request.node.get_closest_marker("validates_engines") is None:
        import retrain.flows.pipeline as pipeline

        monkeypatch.setattr(pipeline, "validate_step", lambda run_url: {"skipped": "tests: validated on first use"})


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here (integration data lives in ../shared)")
    return path


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API for the session: the server CI started (PREFECT_API_URL), else one
    temporary local server, instead of one per test."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield None


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """3 classes x 8 tiny JPEGs (48 px) in class folders."""
    root = tmp_path_factory.mktemp("shapes") / "shapes"
    return make_shapes_dataset(str(root), per_class=8, size=48, seed=1)


@pytest.fixture(scope="session")
def caffe_weights() -> str:
    return str(need(CAFFE_WEIGHTS))


@pytest.fixture(scope="session")
def random_model_file(tmp_path_factory) -> str:
    """A model file for the shapes classes with random weights: for plumbing, not accuracy."""
    import torch

    torch.manual_seed(0)
    spec = get_spec("squeezenet-caffe")
    model, origin = build_network(spec.name, 3, weights="none")
    url = str(tmp_path_factory.mktemp("model") / "model.pt")
    save_model_file(url, model_record(model, spec, ["circle", "square", "triangle"], origin))
    return url


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """One S3 server (moto's, tests/_services.py) for the session, instead of one per test
    module: each test uses buckets of its own names."""
    pytest.importorskip("s3fs")
    from tests._services import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def dask_client():
    """An in-process Dask cluster (one worker thread): the real job, without process start-up."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client


# ---- helpers -------------------------------------------------------------------------------------


def encode(image, fmt: str, **kwargs) -> bytes:
    """A PIL image as the bytes of a file in format ``fmt`` (JPEG, PNG, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def zip_folder(folder: Path, out: Path, top: str = "") -> Path:
    """Zip the files below ``folder`` (symlinks left out) into ``out``, under ``top/``."""
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, (Path(top) / path.relative_to(folder)).as_posix())
    return out


def tiny_run_flags(max_epochs: int = 1, **options) -> list[str]:
    """``retrain run`` flags for a quick run on generated images: the Caffe SqueezeNet layout
    with random weights, mini-batches of 8; ``options`` as more training options."""
    flags = ["--network", "squeezenet-caffe", "--weights", "none", "--max-epochs", str(max_epochs)]
    flags += ["--mini-batch-size", "8"]
    for name, value in options.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def last_json(capsys) -> dict:
    """The JSON object a ``--json`` command printed last."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def run_cli(args: list[str]) -> tuple[int, dict, str]:
    """``retrain ARGS --json`` in this process: (exit status, the last JSON line, stderr). An
    exception escaping ``main`` is a crash and fails the test."""
    from retrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([*args, "--json"])
        except BaseException as exc:  # noqa: BLE001 - that is the point
            pytest.fail(f"crash: retrain {' '.join(args)} raised {type(exc).__name__}: {exc}")
    lines = out.getvalue().strip().splitlines()
    return status, json.loads(lines[-1]) if lines else {}, err.getvalue()


def s3_environment(monkeypatch, endpoint: str, **extra: str) -> None:
    """Point s3fs (botocore) at the S3 server at ``endpoint`` with test credentials; ``extra``:
    more environment variables."""
    s3fs = pytest.importorskip("s3fs")
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        **extra,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 6 MiB tmpfs (root only): a disk that fills up."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
