"""The promotion gate: which run's model is *the* model of a name, and the record of why.

Store layout (next to ``runs/``)::

    models/<name>/current.json                      the promoted run: run id, model URL, score
    models/<name>/history/<utc-time>-<run-id>.json  one record per decision (promote, keep, rollback)
    models/<name>/.lock                             held while a decision is taken
    runs/<run-id>/promotion.json                    the decision taken on that run

A new run replaces the current model only if it is at least as good on the *same* held-out
images that *neither* model trained on: the new run's test split (its validation split when
it has no test part) less the images the current model trained or validated on, matched by
content (the index's sha1 ``digest``), since a new version of a data set, or a copy of it,
puts the same images under other paths. The new run's accuracy on them is the one its
evaluation recorded (metrics.json) when none was left out; else, like the current model's,
it is evaluated here, with the same code, on the same images. With no current model the new
run is promoted; a current model trained on other classes cannot be compared, so the new run
is kept out unless ``allow_class_change``. One decision on a name at a time (a lock): two
runs promoting at once both get a decision in the history, one after the other, and
current.json is the result of the second. Every file is written atomically
(:func:`tasks.storage.write_json`), and each decision is its own file, so the history never
needs a read-modify-write (object stores have no append).

current.json is the one truth of what is current. It holds the decision that made it
current, and the runs that were current before it (a stack: ``rollback`` pops it), and it
is written before that decision's other records, so a kill between them never shows a
promotion that did not happen; :func:`history` reads a decision whose own file the kill
prevented from current.json, and the next decision on the model writes that file.

Plain functions; :mod:`flows.pipeline` wraps :func:`promote_run` as a Prefect task and shows
the decision as an artifact. ``retrain models`` and ``retrain rollback`` call them directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from retrain.tasks import storage

METRIC = "accuracy"
LOCK_WAIT_S = 900.0  # a promotion waits this long for another one on the same model (it evaluates a model)
PROMOTE, KEEP, ROLLBACK = "promote", "keep", "rollback"


class PromotionError(ValueError):
    """A model or run named for promotion or rollback does not exist or cannot be used."""


# ---- names and places ----------------------------------------------------------------------


def model_name_for(data: str | None, classes: Iterable[str]) -> str:
    """The default model name: the data set's name and a key of its sorted class names
    (``.../MerchData.zip`` -> ``MerchData-<8 hex>``; the generated sample set when no data is
    given). A folder's name alone says little (``.../train``): two data sets with other
    classes get two models, while a new version of one data set, same classes, is judged
    against the model of the one before (a key of its content would make every version a
    model of its own, with nothing to be compared with)."""
    if not data:
        from retrain.tasks.samples import SAMPLE_NAME

        base = SAMPLE_NAME
    else:
        base = posixpath.basename(str(data).rstrip("/"))
        if base.lower().endswith(".zip"):
            base = base[:-4]
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"
    key = hashlib.sha1("\n".join(sorted(set(classes))).encode()).hexdigest()[:8]
    return check_name(f"{base}-{key}")


def run_model_name(data: str | None, run_url: str) -> str:
    """:func:`model_name_for` the published run at ``run_url`` (its summary's classes)."""
    return model_name_for(data, storage.read_json(storage.RunLayout(run_url).summary)["classes"])


def check_name(name: str) -> str:
    return storage.check_name(name, "model name", PromotionError)


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
    current_trained_on: int | None = None  # held-out images the current model trained on, left out (by content)
    held_out: int | None = None  # the images of that split, before those were left out
    model_url: str | None = None
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def to_dict(self) -> dict:
        return asdict(self)


def _history_url(layout: storage.ModelLayout, record: dict) -> str:
    """A decision's own file: named by its time and run, so that the decision kept in
    current.json names the file it belongs in."""
    when = datetime.fromisoformat(record["decided_at"]).strftime("%Y%m%dT%H%M%S%fZ")
    return storage.join(layout.history, f"{when}-{record['run_id']}.json")


def read_current(store: str, name: str) -> dict | None:
    url = model_layout(store, name).current
    return storage.read_json(url) if storage.exists(url) else None


def history(store: str, name: str) -> list[dict]:
    """Every decision on ``name``, oldest first; the current model's decision too when a kill
    kept it from its own file (it is in current.json, written first)."""
    layout = model_layout(store, name)
    records = (
        [storage.read_json(u) for u in storage.list_files(layout.history) if u.endswith(".json")]
        if storage.exists(layout.history)
        else []
    )
    made_current = (read_current(store, name) or {}).get("decision")
    if made_current and not storage.exists(_history_url(layout, made_current)):
        records.append(made_current)
    return sorted(records, key=lambda r: r["decided_at"])


def list_models(store: str) -> list[dict]:
    """Each model name in the store with its current run and its history."""
    root = storage.StoreLayout(store).models
    if not storage.exists(root):
        return []
    fs, path = storage.filesystem(root)
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))
    return [{"model": n, "current": read_current(store, n), "history": history(store, n)} for n in names]


