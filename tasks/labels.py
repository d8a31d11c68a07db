"""Labels from a table instead of class folders: fastai's ``ImageDataLoaders.from_df`` and
Vertex AI's CSV import.

The table is a CSV or parquet file at any fsspec URL with the columns ``path`` (relative to
the data set's folder, or a full URL) and ``label``, and optionally ``split`` (train, val or
test) to fix an image's part of the split instead of drawing it at random. A row that cannot
be used (empty label, a file that is missing or does not decode, an unknown split, a file
listed twice however its path is spelled, the same bytes under two labels) is reported in ``skipped.csv`` with the reason, like an unreadable image in a
class folder, and never stops the run.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from retrain.tasks import storage
from retrain.tasks.datastore import DataSetError, ImageIndex, check_image, drop_same_content, entry_url
from retrain.tasks.vocabulary import SPLITS

REQUIRED_COLUMNS = ("path", "label")
# Spellings of the split names other tools write (Vertex AI: TRAINING, VALIDATION, TEST).
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def read_label_table(url: str) -> pd.DataFrame:
    """The table as strings (``path``, ``label`` and ``split`` when present), one row per
    row of the file; ``.parquet``/``.pq`` files are parquet, anything else CSV."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise DataSetError(f"label table not found: {url}") from None
    try:
        if url.lower().endswith((".parquet", ".pq")):
            table = pd.read_parquet(io.BytesIO(data))
        else:
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # a parser error names the line; the type says the rest
        raise DataSetError(f"label table {url} is not a readable CSV or parquet file: {exc}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataSetError(
            f"label table {url} lacks the column(s) {', '.join(missing)}: it needs path and label "
            f"(and optionally split); its columns are {', '.join(table.columns) or 'none'}"
        )
    columns = [c for c in (*REQUIRED_COLUMNS, "split") if c in table.columns]
    return table[columns].fillna("").astype(str).apply(lambda col: col.str.strip())


def _row_problem(row: pd.Series, url: str, seen: dict[str, int], number: int) -> str | None:
    if not row["path"]:
        return f"row {number}: empty path"
    if not row["label"]:
        return f"row {number}: empty label"
    if "split" in row and row["split"] and row["split"].lower() not in _SPLIT_NAMES:
        return f"row {number}: split {row['split']!r} is not one of {', '.join(SPLITS)}"
    if url in seen:
        return f"row {number}: listed again (first on row {seen[url]})"
    return None


def index_from_table(table_url: str, root_url: str, verify: bool = True, threads: int = 8) -> ImageIndex:
    """The image index a label table describes; ``root_url`` is the folder relative paths
    start from. ``images`` has the columns path, label and, when the table has one, split
    (an empty string where a row leaves it open)."""
    table = read_label_table(table_url)
    has_split = "split" in table.columns
    skipped: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    candidates: list[tuple[str, str, str]] = []
    for number, (_, row) in enumerate(table.iterrows(), start=2):  # row 1 is the header
        url = entry_url(row["path"], root_url) if row["path"] else ""
        problem = _row_problem(row, url, seen, number)
        if problem:
            skipped.append((url, problem))
            continue
        seen[url] = number
        split = _SPLIT_NAMES.get(row["split"].lower(), "") if has_split else ""
        candidates.append((url, row["label"], split))
    if verify and candidates:
        with ThreadPoolExecutor(threads) as pool:
            checks = list(pool.map(check_image, [url for url, _, _ in candidates]))
        usable = []
        for candidate, (url, digest, reason) in zip(candidates, checks):
            if reason:
                skipped.append((url, reason))
            else:
                usable.append((*candidate, digest))
        usable, duplicates = drop_same_content(usable)  # one image under two labels: refused, as in class folders
        skipped += duplicates
        images = pd.DataFrame(usable, columns=["path", "label", "split", "digest"])  # digest: for image shards
    else:
        images = pd.DataFrame(candidates, columns=["path", "label", "split"])
    if not has_split:
        images = images.drop(columns="split")
    if images["label"].nunique() < 2:
        raise DataSetError(
            f"label table {table_url}: {images['label'].nunique()} class(es) with usable images "
            f"({len(skipped)} rows skipped, see skipped.csv); a classifier needs at least 2"
        )
    return ImageIndex(images, pd.DataFrame(skipped, columns=["path", "reason"]), root_url)


def split_with_fixed_parts(images: pd.DataFrame, split_random) -> pd.DataFrame:
    """Rows whose ``split`` the table fixed keep it; the others are split per class by
    ``split_random`` (a seeded :func:`datastore.split_each_label`), or all go to training
    where a class has too few open rows to split. Every class must have a training image."""
    parts = [images[images["split"] != ""]]
    for _, group in images[images["split"] == ""].groupby("label", sort=True):
        group = group.drop(columns="split")
        try:
            parts.append(split_random(group))
        except DataSetError:  # too few left open to split: they train
            parts.append(group.assign(split="train"))
    split = pd.concat(parts, ignore_index=True)
    untrained = sorted(set(split["label"]) - set(split.loc[split["split"] == "train", "label"]))
    if untrained:
        raise DataSetError(
            f"class(es) with no training image in the label table's split: {', '.join(untrained)}; "
            f"mark some of their rows train, or leave split empty to draw them at random"
        )
    return split
