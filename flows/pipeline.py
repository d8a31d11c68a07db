"""The retrain flow: MATLAB's "Retrain Neural Network to Classify New Images", step by step.

unzip -> index (+ montage) -> split -> train (its own flow) -> evaluate -> publish
-> validate engines -> promote [-> batch predict (flows/score.py) when given a folder to score]
"""

from __future__ import annotations

import time
import traceback
from dataclasses import replace

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from retrain.flows.artifacts import flow_run_ui_url
from retrain.flows.train import train_flow
from retrain.tasks import storage
from retrain.tasks.datastore import IndexRecord, adopt_index, index_dataset, materialize, split_stage
from retrain.tasks.engine_gate import validate_run
from retrain.tasks.evaluation import evaluate_run
from retrain.tasks.explain import explain_run
from retrain.tasks.label_issues import find_run_label_issues
from retrain.tasks.promotion import decision_markdown, model_name_for, promote_run, unjudged_run
from retrain.tasks.reports import jpeg_markdown, png_markdown, run_summary_markdown
from retrain.tasks.request import DEFAULTS, RunRequest, check_store_names
from retrain.tasks.runs import STATUS_FAILED, RunConfig, lock_run, publish_run, start_run, update_run
from retrain.tasks.samples import ensure_sample_dataset
from retrain.tasks.scoring.layout import check_output

unzip = task(materialize, name="unzip")
index = task(index_dataset, name="index")
adopt = task(adopt_index, name="adopt-index")
split = task(split_stage, name="split")
evaluate = task(evaluate_run, name="evaluate")
explain = task(explain_run, name="explain")
find_label_issues = task(find_run_label_issues, name="label-issues")
publish = task(publish_run, name="publish")
validate = task(validate_run, name="validate engines")


