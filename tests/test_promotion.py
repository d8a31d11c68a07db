"""The promotion gate on hand-made run folders: models that always answer one class, so their
accuracy on the held-out images is known exactly. Promote, keep, rollback, the CLI's
``models``/``rollback``, the candidate's accuracy taken from its evaluation, and two promotions
of one model at once."""

from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest
import torch

from retrain.tasks import promotion, storage
from retrain.tasks.model_file import model_record, save_model_file
from retrain.tasks.networks import build_network, get_spec

CLASSES = ["circle", "square", "triangle"]


# ---- hand-made runs: a model that always answers one class ------------------------------------


def constant_model(url: str, answer: str, classes: list[str] = CLASSES) -> str:
    """A SqueezeNet whose head ignores the image and always scores ``answer`` highest."""
    spec = get_spec("squeezenet-caffe")
    model, origin = build_network(spec.name, len(classes), weights="none")
    head = model.get_submodule(spec.head_layer)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([1.0 if c == answer else 0.0 for c in classes]))
    return save_model_file(url, model_record(model, spec, classes, origin))


def make_run(store: str, run_id: str, shapes_dir: str, answer: str, classes: list[str] = CLASSES) -> str:
    """runs/<run_id>/ with split.parquet (test: 2 circles, 1 square, 1 triangle) and model.pt."""
    run = storage.StoreLayout(store).run(run_id)
    rows = []
    for label, n_test in zip(CLASSES, (2, 1, 1)):
        files = sorted(storage.list_files(storage.join(shapes_dir, label)))
        rows += [{"path": f, "label": label, "split": "test" if i < n_test else "train"} for i, f in enumerate(files)]
    storage.write_parquet(run.split, pd.DataFrame(rows))
    constant_model(run.model, answer, classes)
    storage.write_json(run.run_json, {"run_id": run_id, "status": "completed"})
    return run.url


def test_model_name_comes_from_the_data_set():
    key = promotion.model_name_for("/data/MerchData.zip", CLASSES).rsplit("-", 1)[1]
    assert len(key) == 8
    assert promotion.model_name_for("/data/MerchData.zip", CLASSES) == f"MerchData-{key}"
    assert promotion.model_name_for("s3://bucket/sets/hymenoptera_data/", CLASSES) == f"hymenoptera_data-{key}"
    assert promotion.model_name_for("/x/ant photos (2).ZIP", CLASSES) == f"ant-photos-2-{key}"
    assert promotion.model_name_for(None, CLASSES) == f"sample-shapes-{key}"
    with pytest.raises(promotion.PromotionError, match="model name"):
        promotion.check_name("../escape")