def _record(store: str, decision: Decision, run_url: str | None, stack: list[str]) -> None:
    """current.json first for a promotion, holding the decision and ``stack`` (the runs
    current before it, oldest first); then the decision's history file and the run folder's
    promotion.json (:func:`_finish_record`). A kill before current.json leaves no trace of
    the promotion; one after it, a promotion that did happen. Called with the model's lock
    held (:func:`_model_lock`)."""
    record = decision.to_dict()
    layout = model_layout(store, decision.model)
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
                "stack": stack,
                "decision": record,
            },
        )
    _finish_record(layout, record, run_url)


def _finish_record(layout: storage.ModelLayout, record: dict, run_url: str | None) -> None:
    """The decision's history file and the run's promotion.json, each unless already written
    (the current model's decision again after a kill cut its recording short)."""
    history_url = _history_url(layout, record)
    history_existed = storage.exists(history_url)
    if not history_existed:
        storage.write_json(history_url, record)
    if run_url is not None and record["action"] != ROLLBACK:
        run_record = storage.RunLayout(run_url).promotion
        if not (history_existed and storage.exists(run_record)):
            storage.write_json(run_record, record)


def _finish_current(store: str, name: str, current: dict | None) -> None:
    """What a kill left unwritten of the current model's decision (before any new one)."""
    if current is not None and current.get("decision"):
        _finish_record(model_layout(store, name), current["decision"], current.get("run"))


def _stack(current: dict) -> list[str]:
    """The runs that were current before ``current``, oldest first (a current.json written
    before the stack was kept knows only the one before it)."""
    if "stack" in current:
        return list(current["stack"])
    return [current["previous"]] if current.get("previous") else []


@contextlib.contextmanager
def _model_lock(store: str, name: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """One decision on a model name at a time: reading current.json, comparing and writing
    the decision happen under an exclusive lock on ``models/<name>/`` (the store's
    :class:`~retrain.tasks.storage.FolderLock`: ``flock`` on a local disk, released by the
    kernel even when the holder is killed; a lease on an object store). A second promotion
    waits for the first."""
    folder = model_layout(store, name).url

    def refusal(who: str) -> PromotionError:
        return PromotionError(
            f"model {name!r}: another promotion or rollback has held {folder} for over {wait_s:.0f} s; try again"
        )

    with storage.FolderLock(folder, wait_s=wait_s, refusal=refusal):
        yield


# ---- both models on the same images ----------------------------------------------------------


def held_out_rows(run_url: str):
    """The new run's held-out images (:func:`tasks.datastore.held_out`, the rule evaluation
    uses). Returns (rows, split name)."""
    from retrain.tasks.datastore import held_out

    rows, which = held_out(storage.read_parquet(storage.RunLayout(run_url).split))
    if not len(rows):
        raise PromotionError(f"run {run_url} has no test or validation images to compare models on")
    return rows, which


def content_keys(rows) -> list[str]:
    """Each row's image by content: the index's sha1 of the file (its ``digest`` column), or
    the same sha1 read from the file for rows indexed without it."""
    if "digest" in rows.columns and rows["digest"].notna().all():
        return [str(d) for d in rows["digest"]]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(_file_key, rows["path"]))


def _file_key(url: str) -> str:
    try:
        return hashlib.sha1(storage.read_bytes(url)).hexdigest()
    except FileNotFoundError:  # gone since: known by its path only
        return f"path:{url}"


