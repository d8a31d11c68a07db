"""The ``retrain`` command.

``run`` is a Prefect flow (it shows in the UI); ``evaluate``, ``classify``, ``network`` and
``runs`` call the plain functions, so they answer in seconds without starting a Prefect API.
With ``--json`` the last line of stdout is one JSON object; without it, output is for people.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from typing import Any

# Quiet, offline-friendly Prefect defaults; the user's own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect's temporary local API takes 10-30 s to start on a small, busy machine; its default
# 20 s limit would fail the run before it begins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from retrain.tasks import storage  # noqa: E402
from retrain.tasks.datastore import DataSetError, index_images, materialize  # noqa: E402
from retrain.tasks.networks import (  # noqa: E402
    NETWORKS,
    ModelFileError,
    WeightsUnavailableError,
    build_network,
    get_spec,
    load_model_file,
    summarize,
)
from retrain.tasks.preprocessing import ImageDecodeError  # noqa: E402
from retrain.tasks.scoring import DEFAULT_MINI_BATCH_SIZE, DEFAULT_PARTITION_SIZE  # noqa: E402
from retrain.tasks.training.options import TrainingOptions  # noqa: E402

USER_ERRORS = (DataSetError, WeightsUnavailableError, ModelFileError, ImageDecodeError, FileNotFoundError, ValueError)


# What an option left at None means, for its help text.
_NONE_MEANS = {
    "initial_learn_rate": "per mode",
    "validation_patience": "never stop early",
    "feature_cache_views": "automatic",
}


def _option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainingOptions field: the dataclass stays the one place options live."""
    group = parser.add_argument_group("training options (MATLAB trainingOptions)")
    defaults = TrainingOptions()
    for f in fields(TrainingOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", bool):
            group.add_argument(flag, action="store_true", default=None, help=f"(default {default})")
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        group.add_argument(
            flag,
            type=kind,
            default=None,
            metavar=f.name.upper(),
            help=f"default {default}" if default is not None else f"default: {_NONE_MEANS[f.name]}",
        )


def _collect_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(TrainingOptions) if getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=None, help="store URL (default $RETRAIN_STORE or ./retrain-store)")
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    run = sub.add_parser("run", help="retrain a network on a data set (Prefect flow)")
    run.add_argument(
        "data",
        nargs="?",
        default=None,
        help="zip or folder of class folders, any fsspec URL (default: a generated sample set)",
    )
    run.add_argument("--network", default="squeezenet", choices=sorted(NETWORKS))
    run.add_argument(
        "--weights",
        default="default",
        help="default (the network's pretrained weights), none, or a state-dict file URL",
    )
    run.add_argument("--mode", default="transfer", choices=["transfer", "finetune", "scratch"])
    run.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions per label")
    run.add_argument("--no-reflect", action="store_true", help="no random horizontal reflection")
    run.add_argument("--max-translation", type=int, default=30, help="random X/Y translation, pixels")
    run.add_argument("--run-id", default=None, help="name the run (or resume that run)")
    run.add_argument(
        "--fresh", action="store_true", help="start a new run even if an unfinished run with the same settings exists"
    )
    run.add_argument(
        "--model-name", default=None, help="the model this run may be promoted to (default: the data set's name)"
    )
    run.add_argument("--no-promote", action="store_true", help="skip the promotion gate")
    run.add_argument(
        "--train-deployment",
        default=None,
        help="train as a flow run of this deployment (e.g. train/gpu) and wait for it",
    )
    run.add_argument("--score-folder", default=None, help="end by batch-scoring this folder with the new model")
    run.add_argument("--score-out", default=None, help="where the scores go (default <run>/scores)")
    common(run)
    _option_flags(run)

    evaluate = sub.add_parser(
        "evaluate", help="accuracy, per-class metrics and confusion of a model on labelled images"
    )
    evaluate.add_argument("model", help="model file URL or run id in the store")
    evaluate.add_argument("data", help="zip or folder of class folders")
    evaluate.add_argument("--chart", default=None, help="write the confusion chart PNG here")
    common(evaluate)

    classify = sub.add_parser("classify", help="label and score for one image")
    classify.add_argument("model", help="model file URL or run id in the store")
    classify.add_argument("image", help="image URL")
    common(classify)

    score = sub.add_parser(
        "score",
        help="batch-score a folder or list of images on Dask (Prefect flow); rerun with the same --out to resume",
    )
    score.add_argument("model", help="model file URL or run id in the store")
    score.add_argument(
        "images", help="folder of images (searched recursively) or list file of image URLs, any fsspec URL"
    )
    score.add_argument(
        "--out",
        default=None,
        help="output URL for the parts, scores.parquet and summary.json (default <store>/scores/<job-id>)",
    )
    score.add_argument(
        "--dask-address",
        default=None,
        help="scheduler of an existing Dask cluster, e.g. tcp://host:8786 (default: start a local one)",
    )
    score.add_argument("--workers", type=int, default=None, help="local cluster processes (default: one per core)")
    score.add_argument(
        "--mini-batch-size",
        type=int,
        default=DEFAULT_MINI_BATCH_SIZE,
        help=f"images per forward pass (default {DEFAULT_MINI_BATCH_SIZE})",
    )
    score.add_argument(
        "--top-k", type=int, default=None, help="labels and scores kept per image (default min(5, classes))"
    )
    score.add_argument(
        "--partition-size",
        type=int,
        default=DEFAULT_PARTITION_SIZE,
        help=f"images per Dask task and output part (default {DEFAULT_PARTITION_SIZE})",
    )
    common(score)

    network = sub.add_parser("network", help="list networks, or show one's summary")
    network.add_argument("name", nargs="?", help="network to summarise")
    network.add_argument("--classes", type=int, default=5, help="classes for the new head")
    network.add_argument("--weights", default="none", help="weights to load (default: none, architecture only)")
    common(network)

    runs = sub.add_parser("runs", help="list the runs in the store")
    common(runs)
    _deployment_parsers(sub, common)
    return parser


