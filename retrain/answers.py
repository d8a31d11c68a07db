"""What each command answers, in the one vocabulary of ``--json`` and the Python API
(docs/reference.md: the vocabulary table): a model's file is ``model_url`` and a promoted
model's name ``model_name``; an accuracy is ``<split>_accuracy``; a number of images is
``images`` or ``<split>_images``; a location the command wrote is named after the flag that
chooses it (``score_out``, ``out``) or ends in ``_url``; floats are rounded for people
(accuracies and scores to 4 decimals, images/s to 1, seconds to 2).

The flows and the store keep their own records (summary.json, current.json, ...): these
functions turn one into the answer a person or a script reads. Standard library only.
"""

from __future__ import annotations

import posixpath

_DECIMALS = {"seconds": 2, "images_per_second": 1, "images_per_second_scoring": 1}
_FOUR = ("accuracy", "score", "precision", "recall", "f1")  # a key that is or ends in one: 4 decimals


def rounded(value, key: str = ""):
    """``value`` with every float rounded as its key says (a float under another key, such as
    export's largest score difference, is kept whole); ``scores`` maps classes to scores."""
    if isinstance(value, dict):
        return {k: rounded(v, key if key == "scores" else k) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, key) for v in value]
    if isinstance(value, float):
        if key in _DECIMALS:
            return round(value, _DECIMALS[key])
        if key.endswith(_FOUR) or key == "scores":
            return round(value, 4)
    return value


def _renamed(record: dict, names: dict[str, str]) -> dict:
    return {names.get(k, k): v for k, v in record.items()}


def run_answer(summary: dict) -> dict:
    """The retrain flow's summary (summary.json) as ``retrain run`` answers it."""
    answer = _renamed(summary, {"model": "model_url", "run": "run_url", "counts": "class_images"})
    answer["images"] = sum(summary.get("counts", {}).values())
    if "promotion" in summary:
        answer["promotion"] = decision_answer(summary["promotion"])
    if "scores" in summary:  # scored at the end: the scores file and its folder
        answer["scores_url"] = answer.pop("scores")
        answer["score_out"] = posixpath.dirname(answer["scores_url"])
    return rounded(answer)


def score_answer(summary: dict) -> dict:
    """The score flow's summary (<out>/summary.json) as ``retrain score`` answers it."""
    answer = _renamed(summary, {"model": "model_url", "output": "scores_url", "out": "score_out"})
    if answer.get("to_label"):
        answer["to_label"] = _renamed(answer["to_label"], {"count": "images"})
    return rounded(answer)


def evaluation_answer(result: dict) -> dict:
    """An evaluation (tasks.evaluation.Evaluation.to_dict and the engine) on DATA; each
    class's ``support`` (scikit-learn's word) is its ``images``."""
    answer = _renamed(result, {"accuracy": "data_accuracy", "count": "images"})
    answer["per_class"] = {c: _renamed(m, {"support": "images"}) for c, m in result["per_class"].items()}
    return rounded(answer)


def decision_answer(decision: dict) -> dict:
    """A promotion decision or rollback (tasks.promotion.Decision): both models' accuracies on
    the images of ``split`` the decision compared them on."""
    names = {
        "model": "model_name",
        "candidate_score": "candidate_accuracy",
        "current_score": "current_accuracy",
        "current_run": "current_run_id",
    }
    return rounded({k: v for k, v in _renamed(decision, names).items() if k != "metric"})  # metric: always accuracy


def model_answer(model: dict) -> dict:
    """A promoted model as ``retrain models`` lists it: its current run (current.json) and
    its decisions."""
    current = model["current"]
    if current is not None:
        split = (current.get("decision") or {}).get("split") or "test"
        current = _renamed(current, {"model": "model_name", "run": "run_url", "score": f"{split}_accuracy"})
        current.pop("metric", None)  # always accuracy: the key says so
        if current.get("decision"):
            current["decision"] = decision_answer(current["decision"])
    return rounded(
        {"model_name": model["model"], "current": current, "history": [decision_answer(h) for h in model["history"]]}
    )


def experiment_answer(record: dict) -> dict:
    """An experiment's record (experiment.json) as ``retrain experiment`` answers it: each
    run's (and the best run's) folder and model file by their vocabulary names."""
    names = {"run": "run_url", "model": "model_url"}
    answer = _renamed(record, {"experiment": "experiment_url"})
    answer["runs"] = [_renamed(r, names) for r in record.get("runs", [])]
    if record.get("best"):
        answer["best"] = _renamed(record["best"], names)
    if record.get("promotion"):
        answer["promotion"] = decision_answer(record["promotion"])
    return rounded(answer)