@flow(name="retrain")
def retrain_flow(
    data: str | None = None,
    store: str | None = None,
    network: str = DEFAULTS.network,
    weights: str = DEFAULTS.weights,
    mode: str = DEFAULTS.mode,
    split_fractions: str = DEFAULTS.split_fractions,
    options: dict | None = None,
    augmentation: dict | None = None,
    run_id: str | None = None,
    resume: bool = True,
    progress: bool = False,
    train_deployment: str | None = None,
    model_name: str | None = None,
    promote: bool = True,
    allow_class_change: bool = False,
    score_folder: str | None = None,
    score_out: str | None = None,
    labels: str | None = None,
    split_seed: int | None = None,
    shared_features: dict | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    label_issues: str = "find",
    validate_engines: bool = True,
) -> dict:
    """Retrain ``network`` on the images in ``data`` (a zip or a folder of class folders,
    any fsspec URL; the generated sample set when None). Returns the run summary.

    ``network`` ... ``augmentation``: the run's choices (:class:`tasks.request.RunRequest`,
    whose defaults these are; ``options`` are training options such as ``{"max_epochs": 5}``).
    ``train_deployment`` ("flow/deployment", e.g. ``train/gpu``): run the train step as a
    flow run of that deployment (a GPU work pool) and wait for it; in process when None.
    ``promote``: pass the model through the promotion gate of ``model_name`` (default: the
    data set's name and a key of its classes), see :mod:`tasks.promotion`; across a change
    of classes only with ``allow_class_change``. A rerun of a run that published its model
    but died before the gate finishes that run instead of training a new one.
    ``validate_engines``: validate the published model's engines on the run's images
    (tasks/engine_gate.py), so that scoring it only reads the verdict; the summary's
    ``engines`` says which passed and which one ``auto`` uses. An experiment validates only
    the run it promotes (flows/experiment.py).
    ``score_folder``: end with a batch-predict step that scores that folder with the new model
    (:mod:`flows.score`) into ``score_out`` (default ``<run>/scores``).
    ``labels``: a CSV or parquet label table (path, label[, split]) instead of class folders;
    its relative paths start at ``data`` (default: the table's folder).
    ``split_seed``: draw the split from this seed instead of the training seed (an experiment
    keeps one split for all its seeds). ``shared_features``: ``{"folder", "seed"}`` of a
    feature cache shared with other runs (tasks/feature_sharing.py).
    ``dask_address`` (a scheduler) or ``dask_workers`` (a local cluster of that many
    processes): prepare the image shards and compute transfer mode's features on Dask
    (tasks/training/cluster.py); in the training process when neither.
    ``label_issues``: "find" (label_issues.csv and label-issues.png, tasks/label_issues.py),
    "exclude" (and train without the flagged images) or "off"."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = storage.absolute(store or storage.default_store())
    data, train_deployment = data or None, train_deployment or None  # "" from a deployment = unset
    check_store_names(run_id=run_id, model_name=model_name)
    if score_folder and score_out:  # a scores folder that is not the job's: refused before training
        check_output(storage.absolute(score_out), storage.absolute(score_folder))
    request = RunRequest(network, weights, mode, split_fractions, options or {}, augmentation or {})
    checked = request.check(fetch_weights=train_deployment is None)  # the weights are the GPU pool's business
    checked = replace(checked, label_issues=label_issues)
    if labels:
        labels = storage.absolute(labels)
        data = data or labels.rsplit("/", 1)[0]  # the table's folder
    named_after = data  # the default model name's data set (None: the sample set)
    if data is None:
        data = ensure_sample_dataset(store)
        logger.info("no data given: using the generated sample set %s", data)
    data = storage.absolute(data)

    dataset_url = unzip(data, store)
    indexed = index(dataset_url, store, labels)  # first: the run is bound to the data's content, not its URL
    config = _with_data(checked, data, dataset_url, labels, split_seed, shared_features, indexed.content)
    after = dict(
        store=store,
        model_name=model_name,
        named_after=named_after,
        promote=promote,
        allow_class_change=allow_class_change,
        score_folder=score_folder,
        score_out=score_out,
        progress=progress,
        validate_engines=validate_engines,
    )
    unjudged = unjudged_run(store, config.fingerprint()) if promote and resume and not run_id else None
    unscored = _unscored_run(store, config.fingerprint()) if score_folder and resume and not run_id else None
    unfinished = unjudged or unscored
    if not unfinished and validate_engines and resume and not run_id:  # e.g. --no-promote, killed while validating
        unfinished = _published_without(store, config.fingerprint(), "engines", "validate_engines")
    if unfinished:
        return _finish_published(unfinished, started, after)
    run_url, lock = start_run(store, config, run_id=run_id, resume=resume)  # refused while another writes it
    cluster = {"address": dask_address or None, "workers": dask_workers or None}
    try:
        # recorded first: a rerun finishes what a kill prevented (promotion, validation)
        update_run(run_url, promote=promote, validate_engines=validate_engines)
        indexed, trained, metrics, model_url, issues = _run_stages(
            run_url, indexed, config, train_deployment, progress, cluster
        )
        summary = _summary(run_url, model_url, config, indexed, trained, metrics, time.perf_counter() - started)
        summary.update({k: v for k, v in issues.items() if k.startswith("label_issues")})
        summary_url = storage.RunLayout(run_url).summary
        storage.write_json(summary_url, summary)
        publish_artifacts(summary, metrics, run_url, indexed.montage)
        _after_publishing(summary, **after)
        summary["seconds"] = time.perf_counter() - started  # the whole flow, validation, promotion and scoring included
        storage.write_json(summary_url, summary)  # what became of its model too
        return summary
    finally:
        lock.release()


def _finish_published(run_url: str, started: float, after: dict) -> dict:
    """The rerun of a run that published its model but died before its engines were
    validated, before the promotion gate or during its batch-predict step: the steps after
    publishing, under the run's lock, without training anew."""
    lock = lock_run(run_url).acquire()
    try:
        summary_url = storage.RunLayout(run_url).summary
        summary = storage.read_json(summary_url)
        get_run_logger().info("run %s published its model but did not finish: finishing it", summary["run_id"])
        _after_publishing(summary, **after)
        summary["seconds"] = time.perf_counter() - started  # this rerun's
        storage.write_json(summary_url, summary)
        return summary
    finally:
        lock.release()


