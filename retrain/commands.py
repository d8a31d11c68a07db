"""What each ``retrain`` command does (:mod:`retrain.cli` parses the command line).

``evaluate``, ``classify``, ``score`` and ``export`` call the Python API's function of the
same name (:mod:`retrain`: the one implementation) and print its answer. Each command imports
what it needs when it runs, so ``retrain --help`` and a refused flag import no torch, Prefect or
Dask. Each returns the dict that ``--json`` prints.
"""

from __future__ import annotations

import sys

import retrain
from retrain.answers import decision_answer, model_answer, rounded
from retrain.tasks import storage
from retrain.tasks.request import check_store_names, request_from_args


def _store(args) -> str:
    return storage.absolute(args.store or storage.default_store())


def _say_loading(args) -> None:
    """On a terminal, the imports said before they start (torch, Prefect, Dask: 5-15 s on a
    small machine); a resident process (retrain/resident.py) has them loaded already."""
    if not args.json and sys.stderr.isatty() and "torch" not in sys.modules:
        print(f"retrain {args.command}: loading torch and Prefect...", file=sys.stderr, flush=True)


def cmd_run(args) -> dict:
    from dataclasses import asdict

    _say_loading(args)
    request = _checked_run_request(args)
    settings = asdict(request)
    settings["split"] = settings.pop("split_fractions")  # the API's name is the flag's
    summary = retrain.run(
        args.data,
        store=args.store,
        **settings,
        run_id=args.run_id,
        resume=not args.fresh,
        progress=not args.json and sys.stderr.isatty(),
        train_deployment=args.train_deployment,
        model_name=args.model_name,
        promote=not args.no_promote,
        allow_class_change=args.allow_class_change,
        score_folder=args.score_folder,
        score_out=args.score_out,
        labels=args.labels,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        label_issues=args.label_issues,
    )
    if not args.json:
        _print_run(summary)
    keys = (
        "run_id",
        "model_url",
        "run_url",
        "classes",
        "test_accuracy",
        "val_accuracy",
        "images",
        "test_images",
        "class_images",
        "skipped",
        "seconds",
        "iterations",
        "epochs",
        "engines",
        "promotion",
        "scores_url",
        "score_out",
        "label_issues",
        "label_issues_excluded",
        "ui_url",
    )
    return {k: summary[k] for k in keys if k in summary}


def _checked_run_request(args):
    """The run's request, checked before Prefect starts (10-30 s) so that a bad one fails fast;
    the flow's own check of it is then free."""
    request = request_from_args(args)
    check_store_names(run_id=args.run_id, model_name=args.model_name)
    if args.labels:
        from retrain.tasks.labels import read_label_table

        read_label_table(storage.absolute(args.labels))  # a table without path/label columns: refused now
    request.check(fetch_weights=not args.train_deployment)
    from retrain.tasks.training.cluster import ClusterRequest

    ClusterRequest.from_dict({"address": args.dask_address, "workers": args.dask_workers})  # --dask-workers -1: refused
    return request


def _print_run(summary: dict) -> None:
    """What a run did, for the terminal."""
    from retrain.tasks.reports import accuracy_text

    print(
        f"\nrun {summary['run_id']}: {summary['network']} ({summary['mode']}) on "
        f"{len(summary['classes'])} classes: " + ", ".join(summary["classes"])
    )
    print(
        f"  validation accuracy {accuracy_text(summary['val_accuracy'], 'validation')}, test accuracy "
        f"{accuracy_text(summary['test_accuracy'], 'test')} ({summary['test_images']} images)"
    )
    print(
        f"  {summary['iterations']} iterations, {summary['epochs']} epochs on {summary['device']}, "
        f"{summary['seconds']:.1f} s"
    )
    print(
        f"  model: {summary['model_url']}\n  plots: {summary['run_url']}/{{montage,progress,confusion,mistakes,gradcam}}.png"
    )
    if summary.get("label_issues") is not None:
        excluded = summary.get("label_issues_excluded")
        print(
            f"  label issues: {summary['label_issues']} likely wrong labels in {summary['run_url']}/label_issues.csv"
            + (f"; {excluded} images left out of training" if excluded is not None else "")
        )
    if summary.get("engines", {}).get("auto"):  # tasks/engine_gate.validate_run
        engines = summary["engines"]
        print(f"  engines validated: {', '.join(engines['passed'])}; auto uses {engines['auto']}")
    if "promotion" in summary:
        decision = summary["promotion"]
        print(
            f"  model {decision['model_name']}: {'promoted' if decision['promoted'] else 'not promoted'} "
            f"({decision['reason']})"
        )
    if "scores_url" in summary:
        print(f"  scores: {summary['scores_url']}")
    _print_ui_url(summary)


