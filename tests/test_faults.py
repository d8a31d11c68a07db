"""Faults (issue 6): kill -9 of a training run (in the middle of an epoch, and while a checkpoint
is being written) and its resume; an S3 store that answers errors or is down (moto's server
behind a proxy that injects the faults) during reads, publishing and the consolidation of scores.

What must hold: a rerun resumes from the last complete checkpoint and ends within noise of an
uninterrupted run; no checkpoint, model or consolidated output is ever seen half-written; a
store that keeps failing is retried, then reported clearly (exit status 3, a JSON error), never
as a traceback. Kill -9 of batch scoring and two jobs on one output are in test_scoring.py.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch

from retrain.tasks import storage
from retrain.tasks.model_file import model_record, read_model_record
from retrain.tasks.networks import build_network, get_spec
from retrain.tasks.samples import make_shapes_dataset
from tests import _services
from tests._services import kill_group
from tests.conftest import CAFFE_WEIGHTS, s3_environment

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]


# ---- kill -9 during training -------------------------------------------------------------------


def training_args(data: str, store: str) -> list[str]:
    """3 classes x 12 images: 24 train (3 iterations of 8 per epoch), 6 validation, 6 test;
    fine-tuning the whole network (every iteration a real forward and backward pass), a
    checkpoint after every iteration (about 12 MB each)."""
    weights = str(CAFFE_WEIGHTS) if CAFFE_WEIGHTS.exists() else "none"
    return [
        "run",
        data,
        "--store",
        store,
        "--network",
        "squeezenet-caffe",
        "--weights",
        weights,
        "--mode",
        "finetune",
        "--max-epochs",
        "3",
        "--mini-batch-size",
        "8",
        "--validation-frequency",
        "3",
        "--checkpoint-frequency",
        "1",
        "--checkpoint-frequency-unit",
        "iteration",
        "--seed",
        "0",
        "--json",
    ]


def api_url(prefect_api) -> str:
    """The session's Prefect API, for the `retrain run` processes (so none starts its own)."""
    if prefect_api:
        return prefect_api
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def subprocess_env(prefect_api, tmp_path) -> dict[str, str]:
    """The environment of a ``retrain`` process that uses the session's Prefect API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=api_url(prefect_api),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_in_process(args: list[str]) -> dict:
    from retrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(args)
    assert status == 0, out.getvalue()[-3000:]
    return json.loads(out.getvalue().strip().splitlines()[-1])


def checkpoints_of(store: Path) -> Path | None:
    found = list(store.glob("runs/*/checkpoints"))
    return found[0] if found else None


def complete_checkpoints(folder: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in folder.glob("iter-*.pt"))


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300, poll: float = 0.05):
    """Poll ``condition()`` until it returns something truthy; the process must still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended ({proc.returncode}) before the fault could be injected:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        time.sleep(poll)
    pytest.fail("timed out waiting to inject the fault:\n" + log.read_text(errors="replace")[-3000:])


def assert_every_checkpoint_loads(folder: Path) -> None:
    for path in folder.glob("iter-*.pt"):
        state = torch.load(path, weights_only=True)  # complete and safe, or this raises
        assert state["iteration"] == int(path.name[5:13]) and "model" in state and "optimizer" in state