def _after_publishing(
    summary: dict,
    store: str,
    model_name: str | None,
    named_after: str | None,
    promote: bool,
    allow_class_change: bool,
    score_folder: str | None,
    score_out: str | None,
    progress: bool,
    validate_engines: bool = True,
) -> None:
    """The validation of the published model's engines when asked (first: a promoted model
    then has its verdict when anyone scores it), its promotion (as model ``model_name``, default
    :func:`tasks.promotion.model_name_for` the data set ``named_after`` and the run's classes)
    and the batch-predict step (``score_folder`` into ``score_out``, default
    ``<run>/scores``), the last two when asked for; their outcomes go into ``summary``."""
    if validate_engines and "engines" not in summary:
        summary["engines"] = validate_step(summary["run"])
    # A rerun finishing the batch-predict step keeps the decision made before it.
    promote = promote and "promotion" not in summary
    promote_as = (model_name or model_name_for(named_after, summary["classes"])) if promote else None
    if promote_as and not summary["test_images"]:
        # The gate compares models on held-out images: a split with neither a test nor a
        # validation part (--split 1,0,0) gives it none, so the run publishes unjudged.
        summary["promotion"] = {
            "model": promote_as,
            "run_id": summary["run_id"],
            "promoted": False,
            "reason": "the split holds out no images (no test or validation part) to judge the model on",
        }
    elif promote_as:
        summary["promotion"] = promotion_gate(store, promote_as, summary["run"], allow_class_change)
    if score_folder:
        out = score_out or storage.RunLayout(summary["run"]).scores
        update_run(summary["run"], score_out=out)  # until summary.json has "scores": see _unscored_run
        summary["scores"] = _score(summary["model"], score_folder, store, progress, out)


def _unscored_run(store: str, fingerprint: str) -> str | None:
    """The newest run with this fingerprint when it published its model and began its
    batch-predict step, but its summary holds no scores: it was interrupted while scoring, and
    the same command is to finish that job in that run (its parts are kept), not train anew."""
    return _published_without(store, fingerprint, "scores", "score_out")


def _published_without(store: str, fingerprint: str, outcome: str, asked: str) -> str | None:
    """The newest run with this fingerprint when it published its model, its run record says
    ``asked`` (it went on to that step), and its summary holds no ``outcome`` of the step: it
    died before the step finished, and the same command is to finish it, not train anew. A
    run published before the flow asked for that step (no ``asked``) is finished as it is."""
    from retrain.tasks.runs import STATUS_COMPLETED, list_runs

    same = [r for r in list_runs(store, check_writers=False) if r.get("fingerprint") == fingerprint]
    if not same or same[-1].get("status") != STATUS_COMPLETED or not same[-1].get(asked):
        return None
    layout = storage.StoreLayout(store).run(same[-1]["run_id"])
    if not storage.exists(layout.summary) or outcome in storage.read_json(layout.summary):
        return None
    return layout.url


def _with_data(
    checked: RunConfig,
    data: str,
    dataset_url: str,
    labels: str | None,
    split_seed: int | None,
    shared_features: dict | None,
    content: str,
) -> RunConfig:
    """The checked request's configuration with its data (a resumed run must ask for the
    same, on the same images: ``content``, their key)."""
    return replace(
        checked,
        data=data,
        dataset=dataset_url,
        extra={
            **({"labels": labels, "labels_sha256": storage.sha256_of(labels)} if labels else {}),
            **({"split_seed": split_seed} if split_seed is not None else {}),
            **({"shared_features": shared_features} if shared_features else {}),
        },
        content=content,
    )


def _score(model_url: str, folder: str, store: str, progress: bool, out: str) -> str:
    """The batch-predict step (a subflow): scores ``folder`` into ``out``; returns ``out``."""
    from retrain.flows.score import score_flow

    return score_flow(model=model_url, images=folder, store=store, progress=progress, out=out)["output"]


