"""What to label next: the scoring job's least certain images, as a table a person fills in.

``to_label.csv`` holds the N scored images with the smallest margin between their two top
scores (uncertainty sampling by margin: the images nearest the model's decision boundary, where
a label teaches it most), best candidate first. Its columns make it, once the ``label`` column is
filled in, a label table of ``retrain run DATA --labels TABLE`` (tasks/labels.py): ``path`` is
the image's full URL (accepted whatever DATA is), ``label`` is empty (a row left empty is
skipped with a reason, so a person may label only some), and the model's view comes beside it
(``predicted``, ``score``, ``second_label``, ``margin``), which the table reader ignores.

Ranked over every row of ``scores.parquet`` (a rerun that scored only new images ranks all of
them); rows with an error have no scores and are left out. A job scored with top-k 1 keeps one
score per image: the margin is then unknown (``margin`` empty) and the images are ranked by
their top score, the order the margin's bound ``2 * score - 1`` gives (softmax scores: the other
classes share ``1 - score``).
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc

from retrain.tasks import storage

COLUMNS = ("path", "label", "predicted", "score", "second_label", "margin")


def least_certain(rows: pa.Table, n: int) -> pa.Table:
    """The ``n`` rows of ``rows`` (scores.parquet's columns) without an error whose two top
    scores are closest, in that order (ties by path), as :data:`COLUMNS`."""
    scored = rows.filter(pc.is_null(rows["error"]))
    top_labels, top_scores = scored["top_labels"], scored["top_scores"]
    two = scored.num_rows > 0 and pc.min(pc.list_value_length(top_scores)).as_py() >= 2
    if two:
        second_label = pc.list_element(top_labels, 1)
        margin = pc.subtract(pc.list_element(top_scores, 0), pc.list_element(top_scores, 1))
        rank = margin
    else:  # top-k 1: the margin is unknown; the top score ranks as its bound does
        second_label = pa.nulls(scored.num_rows, pa.string())
        margin = pa.nulls(scored.num_rows, pa.float32())
        rank = scored["score"]
    table = pa.table(
        {
            "path": scored["path"],
            "label": pa.array([""] * scored.num_rows, pa.string()),
            "predicted": scored["label"],
            "score": scored["score"],
            "second_label": second_label,
            "margin": margin,
            "rank": rank,
        }
    )
    order = pc.sort_indices(table, sort_keys=[("rank", "ascending"), ("path", "ascending")])
    return table.take(order[:n]).select(list(COLUMNS))


def csv_bytes(table: pa.Table) -> bytes:
    """The table as CSV (scores to 6 decimals: enough to tell images apart, short to read)."""
    frame = table.to_pandas()
    for name in ("score", "margin"):
        frame[name] = frame[name].astype("float64").round(6)
    sink = io.BytesIO()
    frame.to_csv(sink, index=False)
    return sink.getvalue()


def write_to_label(rows: pa.Table, url: str, n: int) -> dict | None:
    """Write the ``n`` least certain of ``rows`` to ``url`` atomically and return its URL and
    row count; ``n`` 0: none asked for, and an earlier job's file (it would describe rows no
    longer current) is removed. Returns None then."""
    if n == 0:
        if storage.exists(url):
            storage.remove(url)
        return None
    table = least_certain(rows, n)
    storage.write_bytes(url, csv_bytes(table))
    return {"url": url, "count": table.num_rows}
