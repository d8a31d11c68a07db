"""Bad inputs (issue 6): the files and archives real data sets and scoring folders hold, through
the three ways in: training data (``retrain run``), a scoring folder (the batch-scoring job) and
a single image (``retrain classify``). Each gets the right outcome (used correctly, skipped with
a reason, or refused with a clear error) and nothing else in the store is touched: the store's
files and their hashes are compared before and after. Bad model and checkpoint files too.

Every file is generated here (PIL, zipfile); nothing binary is committed. The per-kind tables
below are the inventory of what is tried; ``test_bad_input_inventory`` counts them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import shutil
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retrain.tasks import datastore, storage
from retrain.tasks.datastore import unzip_dataset
from retrain.tasks.model_file import MODEL_FORMAT, ModelFileError, save_model_file
from retrain.tasks.networks import build_network
from retrain.tasks.preprocessing import ImageDecodeError, decode_image
from retrain.tasks.samples import make_shapes_dataset
from retrain.tasks.training.checkpoints import load_latest_checkpoint
from tests.conftest import encode, run_cli, tiny_run_flags, zip_folder

CLASSES = ["circle", "square", "triangle"]
FAST = tiny_run_flags(max_epochs=1, seed=0)


# ---- generated images ------------------------------------------------------------------------


def noise(seed: int, size=(48, 64)) -> Image.Image:
    """A distinct RGB picture per seed (so no two kinds are byte-identical duplicates)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "lime", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buffer.getvalue()