@pytest.mark.services
def test_kill_9_mid_epoch_and_mid_checkpoint_write_then_rerun_resumes(prefect_api, tmp_path):
    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, per_class=12, size=64, seed=1)
    env = subprocess_env(prefect_api, tmp_path)
    store = tmp_path / "store"
    args = training_args(data, str(store))
    log = tmp_path / "runs.log"
    timings = {}

    # 1. kill -9 in the middle of epoch 2: just after the checkpoint of iteration 4 (of 3 per epoch)
    def fourth_checkpoint() -> Path | None:
        folder = checkpoints_of(store)
        return folder if folder and (folder / "iter-00000004.pt").exists() else None

    t = time.perf_counter()
    proc = _services.start(_services.retrain_argv(*args), log, env)
    try:
        folder = wait_for(fourth_checkpoint, proc, log)
        kill_group(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    timings["run killed mid-epoch"] = time.perf_counter() - t
    resumes = [complete_checkpoints(folder)[-1]]
    assert resumes[0] in (4, 5), resumes  # epochs end at iterations 3, 6, 9
    assert_every_checkpoint_loads(folder)
    assert storage.read_json(str(folder.parent / "run.json"))["status"] == "running"  # nothing could record it

    # 2. rerun; once it has resumed, kill -9 while a checkpoint is being written (its temporary
    #    file is there). The write may finish between seeing the file and the kill: then rerun
    #    and try again.
    caught_mid_write = False
    for attempt in range(3):
        resumed_before = log.read_text(errors="replace").count("resuming from checkpoint")
        t = time.perf_counter()
        proc = _services.start(_services.retrain_argv(*args), log, env)
        try:
            wait_for(
                lambda: log.read_text(errors="replace").count("resuming from checkpoint") > resumed_before, proc, log
            )
            before = {p.name for p in folder.iterdir()}
            tmp_name = wait_for(
                lambda: next(
                    (e.name for e in os.scandir(folder) if storage.TMP_MARKER in e.name and e.name not in before), None
                ),
                proc,
                log,
                poll=0.0005,
            )
            kill_group(proc)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        timings[f"rerun killed while writing a checkpoint ({attempt + 1})"] = time.perf_counter() - t
        assert_every_checkpoint_loads(folder)  # never a half-written iter-*.pt
        resumes.append(complete_checkpoints(folder)[-1])
        debris = folder / tmp_name
        if debris.exists():
            complete_size = (folder / f"iter-{resumes[-1]:08d}.pt").stat().st_size
            assert debris.stat().st_size <= complete_size  # the write was cut short, not finished
            caught_mid_write = True
            break
    assert caught_mid_write, "the kill never landed inside a checkpoint write in 3 tries"

    # 3. the same command again, to the end
    t = time.perf_counter()
    resumed = run_in_process(args)
    timings["rerun to the end"] = time.perf_counter() - t
    run = Path(resumed["run_url"])
    summary = storage.read_json(str(run / "summary.json"))
    record = storage.read_json(str(run / "run.json"))
    assert run == folder.parent and record["status"] == "completed"
    assert summary["resumed_from"] == resumes[-1] and record["resumed"] == len(resumes)
    assert resumed["iterations"] == 9 and resumed["epochs"] == 3
    assert_every_checkpoint_loads(folder)
    assert complete_checkpoints(folder) == [8, 9]  # the newest two
    assert not [p.name for p in folder.iterdir() if storage.TMP_MARKER in p.name]  # the debris went on resume
    read_model_record(str(run / "model.pt"))  # the published model is whole and safe to load

    # 4. an uninterrupted run of the same command (another store): the same result, within noise
    t = time.perf_counter()
    baseline = run_in_process(training_args(data, str(tmp_path / "baseline-store")))
    timings["uninterrupted run"] = time.perf_counter() - t
    test_images = 6
    assert abs(resumed["test_accuracy"] - baseline["test_accuracy"]) <= 1 / test_images + 1e-9
    assert abs(resumed["val_accuracy"] - baseline["val_accuracy"]) <= 1 / test_images + 1e-9
    a = pd.read_csv(run / "history.csv")
    b = pd.read_csv(Path(baseline["run_url"]) / "history.csv")
    assert list(a["iteration"]) == list(b["iteration"]) == list(range(1, 10))  # no step lost or repeated
    assert (a["loss"] - b["loss"]).abs().max() < 0.05, pd.DataFrame({"resumed": a["loss"], "baseline": b["loss"]})
    print(
        "\n"
        + json.dumps(
            {
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
                "resumed_from": resumes,
                "test_accuracy": [resumed["test_accuracy"], baseline["test_accuracy"]],
                "max_loss_difference": float((a["loss"] - b["loss"]).abs().max()),
            }
        )
    )


# ---- a faulty S3 ---------------------------------------------------------------------------------


class FaultProxy:
    """An HTTP proxy in front of moto's S3 server that answers ``503 ServiceUnavailable``
    instead of forwarding whenever ``fail(n, method, path)`` says so (``n``: the request's
    number, from 1). ``log`` lists every request and what it got."""

    def __init__(self, upstream: str):
        host, port = upstream.split("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.fail = lambda n, method, path: False
        self.log: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    n = len(proxy.log) + 1
                    failing = bool(proxy.fail(n, self.command, self.path))
                    proxy.log.append((self.command, self.path, "503" if failing else "ok"))
                if failing:
                    payload = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                        b"<Message>injected by the test</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")
                }
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fail_from(self, k: int | None) -> None:
        """Answer errors from the k-th request after now on (None: never)."""
        start = len(self.log)
        self.fail = (lambda n, m, p: False) if k is None else (lambda n, m, p: n - start >= k)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_environment_with_fast_retries(monkeypatch, endpoint: str) -> None:
    """botocore tries once (AWS_MAX_ATTEMPTS=1), so every retry seen is retrain's own
    (tasks/storage/remote.py), three attempts in all, quickly."""
    s3_environment(
        monkeypatch, endpoint, AWS_MAX_ATTEMPTS="1", RETRAIN_STORE_RETRIES="3", RETRAIN_STORE_RETRY_DELAY="0.02"
    )