def _summary(
    run_url: str,
    model_url: str,
    config: RunConfig,
    indexed: IndexRecord,
    trained: dict,
    metrics: dict,
    seconds: float,
) -> dict:
    """The run's summary.json (and what ``retrain run`` prints)."""
    return {
        "run_id": storage.RunLayout(run_url).run_id,
        "run": run_url,
        "model": model_url,
        "data": config.data,
        "network": config.network,
        "mode": config.mode,
        "weights_origin": trained["weights_origin"],
        "classes": indexed.classes,
        "counts": indexed.counts,
        "skipped": indexed.skipped,
        "test_accuracy": metrics["test_accuracy"],
        "val_accuracy": trained["val_accuracy"],
        "test_images": metrics["test_images"],
        "iterations": trained["iterations"],
        "epochs": trained["epochs"],
        "resumed_from": trained["resumed_from"],
        "device": trained["device"],
        "feature_engine": trained.get("feature_engine"),  # transfer mode: what computed the body's features
        "options": config.options.to_dict(),
        "seconds": seconds,
        "ui_url": flow_run_ui_url(),
    }


def _run_stages(
    run_url: str,
    indexed: IndexRecord,
    config: RunConfig,
    train_deployment: str | None,
    progress: bool,
    cluster: dict | None = None,
) -> tuple[IndexRecord, dict, dict, str, dict]:
    """index (``indexed``, taken into the run folder) -> split -> [label issues, excluded]
    -> train -> [label issues] -> evaluate -> explain -> publish; a failure marks the run
    failed (and is raised). Returns the index record, training.json, metrics.json, the model
    URL and what the label-issues step found."""
    logger = get_run_logger()
    run_name = storage.RunLayout(run_url).run_id
    logger.info("run %s in %s", run_name, run_url)
    try:
        indexed = adopt(indexed, run_url, config.options.seed)
        logger.info(
            "%d classes: %s; %d files skipped",
            len(indexed.classes),
            ", ".join(f"{c} ({n})" for c, n in indexed.counts.items()),
            indexed.skipped,
        )
        split(run_url, config.split, config.split_seed)
        issues = label_issues_step(run_url, exclude=True) if config.label_issues == "exclude" else {}
        if train_deployment:
            trained = train_on_deployment(train_deployment, run_url, cluster)
        else:
            trained = train_flow(run_url, progress=progress, cluster=cluster)
        if config.label_issues == "find":
            issues = label_issues_step(run_url, trained=True)
        logger.info("evaluating the trained network on the held-out images")  # each step past ~2 s said first
        metrics = evaluate(run_url)
        explain_step(run_url)
        return indexed, trained, metrics, publish(run_url), issues
    except BaseException as exc:
        try:
            update_run(
                run_url,
                status=STATUS_FAILED,
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc))[-20000:],  # the record keeps the details
            )
        except Exception as record_error:  # the store may be what failed: keep the first error
            logger.warning("could not mark run %s failed: %s", run_name, record_error)
        raise


def explain_step(run_url: str) -> None:
    """mistakes.png and gradcam.png; an explanation that fails costs the run nothing."""
    get_run_logger().info("explaining: the top losses and Grad-CAM maps")
    try:
        explain(run_url)
    except Exception as exc:  # e.g. an architecture without a spatial feature map
        get_run_logger().warning("no explanations for this run: %s: %s", type(exc).__name__, exc)


def validate_step(run_url: str) -> dict:
    """The "validate engines" task with its line before and after; a validation that fails
    costs the run nothing (its model is then validated on first use, as one published before
    this step was)."""
    logger = get_run_logger()
    # Said first: exports, int8 calibration and every engine on the run's images take seconds.
    logger.info("validating engines: every engine this machine offers against float32 torch on the run's images")
    try:
        engines = validate(run_url)
    except Exception as exc:
        logger.warning("engines not validated (scoring validates them on first use): %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    logger.info(
        "engines: %s passed%s; auto uses %s (%s) (%.1f s)",
        ", ".join(engines["passed"]),
        f", {', '.join(engines['failed'])} failed" if engines["failed"] else "",
        engines["auto"],
        engines["reason"],
        engines["seconds"],
    )
    return engines