def _deployment_parsers(sub, common) -> None:
    """``deploy``, ``models`` and ``rollback``: deployments and the promotion gate."""
    from retrain.flows.deploy import placeholder_defaults

    deploy = sub.add_parser(
        "deploy",
        help="apply deployments/prefect.yaml (work pools + deployments)",
        description="Create the missing work pools and apply deployments/prefect.yaml "
        "against the Prefect API in PREFECT_API_URL. Each flag fills a "
        "{{ $RETRAIN_* }} placeholder of the file (flag > environment > default).",
    )
    for name, (default, what) in placeholder_defaults().items():
        flag = "--" + name.removeprefix("RETRAIN_").lower().replace("_", "-")
        deploy.add_argument(
            flag, dest=name, default=None, metavar="VALUE", help=f"{what} [${name}, default {default!r}]"
        )
    deploy.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="DEPLOYMENT",
        help="apply only this deployment (repeatable): scheduled, gpu, batch",
    )
    deploy.add_argument("--cpu-pool-type", default="process", help="type of a CPU pool to create (default process)")
    deploy.add_argument(
        "--gpu-pool-type",
        default="process",
        help="type of the GPU pool to create: process, or kubernetes with --gpu-job-template",
    )
    deploy.add_argument(
        "--gpu-job-template",
        default=None,
        help="base job template (JSON) of the GPU pool, e.g. infra/k8s/gpu-work-pool.json",
    )
    deploy.add_argument("--no-create-pools", action="store_true", help="do not create missing work pools")
    deploy.add_argument("--prefect-file", default=None, help="default deployments/prefect.yaml")
    deploy.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    models = sub.add_parser("models", help="list the promoted models and their history")
    models.add_argument("name", nargs="?", help="one model (default: all)")
    common(models)

    rollback = sub.add_parser("rollback", help="make an earlier run the current model again")
    rollback.add_argument("name", help="model name")
    rollback.add_argument(
        "--to",
        dest="to_run",
        default=None,
        metavar="RUN_ID",
        help="the run to make current (default: the one promoted before the current)",
    )
    common(rollback)


def _store(args) -> str:
    return storage.absolute(args.store or storage.default_store())