@pytest.fixture
def s3(moto, monkeypatch):
    """A fresh bucket behind a fault-injecting proxy; yields (proxy, bucket URL)."""
    import s3fs

    with FaultProxy(moto) as proxy:
        s3_environment_with_fast_retries(monkeypatch, proxy.url)
        bucket = f"faults-{os.urandom(4).hex()}"
        s3fs.S3FileSystem().mkdir(bucket)
        yield proxy, f"s3://{bucket}"
        proxy.fail_from(None)
        s3fs.S3FileSystem.clear_instance_cache()


def test_transient_s3_errors_are_retried_and_the_write_lands_whole(s3, caplog):
    proxy, bucket = s3
    url = f"{bucket}/store/blob.bin"
    payload = os.urandom(300_000)
    start = len(proxy.log)
    proxy.fail = lambda n, m, p: n - start in (1, 2)  # the next two requests fail, then all is well
    with caplog.at_level("WARNING", logger="retrain.storage"):
        storage.write_bytes(url, payload)
    assert [s for _, _, s in proxy.log[start : start + 3]] == ["503", "503", "ok"]
    assert sum("attempt" in r.message for r in caplog.records) == 2  # two retries, each logged
    proxy.fail_from(None)
    assert storage.read_bytes(url) == payload
    assert storage.list_files(f"{bucket}/store") == [url]  # no temporary debris listed

    start = len(proxy.log)
    proxy.fail = lambda n, m, p: n - start == 1 and m == "GET"
    assert storage.read_bytes(url) == payload  # a failed read is retried too

    proxy.fail_from(None)
    start = len(proxy.log)
    with pytest.raises(FileNotFoundError):  # not weather: no retry, no wait
        storage.read_bytes(f"{bucket}/store/missing.bin")
    assert len(proxy.log) - start <= 2


def test_listing_images_to_score_on_a_flaky_s3_is_retried(s3):
    from retrain.tasks.scoring import list_images

    proxy, bucket = s3
    urls = [f"{bucket}/photos/{folder}/{i}.jpg" for folder in ("a", "b") for i in range(3)]
    for url in urls:
        storage.write_bytes(url, b"not really a jpeg: listing does not read it")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no listing cached from the writes
    start = len(proxy.log)
    proxy.fail = lambda n, m, p: n - start in (1, 2)  # the first two requests of the listing fail
    listing = list_images(f"{bucket}/photos")
    assert [s for _, _, s in proxy.log[start : start + 3]] == ["503", "503", "ok"]
    assert listing.paths == sorted(urls)


def test_s3_that_keeps_failing_gives_a_clear_error_after_retries(s3, tmp_path, capsys):
    from retrain.cli import main

    proxy, bucket = s3
    model = f"{bucket}/models/model.pt"
    storage.write_bytes(model, b"placeholder")
    proxy.fail_from(1)
    start = len(proxy.log)
    with pytest.raises(storage.StorageError, match=r"read_bytes .*models/model.pt failed 3 time\(s\)") as err:
        storage.read_bytes(model)
    assert "ServiceUnavailable" in str(err.value) or "Service Unavailable" in str(err.value)
    assert len(proxy.log) - start >= 3  # three attempts reached the endpoint
    image = tmp_path / "x.jpg"
    make_shapes_dataset(str(tmp_path / "img"), per_class=1, size=32)
    image.write_bytes((tmp_path / "img" / "circle" / "circle_000.jpg").read_bytes())
    status = main(["classify", model, str(image), "--json"])
    captured = capsys.readouterr()
    assert status == 3, captured
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["type"] == "StorageError" and "failed 3 time(s)" in result["error"]
    assert "Traceback" not in captured.err


@pytest.mark.services
def test_s3_endpoint_down_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    """moto started, a model published to it, moto stopped: the endpoint refuses connections."""
    pytest.importorskip("s3fs")
    import s3fs

    from retrain.cli import main
    from tests._services import moto_s3

    with moto_s3(tmp_path) as endpoint:
        s3_environment_with_fast_retries(monkeypatch, endpoint)
        s3fs.S3FileSystem().mkdir("down")
        storage.write_bytes("s3://down/model.pt", b"placeholder")
    s3fs.S3FileSystem.clear_instance_cache()
    started = time.monotonic()
    status = main(["classify", "s3://down/model.pt", str(tmp_path / "x.jpg"), "--json"])
    captured = capsys.readouterr()
    assert status == 3 and "Traceback" not in captured.err, captured
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["type"] == "StorageError" and "Could not connect" in result["error"], result
    assert time.monotonic() - started < 60


def s3_run_folder(bucket: str, name: str, trained: bytes) -> str:
    """runs/<name>/ on S3 as the evaluate stage leaves it: run.json, trained.pt, metrics.json."""
    run_url = f"{bucket}/store/runs/{name}"
    storage.write_json(f"{run_url}/run.json", {"run_id": name, "status": "running"})
    storage.write_bytes(f"{run_url}/trained.pt", trained)
    storage.write_json(f"{run_url}/metrics.json", {"test_accuracy": 0.75, "classes": CLASSES})
    return run_url