def trained_on(run_url: str | None) -> set[str] | None:
    """The content keys (:func:`content_keys`) of the images the run at ``run_url`` trained
    or validated on (None: unknown, no split recorded)."""
    split_url = storage.RunLayout(run_url).split if run_url else None
    if not split_url or not storage.exists(split_url):
        return None
    split = storage.read_parquet(split_url)
    return set(content_keys(split[split["split"].isin(["train", "val"])]))


def unseen_by(run_url: str | None, rows):
    """``rows`` less the images the run at ``run_url`` trained or validated on, by content;
    returns (those rows, how many were left out; None: unknown, none left out)."""
    seen = trained_on(run_url)
    if seen is None:
        return rows, None
    keep = [key not in seen for key in content_keys(rows)]
    return rows[keep], len(rows) - sum(keep)


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


def promote_run(store: str, name: str, run_url: str, allow_class_change: bool = False) -> Decision:
    """The gate: make ``run_url``'s model current for ``name`` if it scores at least as well
    as the current one on the run's held-out images that neither trained on (or if there is
    none; across a change of classes only with ``allow_class_change``). Records the decision
    either way and returns it. Atomic: one decision on ``name`` at a time. For the run that
    is already current (a rerun after a kill cut its recording short) it finishes that
    recording and returns the decision that made it current."""
    check_name(name)
    layout = storage.RunLayout(run_url)
    if not storage.exists(layout.model):
        raise PromotionError(f"run {layout.run_id} has no published model ({layout.model})")
    rows, split_name = held_out_rows(run_url)
    with _model_lock(store, name):
        current = read_current(store, name)
        _finish_current(store, name, current)
        if current is not None and current["run_id"] == layout.run_id and current.get("decision"):
            return Decision(**current["decision"])
        base = dict(
            model=name,
            run_id=layout.run_id,
            split=split_name,
            images=len(rows),
            held_out=len(rows),
            model_url=layout.model,
            current_run=current["run_id"] if current else None,
        )
        decision = _decide(base, current, run_url, rows, allow_class_change)
        _record(store, decision, run_url, (_stack(current) + [current["run_id"]]) if current else [])
    return decision


def _decide(base: dict, current: dict | None, run_url: str, rows, allow_class_change: bool) -> Decision:
    """Compare the candidate with the current model (evaluated here on the same rows)."""
    from retrain.tasks.model_file import read_model_record

    if current is None:
        score = candidate_accuracy(run_url, rows)
        return Decision(
            **base, candidate_score=score, action=PROMOTE, promoted=True, current_score=None, reason="no current model"
        )
    if current["run_id"] == base["run_id"]:  # a current.json written before it kept its decision
        score = candidate_accuracy(run_url, rows)
        reason = "this run is already the current model"
        return Decision(
            **base, candidate_score=score, action=PROMOTE, promoted=True, current_score=score, reason=reason
        )
    current_classes = read_model_record(current["model_url"])["classes"]
    classes = read_model_record(base["model_url"])["classes"]
    if sorted(current_classes) != sorted(classes):
        changed = (
            f"the classes changed (current model {current['run_id']}: {', '.join(current_classes)}; "
            f"this run: {', '.join(classes)}); the models cannot be compared"
        )
        reason = (
            f"{changed}: promoted, as asked (--allow-class-change)"
            if allow_class_change
            else f"{changed}: kept out; pass --allow-class-change to promote it anyway"
        )
        return Decision(
            **base,
            candidate_score=candidate_accuracy(run_url, rows),
            action=PROMOTE if allow_class_change else KEEP,
            promoted=allow_class_change,
            current_score=None,
            reason=reason,
        )
    unseen, left_out = unseen_by(current.get("run"), rows)
    base.update(images=len(unseen), current_trained_on=left_out)
    if not len(unseen):
        reason = (
            f"all {len(rows)} held-out images of this run are training images of the current model "
            f"{current['run_id']} (by content): the models cannot be compared; kept out "
            f"(`retrain rollback {base['model']} --to {base['run_id']} --force` makes it current)"
        )
        return Decision(**base, candidate_score=None, action=KEEP, promoted=False, current_score=None, reason=reason)
    candidate = candidate_accuracy(run_url, unseen)
    score = accuracy_on(current["model_url"], unseen)
    better = candidate >= score
    relation = ">=" if better else "<"
    on = f" on the {len(unseen)} held-out images neither trained on ({left_out} left out)" if left_out else ""
    return Decision(
        **base,
        candidate_score=candidate,
        action=PROMOTE if better else KEEP,
        promoted=better,
        current_score=score,
        reason=f"{candidate:.4f} {relation} {score:.4f} of the current model {current['run_id']}{on}",
    )