def test_gate_promotes_first_and_better_runs_keeps_worse_ones_and_rolls_back(tmp_path, shapes_dir):
    store = str(tmp_path / "store")
    # first run: no current model -> promoted; it answers "circle": 2 of 4 test images right
    first = make_run(store, "r1", shapes_dir, "circle")
    d1 = promotion.promote_run(store, "shapes", first)
    assert d1.promoted and d1.action == "promote" and d1.reason == "no current model"
    assert d1.candidate_score == pytest.approx(0.5) and d1.images == 4 and d1.split == "test"
    assert promotion.read_current(store, "shapes")["run_id"] == "r1"

    # worse run ("square": 1 of 4) -> kept out; both scores recorded, scored on r2's split
    worse = make_run(store, "r2", shapes_dir, "square")
    d2 = promotion.promote_run(store, "shapes", worse)
    assert not d2.promoted and d2.action == "keep"
    assert (d2.candidate_score, d2.current_score) == (pytest.approx(0.25), pytest.approx(0.5))
    assert d2.current_run == "r1" and d2.current_trained_on == 0
    assert promotion.read_current(store, "shapes")["run_id"] == "r1"
    assert storage.read_json(storage.join(worse, "promotion.json"))["promoted"] is False

    # as good (another "circle" model) -> promoted: "at least as good"
    equal = make_run(store, "r3", shapes_dir, "circle")
    d3 = promotion.promote_run(store, "shapes", equal)
    assert d3.promoted and d3.current_score == pytest.approx(0.5) and d3.current_run == "r1"
    current = promotion.read_current(store, "shapes")
    assert current["run_id"] == "r3" and current["previous"] == "r1"
    assert current["model_url"] == storage.join(equal, "model.pt")

    history = promotion.history(store, "shapes")
    assert [(h["run_id"], h["action"]) for h in history] == [("r1", "promote"), ("r2", "keep"), ("r3", "promote")]

    # rollback: to the run current before the current one, then to a named run
    back = promotion.rollback(store, "shapes")
    assert back.run_id == "r1" and back.action == "rollback" and back.current_run == "r3"
    assert promotion.read_current(store, "shapes")["run_id"] == "r1"
    with pytest.raises(promotion.PromotionError, match="no run was current before"):
        promotion.rollback(store, "shapes")
    assert promotion.rollback(store, "shapes", to_run="r3").run_id == "r3"
    with pytest.raises(promotion.PromotionError, match="no published model"):
        promotion.rollback(store, "shapes", to_run="nope")
    with pytest.raises(promotion.PromotionError, match="no model named"):
        promotion.rollback(store, "other")
    assert promotion.current_model_url(store, "shapes") == storage.join(equal, "model.pt")
    # nothing half-written is left behind
    assert not [f for f in storage.list_files(store) if storage.TMP_MARKER in f]


def test_gate_promotes_across_changed_classes_only_when_asked(tmp_path, shapes_dir):
    store = str(tmp_path / "store")
    promotion.promote_run(
        store, "shapes", make_run(store, "a", shapes_dir, "circle", classes=["circle", "square", "triangle", "star"])
    )
    b = make_run(store, "b", shapes_dir, "square")
    assert not promotion.promote_run(store, "shapes", b).promoted
    decision = promotion.promote_run(store, "shapes", b, allow_class_change=True)
    assert decision.promoted and "classes changed" in decision.reason and decision.current_score is None


