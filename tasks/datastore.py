"""Data sets: safe unzip into the store, the image index, the per-label split.

The index is MATLAB's ``imageDatastore(..., IncludeSubfolders=true, LabelSource="foldernames")``
as a pandas table: one row per usable image with its URL and label. Files that are not
decodable images are listed with the reason and left out; they never crash a run.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from retrain.tasks import storage
from retrain.tasks.preprocessing import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, load_images
from retrain.tasks.reports import montage
from retrain.tasks.vocabulary import IGNORED_NAMES, SPLITS

# A zip whose contents expand past these is refused before anything is written.
MAX_EXTRACTED_BYTES = 20 * 2**30
MAX_ZIP_ENTRIES = 2_000_000
MAX_COMPRESSION_RATIO = 1_000  # JPEGs barely compress; a zip bomb compresses a millionfold
# Images are compressed already: a whole archive that expands past MAX_ARCHIVE_RATIO and past
# ARCHIVE_RATIO_FLOOR bytes is a bomb spread over many entries, each under the entry check.
MAX_ARCHIVE_RATIO = 100
ARCHIVE_RATIO_FLOOR = 1 * 2**30


class DataSetError(ValueError):
    """The data set cannot be used as given (bad zip, no class folders, class too small...)."""


# ---- unzip -------------------------------------------------------------------------------


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part in IGNORED_NAMES


def check_zip_entries(archive: zipfile.ZipFile, source: str) -> list[zipfile.ZipInfo]:
    """The entries to extract; raises :class:`DataSetError` for anything unsafe or absurd."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise DataSetError(f"{source}: {len(infos):,} entries is more than the {MAX_ZIP_ENTRIES:,} allowed")
    total = compressed = 0
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise DataSetError(
                f"{source}: refused, entry {name!r} would be written outside the target folder (absolute path or '..')"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DataSetError(f"{source}: refused, entry {name!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise DataSetError(f"{source}: refused, entry {name!r} is encrypted")
        total += info.file_size
        compressed += info.compress_size
        if (
            info.compress_size
            and info.file_size > 10 * 2**20
            and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO
        ):
            raise DataSetError(
                f"{source}: refused, entry {name!r} expands {info.file_size / info.compress_size:,.0f}x (a zip bomb?)"
            )
    if total > MAX_EXTRACTED_BYTES:
        raise DataSetError(
            f"{source}: refused, it would expand to {total / 2**30:.1f} GiB "
            f"(limit {MAX_EXTRACTED_BYTES / 2**30:.0f} GiB)"
        )
    if total > ARCHIVE_RATIO_FLOOR and total > MAX_ARCHIVE_RATIO * max(compressed, 1):
        raise DataSetError(
            f"{source}: refused, {compressed / 2**20:,.1f} MiB would expand to "
            f"{total / 2**30:,.1f} GiB ({total / max(compressed, 1):,.0f}x; a zip bomb?)"
        )
    return [i for i in infos if not i.is_dir()]


FREE_SPACE_MARGIN = 256 * 2**20  # room left on the store's disk after an extraction (checkpoints, models)


def _gib(n: int) -> str:
    """Bytes in GiB with enough digits that a small amount does not read as 0.00."""
    return f"{n / 2**30:.3f} GiB"


def _check_free_space(store: str, needed: int, source: str) -> None:
    """A local store must have room for the extracted files plus :data:`FREE_SPACE_MARGIN`."""
    if not storage.is_local(store):
        return
    import shutil

    path = os.path.abspath(store)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if needed + FREE_SPACE_MARGIN > free:
        raise DataSetError(
            f"{source}: refused, extracting it needs {_gib(needed + FREE_SPACE_MARGIN)} ({_gib(needed)} expanded "
            f"+ {_gib(FREE_SPACE_MARGIN)} margin for the run's checkpoints and model) but the store {store} has "
            f"{_gib(free)} free; free some space or use another --store"
        )


def unzip_dataset(zip_url: str, store: str) -> str:
    """Extract ``zip_url`` into ``store/datasets/<name>/<content-hash>/`` and return that URL.

    The same zip twice gives the same folder and extracts once: a ``manifest.json`` written
    last marks a complete extraction, so an interrupted one is simply redone.
    """
    if not storage.exists(zip_url):
        raise DataSetError(f"data set not found: {zip_url}")
    content_hash = storage.sha256_of(zip_url)
    name = posixpath.basename(zip_url.rstrip("/")).rsplit(".", 1)[0] or "dataset"
    layout = storage.StoreLayout(store).dataset(name, content_hash)
    target, manifest_url = layout.url, layout.manifest
    if storage.exists(manifest_url):
        return layout.files
    data = storage.read_bytes(zip_url)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise DataSetError(f"{zip_url} is not a valid zip file ({exc})") from None
    with archive:
        entries = check_zip_entries(archive, zip_url)
        _check_free_space(store, sum(i.file_size for i in entries), zip_url)
        files_root = layout.files
        try:
            for info in entries:
                storage.write_bytes(storage.join(files_root, info.filename), _read_entry(archive, info, zip_url))
        except DataSetError:
            # A damaged or lying archive: take back what was written (the folder is this zip's
            # own, keyed by its content hash, and has no manifest yet), so the store is as before.
            _remove_partial(target)
            raise
    storage.write_json(manifest_url, {"source": zip_url, "sha256": content_hash, "entries": len(entries)})
    return files_root


def _remove_partial(target: str) -> None:
    storage.remove(target, recursive=True)
    if storage.is_local(target):  # and datasets/<name>/ if this made it (object stores have no folders)
        try:
            os.rmdir(os.path.dirname(storage.absolute(target)))
        except OSError:
            pass  # not empty: other versions of the data set live there


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    try:
        with archive.open(info) as member:
            # Never trust the declared size: read at most one byte more than it.
            content = member.read(info.file_size + 1)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise DataSetError(
            f"{source}: entry {info.filename!r} is damaged or uses an unsupported "
            f"compression ({type(exc).__name__}: {exc})"
        ) from None
    if len(content) > info.file_size:
        raise DataSetError(f"{source}: entry {info.filename!r} is larger than it declares")
    return content


def materialize(data_url: str, store: str) -> str:
    """A folder URL for the data set: a zip is extracted into the store, a folder is used
    where it is."""
    if data_url.lower().endswith(".zip"):
        return unzip_dataset(data_url, store)
    if not storage.isdir(data_url):
        raise DataSetError(f"data set not found or not a folder/zip: {data_url}")
    return data_url.rstrip("/")


# ---- index --------------------------------------------------------------------------------


@dataclass
class ImageIndex:
    images: pd.DataFrame  # columns: path, label (and digest: the sha1 of the file, when verified)
    skipped: pd.DataFrame  # columns: path, reason
    root: str

    @property
    def classes(self) -> list[str]:
        return sorted(self.images["label"].unique())

    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.images["label"].value_counts().sort_index().items()}


def _visible_children(fs, path: str) -> tuple[list[str], list[str]]:
    dirs, files = [], []
    for entry in fs.ls(path, detail=True):
        base = posixpath.basename(entry["name"].rstrip("/"))
        if _is_hidden(base) or storage.TMP_MARKER in base:
            continue
        (dirs if entry["type"] == "directory" else files).append(entry["name"].rstrip("/"))
    return sorted(dirs), sorted(files)


def find_class_root(root_url: str) -> str:
    """Descend through single wrapper folders (``MerchData.zip`` holds ``MerchData/``) to the
    folder whose sub-folders are the classes."""
    fs, path = storage.filesystem(root_url)
    while True:
        dirs, files = _visible_children(fs, path)
        if len(dirs) == 1 and not files:
            path = dirs[0]
            continue
        if not dirs:
            raise DataSetError(
                f"no class folders under {root_url}: expected one sub-folder per "
                f"class holding its images (the label is the folder name)"
            )
        return storage.to_url(fs, path)


def check_image(url: str) -> tuple[str, str | None, str | None]:
    """(url, content digest, reason it is unusable or None)."""
    try:
        data = storage.read_bytes(url)
        decode_image(data)
    except ImageDecodeError as exc:
        return url, None, str(exc)
    except FileNotFoundError:
        return url, None, "file not found"
    except OSError as exc:
        return url, None, f"cannot read file ({exc})"
    return url, hashlib.sha1(data).hexdigest(), None


def entry_url(entry: str, base: str) -> str:
    """The one URL of a file named in a label table or a list file: a relative ``entry``
    starts at ``base``; ``./``, ``a/../`` and ``//`` are collapsed and a local path is made
    absolute, so that every spelling of one file is one key (judging duplicates on the text
    as written let one image be two rows, with two labels)."""
    if "://" not in entry and not entry.startswith("/"):
        entry = storage.join(base, entry)
    if "://" in entry and not entry.startswith("file://"):
        protocol, path = entry.split("://", 1)
        return f"{protocol}://{posixpath.normpath(path)}"
    return storage.absolute(entry)


def drop_same_content(rows: list[tuple]) -> tuple[list[tuple], list[tuple[str, str]]]:
    """``rows`` (url, label, ..., digest: the content's sha1 last) less the images whose bytes
    appear again: under two labels all are ambiguous, under one label the first is kept.
    Returns (kept rows, skipped (url, reason))."""
    labels_by_digest: dict[str, dict[str, str]] = {}
    for url, label, *_, digest in rows:
        labels_by_digest.setdefault(digest, {}).setdefault(label, url)
    kept, skipped = [], []
    for row in rows:
        url, label, digest = row[0], row[1], row[-1]
        by_label = labels_by_digest[digest]
        if len(by_label) > 1:
            skipped.append((url, "same image in classes " + ", ".join(sorted(by_label))))
        elif by_label[label] != url:
            skipped.append((url, f"duplicate of {by_label[label]}"))
        else:
            kept.append(row)
    return kept, skipped


def index_images(root_url: str, verify: bool = True, threads: int = 8) -> ImageIndex:
    """Index every image below the class folders of ``root_url``.

    Hidden files and folders are ignored; nested folders inside a class belong to that class;
    files that do not decode, and duplicates (the same bytes twice in a class, or in two
    classes, which would make the label ambiguous), are listed in ``skipped``.
    """
    class_root = find_class_root(root_url)
    fs, root_path = storage.filesystem(class_root)
    class_dirs, loose_files = _visible_children(fs, root_path)
    candidates: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = [(storage.to_url(fs, f), "not inside a class folder") for f in loose_files]
    empty: list[str] = []
    for class_dir in class_dirs:
        label = posixpath.basename(class_dir)
        found = 0
        for f in sorted(fs.find(class_dir)):
            rel = posixpath.relpath(f, class_dir)
            if any(_is_hidden(p) or storage.TMP_MARKER in p for p in rel.split("/")):
                continue
            url = storage.to_url(fs, f)
            if posixpath.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                skipped.append((url, "not an image file extension"))
                continue
            candidates.append((url, label))
            found += 1
        if not found:
            empty.append(label)
    if empty:
        raise DataSetError(
            f"class folder(s) with no images: {', '.join(empty)} (under {class_root}); add images or remove the folder"
        )
    rows = []
    if verify:
        with ThreadPoolExecutor(threads) as pool:
            checks = list(pool.map(check_image, [u for u, _ in candidates]))
        for (url, label), (_, digest, reason) in zip(candidates, checks):
            if reason:
                skipped.append((url, reason))
            else:
                rows.append((url, label, digest))
        kept, duplicates = drop_same_content(rows)
        skipped += duplicates
        images = pd.DataFrame(kept, columns=["path", "label", "digest"])  # digest: training's image shards key on it
    else:
        images = pd.DataFrame(candidates, columns=["path", "label"])
    lost = sorted(set(label for _, label in candidates) - set(images["label"]))
    if lost:
        raise DataSetError(
            f"class folder(s) with no usable images: {', '.join(lost)} (see the skipped files); fix or remove them"
        )
    return ImageIndex(images, pd.DataFrame(skipped, columns=["path", "reason"]), class_root)


# ---- split --------------------------------------------------------------------------------


def split_each_label(
    images: pd.DataFrame, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> pd.DataFrame:
    """MATLAB's ``splitEachLabel(imds, 0.7, 0.15, "randomized")``: a seeded random split of
    every label, so each class appears in each split in proportion. Adds a ``split`` column."""
    rng = np.random.default_rng(seed)
    needed = sum(1 for f in fractions if f > 0)
    parts = []
    for label, group in images.sort_values("path").groupby("label", sort=True):
        n = len(group)
        if n < needed:
            raise DataSetError(
                f"class {label!r} has {n} image(s); splitting {fractions} needs at "
                f"least {needed} per class. Add images or remove the class."
            )
        n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
        n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
        n_train = n - n_val - n_test
        if n_train < 1:
            raise DataSetError(f"class {label!r} has {n} images: too few for a training set")
        order = rng.permutation(n)
        names = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test, dtype=object)
        assigned = group.iloc[order].copy()
        assigned["split"] = names
        parts.append(assigned)
    return pd.concat(parts, ignore_index=True)


def sample_for_montage(images: pd.DataFrame, count: int = 16, seed: int = 0) -> pd.DataFrame:
    """``count`` random images (seeded) for the montage the seed shows first."""
    return images.sample(n=min(count, len(images)), random_state=seed)


# ---- stages (plain functions on URLs, wrapped as Prefect tasks in flows/pipeline.py) --------


@dataclass
class IndexRecord:
    dataset: str  # the folder indexed
    index: str  # URL of index.parquet
    classes: list[str]
    counts: dict[str, int]
    skipped: int
    montage: str  # "" until the index is in a run folder (index_stage, adopt_index)
    content: str = ""  # content_key of the images: what a run made from them is bound to


def build_index(dataset_url: str, labels: str | None = None) -> ImageIndex:
    """The data set's image index: its class folders, or the label table ``labels``
    (:mod:`tasks.labels`) whose relative paths start at ``dataset_url``."""
    if labels:
        from retrain.tasks.labels import index_from_table

        return index_from_table(labels, dataset_url)
    return index_images(dataset_url)


def content_key(images: pd.DataFrame, root: str) -> str:
    """What the images of an index are, independent of where the data set lies: every image's
    path below ``root``, label, content digest (and fixed split, from a label table). A run is
    bound to it (tasks/runs.py): a class removed or added, an image moved to another class,
    replaced or renamed gives another key, since each changes the split and the model."""
    columns = [c for c in ("path", "label", "digest", "split") if c in images.columns]
    rows = images[columns].copy()
    prefix = root.rstrip("/") + "/"
    rows["path"] = [p[len(prefix) :] if p.startswith(prefix) else p for p in rows["path"]]
    blob = rows.sort_values(columns, ignore_index=True).to_csv(index=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def index_dataset(dataset_url: str, store: str, labels: str | None = None) -> IndexRecord:
    """Index the data set before a run is chosen for it (the run is bound to its content):
    ``index.parquet`` and ``skipped.csv`` in ``indexes/<content key>/`` of the store, where
    :func:`adopt_index` takes them into the run folder."""
    index = build_index(dataset_url, labels)
    key = content_key(index.images, index.root)
    # The root too: a copy of the data set elsewhere has the same key but other paths.
    folder = storage.join(storage.StoreLayout(store).indexes, key, hashlib.sha1(index.root.encode()).hexdigest()[:8])
    index_url = storage.write_parquet(storage.join(folder, "index.parquet"), index.images)
    storage.write_bytes(storage.join(folder, "skipped.csv"), index.skipped.to_csv(index=False).encode())
    return IndexRecord(index.root, index_url, index.classes, index.counts(), len(index.skipped), "", key)


def adopt_index(record: IndexRecord, run_url: str, seed: int = 0) -> IndexRecord:
    """The index of :func:`index_dataset` in the run folder (``index.parquet``,
    ``skipped.csv``) with the montage of 16 random images drawn from ``seed``."""
    layout = storage.RunLayout(run_url)
    images = storage.read_parquet(record.index)
    skipped = storage.read_bytes(storage.join(record.index.rsplit("/", 1)[0], "skipped.csv"))
    index_url = storage.write_parquet(layout.index, images)
    storage.write_bytes(layout.skipped, skipped)
    return replace(record, index=index_url, montage=_montage(images, layout.montage, seed))


def _montage(images: pd.DataFrame, url: str, seed: int) -> str:
    sample = sample_for_montage(images, 16, seed)
    return montage(load_images(list(sample["path"]), (160, 160)), list(sample["label"]), url)


def index_stage(dataset_url: str, run_url: str, seed: int = 0, labels: str | None = None) -> IndexRecord:
    """Index the data set into the run folder: ``index.parquet``, ``skipped.csv`` and the
    montage of 16 random images. ``labels``: a label table (:mod:`tasks.labels`) instead of
    class folders."""
    layout = storage.RunLayout(run_url)
    index = build_index(dataset_url, labels)
    index_url = storage.write_parquet(layout.index, index.images)
    storage.write_bytes(layout.skipped, index.skipped.to_csv(index=False).encode())
    montage_url = _montage(index.images, layout.montage, seed)
    key = content_key(index.images, index.root)
    return IndexRecord(index.root, index_url, index.classes, index.counts(), len(index.skipped), montage_url, key)


# The parts of a split a run never trains on, in the order :func:`held_out` prefers them.
HELD_OUT_SPLITS = ("test", "val")


def is_held_out(split: pd.DataFrame) -> pd.Series:
    """Which rows of a split the run did not train on (its val and test parts): the rows the
    engine gate judges held-out accuracy on. :func:`held_out` picks one of those parts."""
    return split["split"].isin(HELD_OUT_SPLITS)


def held_out(split: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The images a run holds out to judge its model on (evaluation and the promotion gate):
    its test split, or its validation split when it has no test part. Returns (rows, which);
    the rows are empty when it has neither."""
    for name in HELD_OUT_SPLITS:
        rows = split[split["split"] == name]
        if len(rows):
            return rows, name
    return split.iloc[:0], "val"


@dataclass
class SplitRecord:
    split: str  # URL of split.parquet
    counts: dict[str, dict[str, int]]  # split -> label -> images


def split_stage(run_url: str, fractions: tuple[float, float, float], seed: int) -> SplitRecord:
    layout = storage.RunLayout(run_url)
    images = storage.read_parquet(layout.index)
    if "split" in images.columns:  # a label table that fixes some rows' split
        from retrain.tasks.labels import split_with_fixed_parts

        split = split_with_fixed_parts(images, lambda rest: split_each_label(rest, fractions, seed))
    else:
        split = split_each_label(images, fractions, seed)
    url = storage.write_parquet(layout.split, split)
    counts = {
        s: {k: int(v) for k, v in split[split["split"] == s]["label"].value_counts().sort_index().items()}
        for s in SPLITS
    }
    return SplitRecord(url, counts)
