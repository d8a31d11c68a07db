import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from retrain.tasks import storage
from retrain.tasks.datastore import (
    DataSetError,
    find_class_root,
    index_images,
    index_stage,
    materialize,
    split_each_label,
    unzip_dataset,
)
from retrain.tasks.samples import draw_shape
from tests.conftest import zip_folder


def copy_shapes(shapes_dir: str, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root)
    return root


def test_unzip_is_keyed_by_content_and_extracts_once(shapes_dir, tmp_path):
    archive = zip_folder(Path(shapes_dir), tmp_path / "Shapes.zip", top="Shapes")
    store = str(tmp_path / "store")
    first = unzip_dataset(str(archive), store)
    assert "/datasets/Shapes/" in first
    marker = Path(first).parent / "manifest.json"
    mtime = marker.stat().st_mtime_ns
    assert unzip_dataset(str(archive), store) == first  # same zip -> same folder, no second copy
    assert marker.stat().st_mtime_ns == mtime
    index = index_images(first)
    assert index.classes == ["circle", "square", "triangle"]
    assert index.counts() == {"circle": 8, "square": 8, "triangle": 8}
    assert index.root.endswith("/Shapes")  # descended through the wrapper folder


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg", "C:/evil.jpg"])
def test_zip_entries_escaping_the_target_are_refused(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/a.jpg", b"x")
        z.writestr(name, b"x")
    store = tmp_path / "store"
    with pytest.raises(DataSetError, match="outside the target"):
        unzip_dataset(str(archive), str(store))
    assert not (tmp_path / "evil.jpg").exists()
    assert not list(store.rglob("*.jpg")) if store.exists() else True


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        info = zipfile.ZipInfo("cls/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(DataSetError, match="symbolic link"):
        unzip_dataset(str(archive), str(tmp_path / "store"))


def test_zip_bomb_is_refused(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("cls/a.jpg", b"\0" * (64 * 2**20))
    with pytest.raises(DataSetError, match="zip bomb"):
        unzip_dataset(str(archive), str(tmp_path / "store"))
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("a.jpg"))


def test_not_a_zip_and_missing_data_give_clear_errors(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(DataSetError, match="not a valid zip"):
        materialize(str(bad), str(tmp_path / "store"))
    with pytest.raises(DataSetError, match="not found"):
        materialize(str(tmp_path / "nope"), str(tmp_path / "store"))


def test_zip_without_class_folders(tmp_path, shapes_dir):
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(Path(shapes_dir, "circle").iterdir())[:3]:
            z.write(f, f.name)
    folder = unzip_dataset(str(archive), str(tmp_path / "store"))
    with pytest.raises(DataSetError, match="no class folders"):
        index_images(folder)


def test_index_skips_bad_files_with_reasons(shapes_dir, tmp_path):
    root = copy_shapes(shapes_dir, tmp_path)
    good = (root / "circle" / "circle_000.jpg").read_bytes()
    (root / "circle" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (root / "circle" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "circle" / "empty.jpg").write_bytes(b"")
    (root / "circle" / "notes.txt").write_text("hello")
    (root / "circle" / ".hidden.jpg").write_bytes(good)
    (root / ".DS_Store").write_bytes(b"x")
    nested = root / "square" / "more" / "deeper"
    nested.mkdir(parents=True)
    draw_shape("square", 40, np.random.default_rng(9)).save(nested / "nested squäre.png")
    shutil.copy(root / "triangle" / "triangle_003.jpg", root / "triangle" / "z_copy.jpg")
    index = index_images(str(root))
    reasons = dict(zip(index.skipped["path"].map(lambda p: Path(p).name), index.skipped["reason"]))
    assert set(reasons) == {"corrupt.jpg", "truncated.jpg", "empty.jpg", "notes.txt", "z_copy.jpg"}
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert reasons["z_copy.jpg"].startswith("duplicate of") and "triangle_003.jpg" in reasons["z_copy.jpg"]
    assert index.counts() == {"circle": 8, "square": 9, "triangle": 8}


def test_nested_folders_belong_to_their_class_and_duplicates_across_classes_are_dropped(shapes_dir, tmp_path):
    root = copy_shapes(shapes_dir, tmp_path)
    (root / "square" / "sub").mkdir()
    shutil.move(root / "square" / "square_001.jpg", root / "square" / "sub" / "square_001.jpg")
    shutil.copy(root / "circle" / "circle_002.jpg", root / "triangle" / "looks_like_circle.jpg")
    index = index_images(str(root))
    assert index.counts() == {"circle": 7, "square": 8, "triangle": 8}
    ambiguous = index.skipped[index.skipped["reason"].str.contains("same image in classes")]
    assert len(ambiguous) == 2


def test_empty_class_folder_is_a_clear_error(shapes_dir, tmp_path):
    root = copy_shapes(shapes_dir, tmp_path)
    (root / "hexagon").mkdir()
    with pytest.raises(DataSetError, match="hexagon"):
        index_images(str(root))


def test_class_with_only_broken_images_is_a_clear_error(shapes_dir, tmp_path):
    root = copy_shapes(shapes_dir, tmp_path)
    (root / "broken").mkdir()
    (root / "broken" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(DataSetError, match="no usable images: broken"):
        index_images(str(root))


def test_split_each_label_is_stratified_seeded_and_complete(shapes_dir):
    images = index_images(shapes_dir).images
    a = split_each_label(images, (0.7, 0.15, 0.15), seed=3)
    b = split_each_label(images, (0.7, 0.15, 0.15), seed=3)
    c = split_each_label(images, (0.7, 0.15, 0.15), seed=4)
    assert a.equals(b) and not a.equals(c)
    assert sorted(a["path"]) == sorted(images["path"])  # every image exactly once
    counts = a.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == 6).all() and (counts["val"] == 1).all() and (counts["test"] == 1).all()


def test_split_of_a_one_image_class_names_the_class(shapes_dir, tmp_path):
    root = copy_shapes(shapes_dir, tmp_path)
    (root / "lonely").mkdir()
    shutil.copy(root / "circle" / "circle_000.jpg", root / "lonely" / "only.jpg")
    (root / "circle" / "circle_000.jpg").unlink()
    images = index_images(str(root)).images
    with pytest.raises(DataSetError, match="'lonely' has 1 image"):
        split_each_label(images)


def test_index_stage_writes_index_report_and_montage(shapes_dir, tmp_path):
    run_url = str(tmp_path / "run")
    record = index_stage(shapes_dir, run_url, seed=0)
    assert record.classes == ["circle", "square", "triangle"]
    assert len(storage.read_parquet(record.index)) == 24
    assert Path(record.montage).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (Path(run_url) / "skipped.csv").exists()


def test_find_class_root_in_memory_filesystem(shapes_dir):
    for f in Path(shapes_dir).rglob("*.jpg"):
        storage.write_bytes(f"memory://ds/wrap/{f.parent.name}/{f.name}", f.read_bytes())
    assert find_class_root("memory://ds").endswith("/ds/wrap")
    assert index_images("memory://ds").counts()["circle"] == 8
    storage.remove("memory://ds", recursive=True)