def exif_rotated() -> bytes:
    """Stored 40 wide x 20 high, left half red, right half blue, EXIF orientation 6 (rotate 90
    degrees clockwise to display): shown 20 wide x 40 high, red on top, blue below."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def alpha_png() -> bytes:
    pixels = np.zeros((30, 40, 4), np.uint8)
    pixels[...] = (10, 200, 30, 255)
    pixels[:10, :10, 3] = 0  # a transparent corner
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def palette_png() -> bytes:
    image = Image.new("P", (30, 20), 0)
    image.putpalette([250, 10, 10, 10, 10, 250] + [0] * 762)
    image.paste(1, (15, 0, 30, 20))
    return encode(image, "PNG")


def grey16(fmt: str) -> bytes:
    return encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), fmt)


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.full((20, 30), 0.5, np.float32)), "TIFF")


@functools.lru_cache(maxsize=1)
def decompression_bomb() -> bytes:
    return encode(Image.new("1", (20000, 20000)), "PNG")  # 400 Mpixel in a few KB


def good_jpeg(seed: int) -> bytes:
    return encode(noise(seed), "JPEG", quality=90)


def near(pixel: torch.Tensor, rgb: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(int(v) - c) <= tolerance for v, c in zip(pixel.tolist(), rgb))


@dataclass(frozen=True)
class Kind:
    """One kind of image file: its bytes, its name, and its right outcome: ``error`` None means
    used (and ``check`` says what correct pixels look like), else a word of the reason it is
    skipped (training, scoring) or refused (classify)."""

    name: str
    file: str
    data: Callable[[], bytes]
    error: str | None = None
    check: Callable[[torch.Tensor], bool] | None = None


IMAGE_KINDS = [
    # unusable: skipped with the reason (training, scoring), a clear error (classify)
    Kind(
        "corrupt JPEG",
        "corrupt.jpg",
        lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 8,
        "not a readable image|cannot decode",
    ),
    Kind("truncated JPEG", "truncated.jpg", lambda: good_jpeg(1)[:2500], "(?i)truncated"),
    Kind("truncated PNG", "truncated.png", lambda: encode(noise(2), "PNG")[:4000], "(?i)truncated"),
    Kind("zero-byte file", "zero.jpg", lambda: b"", "empty"),
    Kind("text file named .jpg", "notes-as-image.jpg", lambda: b"shopping list: milk, eggs\n", "not a readable image"),
    Kind(
        "HTML error page saved as .png",
        "error-page.png",
        lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
        "not a readable image",
    ),
    Kind("decompression bomb (20000x20000 PNG)", "bomb.png", decompression_bomb, "too large"),
    # usable: decoded to RGB uint8 correctly
    Kind("GIF", "still.gif", lambda: encode(noise(3), "GIF"), check=lambda t: t.shape == (3, 48, 64)),
    Kind(
        "animated GIF (first frame)",
        "animated.gif",
        animated_gif,
        check=lambda t: t.shape == (3, 30, 40) and near(t[:, 15, 20], (255, 0, 0), 10),
    ),
    Kind(
        "PNG with alpha",
        "alpha.png",
        alpha_png,
        check=lambda t: t.shape == (3, 30, 40) and near(t[:, 20, 20], (10, 200, 30), 0),
    ),
    Kind(
        "palette PNG",
        "palette.png",
        palette_png,
        check=lambda t: near(t[:, 10, 5], (250, 10, 10), 0) and near(t[:, 10, 25], (10, 10, 250), 0),
    ),
    Kind(
        "CMYK JPEG",
        "cmyk.jpg",
        lambda: encode(Image.new("RGB", (40, 30), (220, 20, 20)).convert("CMYK"), "JPEG"),
        check=lambda t: t.shape == (3, 30, 40) and near(t[:, 15, 20], (220, 20, 20)),
    ),
    Kind(
        "16-bit PNG",
        "grey16.png",
        lambda: grey16("PNG"),
        check=lambda t: t.dtype == torch.uint8 and near(t[:, 5, 5], (155, 155, 155), 2),
    ),
    Kind(
        "16-bit TIFF",
        "grey16.tif",
        lambda: grey16("TIFF"),
        check=lambda t: t.dtype == torch.uint8 and near(t[:, 5, 5], (155, 155, 155), 2),
    ),
    Kind("32-bit float TIFF", "float.tiff", float_tiff, check=lambda t: near(t[:, 5, 5], (128, 128, 128), 2)),
    Kind(
        "grayscale JPEG",
        "grey.jpg",
        lambda: encode(noise(4).convert("L"), "JPEG"),
        check=lambda t: t.shape == (3, 48, 64) and torch.equal(t[0], t[1]) and torch.equal(t[1], t[2]),
    ),
    Kind(
        "1-bit PNG",
        "bilevel.png",
        lambda: encode(Image.new("1", (16, 16), 1), "PNG"),
        check=lambda t: near(t[:, 0, 0], (255, 255, 255), 0),
    ),
    Kind(
        "1x1 image",
        "one-pixel.png",
        lambda: encode(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG"),
        check=lambda t: t.shape == (3, 1, 1) and near(t[:, 0, 0], (0, 0, 255), 0),
    ),
    Kind(
        "EXIF-rotated photo",
        "rotated.jpg",
        exif_rotated,
        check=lambda t: t.shape == (3, 40, 20) and near(t[:, 5, 10], (255, 0, 0)) and near(t[:, 35, 10], (0, 0, 255)),
    ),
    Kind("PNG named .jpg", "really-a-png.jpg", lambda: encode(noise(5), "PNG"), check=lambda t: t.shape == (3, 48, 64)),
    Kind("upper-case extension", "SHOUTING.JPEG", lambda: good_jpeg(6), check=lambda t: t.shape == (3, 48, 64)),
    Kind(
        "name with spaces and unicode",
        "fête du café ☃ 1.jpg",
        lambda: good_jpeg(7),
        check=lambda t: t.shape == (3, 48, 64),
    ),
    Kind(
        "WebP", "modern.webp", lambda: encode(noise(8), "WEBP", lossless=True), check=lambda t: t.shape == (3, 48, 64)
    ),
]
USED = [k for k in IMAGE_KINDS if k.error is None]
UNUSABLE = [k for k in IMAGE_KINDS if k.error is not None]


# ---- the store: something to leave alone ------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and link under ``root``, by relative path."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "link -> " + os.readlink(path)
        elif path.is_dir():
            found[rel + "/"] = "folder"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_untouched(before: dict[str, str], store: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """Nothing that was in the store changed or went; anything new lies under ``allowed``
    prefixes. Returns the new paths."""
    after = snapshot(store)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"changed or removed in the store: {changed}"
    added = sorted(k for k in after if k not in before)
    stray = [k for k in added if not k.startswith(allowed)]
    assert not stray, f"written outside {allowed}: {stray}"
    return added


@pytest.fixture(scope="module")
def model_file(random_model_file) -> str:
    """The shared random-weights model for the CLASSES (tests/conftest.py)."""
    return random_model_file


@pytest.fixture(scope="module")
def store_template(tmp_path_factory, model_file) -> Path:
    """A store with history: an extracted data set, a finished run with its model, a promoted
    model and earlier scores."""
    root = tmp_path_factory.mktemp("template") / "store"
    shapes = tmp_path_factory.mktemp("template-data") / "old"
    make_shapes_dataset(str(shapes), per_class=2, size=32, seed=11)
    archive = tmp_path_factory.mktemp("template-zip") / "old.zip"
    zip_folder(shapes, archive, top="old")
    unzip_dataset(str(archive), str(root))
    run = root / "runs" / "r0"
    run.mkdir(parents=True)
    shutil.copy(model_file, run / "model.pt")
    storage.write_json(str(run / "run.json"), {"run_id": "r0", "status": "completed"})
    storage.write_json(str(run / "metrics.json"), {"test_accuracy": 0.5})
    storage.write_json(str(root / "models" / "old" / "current.json"), {"run_id": "r0"})
    storage.write_parquet(
        str(root / "scores" / "earlier" / "scores.parquet"), pd.DataFrame({"path": ["a.jpg"], "label": ["circle"]})
    )
    return root


@pytest.fixture
def store(tmp_path, store_template) -> Path:
    root = tmp_path / "store"
    shutil.copytree(store_template, root, symlinks=True)
    return root


def assert_clear_refusal(status: int, result: dict, stderr: str, match: str, command: str) -> None:
    assert status == 2, (status, result, stderr[-2000:])
    assert set(result) == {"error", "type", "status", "log"} and result["status"] == 2, result
    assert pd.Series([result["error"]]).str.contains(match).all(), result
    assert f"retrain {command}: error: " in stderr


# ---- decoding: each kind's pixels ----------------------------------------------------------------


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=lambda k: k.name)
def test_each_kind_decodes_correctly_or_says_why_not(kind):
    if kind.error:
        with pytest.raises(ImageDecodeError, match=kind.error):
            decode_image(kind.data())
    else:
        image = decode_image(kind.data())
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert kind.check(image), (kind.name, image.shape, image[:, 0, 0])


# ---- training data -------------------------------------------------------------------------------


def mixed_data_set(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Shapes in class folders plus every image kind, hidden files, nested folders, junk and
    duplicates. Returns (file name -> class, for the files that must be used) and (file name ->
    reason word, for the files that must be listed as skipped)."""
    make_shapes_dataset(str(root), per_class=6, size=48, seed=5)
    used = {p.name: p.parent.name for p in root.rglob("*.jpg")}
    skipped: dict[str, str] = {}
    for i, kind in enumerate(IMAGE_KINDS):
        label = CLASSES[i % 3]
        (root / label / kind.file).write_bytes(kind.data())
        if kind.error:
            skipped[kind.file] = kind.error
        else:
            used[kind.file] = label
    # hidden files and folders, OS debris: ignored altogether
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "circle" / "._circle_000.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (root / "square" / ".thumbnails").mkdir()
    (root / "square" / ".thumbnails" / "t.jpg").write_bytes(good_jpeg(40))
    (root / "__MACOSX" / "circle").mkdir(parents=True)
    (root / "__MACOSX" / "circle" / "._x.jpg").write_bytes(b"junk")
    (root / "triangle" / "Thumbs.db").write_bytes(b"junk")
    # nested folders belong to their class
    deep = root / "triangle" / "2024" / "june"
    deep.mkdir(parents=True)
    (deep / "deep.png").write_bytes(encode(noise(41), "PNG"))
    used["deep.png"] = "triangle"
    # not images, or not in a class folder: listed with the reason
    (root / "square" / "readme.txt").write_text("about these squares")
    skipped["readme.txt"] = "not an image file extension"
    (root / "loose.jpg").write_bytes(good_jpeg(42))
    skipped["loose.jpg"] = "not inside a class folder"
    # duplicates: the same bytes in two classes (ambiguous: both out), twice in one class
    shutil.copy(root / "circle" / "circle_001.jpg", root / "square" / "looks-like-a-circle.jpg")
    del used["circle_001.jpg"]
    skipped.update({"circle_001.jpg": "same image in classes", "looks-like-a-circle.jpg": "same image in classes"})
    shutil.copy(root / "square" / "square_002.jpg", root / "square" / "zz copy of square_002.jpg")
    skipped["zz copy of square_002.jpg"] = "duplicate of"
    return used, skipped