def rollback(store: str, name: str, to_run: str | None = None, force: bool = False) -> Decision:
    """Make an earlier run current again: ``to_run``, or the run that was current before the
    current one (popped from current.json's stack, so rollbacks walk back through what was
    current, not through the promotion history). ``to_run`` must be a run of this store with
    a published model, and one that was current before: a run the gate kept out, or one that
    never went through it, only with ``force``."""
    with _model_lock(store, name):
        current = read_current(store, name)
        if current is None:
            raise PromotionError(f"no model named {name!r} in {store} (nothing was promoted yet)")
        _finish_current(store, name, current)
        stack = _stack(current)
        if to_run is None:
            if not stack:
                raise PromotionError(
                    f"model {name!r}: no run was current before the current run {current['run_id']}; "
                    "name one with --to RUN_ID"
                )
            to_run, stack = stack[-1], stack[:-1]
        else:
            stack = [*stack, current["run_id"]]
        layout = storage.StoreLayout(store).run(to_run)
        if not storage.exists(layout.model):
            raise PromotionError(f"run {to_run!r} has no published model in {store}")
        never = _never_current(store, name, to_run)
        if never and not force:
            raise PromotionError(
                f"model {name!r}: run {to_run} was never current: {never}; pass --force to make it current anyway"
            )
        score = storage.read_json(layout.metrics).get("test_accuracy") if storage.exists(layout.metrics) else None
        decision = Decision(
            model=name,
            run_id=to_run,
            action=ROLLBACK,
            promoted=True,
            reason=f"rolled back from {current['run_id']}" + (f" (forced: {never})" if never else ""),
            candidate_score=score,
            current_run=current["run_id"],
            current_score=current.get("score"),
            model_url=layout.model,
        )
        _record(store, decision, layout.url, stack)
    return decision


def _never_current(store: str, name: str, run_id: str) -> str | None:
    """Why ``run_id`` was never the current model of ``name`` (None: it was)."""
    decisions = [h for h in history(store, name) if h["run_id"] == run_id]
    if any(h["promoted"] for h in decisions):
        return None
    if decisions:
        return f"the promotion gate kept it out ({decisions[-1]['reason']})"
    return "it never went through this model's promotion gate"


def unjudged_run(store: str, fingerprint: str) -> str | None:
    """The newest run with this fingerprint (:meth:`tasks.runs.RunConfig.fingerprint`) when it
    published its model and asked for the gate but its summary holds no decision: its process
    died in between, and the same command is to finish it, not train a new run. None when
    there is none (that command then trains a new run, or resumes an unfinished one)."""
    from retrain.tasks.runs import STATUS_COMPLETED, list_runs

    same = [r for r in list_runs(store, check_writers=False) if r.get("fingerprint") == fingerprint]
    if not same or same[-1].get("status") != STATUS_COMPLETED or not same[-1].get("promote"):
        return None
    layout = storage.StoreLayout(store).run(same[-1]["run_id"])
    if not storage.exists(layout.summary) or "promotion" in storage.read_json(layout.summary):
        return None
    return layout.url


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
        f"Both scored on the {decision.get('images')} images of this run's {decision.get('split')} split"
        + (" that neither model trained on." if decision.get("current_trained_on") is not None else "."),
    ]
    if decision.get("current_trained_on"):
        lines.append(
            f"\n{decision['current_trained_on']} of its {decision.get('held_out')} {decision.get('split')} images "
            f"were left out: the current model trained on them (matched by content, not by path), "
            f"{decision.get('images')} remain."
        )
    return "\n".join(lines)