@pytest.fixture(scope="module")
def trained_bytes() -> bytes:
    torch.manual_seed(0)
    spec = get_spec("squeezenet-caffe")
    model, origin = build_network(spec.name, 3, weights="none")
    buffer = io.BytesIO()
    torch.save(model_record(model, spec, CLASSES, origin, metrics={"val_accuracy": 0.8}), buffer)
    return buffer.getvalue()


def test_publish_on_a_failing_s3_never_leaves_a_half_published_model(s3, trained_bytes):
    """The store starts failing at every point of publishing in turn (from the k-th request
    on): publishing fails with StorageError, and model.pt is either absent or whole; run.json
    says completed only when model.pt is there. Once the store is back, the rerun publishes."""
    from retrain.tasks.runs import publish_run

    proxy, bucket = s3
    record = torch.load(io.BytesIO(trained_bytes), weights_only=True)
    buffer = io.BytesIO()  # publishing reads the record, not the network: small weights will do
    torch.save(dict(record, state_dict={"classifier.1.bias": torch.zeros(3)}), buffer)
    trained_bytes = buffer.getvalue()
    start = len(proxy.log)
    publish_run(s3_run_folder(bucket, "dry", trained_bytes))
    requests = len(proxy.log) - start
    assert requests > 3
    for k in range(1, requests + 1):
        proxy.fail_from(None)
        run_url = s3_run_folder(bucket, f"r{k}", trained_bytes)
        proxy.fail_from(k)
        injected = len(proxy.log)
        try:
            publish_run(run_url)
        except storage.StorageError:
            pass
        else:  # fewer requests this time (cached listings): the fault never came
            assert "503" not in [s for _, _, s in proxy.log[injected:]]
        proxy.fail_from(None)
        model_url = f"{run_url}/model.pt"
        if storage.exists(model_url):
            record = read_model_record(model_url)  # whole: it loads, with the test metrics
            assert record["metrics"]["test_accuracy"] == 0.75 and record["run_id"] == f"r{k}"
        else:
            assert storage.read_json(f"{run_url}/run.json")["status"] != "completed"
        assert publish_run(run_url) == model_url  # the rerun, with the store back
        assert storage.read_json(f"{run_url}/run.json")["status"] == "completed"
        read_model_record(model_url)


def test_consolidation_on_a_failing_s3_never_leaves_partial_scores(s3, tmp_path, trained_bytes):
    """Scores written to S3; the store fails from each request of the consolidation on in
    turn: scores.parquet is absent or holds exactly one row per image; a rerun completes it."""
    from retrain.tasks import scoring

    proxy, bucket = s3
    model = tmp_path / "model.pt"
    model.write_bytes(trained_bytes)
    images = tmp_path / "images"
    make_shapes_dataset(str(images), per_class=3, size=32, seed=4)
    (images / "broken.jpg").write_bytes(b"not an image")
    out = f"{bucket}/scores/job"
    layout = scoring.JobLayout(out)
    plan = scoring.prepare_job(str(model), str(images), out, partition_size=4, mini_batch_size=4)
    for part in scoring.read_partitions(plan):
        scoring.score_partition(plan.model.for_workers(), part.files, layout.part(part.name), 4, plan.top_k)
    parts = {name: storage.read_bytes(storage.join(layout.parts, name)) for name in storage.names_in(layout.parts)}
    start = len(proxy.log)
    scoring.consolidate(plan)
    requests = len(proxy.log) - start
    assert not storage.names_in(layout.parts)  # consolidated: the parts' rows are in scores.parquet

    def as_the_workers_left_it() -> None:
        for url in (layout.scores, layout.summary):
            if storage.exists(url):
                storage.remove(url)
        for name, data in parts.items():
            storage.write_bytes(storage.join(layout.parts, name), data)

    for k in range(1, requests + 1):
        as_the_workers_left_it()
        proxy.fail_from(k)
        with pytest.raises(OSError):  # StorageError, or s3fs's OSError where scoring lists parts itself
            scoring.consolidate(plan)
        proxy.fail_from(None)
        if storage.exists(layout.scores):
            frame = storage.read_parquet(layout.scores)
            assert len(frame) == plan.count == 10 and frame["path"].is_unique
    # The rerun of the job, from where the last failure left the output (scores.parquet written,
    # a part not yet removed): nothing to score but the broken file, tried again each run.
    assert storage.exists(layout.scores) and storage.names_in(layout.parts)
    summary = scoring.score_job(str(model), str(images), out, partition_size=4, mini_batch_size=4)
    frame = storage.read_parquet(layout.scores)
    assert len(frame) == summary["images"] == 10 and frame["path"].is_unique and summary["failed"] == 1
    assert summary["unchanged"] == 9 and summary["retried"] == summary["processed"] == 1
