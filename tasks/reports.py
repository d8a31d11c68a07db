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


def drift_chart(result: dict, reference: dict, confidence: np.ndarray, embeddings: np.ndarray | None, url: str) -> str:
    """drift.png: the job beside the model's reference (tasks/drift.py): predicted-class mix,
    confidence (top score) and the embeddings on their first two principal components."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    mix = result["class_mix"]
    x = np.arange(len(mix["classes"]))
    for offset, name, counts in ((-0.2, "reference", mix["reference"]), (0.2, "this job", mix["job"])):
        share = np.asarray(counts, dtype=float) / max(sum(counts), 1)
        axes[0].bar(x + offset, share, width=0.4, label=name)
    axes[0].set_xticks(x, mix["classes"], rotation=45, ha="right", fontsize=7)
    axes[0].set_title("Predicted classes (share)")
    bins = np.linspace(0, 1, 21)
    axes[1].hist(reference["confidence"].numpy(), bins=bins, density=True, alpha=0.6, label="reference")
    axes[1].hist(confidence, bins=bins, density=True, alpha=0.6, label="this job")
    axes[1].set_title("Confidence (top score)")
    ref = reference.get("embeddings")
    if ref is not None and embeddings is not None and len(embeddings):
        both = np.concatenate([ref.float().numpy(), embeddings])
        centred = both - both.mean(0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ components[:2].T
        axes[2].scatter(*projected[: len(ref)].T, s=6, alpha=0.6, label="reference")
        axes[2].scatter(*projected[len(ref) :].T, s=6, alpha=0.6, label="this job")
    axes[2].set_title("Embeddings (first two principal components)")
    for ax in axes:
        ax.legend(fontsize=7)
    verdict = {True: "DRIFT", False: "no drift"}[result["drift"]]
    tests = ", ".join(f"{t['name']} p={t['p_value']:.3g}" for t in result["tests"])
    fig.suptitle(f"{verdict}: {tests} (threshold {result['tests'][0]['threshold']:.3g})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return storage.write_bytes(url, buffer.getvalue())


def drift_markdown(result: dict) -> str:
    """The scoring job's drift artifact: the verdict, each test, the class mix side by side and
    drift.png (tasks/drift.py)."""
    from retrain.tasks.drift import verdict_line

    lines = ["# Drift", "", verdict_line(result)]
    if result["tests"]:
        lines += [
            "",
            f"{result['images']:,} images of this run ({result['embeddings']:,} embeddings) against the model's "
            f"{result['reference_images']:,} held-out images; false-alarm rate at most {result['alpha']}.",
            "",
            "| test | method | statistic | p-value | threshold | drift |",
            "|---|---|---|---|---|---|",
            *[
                f"| {t['name']} | {t['method']} | {t['statistic']:.4g} | {t['p_value']:.4g} | {t['threshold']:.4g} | "
                f"{'**yes**' if t['drift'] else 'no'} |"
                for t in result["tests"]
            ],
        ]
        mix, hist = result["class_mix"], result["confidence_histogram"]
        lines += ["", *_shares_table("predicted class", mix["classes"], mix["reference"], mix["job"])]
        bins = [f"{a:.1f}-{b:.1f}" for a, b in zip(hist["edges"], hist["edges"][1:])]
        lines += ["", *_shares_table("confidence (top score)", bins, hist["reference"], hist["job"])]
    if result.get("reason") and result["drift"] is not None:
        lines += ["", result["reason"]]
    if result.get("plot") and storage.exists(result["plot"]):
        lines += ["", png_markdown(result["plot"], "Drift: this job beside the reference")]
    return "\n".join(lines)


def _shares_table(what: str, rows: list[str], reference: list[int], job: list[int]) -> list[str]:
    """A markdown table of two distributions side by side, as shares of their totals."""
    ref_total, job_total = max(sum(reference), 1), max(sum(job), 1)
    return [
        f"| {what} | reference | this job |",
        "|---|---|---|",
        *[f"| {name} | {r / ref_total:.1%} | {j / job_total:.1%} |" for name, r, j in zip(rows, reference, job)],
    ]


def png_markdown(url: str, alt: str) -> str:
    """An image embedded in markdown as a data URI, so the Prefect UI shows it whatever the
    store is (a local folder is not reachable from a browser)."""
    encoded = base64.b64encode(storage.read_bytes(url)).decode("ascii")
    return f"![{alt}](data:image/png;base64,{encoded})"


def jpeg_markdown(url: str, alt: str, quality: int = 85) -> str:
    """A photo-like PNG (a montage, Grad-CAM maps) embedded as a JPEG data URI, ~6x smaller:
    what keeps an artifact of several under Prefect's event size limit (1.5 MB,
    PREFECT_EVENTS_MAXIMUM_SIZE_BYTES; the artifact's event carries its markdown, and a
    larger one is refused with a warning on the console)."""
    from PIL import Image

    image = Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGBA")
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image)  # transparency on white, as the PNG shows
    buffer = io.BytesIO()
    flat.save(buffer, format="JPEG", quality=quality, optimize=True)
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')})"


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