def test_training_data_with_every_kind_runs_and_reports_what_it_skipped(prefect_api, tmp_path, store):
    """One `retrain run` on a zip holding every kind: usable files train, the others are listed
    in skipped.csv with the reason, and only this run's own places in the store are new."""
    folder = tmp_path / "src" / "mixed"
    used, skipped = mixed_data_set(folder)
    archive = zip_folder(folder, tmp_path / "mixed.zip", top="mixed")
    with zipfile.ZipFile(archive) as z:  # __MACOSX and dot files travel in the zip, as from a Mac
        assert any(n.startswith("mixed/__MACOSX/") for n in z.namelist())
    before = snapshot(store)
    status, result, stderr = run_cli(["run", str(archive), "--store", str(store), *FAST])
    assert status == 0, stderr[-3000:]
    run = Path(result["run_url"])
    # Besides the run, its data set, its index (runs are bound to its content) and model
    # (named after the data set and its classes): the data set's image shards, which runs share.
    allowed = (f"runs/{result['run_id']}/", "datasets/mixed/", "indexes/", "models/mixed-", "shards/")
    added = assert_untouched(before, store, allowed=allowed)
    assert any(a.startswith("datasets/mixed/") for a in added) and (run / "model.pt").exists()
    assert len({a.split("/")[1] for a in added if a.startswith("shards/") and a.count("/") >= 2}) == 1, added

    index = pd.read_parquet(run / "index.parquet")
    assert dict(zip(index["path"].map(lambda p: Path(p).name), index["label"])) == used
    assert result["images"] == len(used) and result["skipped"] == len(skipped)
    report = pd.read_csv(run / "skipped.csv")
    reasons = dict(zip(report["path"].map(lambda p: Path(p).name), report["reason"]))
    assert set(reasons) == set(skipped), set(reasons) ^ set(skipped)
    for name, word in skipped.items():
        assert pd.Series([reasons[name]]).str.contains(word).all(), (name, reasons[name])
    split = pd.read_parquet(run / "split.parquet")
    assert sorted(split["path"]) == sorted(index["path"])  # every used image once, in one split


