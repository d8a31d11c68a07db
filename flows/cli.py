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

from tasks import storage  # noqa: E402
from tasks.datastore import DataSetError, index_images, materialize  # noqa: E402
from tasks.networks import (NETWORKS, ModelFileError, WeightsUnavailableError, build_network,  # noqa: E402
                            get_spec, load_model_file, summarize)
from tasks.preprocessing import ImageDecodeError  # noqa: E402
from tasks.training import TrainingOptions  # noqa: E402

USER_ERRORS = (DataSetError, WeightsUnavailableError, ModelFileError, ImageDecodeError,
               FileNotFoundError, ValueError)


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
        group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                           help=f"default {default}" if default is not None else "default: per mode")


def _collect_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(TrainingOptions)
            if getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=None, help="store URL (default $RETRAIN_STORE or ./retrain-store)")
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    run = sub.add_parser("run", help="retrain a network on a data set (Prefect flow)")
    run.add_argument("data", nargs="?", default=None,
                     help="zip or folder of class folders, any fsspec URL (default: a generated sample set)")
    run.add_argument("--network", default="squeezenet", choices=sorted(NETWORKS))
    run.add_argument("--weights", default="default",
                     help="default (the network's pretrained weights), none, or a state-dict file URL")
    run.add_argument("--mode", default="transfer", choices=["transfer", "finetune", "scratch"])
    run.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions per label")
    run.add_argument("--no-reflect", action="store_true", help="no random horizontal reflection")
    run.add_argument("--max-translation", type=int, default=30, help="random X/Y translation, pixels")
    run.add_argument("--run-id", default=None, help="name the run (or resume that run)")
    run.add_argument("--fresh", action="store_true", help="start a new run even if an unfinished "
                                                          "run with the same settings exists")
    common(run)
    _option_flags(run)

    evaluate = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion of a model on labelled images")
    evaluate.add_argument("model", help="model file URL or run id in the store")
    evaluate.add_argument("data", help="zip or folder of class folders")
    evaluate.add_argument("--chart", default=None, help="write the confusion chart PNG here")
    common(evaluate)

    classify = sub.add_parser("classify", help="label and score for one image")
    classify.add_argument("model", help="model file URL or run id in the store")
    classify.add_argument("image", help="image URL")
    common(classify)

    network = sub.add_parser("network", help="list networks, or show one's summary")
    network.add_argument("name", nargs="?", help="network to summarise")
    network.add_argument("--classes", type=int, default=5, help="classes for the new head")
    network.add_argument("--weights", default="none", help="weights to load (default: none, architecture only)")
    common(network)

    runs = sub.add_parser("runs", help="list the runs in the store")
    common(runs)
    return parser


def _store(args) -> str:
    return storage.absolute(args.store or storage.default_store())


def cmd_run(args) -> dict:
    from flows.retrain import retrain_flow

    summary = retrain_flow(
        data=args.data, store=_store(args), network=args.network, weights=args.weights,
        mode=args.mode, split_fractions=args.split, options=_collect_options(args),
        augmentation={"reflect": not args.no_reflect, "max_translation": args.max_translation},
        run_id=args.run_id, resume=not args.fresh, progress=not args.json and sys.stderr.isatty())
    if not args.json:
        print(f"\nrun {summary['run_id']}: {summary['network']} ({summary['mode']}) on "
              f"{len(summary['classes'])} classes: " + ", ".join(summary["classes"]))
        print(f"  validation accuracy {summary['val_accuracy']:.4f}, test accuracy "
              f"{summary['test_accuracy']:.4f} ({summary['test_images']} images)")
        print(f"  {summary['iterations']} iterations, {summary['epochs']} epochs on {summary['device']}, "
              f"{summary['seconds']:.1f} s")
        print(f"  model: {summary['model']}\n  plots: {summary['run']}/{{montage,progress,confusion}}.png")
    return {k: summary[k] for k in ("run_id", "model", "classes", "test_accuracy", "val_accuracy",
                                    "seconds", "run", "counts", "skipped", "iterations", "epochs")}


def cmd_evaluate(args) -> dict:
    from tasks.evaluation import evaluate_model
    from tasks.reports import confusion_chart
    from tasks.runs import resolve_model

    started = time.perf_counter()
    loaded = load_model_file(resolve_model(args.model, _store(args)))
    index = index_images(materialize(storage.absolute(args.data), _store(args)))
    result, _ = evaluate_model(loaded, index.images)
    if args.chart:
        confusion_chart(result.confusion, result.classes, args.chart)
    if not args.json:
        print(f"accuracy {result.accuracy:.4f} on {result.count} images"
              + (f" ({len(index.skipped)} files skipped)" if len(index.skipped) else ""))
        print(result.per_class_table().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(result.confusion_text())
    return {**result.to_dict(), "skipped": len(index.skipped), "seconds": time.perf_counter() - started}


def cmd_classify(args) -> dict:
    from tasks.evaluation import classify_image
    from tasks.runs import resolve_model

    loaded = load_model_file(resolve_model(args.model, _store(args)))
    result = classify_image(loaded.model, loaded.preprocessing, loaded.classes, storage.absolute(args.image))
    if not args.json:
        print(f"{result.label} ({result.score:.4f})")
    return {"label": result.label, "score": result.score, "scores": result.scores}


def cmd_network(args) -> dict:
    if not args.name:
        if not args.json:
            for spec in NETWORKS.values():
                print(f"{spec.name:<20} {spec.preprocessing.input_size[0]}x{spec.preprocessing.input_size[1]}  "
                      f"head {spec.head_name:<13} {spec.description}")
        return {"networks": list(NETWORKS)}
    spec = get_spec(args.name)
    model, origin = build_network(spec.name, args.classes, args.weights)
    summary = summarize(model, spec)
    if not args.json:
        print(summary.to_text())
        print(f"weights: {origin}")
    return {"network": spec.name, "input_size": list(summary.input_size), "head_layer": summary.head_name,
            "head_module": summary.head_layer, "learnables": summary.learnables, "layers": len(summary.layers)}


def cmd_runs(args) -> dict:
    from tasks.runs import list_runs

    records = list_runs(_store(args))
    if not args.json:
        for r in records:
            acc = r.get("test_accuracy")
            print(f"{r['run_id']}  {r['status']:<9}  {r['config']['network']:<18} {r['config']['mode']:<8} "
                  f"test accuracy {acc if acc is None else f'{acc:.4f}'}")
    return {"runs": [{k: r.get(k) for k in ("run_id", "status", "test_accuracy", "model")} for r in records]}


COMMANDS = {"run": cmd_run, "evaluate": cmd_evaluate, "classify": cmd_classify,
            "network": cmd_network, "runs": cmd_runs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        message = str(exc) if not isinstance(exc, FileNotFoundError) else f"not found: {exc}"
        print(f"retrain {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": message, "type": type(exc).__name__}))
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
