"""The Prefect UI in a real browser: a retrain run's page shows its artifacts.

Starts ``prefect server`` on 127.0.0.1, runs ``retrain run`` against it (tiny generated
images, one epoch), then drives Debian's headless Chromium over the DevTools protocol: opens
the flow-run page, clicks its Artifacts tab, and opens each artifact, checking the summary,
the per-class metrics table, the promotion decision and that the three plots (montage,
training progress, confusion chart) are decoded images, not broken links. Skipped when no
Chromium is installed (``apt-get install chromium``).

``RETRAIN_UI_SCREENSHOTS=<folder>`` also saves screenshots of the pages there
(``benchmarks/ui_screenshots.sh`` does).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests._services import prefect_server

SCORE_FLOW = Path(__file__).resolve().parents[1] / "flows" / "score.py"
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


def test_retrain_and_score_run_pages_show_their_artifacts_in_a_browser(tmp_path, shapes_dir, chromium):
    shots = os.environ.get("RETRAIN_UI_SCREENSHOTS")
    timings = {}
    with prefect_server(tmp_path) as server:
        t = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "retrain.flows.cli",
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
                "2",
                "--mini-batch-size",
                "8",
                "--validation-frequency",
                "1",
                "--json",
            ],
            env=server["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        timings["retrain run"] = time.perf_counter() - t
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])

        # the REST API has the run and its artifacts...
        flow_run = flow_run_of(server["api_url"], "retrain")
        artifacts = {
            a["key"]: a
            for a in _api(
                server["api_url"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}
            )
        }
        assert {"retrain-summary", "per-class-metrics", "retrain-plots", "model-promotion"} <= set(artifacts)

        # ...and a person opening the run page in a browser sees them
        t = time.perf_counter()
        browser = Browser(chromium)
        try:
            links = artifact_links(
                browser,
                server["ui_url"],
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
                ".filter(x => x.src.startsWith('data:image/png;base64,'));"
                " return i.length >= 3 && i.every(x => x.complete && x.naturalWidth > 0)"
                " && i.map(x => [x.alt, x.naturalWidth, x.naturalHeight]) })()"
            )
            assert [alt for alt, _, _ in images] == ["Sample images", "Training progress", "Confusion chart"]
            assert all(w > 300 and h > 300 for _, w, h in images), images
            if shots:
                browser.screenshot(Path(shots) / "retrain-run-plots.png", height=2400)

            # a batch-scoring run shows its progress and its summary
            if SCORE_FLOW.exists():
                t_score = time.perf_counter()
                scored = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "retrain.flows.cli",
                        "score",
                        summary["run_id"],
                        shapes_dir,
                        "--store",
                        str(tmp_path / "store"),
                        "--workers",
                        "1",
                        "--json",
                    ],
                    env=server["env"],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                timings["retrain score"] = time.perf_counter() - t_score
                assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
                images_scored = json.loads(scored.stdout.strip().splitlines()[-1])["scored"]
                links = artifact_links(
                    browser,
                    server["ui_url"],
                    flow_run_of(server["api_url"], "score")["id"],
                    ("score-summary", "score-labels", "score-progress"),
                )
                if shots:
                    browser.screenshot(Path(shots) / "score-run-artifacts.png")
                browser.goto(links["score-summary"])
                text = browser.wait_for("document.body.innerText.includes('Batch scoring') && document.body.innerText")
                assert "images scored" in text and f"{images_scored:,}" in text
                browser.goto(links["score-progress"])
                browser.wait_for("document.body.innerText.includes('100')")
        finally:
            browser.close()
        timings["browser checks"] = time.perf_counter() - t
        timings["server start"] = server["started_s"]
    print("\n" + json.dumps({"timings_s": {k: round(v, 1) for k, v in timings.items()}}))
