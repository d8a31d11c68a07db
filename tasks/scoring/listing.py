"""What is in the images folder now, and what changed since the output's rows were scored.

Each listed file has an identity taken from the listing itself, without reading the file: its
path, its size and its version (the store's ETag, generation or version id; a local file's
modification time). ``verify_content`` adds the SHA-256 of the bytes, for stores whose listing
gives no version (or where a file may change without its size or time changing): the identity
then compares size and hash, and reading every file is the price.

A scored row carries the identity of the file it scored (``size``, ``version``, ``sha256``), so
a rerun compares the listing with the output's rows (:func:`changes`) and scores exactly the
files that are new or whose identity changed; a file whose version is unknown matches nothing
and is scored each time.
"""

from __future__ import annotations

import hashlib
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from retrain.tasks import storage
from retrain.tasks.datastore import _is_hidden as is_hidden  # one rule for hidden files, training's
from retrain.tasks.datastore import entry_url
from retrain.tasks.preprocessing import IMAGE_EXTENSIONS
from retrain.tasks.scoring.layout import ScoringError

LIST_FILE_COMMENT = "#"
IDENTITY_COLUMNS = ("size", "version", "sha256")
LISTING_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("version", pa.string()), ("sha256", pa.string())]
)
# Where a store's listing says which version of a file it holds, most specific first: S3's
# version id and ETag, GCS's generation, Azure's etag, a local file's modification time,
# memory://'s creation time. The key is kept in the value ("ETag:...") so that versions of two
# kinds never compare equal.
VERSION_KEYS = (
    "VersionId",
    "ETag",
    "etag",
    "generation",
    "md5Hash",
    "mtime",
    "LastModified",
    "last_modified",
    "created",
)
REMOTE_THREADS = 16  # stat and hash calls on an object store wait on the network: overlap them


def version_of(info: dict) -> str | None:
    """The file's version from its listing entry; None when the store gives none."""
    for key in VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}:{value}"
    return None


@dataclass
class ImageList:
    files: pa.Table  # LISTING_SCHEMA, sorted by path, one row per image
    ignored: list[str]  # files in a folder without an image extension (not scored)
    source: str

    @property
    def paths(self) -> list[str]:
        return self.files["path"].to_pylist()


def list_images(
    images: str, extensions: frozenset[str] | None = IMAGE_EXTENSIONS, verify_content: bool = False
) -> ImageList:
    """The images to score, sorted, each with its identity: every file with an image extension
    below a folder (recursively; hidden files and folders left out), or every entry of a list
    file (one URL or path per line, relative ones taken from the list file's folder; blank lines
    and ``#`` comments skipped). A single image file is a list of one. ``verify_content``: hash
    every image too."""
    fs, root = storage.filesystem(images)
    below = _files_below(images)
    if below is not None:
        found, ignored = {}, []
        for path, info in below.items():
            # find() gives paths below root: cutting root off is enough (relpath, which normalises
            # both paths each time, was two thirds of this loop's time on 100,000 files)
            rel = path[len(root) :].lstrip("/")
            if any(is_hidden(p) or storage.TMP_MARKER in p for p in rel.split("/")):
                continue
            url = storage.to_url(fs, path)
            if extensions is None or posixpath.splitext(path)[1].lower() in extensions:
                found[url] = info
            else:
                ignored.append(url)
        return ImageList(_table(found, verify_content), sorted(ignored), images)
    if not storage.exists(images):
        raise FileNotFoundError(f"no folder or list file at {images}")
    if posixpath.splitext(root)[1].lower() in IMAGE_EXTENSIONS:
        return ImageList(_table(_stat([images]), verify_content), [], images)
    try:
        text = storage.read_bytes(images).decode("utf-8")
    except UnicodeDecodeError:
        raise ScoringError(
            f"{images} is neither a folder, an image, nor a list file of image URLs (one per line, UTF-8)"
        ) from None
    base = images.rsplit("/", 1)[0] if "/" in images else "."
    entries = {
        entry_url(line.strip(), base)  # one spelling per file: ./x.jpg and x.jpg are one image
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith(LIST_FILE_COMMENT)
    }
    return ImageList(_table(_stat(sorted(entries)), verify_content), [], images)


@storage.retrying
def _files_below(folder: str) -> dict[str, dict] | None:
    """Each file below ``folder`` (path in its filesystem -> listing entry); None when it is not
    a folder. One listing, no call per file: S3 lists 1,000 keys a request. Retried on a remote
    store, like every other storage call."""
    fs, root = storage.filesystem(folder)
    fs.invalidate_cache()  # a listing cached by an earlier call would hide what changed since
    if not fs.isdir(root):
        return None
    return {p: info for p, info in fs.find(root, detail=True).items() if info.get("type", "file") == "file"}


