"""``retrain experiment``: its flags and its output (the flow is in flows/experiment.py, which
this module imports only when the command runs, so ``retrain --help`` stays quick)."""

from __future__ import annotations

import argparse

from retrain import failures


def add_experiment_arguments(experiment: argparse.ArgumentParser) -> None:
    """The experiment's own flags (the run's flags are added by retrain/cli.py)."""
    experiment.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a run option and its values, repeatable: mode=transfer,finetune network=squeezenet,resnet18 "
        "initial-learn-rate=1e-3,1e-4; a network may carry its weights: network=resnet18@w.pth "
        "(split fractions: split=0.7,0.15,0.15;0.8,0.1,0.1)",
    )
    experiment.add_argument("--seeds", default="0,1,2", help="training seeds of every combination (default 0,1,2)")
    experiment.add_argument(
        "--parallel", type=int, default=None, help="runs at once (default: all with a deployment, else cores / 2)"
    )
    experiment.add_argument(
        "--no-share-features",
        action="store_true",
        help="every transfer run computes its own feature cache (to measure what sharing saves)",
    )
    experiment.add_argument("--promote-best", action="store_true", help="pass the best run through the promotion gate")
    experiment.add_argument(
        "--model-name", default=None, help="model name for --promote-best (default: the data set's)"
    )
    experiment.add_argument(
        "--experiment-id",
        default=None,
        help="name the experiment (default: a digest of its data, grid, seeds and options; the same command "
        "again reuses the runs that completed and resumes the others)",
    )


def cmd_experiment(args: argparse.Namespace, store: str) -> dict:
    from dataclasses import asdict

    from retrain.flows.experiment import experiment_flow
    from retrain.tasks.experiments import parse_grid, parse_seeds
    from retrain.tasks.request import check_store_names, request_from_args

    request = asdict(request_from_args(args))
    check_store_names(experiment_id=args.experiment_id, model_name=args.model_name)

    if args.parallel is not None and args.parallel < 1:
        raise ValueError(f"--parallel must be at least 1, not {args.parallel}")
    check_combinations(request, parse_grid(args.grid), parse_seeds(args.seeds), fetch_weights=not args.train_deployment)
    if args.labels:
        from retrain.tasks import storage
        from retrain.tasks.labels import read_label_table

        read_label_table(storage.absolute(args.labels))
    from retrain.orchestrator import prepare_for_flows

    prepare_for_flows()
    record = experiment_flow(
        data=args.data,
        store=store,
        grid=args.grid,
        seeds=args.seeds,
        base={**request, **({"labels": args.labels} if args.labels else {})},
        train_deployment=args.train_deployment,
        promote_best=args.promote_best,
        model_name=args.model_name,
        parallel=args.parallel,
        share_features=not args.no_share_features,
        experiment_id=args.experiment_id,
    )
    if not args.json:
        print_table(record)
    from retrain.answers import experiment_answer

    keep = ("experiment_id", "experiment", "runs", "best", "table", "seconds", "parallel", "promotion", "files")
    result = experiment_answer({k: record[k] for k in keep if k in record})
    failed = [r for r in record["runs"] if r["error"]]
    if failed:
        return failures.Unfinished(
            result,
            failures.EXIT_RUNS_FAILED,
            f"{len(failed)} of {len(record['runs'])} runs failed (first: {failed[0]['error']}); the others are kept: "
            "rerun the same command to retry the failed ones",
        )
    return result


def check_combinations(request: dict, grid: dict, seeds: list[int], fetch_weights: bool) -> None:
    """Every combination's network, weights, mode and options, checked before Prefect starts
    (the flags alone may name a network no combination uses)."""
    from retrain.tasks.experiments import plan_runs
    from retrain.tasks.request import RunRequest

    checked = set()
    for planned in plan_runs(request, grid, seeds[:1], "memory://unused", "unused", share_features=False):
        p = planned.parameters
        arguments = (p["network"], p["weights"], p["mode"], p["split_fractions"], p["options"], p["augmentation"])
        if repr(arguments) not in checked:
            checked.add(repr(arguments))
            RunRequest(*arguments).check(fetch_weights=fetch_weights)


def print_table(record: dict) -> None:
    from retrain.tasks.experiments import mean_sd_text
    from retrain.tasks.reports import accuracy_text

    rows = record["table"]
    width = max([len("combination")] + [len(r["combination"]) for r in rows])
    print(f"\nexperiment {record['experiment_id']}: {len(record['runs'])} runs in {record['seconds']:.0f} s")
    print(f"{'combination':<{width}}  runs  {'val accuracy':<17}  {'test accuracy':<17}  seconds")
    for r in rows:
        runs = f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        print(
            f"{r['combination']:<{width}}  {runs:<4}  {mean_sd_text(r['val_accuracy'], r['val_accuracy_sd']):<17}  "
            f"{mean_sd_text(r['test_accuracy'], r['test_accuracy_sd']):<17}  {mean_sd_text(r['seconds'], r['seconds_sd'], 1)}"
        )
    best = record["best"]
    if best:
        val = accuracy_text(best["val_accuracy"], "validation")
        print(f"best: {best['label']} seed {best['seed']}, run {best['run_id']} (val {val})")
    for failed in [r for r in record["runs"] if r["error"]]:
        print(f"failed: {failed['label']} seed {failed['seed']}: {failed['error']}")
    print(f"table, runs and accuracy_vs_time.png in {record['experiment']}")