def cmd_run(args) -> dict:
    from retrain.flows.retrain import check_request, retrain_flow

    request = dict(
        network=args.network,
        weights=args.weights,
        mode=args.mode,
        split_fractions=args.split,
        options=_collect_options(args),
        augmentation={"reflect": not args.no_reflect, "max_translation": args.max_translation},
    )
    check_request(**request, fetch_weights=args.train_deployment is None)  # fail fast, before Prefect starts
    summary = retrain_flow(
        data=args.data,
        store=_store(args),
        **request,
        run_id=args.run_id,
        resume=not args.fresh,
        progress=not args.json and sys.stderr.isatty(),
        train_deployment=args.train_deployment,
        model_name=args.model_name,
        promote=not args.no_promote,
        score_folder=args.score_folder,
        score_out=args.score_out,
    )
    if not args.json:
        print(
            f"\nrun {summary['run_id']}: {summary['network']} ({summary['mode']}) on "
            f"{len(summary['classes'])} classes: " + ", ".join(summary["classes"])
        )
        print(
            f"  validation accuracy {summary['val_accuracy']:.4f}, test accuracy "
            f"{summary['test_accuracy']:.4f} ({summary['test_images']} images)"
        )
        print(
            f"  {summary['iterations']} iterations, {summary['epochs']} epochs on {summary['device']}, "
            f"{summary['seconds']:.1f} s"
        )
        print(f"  model: {summary['model']}\n  plots: {summary['run']}/{{montage,progress,confusion}}.png")
        if "promotion" in summary:
            decision = summary["promotion"]
            print(
                f"  model {decision['model']}: {'promoted' if decision['promoted'] else 'not promoted'} "
                f"({decision['reason']})"
            )
        if "scores" in summary:
            print(f"  scores: {summary['scores']}")
    keys = (
        "run_id",
        "model",
        "classes",
        "test_accuracy",
        "val_accuracy",
        "seconds",
        "run",
        "counts",
        "skipped",
        "iterations",
        "epochs",
        "promotion",
        "scores",
    )
    return {k: summary[k] for k in keys if k in summary}