def _stat(urls: list[str]) -> dict[str, dict]:
    """The listing entries of named files (a list file's), one call each, overlapped on a
    remote store; a file that is not there gets an empty entry (scored: its row says so)."""

    def info(url: str) -> dict:
        fs, path = storage.filesystem(url)
        try:
            return fs.info(path)
        except (FileNotFoundError, OSError):
            return {}

    if urls:
        storage.filesystem(urls[0])[0].invalidate_cache()  # as in _files_below
    threads = 1 if not urls or storage.is_local(urls[0]) else REMOTE_THREADS
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(urls, pool.map(info, urls)))


def _table(found: dict[str, dict], verify_content: bool) -> pa.Table:
    paths = sorted(found)
    hashes = _hashes(paths) if verify_content else [None] * len(paths)
    return pa.table(
        {
            "path": paths,
            "size": [found[p].get("size") for p in paths],
            "version": [version_of(found[p]) for p in paths],
            "sha256": hashes,
        },
        schema=LISTING_SCHEMA,
    )


def _hashes(urls: list[str]) -> list[str | None]:
    """SHA-256 of each file (None for one that cannot be read: it is scored, and its row says why)."""

    def digest(url: str) -> str | None:
        try:
            return hashlib.sha256(storage.read_bytes(url)).hexdigest()
        except (FileNotFoundError, OSError):
            return None

    threads = 2 if not urls or storage.is_local(urls[0]) else REMOTE_THREADS
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(digest, urls))


def unlisted(paths: list[str]) -> pa.Table:
    """Paths as listing rows of unknown identity (a caller that has only the paths)."""
    n = len(paths)
    return pa.table(
        {"path": paths, "size": [None] * n, "version": [None] * n, "sha256": [None] * n}, schema=LISTING_SCHEMA
    )


# ---- what changed -------------------------------------------------------------------------------


def identity_keys(verify_content: bool) -> list[str]:
    """The columns that say two rows are of the same file content."""
    return ["path", "size", "sha256"] if verify_content else ["path", "size", "version"]


@dataclass
class Changes:
    """The listing against the rows an output holds (each the identity of the file it scored)."""

    todo: pa.Table  # the listing's rows to score: new, changed, or whose earlier row failed
    new: int  # paths the output has no row for
    changed: int  # paths whose identity changed since their row was scored
    retried: int  # unchanged files whose row is a failure (read or decode): tried again
    unchanged: int  # rows kept as they are
    deleted: int  # paths the output has rows for that are no longer listed


def changes(listing: pa.Table, scored: pa.Table | None, verify_content: bool = False) -> Changes:
    """Compare ``listing`` (LISTING_SCHEMA) with ``scored`` (the output's rows: path, the
    identity columns and ``error``; None: none). A row whose identity has a null (a version the
    store did not give, a file that could not be hashed) matches nothing: that file is scored
    again. Rows that failed are not kept: a fresh job would try those files again."""
    if scored is None or scored.num_rows == 0:
        return Changes(listing, listing.num_rows, 0, 0, 0, 0)
    keys = identity_keys(verify_content)
    usable = scored.filter(pc.is_null(scored["error"])).select(keys)
    failed = scored.filter(pc.is_valid(scored["error"])).select(keys)
    todo = listing.join(usable, keys, join_type="left anti").sort_by("path")
    listed = listing.select(["path"])
    known = scored.select(["path"]).group_by("path").aggregate([])
    new = todo.join(known, "path", join_type="left anti").num_rows
    retried = todo.join(failed, keys, join_type="left semi").num_rows
    deleted = known.join(listed, "path", join_type="left anti").num_rows
    return Changes(todo, new, todo.num_rows - new - retried, retried, listing.num_rows - todo.num_rows, deleted)


def current_rows(rows: pa.Table, listing: pa.Table, verify_content: bool = False) -> pa.Table:
    """The rows of ``rows`` that score a file of ``listing`` as it is now: one per path (the
    first in ``rows``' order: put this run's rows first), sorted by path. Here an unknown
    version matches an unknown one: such a file was scored by this run (:func:`changes` never
    keeps its old row), and this run's row comes first."""
    keys = identity_keys(verify_content)
    # Joined on the keys and a row number only: Arrow's joins carry no list columns (top_labels).
    numbered = _comparable(rows, keys).append_column("row", pa.array(range(rows.num_rows), pa.int64()))
    found = numbered.join(_comparable(listing, keys), keys, join_type="left semi")
    found = found.sort_by([("path", "ascending"), ("row", "ascending")])
    matching = rows.take(found["row"])
    if matching.num_rows < 2:
        return matching
    # The same file may have a row in scores.parquet and in a part (a job stopped between
    # writing the one and removing the other, or a row that failed before): keep the first.
    paths = matching["path"].combine_chunks()
    later = pc.not_equal(paths.slice(1), paths.slice(0, len(paths) - 1))
    return matching.filter(pa.concat_arrays([pa.array([True]), later]))


def _comparable(table: pa.Table, keys: list[str]) -> pa.Table:
    """The key columns with nulls made values, so that unknown matches unknown in a join."""
    filled = {"size": -1, "version": "", "sha256": ""}
    return pa.table({k: table[k] if k == "path" else pc.fill_null(table[k], filled[k]) for k in keys})
