"""Labels from a CSV or parquet table (tasks/labels.py) and its hook in the index and split."""

import os

import pandas as pd
import pytest

from retrain.cli import main
from retrain.tasks import storage
from retrain.tasks.datastore import DataSetError, index_stage, split_stage
from retrain.tasks.labels import index_from_table


def folder_rows(shapes_dir: str) -> list[tuple[str, str]]:
    """(path relative to the data folder, label) of every image in the class folders."""
    rows = []
    for label in sorted(os.listdir(shapes_dir)):
        for name in sorted(os.listdir(os.path.join(shapes_dir, label))):
            rows.append((f"{label}/{name}", label))
    return rows


def test_a_csv_of_the_class_folders_gives_the_same_index_and_split(shapes_dir, tmp_path):
    """Same images, same labels: the same index and the same seeded split, so the same
    training run (the accuracy comparison itself is in the closing note's figures)."""
    table = tmp_path / "labels.csv"
    pd.DataFrame(folder_rows(shapes_dir), columns=["path", "label"]).sample(frac=1, random_state=3).to_csv(
        table, index=False
    )
    by_folder, by_table = str(tmp_path / "folder-run"), str(tmp_path / "table-run")
    index_stage(shapes_dir, by_folder, seed=0)
    record = index_stage(shapes_dir, by_table, seed=0, labels=str(table))
    assert record.skipped == 0 and record.classes == ["circle", "square", "triangle"]
    split_stage(by_folder, (0.5, 0.25, 0.25), seed=4)
    split_stage(by_table, (0.5, 0.25, 0.25), seed=4)
    a = storage.read_parquet(os.path.join(by_folder, "split.parquet")).sort_values("path", ignore_index=True)
    b = storage.read_parquet(os.path.join(by_table, "split.parquet")).sort_values("path", ignore_index=True)
    pd.testing.assert_frame_equal(a, b)