def test_folder_data_set_index_matches_and_a_symlink_out_is_not_followed_into_the_store(tmp_path, store):
    """The same kinds as a folder (used in place, nothing copied into the store), plus a
    symbolic link inside a class that points at a file outside the data set."""
    folder = tmp_path / "mixed"
    used, skipped = mixed_data_set(folder)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for the store")
    (folder / "circle" / "link.jpg").symlink_to(secret)
    skipped["link.jpg"] = "not a readable image"
    before = snapshot(store)
    run_url = str(store / "runs" / "folder-run")
    record = datastore.index_stage(str(folder), run_url, seed=0)
    assert_untouched(before, store, allowed=("runs/folder-run/",))
    assert record.counts == {c: sum(1 for v in used.values() if v == c) for c in CLASSES}
    report = pd.read_csv(Path(run_url) / "skipped.csv")
    assert set(report["path"].map(lambda p: Path(p).name)) == set(skipped)
    assert not any("not for the store" in p.read_text(errors="ignore") for p in Path(run_url).rglob("*") if p.is_file())


# refused data sets: (kind, how to build it under a folder, error word); each through `retrain run`


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression=zipfile.ZIP_STORED) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        out = tmp / "data.zip"
        with zipfile.ZipFile(out, "w", compression=compression) as archive:
            for name, data in entries:
                archive.writestr(name, data)
        return out

    return build


