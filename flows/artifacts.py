"""What a person watches in the Prefect UI while a flow runs: the flow run's page, and the live
training progress. The artifacts' contents (plots, markdown) are built by :mod:`tasks.reports`;
this module is the Prefect side, kept out of tasks/ so the stage modules never call Prefect."""

from __future__ import annotations

import io
import math
import time

import pandas as pd

from retrain.tasks import storage
from retrain.tasks.reports import history_markdown, png_markdown


def flow_run_ui_url() -> str | None:
    """The UI page of the flow run in progress; None outside a flow run or where no UI
    outlives the process (Prefect's temporary API, which has no PREFECT_UI_URL)."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_UI_URL
    from prefect.utilities.urls import url_for

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or not PREFECT_UI_URL.value():
        return None
    return url_for(context.flow_run)


class TrainingMonitor:
    """Training progress in the Prefect UI while it runs: a progress artifact
    (``training-progress``, percent of the iterations) and a markdown artifact
    (``training-history``: validation points and the progress plot), both updated in place
    at each validation (at most every ``every_s`` seconds; the plot, which is ~100 KB, at
    most every ``plot_every_s``) and once more at the end. Call inside a flow run. A failed
    update is logged and skipped: the UI is a view, training goes on."""

    def __init__(self, title: str, plot_url: str, logger=None, every_s: float = 1.0, plot_every_s: float = 10.0):
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact

        self.title, self.plot_url, self.logger = title, plot_url, logger
        self.every_s, self.plot_every_s = every_s, plot_every_s
        self.updated = self.plotted = -math.inf
        self.plot_markdown: str | None = None
        self.failed = False
        self.progress_id = create_progress_artifact(
            0.0, key="training-progress", description=f"{title}: iterations done"
        )
        self.history_id = create_markdown_artifact(
            f"# {title}\n\nwaiting for the first validation",
            key="training-history",
            description=f"{title}: loss, accuracy and validation points, refreshed at each validation",
        )

    def update(self, history: pd.DataFrame, final: bool = False) -> None:
        """``history``: the training history so far (tasks.training), with
        ``attrs["total_iterations"]`` for the percentage."""
        now = time.monotonic()
        if not len(history) or (not final and now - self.updated < self.every_s):
            return
        self.updated = now
        try:
            self._send(history, final, now)
        except Exception as exc:  # an API hiccup must not stop a training run
            if not self.failed and self.logger is not None:
                self.logger.warning("could not update the training progress in the UI: %s", exc)
            self.failed = True

    def finish(self, history_url: str) -> None:
        """The final update, from the run's ``history.csv``: 100 %, every point, the final plot."""
        if storage.exists(history_url):
            self.update(pd.read_csv(io.BytesIO(storage.read_bytes(history_url))), final=True)

    def _send(self, history: pd.DataFrame, final: bool, now: float) -> None:
        from prefect.artifacts import update_progress_artifact
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        total = history.attrs.get("total_iterations")
        done = int(history["iteration"].iloc[-1])
        percent = 100.0 if final else (min(100.0, 100.0 * done / total) if total else 0.0)
        update_progress_artifact(self.progress_id, percent)
        if (final or now - self.plotted >= self.plot_every_s) and storage.exists(self.plot_url):
            self.plot_markdown = png_markdown(self.plot_url, "Training progress")
            self.plotted = now
        markdown = history_markdown(history, self.title, self.plot_markdown)
        get_client(sync_client=True).update_artifact(self.history_id, ArtifactUpdate(data=markdown))
