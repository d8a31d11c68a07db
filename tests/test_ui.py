"""The Prefect UI in a real browser: a retrain run's pages show its live progress and its
artifacts.

Starts the local server as a user does (``retrain server start``, its own PREFECT_HOME and a
free port) and runs ``retrain run`` with no PREFECT_API_URL set, so the command has to find
the server itself; tiny generated images, enough epochs to watch. Then drives Debian's
headless Chromium over the DevTools protocol: while the run trains, the training flow run's
progress artifact reads two increasing percentages; after it ends, its page shows the
training history with the progress plot, and the retrain run's artifacts (summary, per-class
metrics, promotion decision, the six plots: montage, progress, confusion, top losses, Grad-CAM,
label issues) are there and the plots are decoded images, not broken links. A batch-scoring run
shows its progress, its summary and its drift verdict with its chart. Skipped when no Chromium is
installed (``apt-get install chromium``).

``RETRAIN_UI_SCREENSHOTS=<folder>`` also saves screenshots of the pages there
(``benchmarks/ui_screenshots.sh`` does).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from retrain.tasks.reports import HISTORY_ROWS
from retrain.tasks.samples import make_shapes_dataset
from tests._services import local_retrain_server, retrain_cli

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--no-default-browser-check",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol (a WebSocket; no extra packages)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="retrain-chromium-")
        self.proc = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.counter = 0

    def call(self, method: str, **params):
        self.counter += 1
        self.ws.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.counter:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.eval(expression):
                return value
            time.sleep(0.25)
        raise AssertionError(
            f"page never satisfied {expression!r}; it shows:\n"
            + str(self.eval("document.body && document.body.innerText"))[:3000]
        )

    def screenshot(self, path: Path, height: int | None = None) -> Path:
        if height:
            self.call(
                "Emulation.setDeviceMetricsOverride", width=1400, height=height, deviceScaleFactor=1, mobile=False
            )
            time.sleep(0.5)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            # /usr/bin/chromium is a wrapper script: stop the whole process group it leads
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)


def _api(api_url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{api_url}{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def artifact_links(browser: Browser, ui_url: str, flow_run_id: str, keys: tuple[str, ...]) -> dict[str, str]:
    """Open a flow run's page, click its Artifacts tab, wait for the cards of ``keys`` and
    return each card's link (artifact key -> artifact page URL)."""
    # tall enough that the artifact cards below the fold are rendered too
    browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=1600, deviceScaleFactor=1, mobile=False)
    browser.goto(f"{ui_url}/runs/flow-run/{flow_run_id}")
    browser.wait_for("!!document.querySelector('li.p-tab#artifacts')")
    browser.eval("document.querySelector('li.p-tab#artifacts').click()")
    browser.wait_for(
        "(() => { const t = document.body.innerText; return "
        + " && ".join(f"t.includes('{key}')" for key in keys)
        + " })()"
    )
    links = browser.eval(
        "Object.fromEntries([...document.querySelectorAll('a')]"
        ".filter(a => a.href.includes('/artifacts/artifact/'))"
        ".map(a => [a.innerText.split('\\n').find(s => /^[a-z-]+$/.test(s.trim())), a.href]))"
    )
    assert set(keys) <= set(links), links
    return links


def flow_run_of(api_url: str, flow_name: str) -> dict:
    (flow_run,) = _api(api_url, "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}})
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]
    return flow_run


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if not path:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    return path


def read_progress(browser: Browser, link: str) -> float:
    """The percentage a progress artifact's page shows (the page is loaded afresh)."""
    browser.goto(link)
    text = browser.wait_for(
        "(() => { const e = document.querySelector('.artifact-data-progress'); return e && e.innerText })()"
    )
    return float(re.search(r"([0-9.]+)\s*%", text).group(1))