def test_models_and_rollback_commands(tmp_path, shapes_dir, capsys):
    from retrain.cli import main

    store = str(tmp_path / "store")
    for run_id, answer in (("r1", "circle"), ("r2", "triangle"), ("r3", "circle")):
        promotion.promote_run(store, "shapes", make_run(store, run_id, shapes_dir, answer))
    assert main(["models", "--store", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    assert [m["model_name"] for m in listed] == ["shapes"] and listed[0]["current"]["run_id"] == "r3"
    assert [h["promoted"] for h in listed[0]["history"]] == [True, False, True]

    assert main(["models", "--store", store]) == 0
    text = capsys.readouterr().out
    assert "shapes: current run r3" in text and "keep" in text and "0.2500 vs 0.5000" in text

    assert main(["rollback", "shapes", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"] == "r1"
    assert main(["rollback", "shapes", "--to", "r9", "--store", store]) == 2
    assert "no published model" in capsys.readouterr().err
    assert main(["models", "nothing", "--store", store]) == 2


def test_the_candidates_accuracy_comes_from_its_evaluation(tmp_path, shapes_dir, monkeypatch):
    """metrics.json holds the candidate's accuracy on the same held-out images: only the
    current model is evaluated by the gate."""
    store = str(tmp_path / "store")
    promotion.promote_run(store, "shapes", make_run(store, "r1", shapes_dir, "circle"))
    second = make_run(store, "r2", shapes_dir, "triangle")
    storage.write_json(storage.RunLayout(second).metrics, {"test_accuracy": 0.75, "test_images": 4})
    evaluated = []
    real = promotion.accuracy_on
    monkeypatch.setattr(promotion, "accuracy_on", lambda url, rows: evaluated.append(url) or real(url, rows))
    decision = promotion.promote_run(store, "shapes", second)
    assert evaluated == [storage.StoreLayout(store).run("r1").model]
    assert decision.promoted and decision.candidate_score == 0.75 and decision.current_score == pytest.approx(0.5)
    # a record over other images is not used: the candidate is evaluated (1 of 4 right)
    third = make_run(store, "r3", shapes_dir, "triangle")
    storage.write_json(storage.RunLayout(third).metrics, {"test_accuracy": 1.0, "test_images": 9})
    assert promotion.promote_run(store, "shapes", third).candidate_score == pytest.approx(0.25)


def test_two_promotions_of_one_model_at_once_take_turns(tmp_path, shapes_dir, monkeypatch):
    """Both decisions land in the history, the second one taken against the first's result,
    and current.json names one run. A pause between reading current.json and writing the
    decision makes the two overlap: without the lock both would find no current model."""
    store = str(tmp_path / "store")
    runs = {run_id: make_run(store, run_id, shapes_dir, "circle") for run_id in ("a", "b")}
    real_read = promotion.read_current

    def slow_read(*args):
        found = real_read(*args)
        time.sleep(1.0)
        return found

    monkeypatch.setattr(promotion, "read_current", slow_read)
    start = threading.Barrier(2)
    decisions, errors = {}, []

    def promote(run_id: str) -> None:
        start.wait()
        try:
            decisions[run_id] = promotion.promote_run(store, "shapes", runs[run_id])
        except Exception as exc:  # reported below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(run_id,)) for run_id in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and set(decisions) == {"a", "b"}
    first, second = sorted(decisions.values(), key=lambda d: d.decided_at)
    assert first.reason == "no current model" and first.current_run is None
    assert second.current_run == first.run_id and second.current_score == pytest.approx(0.5)
    history = promotion.history(store, "shapes")
    assert [h["run_id"] for h in history] == [first.run_id, second.run_id]
    current = real_read(store, "shapes")
    assert current["run_id"] == second.run_id and current["previous"] == first.run_id
    assert not storage.exists(storage.join(storage.StoreLayout(store).model("shapes").url, ".lock"))


def test_a_promoted_name_resolves_to_its_current_model_and_a_new_one_scores_into_a_new_output(tmp_path, shapes_dir):
    """What the scheduled `score/batch` deployment relies on: it names the model, so each run
    scores with the model current then, into default_out (fixed per model content and folder):
    a newly promoted model starts a new output, and the old one is left as it was."""
    from retrain.tasks.runs import resolve_model
    from retrain.tasks.scoring.layout import default_out

    store = str(tmp_path / "store")
    images = storage.absolute(shapes_dir)
    first = make_run(store, "r1", shapes_dir, "square")  # 1 of 4 right
    promotion.promote_run(store, "shapes", first)
    assert resolve_model("shapes", store) == storage.join(first, "model.pt")
    old_out = default_out(store, storage.sha256_of(resolve_model("shapes", store)), images)
    storage.write_json(storage.join(old_out, "summary.json"), {"model": "r1"})  # stands for its scores
    before = {url: storage.sha256_of(url) for url in storage.list_files(old_out)}

    better = make_run(store, "r2", shapes_dir, "circle")  # 2 of 4 right: promoted
    assert promotion.promote_run(store, "shapes", better).promoted
    assert resolve_model("shapes", store) == storage.join(better, "model.pt")
    new_out = default_out(store, storage.sha256_of(resolve_model("shapes", store)), images)
    assert new_out != old_out
    assert {url: storage.sha256_of(url) for url in storage.list_files(old_out)} == before

    # a file and a run id come first (a run named like a model is that run); an unknown name says all three
    assert resolve_model(storage.join(first, "model.pt"), store) == storage.join(first, "model.pt")
    assert resolve_model("r1", store) == storage.join(first, "model.pt")
    with pytest.raises(FileNotFoundError, match="no model file at 'nope', no run 'nope' .* no promoted model named"):
        resolve_model("nope", store)
    with pytest.raises(FileNotFoundError, match="no promoted model named '../x'"):
        resolve_model("../x", store)
