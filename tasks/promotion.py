"""The promotion gate: which run's model is *the* model of a name, and the record of why.

Store layout (next to ``runs/``)::

    models/<name>/current.json                      the promoted run: run id, model URL, score
    models/<name>/history/<utc-time>-<run-id>.json  one record per decision (promote, keep, rollback)
    runs/<run-id>/promotion.json                    the decision taken on that run

A new run replaces the current model only if it is at least as good on the *same* held-out
images: both models are scored here, with the same code, on the new run's test split (its
validation split when it has no test part). With no current model, or a current model
trained on other classes, the new run is promoted. Every file is written atomically
(:func:`tasks.storage.write_json`), and each decision is its own file, so the history never
needs a read-modify-write (object stores have no append).

Plain functions; :mod:`flows.retrain` wraps :func:`promote_run` as a Prefect task and shows
the decision as an artifact. ``retrain models`` and ``retrain rollback`` call them directly.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from retrain.tasks import storage

METRIC = "accuracy"
PROMOTE, KEEP, ROLLBACK = "promote", "keep", "rollback"


class PromotionError(ValueError):
    """A model or run named for promotion or rollback does not exist or cannot be used."""


# ---- names and places ----------------------------------------------------------------------


def model_name_for(data: str | None) -> str:
    """The default model name: the data set's name (``.../MerchData.zip`` -> ``MerchData``);
    the generated sample set when no data is given."""
    if not data:
        from retrain.tasks.samples import SAMPLE_NAME

        return SAMPLE_NAME
    base = posixpath.basename(str(data).rstrip("/"))
    if base.lower().endswith(".zip"):
        base = base[:-4]
    return check_name(re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model")


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise PromotionError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder in the store)"
        )
    return name


def models_dir(store: str) -> str:
    return storage.join(store, "models")


def model_dir(store: str, name: str) -> str:
    return storage.join(models_dir(store), check_name(name))


def current_url(store: str, name: str) -> str:
    return storage.join(model_dir(store, name), "current.json")


def history_dir(store: str, name: str) -> str:
    return storage.join(model_dir(store, name), "history")


# ---- the records -----------------------------------------------------------------------------


@dataclass
class Decision:
    """One promotion decision (or rollback), as stored and as shown in the UI."""

    model: str  # the model name
    run_id: str  # the run decided on
    action: str  # promote | keep | rollback
    promoted: bool  # does run_id's model become current?
    reason: str
    candidate_score: float | None  # the run's accuracy on the held-out images
    current_run: str | None  # the model current before this decision
    current_score: float | None  # its accuracy on the same images (None: not comparable)
    metric: str = METRIC
    split: str | None = None  # which split of run_id was held out: test (or val)
    images: int | None = None  # how many images both were scored on
    current_trained_on: int | None = None  # held-out images the current model trained on
    model_url: str | None = None
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def to_dict(self) -> dict:
        return asdict(self)


def _now_key() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def read_current(store: str, name: str) -> dict | None:
    url = current_url(store, name)
    return storage.read_json(url) if storage.exists(url) else None


def history(store: str, name: str) -> list[dict]:
    """Every decision on ``name``, oldest first."""
    root = history_dir(store, name)
    if not storage.exists(root):
        return []
    return [storage.read_json(u) for u in storage.list_files(root) if u.endswith(".json")]


def list_models(store: str) -> list[dict]:
    """Each model name in the store with its current run and its history."""
    root = models_dir(store)
    if not storage.exists(root):
        return []
    fs, path = storage.filesystem(root)
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))
    return [{"model": n, "current": read_current(store, n), "history": history(store, n)} for n in names]


def _record(store: str, decision: Decision, run_url: str | None) -> None:
    """The decision in the model's history and in the run folder; current.json last, so a
    reader never sees a current model without the decision that made it current."""
    record = decision.to_dict()
    storage.write_json(storage.join(history_dir(store, decision.model), f"{_now_key()}-{decision.run_id}.json"), record)
    if run_url is not None and decision.action != ROLLBACK:
        storage.write_json(storage.join(run_url, "promotion.json"), record)
    if decision.promoted:
        storage.write_json(
            current_url(store, decision.model),
            {
                "model": decision.model,
                "run_id": decision.run_id,
                "run": run_url,
                "model_url": decision.model_url,
                "score": decision.candidate_score,
                "metric": decision.metric,
                "action": decision.action,
                "reason": decision.reason,
                "previous": decision.current_run,
                "promoted_at": decision.decided_at,
            },
        )


# ---- scoring both models on the same images ----------------------------------------------------


def held_out_rows(run_url: str):
    """The new run's held-out images: its test split (its validation split when it has no
    test part, as :func:`tasks.evaluation.evaluate_run` does). Returns (rows, split name)."""
    split = storage.read_parquet(storage.join(run_url, "split.parquet"))
    for name in ("test", "val"):
        rows = split[split["split"] == name]
        if len(rows):
            return rows, name
    raise PromotionError(f"run {run_url} has no test or validation images to compare models on")


def trained_on(run_url: str | None, paths: set[str]) -> int | None:
    """How many of ``paths`` the run at ``run_url`` trained or validated on (None: unknown)."""
    if not run_url or not storage.exists(storage.join(run_url, "split.parquet")):
        return None
    split = storage.read_parquet(storage.join(run_url, "split.parquet"))
    seen = set(split.loc[split["split"].isin(["train", "val"]), "path"])
    return len(seen & paths)


def score_model(model_url: str, rows) -> float:
    """Accuracy of the model file at ``model_url`` on ``rows`` (columns path, label)."""
    from retrain.tasks.evaluation import evaluate_model
    from retrain.tasks.networks import load_model_file

    result, _ = evaluate_model(load_model_file(model_url), rows)
    return result.accuracy


def _run_id(run_url: str) -> str:
    return posixpath.basename(run_url.rstrip("/"))


def promote_run(store: str, name: str, run_url: str) -> Decision:
    """The gate: make ``run_url``'s model current for ``name`` if it scores at least as well
    as the current one on the run's held-out images (or if there is none). Records the
    decision either way and returns it."""
    from retrain.tasks.networks import read_model_record

    check_name(name)
    run_id = _run_id(run_url)
    model_url = storage.join(run_url, "model.pt")
    if not storage.exists(model_url):
        raise PromotionError(f"run {run_id} has no published model ({model_url})")
    rows, split_name = held_out_rows(run_url)
    candidate = score_model(model_url, rows)
    current = read_current(store, name)
    base = dict(
        model=name,
        run_id=run_id,
        candidate_score=candidate,
        split=split_name,
        images=len(rows),
        model_url=model_url,
        current_run=current["run_id"] if current else None,
    )
    if current is None:
        decision = Decision(**base, action=PROMOTE, promoted=True, current_score=None, reason="no current model")
    elif current["run_id"] == run_id:
        decision = Decision(
            **base,
            action=PROMOTE,
            promoted=True,
            current_score=candidate,
            reason="this run is already the current model",
        )
    else:
        current_classes = read_model_record(current["model_url"])["classes"]
        if sorted(current_classes) != sorted(read_model_record(model_url)["classes"]):
            decision = Decision(
                **base,
                action=PROMOTE,
                promoted=True,
                current_score=None,
                reason=f"the classes changed (current model: {', '.join(current_classes)}); "
                f"the models cannot be compared",
            )
        else:
            score = score_model(current["model_url"], rows)
            overlap = trained_on(current.get("run"), set(rows["path"]))
            better = candidate >= score
            decision = Decision(
                **base,
                action=PROMOTE if better else KEEP,
                promoted=better,
                current_score=score,
                current_trained_on=overlap,
                reason=(
                    f"{candidate:.4f} >= {score:.4f} of the current model {current['run_id']}"
                    if better
                    else f"{candidate:.4f} < {score:.4f} of the current model {current['run_id']}"
                ),
            )
    _record(store, decision, run_url)
    return decision


def rollback(store: str, name: str, to_run: str | None = None) -> Decision:
    """Make an earlier run current again: ``to_run``, or the run promoted before the current
    one. The target must be a run of this store with a published model."""
    current = read_current(store, name)
    if current is None:
        raise PromotionError(f"no model named {name!r} in {store} (nothing was promoted yet)")
    if to_run is None:
        promoted: list[str] = []
        for record in history(store, name):
            if record["action"] == PROMOTE and record["promoted"] and record["run_id"] not in promoted:
                promoted.append(record["run_id"])
        if current["run_id"] not in promoted or promoted.index(current["run_id"]) == 0:
            raise PromotionError(
                f"model {name!r}: no run was promoted before the current run "
                f"{current['run_id']}; name one with --to RUN_ID"
            )
        to_run = promoted[promoted.index(current["run_id"]) - 1]
    run_url = storage.run_dir(store, to_run)
    model_url = storage.join(run_url, "model.pt")
    if not storage.exists(model_url):
        raise PromotionError(f"run {to_run!r} has no published model in {store}")
    metrics_url = storage.join(run_url, "metrics.json")
    score = storage.read_json(metrics_url).get("test_accuracy") if storage.exists(metrics_url) else None
    decision = Decision(
        model=name,
        run_id=to_run,
        action=ROLLBACK,
        promoted=True,
        reason=f"rolled back from {current['run_id']}",
        candidate_score=score,
        current_run=current["run_id"],
        current_score=current.get("score"),
        model_url=model_url,
    )
    _record(store, decision, run_url)
    return decision


def current_model_url(store: str, name: str) -> str:
    """The promoted model file of ``name`` (for scoring with "the current model")."""
    current = read_current(store, name)
    if current is None:
        raise PromotionError(f"no model named {name!r} in {store} (nothing was promoted yet)")
    return current["model_url"]


def decision_markdown(decision: dict) -> str:
    """The promotion artifact: the verdict, both scores and where they come from."""

    def fmt(v):
        return "—" if v is None else f"{v:.4f}"

    verdict = "promoted" if decision["promoted"] else "not promoted"
    lines = [
        f"# Model `{decision['model']}`: run `{decision['run_id']}` {verdict}",
        "",
        f"{decision['reason']}",
        "",
        "| | run | accuracy |",
        "|---|---|---|",
        f"| this run | `{decision['run_id']}` | **{fmt(decision['candidate_score'])}** |",
        f"| current model | `{decision['current_run'] or '—'}` | {fmt(decision['current_score'])} |",
        "",
        f"Both scored on the {decision.get('images')} images of this run's {decision.get('split')} split.",
    ]
    if decision.get("current_trained_on"):
        lines.append(
            f"\nNote: the current model trained on {decision['current_trained_on']} of them, "
            f"so its score is optimistic."
        )
    return "\n".join(lines)
