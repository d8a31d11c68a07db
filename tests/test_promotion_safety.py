"""Issue #20 on the promotion gate: a model name that identifies its data, no promotion across
other classes unless asked, rollback along what was current, held-out images compared by
content, and kills around a promotion that never leave a record of one that did not happen."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from retrain.tasks import promotion, storage
from retrain.tasks.runs import RunConfig, list_runs, read_run, start_run
from tests.conftest import run_cli, tiny_run_flags
from tests.test_promotion import CLASSES, constant_model, make_run

# ---- item 4: model names and class changes ---------------------------------------------------


def test_default_model_name_identifies_its_data_not_just_its_folder_name():
    """Two data sets in folders named ``train`` are two models; a new version of one data set
    (same classes, in any order) keeps its name."""
    bees = promotion.model_name_for("/data/hymenoptera_data/train", ["ants", "bees"])
    merch = promotion.model_name_for("/data/merch/train/", ["Cap", "Cube", "Playing Cards", "Screwdriver", "Torch"])
    assert bees != merch and bees.startswith("train-") and merch.startswith("train-")
    assert promotion.model_name_for("/other/copy/train", ["bees", "ants"]) == bees
    assert promotion.model_name_for("/data/MerchData.zip", ["a", "b"]).startswith("MerchData-")
    assert promotion.model_name_for(None, CLASSES).startswith("sample-shapes-")
    assert promotion.check_name(merch) == merch


def test_a_run_on_other_classes_is_kept_out_unless_asked(tmp_path, shapes_dir):
    store = str(tmp_path / "store")
    four = make_run(store, "a", shapes_dir, "circle", classes=[*CLASSES, "star"])
    promotion.promote_run(store, "shapes", four)
    kept = promotion.promote_run(store, "shapes", make_run(store, "b", shapes_dir, "square"))
    assert not kept.promoted and kept.action == "keep"
    assert "classes changed" in kept.reason and "--allow-class-change" in kept.reason
    assert promotion.read_current(store, "shapes")["run_id"] == "a"
    allowed = promotion.promote_run(store, "shapes", storage.StoreLayout(store).run("b").url, allow_class_change=True)
    assert allowed.promoted and "classes changed" in allowed.reason
    assert promotion.read_current(store, "shapes")["run_id"] == "b"


def test_rollback_to_a_rejected_or_never_promoted_run_needs_force(tmp_path, shapes_dir):
    store = str(tmp_path / "store")
    promotion.promote_run(store, "shapes", make_run(store, "good", shapes_dir, "circle"))
    assert not promotion.promote_run(store, "shapes", make_run(store, "bad", shapes_dir, "square")).promoted
    make_run(store, "never", shapes_dir, "triangle")  # published, never through the gate
    for run_id in ("bad", "never"):
        with pytest.raises(promotion.PromotionError, match="--force"):
            promotion.rollback(store, "shapes", to_run=run_id)
        assert promotion.read_current(store, "shapes")["run_id"] == "good"
    status, answer, err = run_cli(["rollback", "shapes", "--to", "bad", "--store", store])
    assert status == 2 and "--force" in err and "kept it out" in err
    status, answer, _ = run_cli(["rollback", "shapes", "--to", "bad", "--force", "--store", store])
    assert status == 0 and answer["run_id"] == "bad" and "forced" in answer["reason"]
    assert promotion.read_current(store, "shapes")["run_id"] == "bad"


# ---- item 5: rollback goes back along what was current ---------------------------------------


def test_rollback_returns_to_what_was_current_before(tmp_path, shapes_dir):
    store = str(tmp_path / "store")
    runs = {r: make_run(store, r, shapes_dir, "circle") for r in ("A", "B", "C", "D")}
    promotion.promote_run(store, "shapes", runs["A"])
    promotion.promote_run(store, "shapes", runs["B"])
    assert promotion.rollback(store, "shapes").run_id == "A"
    promotion.promote_run(store, "shapes", runs["C"])
    assert promotion.rollback(store, "shapes").run_id == "A"  # C replaced A, not B
    with pytest.raises(promotion.PromotionError, match="no run was current before"):
        promotion.rollback(store, "shapes")
    # a rollback to a named run is a step too: the next rollback comes back from it
    promotion.promote_run(store, "shapes", runs["D"])
    assert promotion.rollback(store, "shapes", to_run="B").run_id == "B"
    assert promotion.rollback(store, "shapes").run_id == "D"
    assert promotion.rollback(store, "shapes").run_id == "A"


# ---- item 11: held-out images compared by content --------------------------------------------


def write_run(store: str, run_id: str, rows: list[tuple[str, str, str]], answer: str) -> str:
    """A run folder whose split.parquet holds ``rows`` (path, label, split) and whose model
    always answers ``answer``."""
    run = storage.StoreLayout(store).run(run_id)
    storage.write_parquet(run.split, pd.DataFrame(rows, columns=["path", "label", "split"]))
    constant_model(run.model, answer)
    storage.write_json(run.run_json, {"run_id": run_id, "status": "completed"})
    return run.url


def shapes_rows(root: str, test: dict[str, range]) -> list[tuple[str, str, str]]:
    """Every image of ``root`` by class: ``test[label]`` (file positions) held out, the rest trained on."""
    rows = []
    for label in CLASSES:
        for i, f in enumerate(sorted(storage.list_files(storage.join(root, label)))):
            rows.append((f, label, "test" if i in test.get(label, ()) else "train"))
    return rows


def test_gate_leaves_out_held_out_images_the_current_model_trained_on_by_content(tmp_path, shapes_dir):
    """The current model trained on a copy of the images (other paths, same bytes), including
    4 circles that the candidate holds out: those 4 are left out, both models are compared on
    the other 4 (2 squares, 2 triangles), and the decision says so."""
    store = str(tmp_path / "store")
    copy = str(tmp_path / "copy")
    shutil.copytree(shapes_dir, copy)
    old_test = {"circle": range(6, 8), "square": range(0, 2), "triangle": range(0, 2)}
    current = write_run(store, "old", shapes_rows(copy, old_test), "circle")
    promotion.promote_run(store, "shapes", current)
    held_out = {"circle": range(0, 4), "square": range(0, 2), "triangle": range(0, 2)}
    candidate = write_run(store, "new", shapes_rows(shapes_dir, held_out), "square")
    # its evaluation counted all 8 held-out images (2 right): not what the gate compares on
    storage.write_json(storage.RunLayout(candidate).metrics, {"test_accuracy": 0.25, "test_images": 8})
    decision = promotion.promote_run(store, "shapes", candidate)
    assert decision.current_trained_on == 4 and decision.images == 4 and decision.held_out == 8
    assert decision.candidate_score == pytest.approx(0.5) and decision.current_score == pytest.approx(0.0)
    assert decision.promoted
    text = promotion.decision_markdown(decision.to_dict())
    assert "4 of its 8 test images" in text and "by content" in text


def test_gate_keeps_the_current_model_when_no_held_out_image_is_unseen(tmp_path, shapes_dir):
    store = str(tmp_path / "store")
    copy = str(tmp_path / "copy")
    shutil.copytree(shapes_dir, copy)
    promotion.promote_run(
        store, "shapes", write_run(store, "old", shapes_rows(copy, {"circle": range(7, 8)}), "circle")
    )
    candidate = write_run(store, "new", shapes_rows(shapes_dir, {label: range(0, 2) for label in CLASSES}), "circle")
    decision = promotion.promote_run(store, "shapes", candidate)
    assert not decision.promoted and decision.action == "keep"
    assert decision.current_trained_on == 6 and decision.images == 0
    assert "cannot be compared" in decision.reason and "--force" in decision.reason
    assert promotion.read_current(store, "shapes")["run_id"] == "old"


# ---- item 14: kills around a promotion -------------------------------------------------------


class Killed(BaseException):
    """kill -9 at a chosen write: nothing after it happens (no except clause catches it)."""


@pytest.mark.parametrize("writes_before_kill", [0, 1, 2])
def test_a_kill_during_the_record_never_shows_a_promotion_that_did_not_happen(
    tmp_path, shapes_dir, monkeypatch, writes_before_kill
):
    store = str(tmp_path / "store")
    promotion.promote_run(store, "shapes", make_run(store, "r1", shapes_dir, "circle"))
    second = make_run(store, "r2", shapes_dir, "circle")
    real_write, written = storage.write_json, []

    def killed_write(url, obj):
        if len(written) == writes_before_kill:
            raise Killed(url)
        written.append(url)
        return real_write(url, obj)

    monkeypatch.setattr(storage, "write_json", killed_write)
    with pytest.raises(Killed):
        promotion.promote_run(store, "shapes", second)
    monkeypatch.setattr(storage, "write_json", real_write)

    def consistent() -> dict:
        (model,) = promotion.list_models(store)
        promoted = [h["run_id"] for h in model["history"] if h["promoted"]]
        assert promoted[-1] == model["current"]["run_id"], (promoted, model["current"])
        return model

    consistent()
    # the rerun finishes what the kill left: one decision on r2, current, recorded in its folder
    promotion.promote_run(store, "shapes", second)
    model = consistent()
    assert model["current"]["run_id"] == "r2" and model["current"]["previous"] == "r1"
    assert [h["run_id"] for h in model["history"]] == ["r1", "r2"]
    assert storage.read_json(storage.RunLayout(second).promotion)["promoted"]


@pytest.fixture(scope="module")
def killed_before_promotion(prefect_api, shapes_dir, tmp_path_factory):
    """A tiny run whose process died between publishing its model and the promotion gate."""
    import retrain.flows.pipeline as retrain_module

    store = str(tmp_path_factory.mktemp("killed") / "store")
    args = ["run", shapes_dir, "--store", store, *tiny_run_flags(max_epochs=1)]
    real = retrain_module.promote_run

    def killed(*a, **k):
        raise Killed("kill -9 before the promotion")

    retrain_module.promote_run = killed
    try:
        with pytest.raises(Killed):
            from retrain.cli import main

            main([*args, "--json"])
    finally:
        retrain_module.promote_run = real
    return store, args


def test_the_rerun_after_a_kill_before_promotion_promotes_the_published_run(killed_before_promotion):
    store, args = killed_before_promotion
    (run,) = list_runs(store)
    assert run["status"] == "completed" and not storage.exists(storage.StoreLayout(store).run(run["run_id"]).promotion)
    status, answer, err = run_cli(args)
    assert status == 0, err
    assert answer["run_id"] == run["run_id"], "the rerun trained a new run instead of finishing the promotion"
    assert [r["run_id"] for r in list_runs(store)] == [run["run_id"]]
    assert answer["promotion"]["promoted"] and answer["promotion"]["model_name"].startswith("shapes-")
    (model,) = promotion.list_models(store)
    assert model["current"]["run_id"] == run["run_id"]


@pytest.mark.services  # kills a process
def test_runs_shows_a_run_whose_writer_died_as_interrupted(tmp_path):
    store = str(tmp_path / "store")
    writer = textwrap.dedent(
        f"""
        import sys, time
        from retrain.tasks.runs import RunConfig, start_run
        config = RunConfig("d", "d", "squeezenet-caffe", "none", "transfer", (0.7, 0.15, 0.15), {{}}, {{}})
        start_run({store!r}, config, run_id="dies")
        print("started", flush=True)
        time.sleep(120)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "started"
        status, answer, _ = run_cli(["runs", "--store", store])
        assert status == 0 and answer["runs"][0]["status"] == "running"  # its writer is alive
    finally:
        process.kill()
        process.wait(timeout=30)
    status, answer, _ = run_cli(["runs", "--store", store])
    assert status == 0 and answer["runs"][0]["status"] == "interrupted"
    assert read_run(str(Path(store) / "runs" / "dies"))["status"] == "running"  # the record is left as it was
    # a run being written in this process is still running
    config = RunConfig("d", "d", "squeezenet-caffe", "none", "transfer", (0.7, 0.15, 0.15), {}, {})
    _, lock = start_run(store, config, run_id="alive")
    try:
        assert {r["run_id"]: r["status"] for r in list_runs(store)} == {"dies": "interrupted", "alive": "running"}
    finally:
        lock.release()
