"""Shared fixtures: tiny generated image sets, the ../shared data (skipped when absent), a
small model file, and one Prefect API for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from retrain.tasks.networks import build_network, get_spec, model_record, save_model_file  # noqa: E402
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
