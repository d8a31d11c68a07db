"""The promotion gate: which run's model is *the* model of a name, and the record of why.

Store layout (next to ``runs/``)::

    models/<name>/current.json                      the promoted run: run id, model URL, score
    models/<name>/history/<utc-time>-<run-id>.json  one record per decision (promote, keep, rollback)
    models/<name>/.lock                             held while a decision is taken
    runs/<run-id>/promotion.json                    the decision taken on that run

A new run replaces the current model only if it is at least as good on the *same* held-out
images: the new run's test split (its validation split when it has no test part). The new
run's accuracy on them is the one its evaluation recorded (metrics.json); the current model
is evaluated here, with the same code, on the same images. With no current model, or a
current model trained on other classes, the new run is promoted. One decision on a name at
a time (a lock): two runs promoting at once both get a decision in the history, one after
the other, and current.json is the result of the second. Every file is written atomically
(:func:`tasks.storage.write_json`), and each decision is its own file, so the history never
needs a read-modify-write (object stores have no append).

Plain functions; :mod:`flows.retrain` wraps :func:`promote_run` as a Prefect task and shows
the decision as an artifact. ``retrain models`` and ``retrain rollback`` call them directly.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from retrain.tasks import storage

METRIC = "accuracy"
LOCK_WAIT_S = 900.0  # a promotion waits this long for another one on the same model (it evaluates a model)
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


def model_layout(store: str, name: str) -> storage.ModelLayout:
    return storage.StoreLayout(store).model(check_name(name))


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
    url = model_layout(store, name).current
    return storage.read_json(url) if storage.exists(url) else None


def history(store: str, name: str) -> list[dict]:
    """Every decision on ``name``, oldest first."""
    root = model_layout(store, name).history
    if not storage.exists(root):
        return []
    return [storage.read_json(u) for u in storage.list_files(root) if u.endswith(".json")]


def list_models(store: str) -> list[dict]:
    """Each model name in the store with its current run and its history."""
    root = storage.StoreLayout(store).models
    if not storage.exists(root):
        return []
    fs, path = storage.filesystem(root)
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))
    return [{"model": n, "current": read_current(store, n), "history": history(store, n)} for n in names]


def _record(store: str, decision: Decision, run_url: str | None) -> None:
    """The decision in the model's history and in the run folder; current.json last, so a
    reader never sees a current model without the decision that made it current. Called
    with the model's lock held (:func:`_model_lock`)."""
    record = decision.to_dict()
    layout = model_layout(store, decision.model)
    storage.write_json(storage.join(layout.history, f"{_now_key()}-{decision.run_id}.json"), record)
    if run_url is not None and decision.action != ROLLBACK:
        storage.write_json(storage.RunLayout(run_url).promotion, record)
    if decision.promoted:
        storage.write_json(
            layout.current,
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


@contextlib.contextmanager
def _model_lock(store: str, name: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """One decision on a model name at a time: reading current.json, comparing and writing
    the decision happen under an exclusive lock on ``models/<name>/`` (scoring's
    :class:`JobLock`: ``flock`` on a local disk, released by the kernel even when the holder
    is killed; a lease on an object store). A second promotion waits for the first."""
    from retrain.tasks.scoring import JobLock, ScoringLockedError

    folder = model_layout(store, name).url
    try:
        lock = JobLock(folder, wait_s=wait_s).acquire()
    except ScoringLockedError:
        raise PromotionError(
            f"model {name!r}: another promotion or rollback has held {folder} for over {wait_s:.0f} s; try again"
        ) from None
    try:
        yield
    finally:
        lock.release()


# ---- both models on the same images ----------------------------------------------------------


def held_out_rows(run_url: str):
    """The new run's held-out images (:func:`tasks.datastore.held_out`, the rule evaluation
    uses). Returns (rows, split name)."""
    from retrain.tasks.datastore import held_out

    rows, which = held_out(storage.read_parquet(storage.RunLayout(run_url).split))
    if not len(rows):
        raise PromotionError(f"run {run_url} has no test or validation images to compare models on")
    return rows, which


def trained_on(run_url: str | None, paths: set[str]) -> int | None:
    """How many of ``paths`` the run at ``run_url`` trained or validated on (None: unknown)."""
    split_url = storage.RunLayout(run_url).split if run_url else None
    if not split_url or not storage.exists(split_url):
        return None
    split = storage.read_parquet(split_url)
    seen = set(split.loc[split["split"].isin(["train", "val"]), "path"])
    return len(seen & paths)


def accuracy_on(model_url: str, rows) -> float:
    """Accuracy of the model file at ``model_url`` on ``rows`` (columns path, label)."""
    from retrain.tasks.evaluation import evaluate_model
    from retrain.tasks.model_file import load_model_file

    result, _ = evaluate_model(load_model_file(model_url), rows)
    return result.accuracy


def candidate_accuracy(run_url: str, rows) -> float:
    """The run's own accuracy on its held-out ``rows``: evaluation measured it on exactly
    these images already (``metrics.json``); measured here only when that record is missing
    or counts other images."""
    layout = storage.RunLayout(run_url)
    if storage.exists(layout.metrics):
        metrics = storage.read_json(layout.metrics)
        if metrics.get("test_images") == len(rows) and metrics.get("test_accuracy") is not None:
            return float(metrics["test_accuracy"])
    return accuracy_on(layout.model, rows)


def promote_run(store: str, name: str, run_url: str) -> Decision:
    """The gate: make ``run_url``'s model current for ``name`` if it scores at least as well
    as the current one on the run's held-out images (or if there is none). Records the
    decision either way and returns it. Atomic: one decision on ``name`` at a time."""
    check_name(name)
    layout = storage.RunLayout(run_url)
    if not storage.exists(layout.model):
        raise PromotionError(f"run {layout.run_id} has no published model ({layout.model})")
    rows, split_name = held_out_rows(run_url)
    candidate = candidate_accuracy(run_url, rows)
    with _model_lock(store, name):
        current = read_current(store, name)
        base = dict(
            model=name,
            run_id=layout.run_id,
            candidate_score=candidate,
            split=split_name,
            images=len(rows),
            model_url=layout.model,
            current_run=current["run_id"] if current else None,
        )
        decision = _decide(base, current, candidate, rows)
        _record(store, decision, run_url)
    return decision


def _decide(base: dict, current: dict | None, candidate: float, rows) -> Decision:
    """Compare the candidate with the current model (evaluated here on the same rows)."""
    from retrain.tasks.model_file import read_model_record

    if current is None:
        return Decision(**base, action=PROMOTE, promoted=True, current_score=None, reason="no current model")
    if current["run_id"] == base["run_id"]:
        return Decision(
            **base,
            action=PROMOTE,
            promoted=True,
            current_score=candidate,
            reason="this run is already the current model",
        )
    current_classes = read_model_record(current["model_url"])["classes"]
    if sorted(current_classes) != sorted(read_model_record(base["model_url"])["classes"]):
        return Decision(
            **base,
            action=PROMOTE,
            promoted=True,
            current_score=None,
            reason=f"the classes changed (current model: {', '.join(current_classes)}); the models cannot be compared",
        )
    score = accuracy_on(current["model_url"], rows)
    better = candidate >= score
    relation = ">=" if better else "<"
    return Decision(
        **base,
        action=PROMOTE if better else KEEP,
        promoted=better,
        current_score=score,
        current_trained_on=trained_on(current.get("run"), set(rows["path"])),
        reason=f"{candidate:.4f} {relation} {score:.4f} of the current model {current['run_id']}",
    )


def rollback(store: str, name: str, to_run: str | None = None) -> Decision:
    """Make an earlier run current again: ``to_run``, or the run promoted before the current
    one. The target must be a run of this store with a published model."""
    with _model_lock(store, name):
        current = read_current(store, name)
        if current is None:
            raise PromotionError(f"no model named {name!r} in {store} (nothing was promoted yet)")
        to_run = to_run or _promoted_before(store, name, current["run_id"])
        layout = storage.StoreLayout(store).run(to_run)
        if not storage.exists(layout.model):
            raise PromotionError(f"run {to_run!r} has no published model in {store}")
        score = storage.read_json(layout.metrics).get("test_accuracy") if storage.exists(layout.metrics) else None
        decision = Decision(
            model=name,
            run_id=to_run,
            action=ROLLBACK,
            promoted=True,
            reason=f"rolled back from {current['run_id']}",
            candidate_score=score,
            current_run=current["run_id"],
            current_score=current.get("score"),
            model_url=layout.model,
        )
        _record(store, decision, layout.url)
    return decision


def _promoted_before(store: str, name: str, current_run: str) -> str:
    """The run promoted before ``current_run``, by the model's history."""
    promoted: list[str] = []
    for record in history(store, name):
        if record["action"] == PROMOTE and record["promoted"] and record["run_id"] not in promoted:
            promoted.append(record["run_id"])
    if current_run not in promoted or promoted.index(current_run) == 0:
        raise PromotionError(
            f"model {name!r}: no run was promoted before the current run {current_run}; name one with --to RUN_ID"
        )
    return promoted[promoted.index(current_run) - 1]


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