def label_issues_step(run_url: str, exclude: bool = False, trained: bool = False) -> dict:
    """label_issues.csv and label-issues.png (tasks/label_issues.py), before training when
    ``exclude`` leaves the flagged images out of it; a step that fails costs the run nothing
    (when excluding, the model then trains on every image)."""
    logger = get_run_logger()
    logger.info("label issues: looking for likely wrong labels (cleanlab)")
    try:
        found = find_label_issues(run_url, exclude=exclude, trained=trained)
    except Exception as exc:
        logger.warning("no label issues for this run: %s: %s", type(exc).__name__, exc)
        return {}
    if found["skipped"]:
        logger.info("%s", found["skipped"])
    else:
        logger.info(
            "label issues: %d likely wrong labels among the training and validation images (%.1f s)%s",
            found["label_issues"],
            found["label_issues_seconds"],
            f"; {found['label_issues_excluded']} left out of training" if exclude else "",
        )
    return found


@task(name="promote")
def promotion_gate(store: str, name: str, run_url: str, allow_class_change: bool = False) -> dict:
    """The promotion gate (tasks.promotion) with its decision shown as an artifact."""
    decision = promote_run(store, name, run_url, allow_class_change).to_dict()
    get_run_logger().info(
        "model %s: run %s %s (%s)",
        name,
        decision["run_id"],
        "promoted" if decision["promoted"] else "not promoted",
        decision["reason"],
    )
    create_markdown_artifact(
        decision_markdown(decision), key="model-promotion", description=f"Promotion decision for model {name}"
    )
    return decision


def train_on_deployment(name: str, run_url: str, cluster: dict | None = None) -> dict:
    """The train step as a flow run of deployment ``name`` (e.g. ``train/gpu`` on a GPU work
    pool); waits for it. Nothing travels through Prefect results: the child reads the run
    folder by URL and writes trained.pt and training.json there, so the store must be one both
    machines reach (S3 in a real deployment)."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    if "://" not in run_url:
        logger.warning(
            "training on deployment %s with a local store (%s): its worker must see the same filesystem", name, run_url
        )
    parameters = {"run_url": run_url, **({"cluster": cluster} if cluster and any(cluster.values()) else {})}
    child = run_deployment(name, parameters=parameters, timeout=None, poll_interval=3)
    state = child.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"training deployment {name!r}: flow run {child.name} ({child.id}) ended "
            f"{state.name if state else 'with no state'}"
            f"{': ' + state.message if state and state.message else ''}"
        )
    logger.info("trained by %s in flow run %s", name, child.name)
    return storage.read_json(storage.RunLayout(run_url).training)


def publish_artifacts(summary: dict, metrics: dict, run_url: str, montage_url: str) -> None:
    """What a person opening the run in the Prefect UI wants to see."""
    create_markdown_artifact(run_summary_markdown(summary), key="retrain-summary", description="Retrain run summary")
    create_table_artifact(
        [{"class": c, **{k: round(v, 4) for k, v in m.items()}} for c, m in metrics["per_class"].items()],
        key="per-class-metrics",
        description="Per-class test metrics",
    )
    layout = storage.RunLayout(run_url)
    # Photos as JPEG, plots as PNG: ~0.5 MB in all instead of 2-3.5 MB, under Prefect's event
    # size limit (tasks.reports.jpeg_markdown). The store keeps the PNG files.
    plots = [
        ("Sample images", montage_url, jpeg_markdown),
        ("Training progress", layout.progress, png_markdown),
        ("Confusion chart", metrics["confusion_chart"], png_markdown),
        ("Top losses", layout.mistakes, jpeg_markdown),
        ("Grad-CAM", layout.gradcam, jpeg_markdown),
        ("Label issues", layout.label_issues_plot, jpeg_markdown),
    ]
    create_markdown_artifact(
        "\n\n".join(f"## {title}\n\n{embed(url, title)}" for title, url, embed in plots if storage.exists(url)),
        key="retrain-plots",
        description="Montage, training progress, confusion chart, top losses, Grad-CAM, label issues",
    )