def cmd_evaluate(args) -> dict:
    from retrain.tasks.evaluation import evaluate_model
    from retrain.tasks.reports import confusion_chart
    from retrain.tasks.runs import resolve_model

    started = time.perf_counter()
    loaded = load_model_file(resolve_model(args.model, _store(args)))
    index = index_images(materialize(storage.absolute(args.data), _store(args)))
    result, _ = evaluate_model(loaded, index.images)
    if args.chart:
        confusion_chart(result.confusion, result.classes, args.chart)
    if not args.json:
        print(
            f"accuracy {result.accuracy:.4f} on {result.count} images"
            + (f" ({len(index.skipped)} files skipped)" if len(index.skipped) else "")
        )
        print(result.per_class_table().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(result.confusion_text())
    return {**result.to_dict(), "skipped": len(index.skipped), "seconds": time.perf_counter() - started}


def cmd_classify(args) -> dict:
    from retrain.tasks.evaluation import classify_image
    from retrain.tasks.runs import resolve_model

    loaded = load_model_file(resolve_model(args.model, _store(args)))
    result = classify_image(loaded.model, loaded.preprocessing, loaded.classes, storage.absolute(args.image))
    if not args.json:
        print(f"{result.label} ({result.score:.4f})")
    return {"label": result.label, "score": result.score, "scores": result.scores}


def cmd_score(args) -> dict:
    from retrain.flows.score import score_flow

    summary = score_flow(
        model=args.model,
        images=args.images,
        out=args.out,
        store=_store(args),
        dask_address=args.dask_address,
        workers=args.workers,
        mini_batch_size=args.mini_batch_size,
        top_k=args.top_k,
        partition_size=args.partition_size,
        progress=not args.json and sys.stderr.isatty(),
    )
    if not args.json:
        print(
            f"scored {summary['scored']:,} of {summary['images']:,} images ({summary['failed']:,} failed) "
            f"in {summary['seconds']:.1f} s, {summary['images_per_second'] or 0:.1f} images/s"
            + (
                f"; {summary['resumed_partitions']} partitions were already done"
                if summary["resumed_partitions"]
                else ""
            )
        )
        for label, n in list(summary["labels"].items())[:10]:
            print(f"  {label:<30} {n:>8,}")
        print(f"  scores: {summary['output']}\n  summary: {summary['out']}/summary.json")
    return {
        k: summary[k]
        for k in (
            "images",
            "scored",
            "failed",
            "seconds",
            "images_per_second",
            "output",
            "processed",
            "resumed_partitions",
            "ignored",
        )
    }


def cmd_network(args) -> dict:
    if not args.name:
        if not args.json:
            for spec in NETWORKS.values():
                print(
                    f"{spec.name:<20} {spec.preprocessing.input_size[0]}x{spec.preprocessing.input_size[1]}  "
                    f"head {spec.head_name:<13} {spec.description}"
                )
        return {"networks": list(NETWORKS)}
    spec = get_spec(args.name)
    model, origin = build_network(spec.name, args.classes, args.weights)
    summary = summarize(model, spec)
    if not args.json:
        print(summary.to_text())
        print(f"weights: {origin}")
    return {
        "network": spec.name,
        "input_size": list(summary.input_size),
        "head_layer": summary.head_name,
        "head_module": summary.head_layer,
        "learnables": summary.learnables,
        "layers": len(summary.layers),
    }


def cmd_runs(args) -> dict:
    from retrain.tasks.runs import list_runs

    records = list_runs(_store(args))
    if not args.json:
        for r in records:
            acc = r.get("test_accuracy")
            print(
                f"{r['run_id']}  {r['status']:<9}  {r['config']['network']:<18} {r['config']['mode']:<8} "
                f"test accuracy {acc if acc is None else f'{acc:.4f}'}"
            )
    return {"runs": [{k: r.get(k) for k in ("run_id", "status", "test_accuracy", "model")} for r in records]}


def cmd_deploy(args) -> dict:
    from pathlib import Path

    from retrain.flows import deploy

    values = {name: getattr(args, name) for name in deploy.placeholder_defaults()}
    result = deploy.apply(
        values,
        Path(args.prefect_file) if args.prefect_file else deploy.PREFECT_FILE,
        names=args.only,
        create_pools=not args.no_create_pools,
        cpu_pool_type=args.cpu_pool_type,
        gpu_pool_type=args.gpu_pool_type,
        gpu_job_template=args.gpu_job_template,
    )
    if not args.json:
        for pool in result["work_pools_created"]:
            print(f"created work pool {pool}")
        for name in result["deployments"]:
            print(f"deployed {name}")
        for note in result["skipped"]:
            print(f"skipped {note}")
        print(
            f"store {result['store']}; start workers with: "
            + "; ".join(f"prefect worker start --pool {p}" for p in result["work_pools"])
        )
    return result


def _fmt_score(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_models(args) -> dict:
    from retrain.tasks.promotion import list_models

    found = [m for m in list_models(_store(args)) if not args.name or m["model"] == args.name]
    if args.name and not found:
        raise FileNotFoundError(f"model {args.name!r} in {_store(args)}")
    if not args.json:
        for m in found:
            cur = m["current"] or {}
            print(
                f"{m['model']}: current run {cur.get('run_id', '-')} ({cur.get('metric', 'accuracy')} "
                f"{_fmt_score(cur.get('score'))}, {cur.get('action', '-')} {cur.get('promoted_at', '')})"
            )
            for h in m["history"]:
                mark = "*" if h["promoted"] else " "
                print(
                    f"  {mark} {h['decided_at'][:19]}  {h['action']:<8}  {h['run_id']:<24} "
                    f"{_fmt_score(h['candidate_score'])} vs {_fmt_score(h['current_score'])}  {h['reason']}"
                )
    return {"models": found}


def cmd_rollback(args) -> dict:
    from retrain.tasks.promotion import rollback

    decision = rollback(_store(args), args.name, args.to_run).to_dict()
    if not args.json:
        print(f"model {args.name}: current run is now {decision['run_id']} ({decision['reason']})")
    return decision


COMMANDS = {
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "classify": cmd_classify,
    "score": cmd_score,
    "network": cmd_network,
    "runs": cmd_runs,
    "deploy": cmd_deploy,
    "models": cmd_models,
    "rollback": cmd_rollback,
}


# Exit statuses: 0 done; 2 refused (bad input, data, model or option: running it again will
# not help); 3 the store kept failing after retries (try again later); 130 interrupted.
EXIT_REFUSED, EXIT_STORE_FAILED, EXIT_INTERRUPTED = 2, 3, 130


def _fail(args, exc: BaseException, message: str, status: int) -> int:
    print(f"retrain {args.command}: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": message, "type": type(exc).__name__}))
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except storage.StorageError as exc:
        return _fail(args, exc, str(exc), EXIT_STORE_FAILED)
    except USER_ERRORS as exc:
        message = str(exc) if not isinstance(exc, FileNotFoundError) else f"not found: {exc}"
        return _fail(args, exc, message, EXIT_REFUSED)
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        return _fail(args, exc, f"{type(exc).__name__}: {exc}", EXIT_REFUSED)
    except KeyboardInterrupt as exc:
        return _fail(args, exc, "interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if not storage.transient(exc):  # a bug: the traceback is what its report needs
            raise
        # a store failure that escaped the retries (a remote filesystem called directly)
        return _fail(args, exc, f"store failure: {type(exc).__name__}: {exc}", EXIT_STORE_FAILED)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