def test_bad_rows_are_skipped_with_their_reason(shapes_dir, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    rows = folder_rows(shapes_dir)
    table = pd.DataFrame(
        rows
        + [
            ("circle/missing.jpg", "circle"),  # no such file
            (rows[0][0], ""),  # empty label
            (rows[1][0], "square"),  # listed again
            (str(tmp_path / "broken.jpg"), "circle"),  # an absolute path that does not decode
            ("", "circle"),  # empty path
        ],
        columns=["path", "label"],
    )
    path = tmp_path / "labels.parquet"
    table.to_parquet(path)
    index = index_from_table(str(path), shapes_dir)
    assert len(index.images) == len(rows)
    reasons = dict(zip(index.skipped["path"], index.skipped["reason"]))
    assert reasons[os.path.join(shapes_dir, "circle/missing.jpg")] == "file not found"
    assert "not a readable image" in reasons[str(tmp_path / "broken.jpg")]
    assert any("empty label" in r for r in reasons.values()) and any("empty path" in r for r in reasons.values())
    assert any("listed again (first on row 3)" in r for r in reasons.values())
    # the same image under the label it was listed with first
    assert index.images.set_index("path").loc[os.path.join(shapes_dir, rows[1][0]), "label"] == rows[1][1]


def test_a_split_column_fixes_those_rows_and_the_rest_is_drawn(shapes_dir, tmp_path):
    rows = folder_rows(shapes_dir)
    splits = ["TRAINING", "validation", "test", ""] * (len(rows) // 4)  # Vertex AI spellings too
    table = pd.DataFrame([(p, label, s) for (p, label), s in zip(rows, splits)], columns=["path", "label", "split"])
    table.to_csv(tmp_path / "labels.csv", index=False)
    run = str(tmp_path / "run")
    index_stage(shapes_dir, run, labels=str(tmp_path / "labels.csv"))
    split_stage(run, (0.7, 0.15, 0.15), seed=0)
    split = storage.read_parquet(os.path.join(run, "split.parquet")).set_index("path")
    fixed = {"TRAINING": "train", "validation": "val", "test": "test"}
    for (p, _), s in zip(rows, splits):
        if s:
            assert split.loc[os.path.join(shapes_dir, p), "split"] == fixed[s]
    assert set(split["split"]) == {"train", "val", "test"} and len(split) == len(rows)


def test_a_table_whose_split_leaves_a_class_untrained_is_refused(shapes_dir, tmp_path):
    rows = folder_rows(shapes_dir)
    table = pd.DataFrame(
        [(p, label, "test" if label == "square" else "train") for p, label in rows], columns=["path", "label", "split"]
    )
    table.to_csv(tmp_path / "labels.csv", index=False)
    index_stage(shapes_dir, str(tmp_path / "run"), labels=str(tmp_path / "labels.csv"))
    with pytest.raises(DataSetError, match="no training image.*square"):
        split_stage(str(tmp_path / "run"), (0.7, 0.15, 0.15), seed=0)


def test_a_table_without_a_label_column_exits_2_with_the_columns_it_has(shapes_dir, tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("file,class\ncircle/a.jpg,circle\n")
    status = main(["run", shapes_dir, "--labels", str(tmp_path / "labels.csv"), "--store", str(tmp_path / "s")])
    assert status == 2
    err = capsys.readouterr().err
    assert "lacks the column(s) path, label" in err and "file, class" in err


def test_spellings_of_one_file_are_one_row_and_a_copy_under_another_label_is_refused(shapes_dir, tmp_path):
    """``a/x.jpg``, ``./a/x.jpg``, ``a/../a/x.jpg`` and the absolute path are one image: the
    first row keeps it, the others are listed again; the same bytes under another label are
    ambiguous, as in class folders (a copy under the same label is a duplicate)."""
    import shutil

    rows = folder_rows(shapes_dir)
    first = rows[0][0]  # circle/circle_000.jpg
    shutil.copy(os.path.join(shapes_dir, rows[1][0]), tmp_path / "copy.jpg")  # circle_001's bytes
    shutil.copy(os.path.join(shapes_dir, rows[2][0]), tmp_path / "same.jpg")  # circle_002's bytes
    table = pd.DataFrame(
        rows
        + [
            ("./" + first, "square"),
            (first.replace("/", "/../circle/", 1), "triangle"),
            (os.path.join(shapes_dir, first), "square"),
            (os.path.join(shapes_dir, ".", first), "square"),
            (str(tmp_path / "copy.jpg"), "square"),
            (str(tmp_path / "same.jpg"), "circle"),
        ],
        columns=["path", "label"],
    )
    table.to_csv(tmp_path / "labels.csv", index=False)
    index = index_from_table(str(tmp_path / "labels.csv"), shapes_dir)
    reasons = list(index.skipped["reason"])
    assert sum("listed again (first on row 2)" in r for r in reasons) == 4, reasons
    assert index.images["digest"].is_unique and index.images["path"].is_unique
    by_path = index.images.set_index("path")["label"]
    assert by_path[os.path.join(shapes_dir, first)] == "circle"
    ambiguous = index.skipped[index.skipped["reason"].str.contains("same image in classes circle, square")]
    assert sorted(ambiguous["path"]) == sorted([os.path.join(shapes_dir, rows[1][0]), str(tmp_path / "copy.jpg")])
    assert str(tmp_path / "same.jpg") in set(index.skipped["path"])  # a duplicate of circle_002
    assert len(index.images) == len(rows) - 1


def test_a_list_file_names_each_image_once_however_it_is_spelled(shapes_dir, tmp_path):
    from retrain.tasks.scoring.job import list_images

    folder = tmp_path / "imgs"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(os.path.join(shapes_dir, "circle"), folder)
    listing = folder / "list.txt"
    listing.write_text(
        "circle_000.jpg\n./circle_000.jpg\nsub/../circle_000.jpg\n"
        + str(folder / "circle_000.jpg")
        + "\ncircle_001.jpg\n"
    )
    found = list_images(str(listing))
    assert found.paths == [str(folder / "circle_000.jpg"), str(folder / "circle_001.jpg")]