def flow_run_named(api_url: str, flow_name: str, timeout: float = 600) -> dict:
    """The (first) flow run of ``flow_name``, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := _api(api_url, "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}}):
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no {flow_name} flow run within {timeout} s")


def watch_training(browser: Browser, api_url: str, ui_url: str, run: subprocess.Popen) -> list[float]:
    """While ``run`` trains: open its training flow run's page and read the progress artifact
    until it has advanced once; returns the readings."""
    train_run = flow_run_named(api_url, "train")
    links = artifact_links(browser, ui_url, train_run["id"], ("training-progress", "training-history"))
    readings = [read_progress(browser, links["training-progress"])]
    while readings[-1] <= readings[0] and run.poll() is None:
        time.sleep(1)
        readings.append(read_progress(browser, links["training-progress"]))
    return readings


@pytest.mark.timeout(900)  # a server, a 40-iteration run, a scoring job: ~2 min idle, 10 on a busy machine
def test_run_pages_show_live_progress_and_artifacts_in_a_browser(tmp_path, chromium):
    shots = os.environ.get("RETRAIN_UI_SCREENSHOTS")
    timings = {}
    # 102 shapes: ~30 held out (a drift reference needs 20) and 102 to score (a verdict needs 50)
    shapes_dir = make_shapes_dataset(str(tmp_path / "shapes"), per_class=34, size=48, seed=1)
    with local_retrain_server(tmp_path) as server:
        api_url, ui_url, env = server["api_url"], server["ui_url"], server["env"]
        assert "PREFECT_API_URL" not in env
        t = time.perf_counter()
        out, err = open(tmp_path / "run.out", "w+"), open(tmp_path / "run.err", "w+")
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retrain.cli",
                "run",
                shapes_dir,
                "--store",
                str(tmp_path / "store"),
                "--network",
                "squeezenet-caffe",
                "--weights",
                "none",
                "--mode",
                "scratch",
                "--max-epochs",
                "7",
                "--mini-batch-size",
                "8",
                "--validation-frequency",
                "1",
                "--json",
            ],
            env=env,
            stdout=out,
            stderr=err,
        )
        browser = Browser(chromium)
        try:
            # while it trains, the progress artifact advances...
            readings = watch_training(browser, api_url, ui_url, run)
            assert readings[0] < 100 and readings[-1] > readings[0], (readings, run.poll())
            if shots:
                browser.screenshot(Path(shots) / "training-progress.png")
            run.wait(600)
            timings["retrain run"] = time.perf_counter() - t
            out.seek(0), err.seek(0)
            stdout = out.read()
            assert run.returncode == 0, stdout[-3000:] + err.read()[-3000:]
            summary = json.loads(stdout.strip().splitlines()[-1])

            # ...the command found the local server by itself and says where to watch the run
            flow_run = flow_run_of(api_url, "retrain")
            assert summary["ui_url"] == f"{ui_url}/runs/flow-run/{flow_run['id']}"

            # after it ends, the training page shows every validation point and the plot
            links = artifact_links(
                browser, ui_url, flow_run_of(api_url, "train")["id"], ("training-progress", "training-history")
            )
            assert read_progress(browser, links["training-progress"]) == 100
            browser.goto(links["training-history"])
            rows = browser.wait_for(
                "(() => { const r = [...document.querySelectorAll('table tr')]; const i = [...document.images]"
                ".filter(x => x.src.startsWith('data:image/png') && x.complete && x.naturalWidth > 300);"
                " return r.length > 1 && i.length === 1 && r.map(x => x.innerText) })()"
            )
            points = min(summary["iterations"], HISTORY_ROWS)  # one validation per iteration
            assert "validation accuracy" in rows[0] and len(rows) - 1 == points, rows[:3]
            if shots:
                browser.screenshot(Path(shots) / "training-history.png", height=2400)

            # the REST API has the run and its artifacts...
            artifacts = {
                a["key"]: a
                for a in _api(api_url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
            }
            assert {"retrain-summary", "per-class-metrics", "retrain-plots", "model-promotion"} <= set(artifacts)

            # ...and a person opening the run page in a browser sees them
            links = artifact_links(
                browser,
                ui_url,
                flow_run["id"],
                ("retrain-summary", "per-class-metrics", "retrain-plots", "model-promotion"),
            )
            if shots:
                browser.screenshot(Path(shots) / "retrain-run-artifacts.png")

            browser.goto(links["retrain-summary"])
            text = browser.wait_for("document.body.innerText.includes('test accuracy') && document.body.innerText")
            assert f"Retrain run {summary['run_id']}" in text and "squeezenet-caffe" in text

            browser.goto(links["per-class-metrics"])
            cells = browser.wait_for(
                "(() => { const c = [...document.querySelectorAll('table td, table th')]"
                ".map(e => e.innerText.trim()); return c.includes('triangle') && c })()"
            )
            assert {"circle", "square", "triangle", "precision", "recall", "f1"} <= set(cells)

            browser.goto(links["model-promotion"])
            text = browser.wait_for("document.body.innerText.includes('promoted') && document.body.innerText")
            assert "no current model" in text

            browser.goto(links["retrain-plots"])
            images = browser.wait_for(
                "(() => { const i = [...document.querySelectorAll('img')]"
                ".filter(x => x.src.startsWith('data:image/'));"
                " return i.length >= 3 && i.every(x => x.complete && x.naturalWidth > 0)"
                " && i.map(x => [x.alt, x.naturalWidth, x.naturalHeight]) })()"
            )
            assert [alt for alt, _, _ in images] == [
                "Sample images",
                "Training progress",
                "Confusion chart",
                "Top losses",
                "Grad-CAM",
                "Label issues",  # label-issues.png: the top suspects (tasks/label_issues.py)
            ]
            assert all(w > 300 and h > 300 for _, w, h in images), images
            if shots:
                browser.screenshot(Path(shots) / "retrain-run-plots.png", height=5200)

            # a batch-scoring run shows its progress and its summary
            t_score = time.perf_counter()
            scored = retrain_cli(
                "score",
                summary["run_id"],
                shapes_dir,
                "--store",
                str(tmp_path / "store"),
                "--workers",
                "1",
                "--json",
                env=env,
            )
            timings["retrain score"] = time.perf_counter() - t_score
            assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
            score_summary = json.loads(scored.stdout.strip().splitlines()[-1])
            score_run = flow_run_of(api_url, "score")
            assert score_summary["ui_url"] == f"{ui_url}/runs/flow-run/{score_run['id']}"
            links = artifact_links(
                browser, ui_url, score_run["id"], ("score-summary", "score-labels", "score-progress", "score-drift")
            )
            if shots:
                browser.screenshot(Path(shots) / "score-run-artifacts.png")
            browser.goto(links["score-summary"])
            # wait for the table itself: the artifact's description ("Batch scoring summary")
            # shows before its markdown is rendered
            text = browser.wait_for("document.body.innerText.includes('images scored') && document.body.innerText")
            assert "# Batch scoring" not in text and f"{score_summary['scored']:,}" in text
            assert read_progress(browser, links["score-progress"]) == 100

            # the drift artifact: the verdict, each test, the class mix and drift.png (tasks/drift.py)
            drift = score_summary["drift"]
            assert drift["drift"] is not None, drift  # 72 images against the run's held-out ones
            browser.goto(links["score-drift"])
            text = browser.wait_for("document.body.innerText.includes('embedding') && document.body.innerText")
            tables = ("class_mix", "confidence", "embedding", "predicted class", "confidence (top score)")
            assert all(word in text for word in tables), text
            assert ("DRIFT:" if drift["drift"] else "drift: none") in text
            if drift["drift"]:  # drift.png, drawn where there is drift
                charts = browser.wait_for(
                    "(() => { const i = [...document.querySelectorAll('img')]"
                    ".filter(x => x.src.startsWith('data:image/png;base64,'));"
                    " return i.length && i.every(x => x.complete && x.naturalWidth > 0)"
                    " && i.map(x => [x.alt, x.naturalWidth]) })()"
                )
                assert [alt for alt, _ in charts] == ["Drift: this job beside the reference"] and charts[0][1] > 600
            if shots:
                browser.screenshot(Path(shots) / "score-run-drift.png", height=1400)
        finally:
            browser.close()
            if run.poll() is None:
                run.kill()
        timings["server start"] = server["started_s"]
    print("\n" + json.dumps({"timings_s": {k: round(v, 1) for k, v in timings.items()}}))


def test_training_history_lists_validation_points_with_the_training_means_since_the_previous():
    import pandas as pd

    from retrain.tasks.reports import history_markdown

    nan = float("nan")
    history = pd.DataFrame(
        {
            "iteration": [1, 2, 3, 4, 5],
            "epoch": [1, 1, 2, 2, 3],
            "loss": [4.0, 2.0, 1.0, 3.0, 0.5],
            "accuracy": [0.0, 0.5, 0.5, 1.0, 1.0],
            "val_loss": [nan, 1.5, nan, nan, 0.25],
            "val_accuracy": [nan, 0.4, nan, nan, 0.9],
            "seconds": [1.0, 2.0, 3.0, 4.0, 5.0],
        }
    )
    history.attrs["total_iterations"] = 10
    text = history_markdown(history, "Training run r1", "![plot](data:image/png;base64,AAAA)")
    lines = text.splitlines()
    assert lines[0] == "# Training run r1: iteration 5 of 10, epoch 3"
    table = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert table == [  # newest first; training means over iterations 3-5, then 1-2
        "| 5 | 3 | 1.5000 | 0.8333 | 0.2500 | 0.9000 | 5.0 |",
        "| 2 | 1 | 3.0000 | 0.2500 | 1.5000 | 0.4000 | 2.0 |",
    ]
    assert lines[-1] == "![plot](data:image/png;base64,AAAA)"
    assert "the newest 1," in history_markdown(history, "t", None, rows=1)
