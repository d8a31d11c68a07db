"""Plots (montage, training progress, confusion chart) and the markdown of what a person sees in
the UI. Plots are PNG bytes written to the store through :mod:`storage`; publishing them as
Prefect artifacts is the flows' part (flows/artifacts.py and each flow's publish step)."""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from retrain.tasks import storage  # noqa: E402


def _save(fig, url: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return storage.write_bytes(url, buffer.getvalue())


def montage(images: torch.Tensor, labels: list[str], url: str) -> str:
    """A square grid of images (uint8 N x 3 x H x W) titled with their labels."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=8)
    return _save(fig, url)


def training_progress(history: pd.DataFrame, url: str, title: str = "Training progress") -> str:
    """MATLAB's training-progress plot: accuracy and loss per iteration, validation points."""
    fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    it = history["iteration"]
    acc_ax.plot(it, 100 * history["accuracy"], color="#1f77b4", alpha=0.35, lw=1)
    acc_ax.plot(
        it,
        100 * history["accuracy"].rolling(5, min_periods=1).mean(),
        color="#1f77b4",
        lw=1.8,
        label="training (smoothed)",
    )
    loss_ax.plot(it, history["loss"], color="#ff7f0e", alpha=0.35, lw=1)
    loss_ax.plot(
        it, history["loss"].rolling(5, min_periods=1).mean(), color="#ff7f0e", lw=1.8, label="training (smoothed)"
    )
    val = history.dropna(subset=["val_loss"])
    if len(val):
        acc_ax.plot(val["iteration"], 100 * val["val_accuracy"], "k--o", ms=4, lw=1, label="validation")
        loss_ax.plot(val["iteration"], val["val_loss"], "k--o", ms=4, lw=1, label="validation")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_ylim(0, 102)
    loss_ax.set_ylabel("loss")
    loss_ax.set_xlabel("iteration")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    epochs = history.groupby("epoch")["iteration"].min().tolist()[1:]
    for x in epochs:
        for ax in (acc_ax, loss_ax):
            ax.axvline(x - 0.5, color="grey", lw=0.5, alpha=0.4)
    acc_ax.set_title(title)
    return _save(fig, url)


def confusion_chart(confusion: list[list[int]], classes: list[str], url: str, title: str = "Confusion chart") -> str:
    """MATLAB's confusionchart: counts, with row-normalised recall shading."""
    matrix = np.asarray(confusion)
    k = len(classes)
    size = max(4.0, 0.9 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = matrix.sum(axis=1, keepdims=True)
    shade = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if shade[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = matrix.sum()
    ax.set_title(f"{title} (accuracy {np.trace(matrix) / total:.1%} of {total})" if total else title)
    return _save(fig, url)


def png_markdown(url: str, alt: str) -> str:
    """An image embedded in markdown as a data URI, so the Prefect UI shows it whatever the
    store is (a local folder is not reachable from a browser)."""
    encoded = base64.b64encode(storage.read_bytes(url)).decode("ascii")
    return f"![{alt}](data:image/png;base64,{encoded})"


def accuracy_text(value: float | None, part: str) -> str:
    """An accuracy to four places, or why there is none: a split may have no validation or
    no test part (``--split 0.8,0,0.2``, a label table without VALIDATION rows)."""
    return f"{value:.4f}" if value is not None else f"none (no {part} part)"


def run_summary_markdown(summary: dict) -> str:
    """The retrain run's summary artifact: data, network, options, accuracies."""
    counts = summary.get("counts", {})
    lines = [
        f"# Retrain run `{summary['run_id']}`",
        "",
        "| | |",
        "|---|---|",
        f"| data set | `{summary['data']}` |",
        f"| classes ({len(counts)}) | " + ", ".join(f"{c} ({n})" for c, n in counts.items()) + " |",
        f"| skipped files | {summary.get('skipped', 0)} |",
        f"| network | {summary['network']} ({summary.get('weights_origin', '')}) |",
        f"| mode | {summary['mode']} |",
        f"| test accuracy | **{accuracy_text(summary['test_accuracy'], 'test')}** |",
        f"| validation accuracy | {accuracy_text(summary['val_accuracy'], 'validation')} |",
        f"| iterations / epochs | {summary.get('iterations')} / {summary.get('epochs')} |",
        *(
            [f"| label issues | {summary['label_issues']} likely wrong labels (`label_issues.csv`) |"]
            if summary.get("label_issues") is not None
            else []
        ),
        *(
            [f"| left out of training | {summary['label_issues_excluded']} |"]
            if "label_issues_excluded" in summary
            else []
        ),
        f"| model | `{summary['model']}` |",
        f"| seconds | {summary['seconds']:.1f} |",
        "",
        "## Training options",
        "",
        "| option | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary.get("options", {}).items()],
    ]
    return "\n".join(lines)


# ---- the training history as the UI shows it ---------------------------------------------


HISTORY_ROWS = 50  # validation points listed in the training-history artifact (the plot shows them all)


def history_markdown(history: pd.DataFrame, title: str, plot_markdown: str | None, rows: int = HISTORY_ROWS) -> str:
    """The training progress as the UI shows it while training runs: where it is, the newest
    validation points (training loss and accuracy averaged since the previous one) and the
    progress plot."""
    last = history.iloc[-1]
    total = history.attrs.get("total_iterations")
    where = f"iteration {int(last['iteration'])}" + (f" of {total}" if total else "") + f", epoch {int(last['epoch'])}"
    since = history["val_loss"].notna().shift(fill_value=False).cumsum()  # validation interval of each row
    train = history.groupby(since)[["loss", "accuracy"]].mean()
    val = history[history["val_loss"].notna()]
    lines = [
        f"# {title}: {where}",
        "",
        f"{len(val)} validation points" + (f", the newest {rows}" if len(val) > rows else "") + ", newest first; "
        "training loss and accuracy are the means since the previous one.",
        "",
        "| iteration | epoch | training loss | training accuracy | validation loss | validation accuracy | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, row in val.iloc[::-1].head(rows).iterrows():
        mean = train.loc[since[index]]
        lines.append(
            f"| {int(row['iteration'])} | {int(row['epoch'])} | {mean['loss']:.4f} | {mean['accuracy']:.4f} | "
            f"{row['val_loss']:.4f} | {row['val_accuracy']:.4f} | {row['seconds']:.1f} |"
        )
    if plot_markdown:
        lines += ["", plot_markdown]
    return "\n".join(lines)