def _symlink_zip(tmp: Path) -> Path:
    info = zipfile.ZipInfo("shapes/circle/link.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip([("shapes/circle/a.jpg", good_jpeg(50)), (info, b"/etc/passwd")])(tmp)


def _encrypted_zip(tmp: Path) -> Path:
    """An entry flagged as encrypted (general purpose bit 0, set in its local and central
    headers; zipfile itself only reads such archives)."""
    out = _zip([("shapes/square/a.jpg", good_jpeg(51)), ("shapes/circle/locked.jpg", good_jpeg(52))])(tmp)
    data = bytearray(out.read_bytes())
    with zipfile.ZipFile(out) as archive:
        info = archive.getinfo("shapes/circle/locked.jpg")
        central = data.index(b"PK\x01\x02", archive.start_dir)
    for _ in range(2):  # the second central directory record is the locked entry's
        if data[central + 46 : central + 46 + len(info.filename)] == info.filename.encode():
            break
        central = data.index(b"PK\x01\x02", central + 4)
    data[info.header_offset + 6] |= 0x1
    data[central + 8] |= 0x1
    out.write_bytes(bytes(data))
    return out


def _damaged_zip(tmp: Path) -> Path:
    """Good entries first (they get written), then one whose bytes no longer match its CRC."""
    last = good_jpeg(53)
    out = _zip(
        [
            ("shapes/circle/a.jpg", good_jpeg(54)),
            ("shapes/square/b.jpg", good_jpeg(55)),
            ("shapes/triangle/c.jpg", last),
        ]
    )(tmp)
    data = bytearray(out.read_bytes())
    at = data.rfind(last[100:140])
    data[at : at + 8] = b"\x00" * 8
    out.write_bytes(bytes(data))
    return out


def _spread_bomb(tmp: Path) -> Path:
    # 40 entries of 2 MiB of zeros, each under the per-entry check; test sets the floor to 64 MiB
    return _zip([(f"bomb/c{i % 2}/{i}.jpg", b"\0" * (2 * 2**20)) for i in range(40)], zipfile.ZIP_DEFLATED)(tmp)


def _folder(build: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        root = tmp / "shapes"
        make_shapes_dataset(str(root), per_class=4, size=32, seed=9)
        build(root)
        return root

    return make


def _one_image_class(root: Path) -> None:
    (root / "lonely").mkdir()
    (root / "lonely" / "only.jpg").write_bytes(good_jpeg(60))


def _broken_class(root: Path) -> None:
    (root / "broken").mkdir()
    for kind in UNUSABLE[:3]:
        (root / "broken" / kind.file).write_bytes(kind.data())


def _truncated_zip(tmp: Path) -> Path:
    out = _zip([("shapes/circle/a.jpg", good_jpeg(61)), ("shapes/square/b.jpg", good_jpeg(62))])(tmp)
    out.write_bytes(out.read_bytes()[:-200])  # a download cut short: no central directory
    return out


# (kind, how to build it, error word, stage that refuses it: "unzip" refusals write nothing at
# all; later ones leave only their own failed run's record and the zip's extraction)
REFUSED_DATA = [
    (
        "zip entry with ..",
        _zip([("shapes/circle/a.jpg", b"x"), ("shapes/../../evil.jpg", b"x")]),
        "outside the target",
        "unzip",
    ),
    ("zip entry with an absolute path", _zip([("/tmp/evil.jpg", b"x")]), "outside the target", "unzip"),
    ("zip entry with a Windows path", _zip([("..\\..\\evil.jpg", b"x")]), "outside the target", "unzip"),
    ("zip entry with a drive letter", _zip([("C:/evil.jpg", b"x")]), "outside the target", "unzip"),
    ("symbolic link in a zip", _symlink_zip, "symbolic link", "unzip"),
    ("zip bomb (one entry)", _zip([("bomb/c/a.jpg", b"\0" * (64 * 2**20))], zipfile.ZIP_DEFLATED), "zip bomb", "unzip"),
    ("zip bomb (spread over many entries)", _spread_bomb, "zip bomb", "unzip"),
    ("damaged zip entry (bad CRC)", _damaged_zip, "damaged", "unzip"),
    ("encrypted zip entry", _encrypted_zip, "encrypted", "unzip"),
    ("truncated zip", _truncated_zip, "not a valid zip", "unzip"),
    (
        "text file named .zip",
        lambda tmp: (tmp / "data.zip").write_text("not a zip") and tmp / "data.zip",
        "not a valid zip",
        "unzip",
    ),
    (
        "zip with no class folders",
        _zip([("a.jpg", good_jpeg(63)), ("b.jpg", good_jpeg(64))]),
        "no class folders",
        "index",
    ),
    ("empty class folder", _folder(lambda root: (root / "hexagon").mkdir()), "no images: hexagon", "index"),
    ("class of only unusable files", _folder(_broken_class), "no usable images: broken", "index"),
    ("one-image class", _folder(_one_image_class), "'lonely' has 1 image", "split"),
]


@pytest.mark.parametrize("kind,build,match,stage", REFUSED_DATA, ids=[k[0] for k in REFUSED_DATA])
def test_refused_training_data_gives_a_clear_error_and_leaves_the_store_alone(
    prefect_api, tmp_path, store, monkeypatch, kind, build, match, stage
):
    monkeypatch.setattr(datastore, "ARCHIVE_RATIO_FLOOR", 64 * 2**20)  # the spread bomb, kept small
    (tmp_path / "in").mkdir()
    data = build(tmp_path / "in")
    before = snapshot(store)
    status, result, stderr = run_cli(["run", str(data), "--store", str(store), *FAST])
    assert_clear_refusal(status, result, stderr, match, "run")
    added = assert_untouched(before, store, allowed=() if stage == "unzip" else ("runs/", "datasets/data/", "indexes/"))
    runs = {a.split("/")[1] for a in added if a.startswith("runs/") and a.count("/") >= 2}
    # Data refused by the index makes no run: the run is chosen after it (it is bound to the content).
    assert len(runs) == (1 if stage == "split" else 0), added
    for run_id in runs:
        assert storage.read_json(str(store / "runs" / run_id / "run.json"))["status"] == "failed"
    if stage == "index" and data.suffix == ".zip":
        assert (store / "datasets" / "data").is_dir()  # extracted complete, reused by a rerun
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil.jpg").exists()


# ---- scoring folders --------------------------------------------------------------------------------


def test_scoring_folder_with_every_kind_gives_one_row_per_image(tmp_path, store, dask_client):
    from retrain.tasks import scoring

    folder = tmp_path / "incoming"
    make_shapes_dataset(str(folder / "batch 1"), per_class=2, size=40, seed=21)
    expected = {str(p): None for p in folder.rglob("*.jpg")}
    for i, kind in enumerate(IMAGE_KINDS):
        path = folder / ("batch 2" if i % 2 else "batch 1/nested/deeper") / kind.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(kind.data())
        expected[str(path)] = kind.error
    (folder / "a folder named like.jpg").mkdir()  # listed by its contents, not as an image
    (folder / "a folder named like.jpg" / "inner.png").write_bytes(encode(noise(70), "PNG"))
    expected[str(folder / "a folder named like.jpg" / "inner.png")] = None
    (folder / ".hidden.jpg").write_bytes(good_jpeg(71))  # hidden: not listed
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jpg").write_bytes(good_jpeg(72))
    (folder / "manifest.csv").write_text("path,owner\n")  # no image extension: ignored, counted

    before = snapshot(store)
    out = str(store / "scores" / "incoming")
    summary = scoring.score_job(
        str(store / "runs" / "r0" / "model.pt"),
        str(folder),
        out,
        client=dask_client,
        partition_size=8,
        mini_batch_size=4,
    )
    assert_untouched(before, store, allowed=("scores/incoming/",))
    frame = pd.read_parquet(scoring.JobLayout(out).scores)
    assert len(frame) == len(expected) and frame["path"].is_unique  # no row lost, none twice
    assert set(frame["path"]) == set(expected)
    assert summary["images"] == len(expected) and summary["ignored"] == 1
    rows = frame.set_index("path")
    for path, error in expected.items():
        row = rows.loc[path]
        if error is None:
            assert pd.isna(row["error"]) and row["label"] in CLASSES, (path, row["error"])
        else:
            assert pd.isna(row["label"]) and pd.Series([row["error"]]).str.contains(error).all(), (path, row["error"])
    assert summary["failed"] == len(UNUSABLE)


# ---- single images: `retrain classify` ------------------------------------------------------------


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=lambda k: k.name)
def test_classify_each_kind_answers_or_refuses_clearly(tmp_path, store, kind):
    image = tmp_path / kind.file
    image.write_bytes(kind.data())
    before = snapshot(store)
    status, result, stderr = run_cli(["classify", "r0", str(image), "--store", str(store)])
    if kind.error:
        assert_clear_refusal(status, result, stderr, kind.error, "classify")
        assert kind.file in result["error"]  # names the file
    else:
        assert status == 0, (result, stderr[-2000:])
        assert result["label"] in CLASSES and abs(sum(result["scores"].values()) - 1) < 1e-4
    assert "Traceback" not in stderr
    assert_untouched(before, store)


@pytest.mark.parametrize(
    "what,make,match",
    [
        ("a folder", lambda tmp: (tmp / "pictures").mkdir() or tmp / "pictures", "is a folder"),
        ("a missing file", lambda tmp: tmp / "gone.jpg", "not found"),
        ("a file it may not read", lambda tmp: _unreadable(tmp), "Permission|cannot"),
    ],
)
def test_classify_of_what_is_not_an_image_file_refuses_clearly(tmp_path, store, what, make, match):
    target = make(tmp_path)
    if what.startswith("a file it may not") and os.access(target, os.R_OK):
        pytest.skip("running as a user that reads any file (root)")
    before = snapshot(store)
    status, result, stderr = run_cli(["classify", "r0", str(target), "--store", str(store)])
    assert_clear_refusal(status, result, stderr, match, "classify")
    assert_untouched(before, store)


def _unreadable(tmp: Path) -> Path:
    path = tmp / "locked.jpg"
    path.write_bytes(good_jpeg(80))
    path.chmod(0)
    return path


# ---- models and checkpoints ---------------------------------------------------------------------------


class Payload:
    """Unpickling this would create the marker file: loading must never do it."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_bytes(marker: Path, wrapper: str) -> bytes:
    payload = Payload()
    payload.marker = str(marker)
    Payload.marker = str(marker)
    if wrapper == "pickle":
        return pickle.dumps(payload)
    buffer = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FORMAT,
            "network": "squeezenet-caffe",
            "classes": CLASSES,
            "iteration": 99,
            "state_dict": {},
            "payload": payload,
        },
        buffer,
    )
    return buffer.getvalue()


def test_malicious_model_is_refused_by_classify_evaluate_and_scoring(tmp_path, store, shapes_dir):
    from retrain.tasks import scoring

    marker = tmp_path / "pwned"
    for wrapper in ("torch", "pickle"):
        evil = tmp_path / f"evil-{wrapper}.pt"
        evil.write_bytes(malicious_bytes(marker, wrapper))
        before = snapshot(store)
        status, result, stderr = run_cli(
            ["classify", str(evil), shapes_dir + "/circle/circle_000.jpg", "--store", str(store)]
        )
        assert_clear_refusal(status, result, stderr, "refused|not a readable model", "classify")
        status, result, stderr = run_cli(["evaluate", str(evil), shapes_dir, "--store", str(store)])
        assert_clear_refusal(status, result, stderr, "refused|not a readable model", "evaluate")
        with pytest.raises(ModelFileError):
            scoring.inspect_model(str(evil))
        assert_untouched(before, store)
        assert not marker.exists(), "the payload ran"
    # the same payload in place of a run's published model, asked for by run id
    (store / "runs" / "r0" / "model.pt").write_bytes(malicious_bytes(marker, "torch"))
    status, result, stderr = run_cli(["classify", "r0", shapes_dir + "/circle/circle_000.jpg", "--store", str(store)])
    assert_clear_refusal(status, result, stderr, "refused", "classify")
    assert not marker.exists()


def test_malicious_or_damaged_checkpoint_is_never_unpickled(tmp_path):
    """Resume reads the newest checkpoint that loads with weights_only=True: one with a pickle
    payload, or a truncated one, is passed over for the last good one and never runs code."""
    marker = tmp_path / "pwned"
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    good = {"iteration": 2, "model": {"w": torch.ones(3)}, "optimizer": {"state": {}, "param_groups": []}}
    buffer = io.BytesIO()
    torch.save(good, buffer)
    (checkpoints / "iter-00000002.pt").write_bytes(buffer.getvalue())
    (checkpoints / "iter-00000003.pt").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # truncated
    (checkpoints / "iter-00000004.pt").write_bytes(malicious_bytes(marker, "torch"))
    (checkpoints / "iter-00000005.pt").write_bytes(malicious_bytes(marker, "pickle"))
    (checkpoints / "iter-00000006.pt.tmp-1a2b3c4d").write_bytes(b"half a write")  # debris: ignored
    loaded = load_latest_checkpoint(str(checkpoints))
    assert loaded["iteration"] == 2 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert not marker.exists(), "a checkpoint's payload ran"
    (checkpoints / "iter-00000002.pt").unlink()
    assert load_latest_checkpoint(str(checkpoints)) is None  # nothing safe to resume from: start over
    assert not marker.exists()


def _record(model_file: str) -> dict:
    return torch.load(model_file, weights_only=True)


def _save(tmp: Path, name: str, record: dict) -> str:
    return save_model_file(str(tmp / name), record)


@pytest.mark.parametrize(
    "kind,make,match",
    [
        (
            "truncated model file",
            lambda tmp, m: (tmp / "t.pt").write_bytes(Path(m).read_bytes()[:5000]) and str(tmp / "t.pt"),
            "truncated or corrupt",
        ),
        (
            "random bytes",
            lambda tmp, m: (tmp / "r.pt").write_bytes(os.urandom(4096)) and str(tmp / "r.pt"),
            "refused|truncated or corrupt|not a readable",
        ),  # torch reads them as a pickle: refused either way
        ("a plain state dict, not a model file", lambda tmp, m: _plain_state_dict(tmp), "not a retrain model"),
        (
            "classes edited (3 outputs, 4 names)",
            lambda tmp, m: _save(tmp, "c.pt", dict(_record(m), classes=CLASSES + ["hexagon"])),
            "do not fit",
        ),
        (
            "weights of another shape",
            lambda tmp, m: _save(
                tmp,
                "w.pt",
                dict(
                    _record(m),
                    state_dict={
                        k: (v[:1] if k.endswith("classifier.1.bias") else v)
                        for k, v in _record(m)["state_dict"].items()
                    },
                ),
            ),
            "do not fit",
        ),
        (
            "unknown network",
            lambda tmp, m: _save(tmp, "n.pt", dict(_record(m), network="alexnet9000")),
            "unknown network",
        ),
        (
            "input size the network cannot take",
            lambda tmp, m: _save(
                tmp,
                "s.pt",
                dict(
                    _record(m),
                    input_size=[16, 16],
                    preprocessing=dict(_record(m)["preprocessing"], input_size=[16, 16]),
                ),
            ),
            "input size 16x16 does not fit",
        ),
        (
            "weights that are not numbers (NaN)",
            lambda tmp, m: _save(
                tmp,
                "nan.pt",
                dict(
                    _record(m),
                    state_dict={
                        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                        for k, v in _record(m)["state_dict"].items()
                    },
                ),
            ),
            "not finite",
        ),
    ],
)
def test_bad_model_files_give_a_clear_error_in_classify(tmp_path, store, model_file, shapes_dir, kind, make, match):
    bad = make(tmp_path, model_file)
    before = snapshot(store)
    status, result, stderr = run_cli(["classify", bad, shapes_dir + "/square/square_000.jpg", "--store", str(store)])
    assert_clear_refusal(status, result, stderr, match, "classify")
    assert_untouched(before, store)


def _plain_state_dict(tmp: Path) -> str:
    model, _ = build_network("squeezenet-caffe", 3, weights="none")
    torch.save(model.state_dict(), tmp / "plain.pt")
    return str(tmp / "plain.pt")


def test_bad_model_for_scoring_is_refused_before_anything_is_written(tmp_path, store, model_file, dask_client):
    """Scoring's own checks of classes and input size are in test_scoring.py; here: unsafe and
    damaged files are refused too, and the store keeps no scores of them."""
    from retrain.tasks import scoring

    folder = tmp_path / "incoming"
    make_shapes_dataset(str(folder), per_class=1, size=32, seed=3)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(malicious_bytes(marker, "torch"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(model_file).read_bytes()[:5000])
    for bad in (evil, truncated):
        before = snapshot(store)
        out = store / "scores" / bad.stem
        with pytest.raises(ModelFileError):
            scoring.score_job(str(bad), str(folder), str(out), client=dask_client)
        assert assert_untouched(before, store, allowed=()) == []  # not even an empty output folder
        assert not marker.exists()