def _print_ui_url(summary: dict) -> None:
    if summary.get("ui_url"):
        print(f"  in the Prefect UI: {summary['ui_url']}")
    else:
        print("  (start `retrain server start` once to keep runs in the Prefect UI)")


def cmd_evaluate(args) -> dict:
    from retrain.tasks.evaluation import Evaluation

    answer = retrain.evaluate(args.model, args.data, args.store, engine=args.engine, chart=args.chart)
    if not args.json:
        result = Evaluation(
            answer["classes"], answer["data_accuracy"], answer["confusion"], answer["per_class"], answer["images"]
        )
        print(
            f"accuracy {result.accuracy:.4f} on {result.count} images with engine {answer['engine']}"
            + (f" ({answer['skipped']} files skipped)" if answer["skipped"] else "")
        )
        print(result.per_class_table().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(result.confusion_text())
    return answer


def cmd_classify(args) -> dict:
    answer = retrain.classify(args.model, args.image, args.store, explain=args.explain)
    if not args.json:
        print(f"{answer['label']} ({answer['score']:.4f})" + (f"; Grad-CAM: {args.explain}" if args.explain else ""))
    return answer


def cmd_score(args) -> dict:
    _say_loading(args)
    summary = retrain.score(
        args.model,
        args.images,
        score_out=args.score_out,
        store=args.store,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        mini_batch_size=args.mini_batch_size,
        top_k=args.top_k,
        partition_size=args.partition_size,
        engine=args.engine,
        progress=not args.json and sys.stderr.isatty(),
        verify_content=args.verify_content,
        to_label=args.to_label,
    )
    if not args.json:
        if "note" in summary:
            print(summary["note"])
        print(
            f"{summary['images']:,} images: {summary['new']:,} new, {summary['changed']:,} changed, "
            f"{summary['deleted']:,} deleted, {summary['unchanged']:,} unchanged; scored {summary['processed']:,} "
            f"in {summary['seconds']:.1f} s ({summary['images_per_second'] or 0:.1f} images/s, engine "
            f"{summary['engine']}); {summary['failed']:,} failed"
        )
        for label, n in list(summary["labels"].items())[:10]:
            print(f"  {label:<30} {n:>8,}")
        print(f"  scores: {summary['scores_url']}\n  summary: {summary['score_out']}/summary.json")
        if summary.get("to_label"):
            print(f"  to label next: {summary['to_label']['url']} ({summary['to_label']['images']:,} least certain)")
        if summary.get("drift"):
            from retrain.tasks.drift import verdict_line

            print(f"  {verdict_line(summary['drift'])}: {summary['score_out']}/drift.json")
        _print_ui_url(summary)
    return {
        k: summary[k]
        for k in (
            "images",
            "scored",
            "failed",
            "seconds",
            "images_per_second",
            "images_per_second_scoring",
            "scores_url",
            "score_out",
            "model_url",
            "model_sha256",
            "processed",
            "new",
            "changed",
            "deleted",
            "unchanged",
            "retried",
            "resumed_partitions",
            "ignored",
            "ui_url",
            "engine",
            "engine_reason",
            "decoder",
            "note",
            "to_label",
            "drift",
        )
        if k in summary
    }


def cmd_export(args) -> dict:
    result = retrain.export(args.model, args.out, args.format, args.store, args.with_preprocessing)
    if not args.json:
        print(f"{args.format} model for {len(result['classes'])} classes written to {result['out']}")
        if "test_split" in result:
            t = result["test_split"]
            print(
                f"  ONNX Runtime against torch on the run's {t['images']} test images: {t['same_labels']} "
                f"same labels, largest score difference {t['max_score_difference']:.2e}"
            )
    return result


def cmd_network(args) -> dict:
    from retrain.tasks.networks import build_network, describe_network, get_spec, network_names, summarize

    if not args.name:
        rows = [describe_network(name) for name in network_names()]
        if not args.json:
            for row in rows:
                size = "x".join(str(v) for v in row["input_size"])
                print(f"{row['network']:<20} {size:<8} {row['description']}")
        return {"networks": [row["network"] for row in rows]}
    spec = get_spec(args.name)
    model, origin = build_network(spec.name, args.classes, args.weights)
    summary = summarize(model, spec)
    if not args.json:
        print(summary.to_text(max_rows=None if args.all_layers else 40))
        print(f"weights: {origin}")
        if spec.from_torchvision:
            print(f"pretrained weights: {spec.description}; {spec.categories} categories")
    return {
        "network": spec.name,
        "architecture": spec.architecture,
        "input_size": list(summary.input_size),
        "preprocessing": spec.preprocessing.to_dict(),
        "head_layer": summary.head_name,
        "head_module": summary.head_layer,
        "learnables": summary.learnables,
        "layers": len(summary.layers),
        "pretrained_weights": str(spec.weights),
        "weights_origin": origin,
    }


def cmd_experiment(args) -> dict:
    from retrain.experiment_cli import cmd_experiment as experiment

    return experiment(args, _store(args))


def cmd_runs(args) -> dict:
    from retrain.tasks.runs import list_runs

    records = list_runs(_store(args))
    if not args.json:
        for r in records:
            acc = r.get("test_accuracy")
            print(
                f"{r['run_id']}  {r['status']:<11}  {r['config']['network']:<18} {r['config']['mode']:<8} "
                f"test accuracy {acc if acc is None else f'{acc:.4f}'}"
            )
    keys = {"run_id": "run_id", "status": "status", "test_accuracy": "test_accuracy", "model_url": "model"}
    return rounded({"runs": [{key: r.get(recorded) for key, recorded in keys.items()} for r in records]})


def cmd_deploy(args) -> dict:
    from pathlib import Path

    from retrain import deploy

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

    found = [model_answer(m) for m in list_models(_store(args)) if not args.name or m["model"] == args.name]
    if args.name and not found:
        raise FileNotFoundError(f"model {args.name!r} in {_store(args)}")
    if not args.json:
        for m in found:
            cur = m["current"] or {}
            split = (cur.get("decision") or {}).get("split") or "test"
            print(
                f"{m['model_name']}: current run {cur.get('run_id', '-')} ({split} accuracy "
                f"{_fmt_score(cur.get(f'{split}_accuracy'))}, {cur.get('action', '-')} {cur.get('promoted_at', '')})"
            )
            for h in m["history"]:
                mark = "*" if h["promoted"] else " "
                print(
                    f"  {mark} {h['decided_at'][:19]}  {h['action']:<8}  {h['run_id']:<24} "
                    f"{_fmt_score(h['candidate_accuracy'])} vs {_fmt_score(h['current_accuracy'])}  {h['reason']}"
                )
    return {"models": found}


def cmd_rollback(args) -> dict:
    from retrain.tasks.promotion import rollback

    decision = decision_answer(rollback(_store(args), args.name, args.to_run, force=args.force).to_dict())
    if not args.json:
        print(f"model {args.name}: current run is now {decision['run_id']} ({decision['reason']})")
    return decision


def cmd_server(args) -> dict:
    from retrain import server

    if args.action == "stop":
        result = server.stop()
        if not args.json:
            print(
                f"stopped the Prefect server (pid {result['pid']})"
                if result["stopped"]
                else "no Prefect server was running"
            )
        return result
    if args.action == "start":
        state = server.start(port=args.port, host=args.host)
        headline = "already running" if state["already_running"] else f"started in {state['seconds']:.1f} s"
    else:
        state = server.status()
        headline = f"running since {state['started_at']}" if state["running"] else ""
    if not args.json:
        if not headline:
            print(f"not running (no live server in {state['state_file']}); start it with `retrain server start`")
        else:
            print(
                f"Prefect server {headline} (pid {state['pid']})\n  UI:  {state['ui_url']}\n  API: {state['api_url']}\n"
                f"  log: {state['log']}\n  database: {state['database']}\n"
                "retrain commands use it while PREFECT_API_URL is unset; `retrain server stop` stops it."
            )
    return state


COMMANDS = {
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "classify": cmd_classify,
    "score": cmd_score,
    "export": cmd_export,
    "network": cmd_network,
    "experiment": cmd_experiment,
    "runs": cmd_runs,
    "deploy": cmd_deploy,
    "models": cmd_models,
    "rollback": cmd_rollback,
    "server": cmd_server,
}
