"""Transfer mode: head training on cached backbone features versus the classic loop.

In one process, for each seed, both loops train the same network from the same initial head
with the same options and augmentation (the order alternates between seeds, since other work
on the machine makes absolute times noisy; the ratios are what count):

- hymenoptera: train on ``train/`` (15 % of it held out per label as validation data, as the
  retrain flow does), accuracy on ``val/``; seeds 0-2.
- MerchData: the retrain flow's split (``split_each_label`` 0.7/0.15/0.15 with the seed),
  test accuracy; seeds 0-4.
- commands: ``retrain run`` on hymenoptera ``train/`` (the same network, options and 15 %
  validation part, per seed) as a user runs it: cold commands one after another, each a new
  process, on a new PREFECT_HOME with no server (the first starts the local server that the
  later ones use); process wall time against the classic loop's of the same seeds, and the
  model's accuracy on ``val/``. The server is stopped at the end.
- fine-tune (and the classic transfer loop) against ``tasks/training.py`` as it was before
  the feature cache (``git show 5826a04:tasks/training.py``, ``--baseline-rev``, loaded as a
  separate module): seconds per iteration, alternating old and new.

Writes a JSON file and prints a table. Run from the project root:

    .venv/bin/python benchmarks/bench_train.py                 # the full benchmark
    .venv/bin/python benchmarks/bench_train.py --quick         # a smoke run (fewer seeds, epochs)
    .venv/bin/python benchmarks/bench_train.py --data hymenoptera,commands --hymenoptera-epochs 30
                                                               # retrain run against the plain loop
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from retrain.tasks import training  # noqa: E402
from retrain.tasks.datastore import index_images, materialize, split_each_label  # noqa: E402
from retrain.tasks.evaluation import predict_scores  # noqa: E402
from retrain.tasks.networks import build_network, get_spec, resolve_device  # noqa: E402
from retrain.tasks.preprocessing import Augmentation, load_images  # noqa: E402
from retrain.tasks.training import TrainingData  # noqa: E402

SHARED = ROOT.parent / "shared"
NETWORK = "squeezenet-caffe"


def _targets(labels, classes) -> torch.Tensor:
    return torch.tensor([classes.index(label) for label in labels], dtype=torch.long)


def load_hymenoptera(
    root: Path, holdout: float, seed: int, size
) -> tuple[TrainingData, torch.Tensor, torch.Tensor, list[str]]:
    train_index = index_images(str(root / "train")).images
    test_index = index_images(str(root / "val")).images
    classes = sorted(train_index["label"].unique())
    if holdout > 0:
        split = split_each_label(train_index, (1 - holdout, holdout, 0.0), seed)
    else:
        split = train_index.assign(split="train")
    parts = {name: split[split["split"] == name] for name in ("train", "val")}
    data = TrainingData(
        load_images(list(parts["train"]["path"]), size),
        _targets(parts["train"]["label"], classes),
        load_images(list(parts["val"]["path"]), size),
        _targets(parts["val"]["label"], classes),
    )
    return data, load_images(list(test_index["path"]), size), _targets(test_index["label"], classes), classes


def load_merch(
    zip_path: Path, store: str, seed: int, size
) -> tuple[TrainingData, torch.Tensor, torch.Tensor, list[str]]:
    index = index_images(materialize(str(zip_path), store)).images
    classes = sorted(index["label"].unique())
    split = split_each_label(index, (0.7, 0.15, 0.15), seed)
    parts = {name: split[split["split"] == name] for name in ("train", "val", "test")}
    pix = {name: load_images(list(rows["path"]), size) for name, rows in parts.items()}
    data = TrainingData(
        pix["train"], _targets(parts["train"]["label"], classes), pix["val"], _targets(parts["val"]["label"], classes)
    )
    return data, pix["test"], _targets(parts["test"]["label"], classes), classes


def train_once(
    module,
    data: TrainingData,
    classes,
    weights: str,
    seed: int,
    options: dict,
    augmentation: Augmentation,
    mode: str = "transfer",
) -> tuple[torch.nn.Module, object, float, float]:
    """Train once; returns the model, the outcome, wall seconds and CPU seconds (this process,
    all threads: less sensitive than wall time to other work on the machine)."""
    spec = get_spec(NETWORK)
    torch.manual_seed(seed)  # the new head's initial weights, as train_run does
    model, _ = build_network(spec.name, len(classes), weights)
    opts = module.TrainingOptions(**{**options, "seed": seed})
    started, cpu = time.perf_counter(), time.process_time()
    outcome = module.train(model, spec, spec.preprocessing, data, mode, opts, augmentation)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    model.load_state_dict(outcome.state_dict)
    return model, outcome, seconds, cpu_seconds


def accuracy(model, images, targets) -> float:
    scores = predict_scores(model, images, get_spec(NETWORK).preprocessing)
    return float((scores.argmax(1) == targets).float().mean())


def compare(
    name: str,
    seeds: list[int],
    load,
    weights: str,
    options: dict,
    augmentation: Augmentation,
    view_counts: list[int | None],
) -> dict:
    """Cache (for each view count) and classic loop on each seed; returns per-run records."""
    runs = []
    for i, seed in enumerate(seeds):
        data, test_images, test_targets, classes = load(seed)
        methods = [("classic", None)] + [("cache", v) for v in view_counts]
        if i % 2:
            methods.reverse()
        for method, views in methods:
            opts = {**options, "classic_loop": method == "classic", "feature_cache_views": views}
            model, outcome, seconds, cpu_seconds = train_once(
                training, data, classes, weights, seed, opts, augmentation
            )
            cache = outcome.feature_cache or {}
            record = {
                "dataset": name,
                "method": method,
                "seed": seed,
                "views": cache.get("views"),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "feature_seconds": cache.get("seconds"),
                "iterations": outcome.iterations,
                "train_images": len(data.train_targets),
                "val_images": len(data.val_targets),
                "test_images": len(test_targets),
                "val_accuracy": outcome.final_val_accuracy,
                "test_accuracy": accuracy(model, test_images, test_targets),
            }
            runs.append(record)
            print(
                f"  {name} seed {seed} {method:<7} views {str(record['views']):>4}: "
                f"{seconds:7.1f} s wall, {cpu_seconds:7.1f} s CPU, test accuracy {record['test_accuracy']:.4f}",
                flush=True,
            )
    return summarize(runs)


def summarize(runs: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["views"]), []).append(r)
    classic = groups[("classic", None)]
    classic_seconds = statistics.mean(r["seconds"] for r in classic)
    classic_cpu = statistics.mean(r["cpu_seconds"] for r in classic)
    classic_accuracy = statistics.mean(r["test_accuracy"] for r in classic)
    rows = []
    for (method, views), rs in groups.items():
        seconds = statistics.mean(r["seconds"] for r in rs)
        cpu = statistics.mean(r["cpu_seconds"] for r in rs)
        acc = statistics.mean(r["test_accuracy"] for r in rs)
        rows.append(
            {
                "method": method,
                "views": views,
                "runs": len(rs),
                "mean_seconds": seconds,
                "mean_cpu_seconds": cpu,
                "mean_test_accuracy": acc,
                "accuracies": [r["test_accuracy"] for r in rs],
                "speedup_vs_classic": classic_seconds / seconds,
                "cpu_speedup_vs_classic": classic_cpu / cpu,
                "accuracy_minus_classic_points": 100 * (acc - classic_accuracy),
            }
        )
    return {"runs": runs, "summary": rows}


# Names the baseline imports that have moved since it was written: name -> the module that holds it now.
MOVED = {"model_record": "retrain.tasks.model_file", "save_model_file": "retrain.tasks.model_file"}


def _import_into(namespace: dict, module: str, names: list[tuple[str, str]]) -> None:
    """``from MODULE import NAMES`` for the baseline, against today's package: ``tasks.X`` is
    ``retrain.tasks.X``; a name that has moved comes from where it lives now (``MOVED``)."""
    target = importlib.import_module("retrain." + module)
    for name, alias in names:
        if hasattr(target, name):
            namespace[alias] = getattr(target, name)
        elif name in MOVED:
            namespace[alias] = getattr(importlib.import_module(MOVED[name]), name)
        else:
            namespace[alias] = importlib.import_module(f"{target.__name__}.{name}")


def _point_imports(source: str) -> str:
    """The baseline's ``from tasks... import ...`` statements, as calls of ``_import_into``
    (the loop's code itself is left as it was)."""
    import ast

    lines = source.splitlines()
    for node in reversed(ast.parse(source).body):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tasks":
            names = [(a.name, a.asname or a.name) for a in node.names]
            call = f"_import_into(globals(), {node.module!r}, {names!r})"
            lines[node.lineno - 1 : node.end_lineno] = [call] + [""] * (node.end_lineno - node.lineno)
    return "\n".join(lines) + "\n"


def load_module(name: str, source: str):
    """A module from source text (the baseline training.py) next to the current one."""
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    module.__dict__["_import_into"] = _import_into
    exec(compile(_point_imports(source), "<baseline tasks/training.py>", "exec"), module.__dict__)
    return module


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def same_work(
    old,
    old_extra: dict,
    new_extra: dict,
    data: TrainingData,
    classes,
    weights: str,
    batch: int,
    augmentation: Augmentation,
    mode: str,
) -> dict:
    """Timing-free evidence: the operators each loop runs (torch profiler counts) and whether
    they compute the same losses, iteration by iteration."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    counts, losses = {}, {}
    for label, module, extra in (("baseline", old, old_extra), ("current", training, new_extra)):
        opts = {"max_epochs": 1, "mini_batch_size": batch, "checkpoint_frequency": 0, **extra}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _, outcome, _, _ = train_once(module, data, classes, weights, 0, opts, augmentation, mode)
        counts[label] = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
        losses[label] = outcome.history["loss"].tolist()
    a, b = counts["baseline"], counts["current"]
    return {
        "aten_ops": {k: sum(c.values()) for k, c in counts.items()},
        "ops_differing": {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)},
        "identical_losses": losses["baseline"] == losses["current"],
        "iterations": len(losses["current"]),
    }


def loop_overhead(
    data: TrainingData, classes, weights: str, repeats: int, iterations: int, batch: int, baseline_rev: str
) -> dict:
    """Seconds per iteration of the baseline loop and this one, fine-tune and classic
    transfer, alternating old and new ``repeats`` times; no validation (only the loop).

    Each run's iterations are timed one by one (the history's clock, the first iteration
    left out: it holds the warm-up). Other work on the machine only ever adds time, so the
    low quantiles of many interleaved samples are the fair comparison; medians are shown too."""
    source = subprocess.run(
        ["git", "show", f"{baseline_rev}:tasks/training.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    old = load_module("baseline_training", source)
    old_extra = {"classic_loop": True} if "classic_loop" in old.TrainingOptions.__dataclass_fields__ else {}
    n = iterations * batch
    subset = TrainingData(data.train_images[:n], data.train_targets[:n], data.val_images[:0], data.val_targets[:0])
    augmentation = Augmentation()
    results = {}
    for mode, extra_new in (("finetune", {}), ("transfer", {"classic_loop": True})):
        samples: dict[str, list[float]] = {"baseline": [], "current": []}
        for r in range(repeats + 1):  # the first round warms up
            order = [("baseline", old, old_extra if mode == "transfer" else {}), ("current", training, extra_new)]
            if r % 2:
                order.reverse()
            for label, module, extra in order:
                opts = {"max_epochs": 1, "mini_batch_size": batch, "checkpoint_frequency": 0, **extra}
                _, outcome, _, _ = train_once(module, subset, classes, weights, 0, opts, augmentation, mode)
                if r:
                    samples[label] += outcome.history["seconds"].diff().dropna().tolist()
        r = {
            k: {
                "min": min(v),
                "p10": _quantile(v, 0.1),
                "p25": _quantile(v, 0.25),
                "median": statistics.median(v),
                "samples": v,
            }
            for k, v in samples.items()
        }
        r["same_work"] = same_work(
            old, old_extra if mode == "transfer" else {}, extra_new, subset, classes, weights, batch, augmentation, mode
        )
        for q in ("min", "p10", "p25", "median"):
            r[f"current_over_baseline_{q}"] = r["current"][q] / r["baseline"][q]
        results[mode] = r
        print(
            f"  {mode}: seconds per iteration, baseline p10 {r['baseline']['p10']:.3f} median "
            f"{r['baseline']['median']:.3f}; current p10 {r['current']['p10']:.3f} median "
            f"{r['current']['median']:.3f} ({len(samples['current'])} samples each)",
            flush=True,
        )
    return results


def commands(seeds: list[int], root: Path, weights: str, options: dict, holdout: float, classic: list[dict]) -> dict:
    """``retrain run`` per seed, cold, one after another on a new PREFECT_HOME (as a user runs
    them: the first starts the local server), against the classic loop's runs of the same seeds."""
    work = Path(tempfile.mkdtemp(prefix="bench-train-commands-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RETRAIN_AUTO_SERVER"}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    retrain = str(Path(sys.executable).parent / "retrain")
    runs = []
    try:
        for seed in seeds:
            argv = [retrain, "run", str(root / "train"), "--store", str(work / "store"), "--network", NETWORK]
            argv += ["--weights", weights, "--mode", "transfer", "--split", f"{1 - holdout:g},{holdout:g},0"]
            argv += ["--max-epochs", str(options["max_epochs"]), "--mini-batch-size", str(options["mini_batch_size"])]
            argv += ["--validation-frequency", str(options["validation_frequency"]), "--seed", str(seed), "--json"]
            started = time.perf_counter()
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"retrain run failed ({done.returncode}):\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            evaluated = subprocess.run(
                [retrain, "evaluate", summary["model_url"], str(root / "val"), "--engine", "torch", "--json"],
                env=env,
                capture_output=True,
                text=True,
            )
            record = {
                "seed": seed,
                "seconds": wall,
                "flow_seconds": summary.get("seconds"),
                "started_server": "started a local Prefect server" in done.stderr,
                "test_accuracy": json.loads(evaluated.stdout.strip().splitlines()[-1])["data_accuracy"],
                "load": os.getloadavg()[0],
            }
            runs.append(record)
            print(
                f"  retrain run seed {seed}: {wall:7.1f} s wall ({record['flow_seconds']:.1f} s in its flow"
                f"{', started the server' if record['started_server'] else ''}), accuracy on val/ "
                f"{record['test_accuracy']:.4f}, load {record['load']:.1f}",
                flush=True,
            )
    finally:
        subprocess.run([retrain, "server", "stop"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    classic_seconds = statistics.mean(r["seconds"] for r in classic)
    seconds = statistics.mean(r["seconds"] for r in runs)
    return {
        "runs": runs,
        "classic_runs": [{k: r[k] for k in ("seed", "seconds", "test_accuracy")} for r in classic],
        "mean_seconds": seconds,
        "classic_mean_seconds": classic_seconds,
        "speedup_vs_classic": classic_seconds / seconds,
        "mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in runs),
        "classic_mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in classic),
    }


def print_table(results: dict) -> None:
    print("\n" + "=" * 100)
    print(
        f"{'data set':<12} {'method':<8} {'views':>5} {'runs':>4} {'wall s':>8} {'speedup':>8} "
        f"{'CPU s':>8} {'speedup':>8} {'accuracy':>9} {'vs classic':>11}  per seed"
    )
    for name in ("hymenoptera", "merch"):
        if name not in results:
            continue
        for row in results[name]["summary"]:
            print(
                f"{name:<12} {row['method']:<8} {str(row['views'] if row['views'] is not None else '-'):>5} "
                f"{row['runs']:>4} {row['mean_seconds']:8.1f} {row['speedup_vs_classic']:7.2f}x "
                f"{row['mean_cpu_seconds']:8.1f} {row['cpu_speedup_vs_classic']:7.2f}x {row['mean_test_accuracy']:9.4f} "
                f"{row['accuracy_minus_classic_points']:+10.2f}p  " + " ".join(f"{a:.3f}" for a in row["accuracies"])
            )
    if "commands" in results:
        c = results["commands"]
        print(
            f"retrain run, cold commands one after another: {c['mean_seconds']:.1f} s a run (per seed "
            + ", ".join(f"{r['seconds']:.1f}" for r in c["runs"])
            + f"); classic loop {c['classic_mean_seconds']:.1f} s: {c['speedup_vs_classic']:.2f}x the plain loop; "
            f"accuracy on val/ {c['mean_test_accuracy']:.4f} (classic {c['classic_mean_test_accuracy']:.4f}; per seed "
            + " ".join(f"{r['test_accuracy']:.3f}" for r in c["runs"])
            + ")"
        )
    if "loop_overhead" in results:
        print(
            f"\nloop against tasks/training.py at {results['settings']['baseline_rev']}: seconds per "
            "iteration (min / p10 / p25 / median), current over baseline"
        )
        for mode, r in results["loop_overhead"].items():
            qs = ("min", "p10", "p25", "median")
            print(
                f"  {mode:<9} baseline "
                + " / ".join(f"{r['baseline'][q]:.3f}" for q in qs)
                + "  current "
                + " / ".join(f"{r['current'][q]:.3f}" for q in qs)
                + "  ratio "
                + " / ".join(f"{r[f'current_over_baseline_{q}']:.3f}" for q in qs)
            )
            w = r["same_work"]
            print(
                f"  {'':<9} same work: aten ops {w['aten_ops']['baseline']} vs {w['aten_ops']['current']} "
                f"(differing: {w['ops_differing']}), identical losses: {w['identical_losses']}"
            )
    print("=" * 100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"))
    p.add_argument(
        "--data",
        default="hymenoptera,merch,overhead",
        help="comma-separated: hymenoptera, merch, overhead (fine-tune loop vs baseline), commands (retrain run "
        "per hymenoptera seed, cold, against the classic loop: needs hymenoptera)",
    )
    p.add_argument("--hymenoptera-seeds", default="0,1,2")
    p.add_argument("--merch-seeds", default="0,1,2,3,4")
    p.add_argument(
        "--hymenoptera-epochs",
        type=int,
        default=25,
        help="default 25, the PyTorch transfer-learning tutorial's on this data set",
    )
    p.add_argument("--merch-epochs", type=int, default=30, help="default 30, MATLAB trainingOptions' MaxEpochs")
    p.add_argument("--hymenoptera-batch", type=int, default=32)
    p.add_argument("--merch-batch", type=int, default=11, help="55 training images: 5 iterations an epoch")
    p.add_argument("--validation-frequency", type=int, default=5)
    p.add_argument("--holdout", type=float, default=0.15, help="part of hymenoptera train/ used as validation data")
    p.add_argument("--views", default="auto", help="cached views to compare, e.g. auto or 1,2,4")
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--overhead-iterations", type=int, default=8)
    p.add_argument(
        "--baseline-rev",
        default="5826a04",
        help="git revision of the loop before the feature cache (default: the first commit)",
    )
    p.add_argument("--quick", action="store_true", help="1 seed each, 3 epochs, 1 overhead repeat")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_train.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.hymenoptera_seeds, args.merch_seeds, args.overhead_repeats = "0", "0", 1
        args.hymenoptera_epochs = args.merch_epochs = 3
    if not Path(args.weights).exists():
        print(f"skipped: weights {args.weights} not found (the benchmark needs ../shared)")
        return 0
    wanted = set(args.data.split(","))
    view_counts = [None if v == "auto" else int(v) for v in args.views.split(",")]
    augmentation = Augmentation()  # the seed's: reflection and +-30 px translation
    size = get_spec(NETWORK).preprocessing.input_size
    base = {"validation_frequency": args.validation_frequency, "checkpoint_frequency": 0}
    results: dict = {
        "settings": {
            **vars(args),
            "network": NETWORK,
            "augmentation": augmentation.to_dict(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "device": str(resolve_device("auto")),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    }
    started = time.perf_counter()
    hymenoptera = SHARED / "data" / "hymenoptera_data"
    merch = SHARED / "data" / "MerchData.zip"
    if "hymenoptera" in wanted and hymenoptera.exists():
        print("hymenoptera: train/ -> val/", flush=True)
        seeds = [int(s) for s in args.hymenoptera_seeds.split(",")]
        results["hymenoptera"] = compare(
            "hymenoptera",
            seeds,
            lambda seed: load_hymenoptera(hymenoptera, args.holdout, seed, size),
            args.weights,
            {**base, "max_epochs": args.hymenoptera_epochs, "mini_batch_size": args.hymenoptera_batch},
            augmentation,
            view_counts,
        )
        if "commands" in wanted:
            print("retrain run commands, cold, one after another on a new Prefect home", flush=True)
            results["commands"] = commands(
                seeds,
                hymenoptera,
                args.weights,
                {**base, "max_epochs": args.hymenoptera_epochs, "mini_batch_size": args.hymenoptera_batch},
                args.holdout,
                [r for r in results["hymenoptera"]["runs"] if r["method"] == "classic"],
            )
    if "merch" in wanted and merch.exists():
        print("MerchData: split 0.7/0.15/0.15 per seed, test accuracy", flush=True)
        store = tempfile.mkdtemp(prefix="bench-train-store-")
        seeds = [int(s) for s in args.merch_seeds.split(",")]
        results["merch"] = compare(
            "merch",
            seeds,
            lambda seed: load_merch(merch, store, seed, size),
            args.weights,
            {**base, "max_epochs": args.merch_epochs, "mini_batch_size": args.merch_batch},
            augmentation,
            view_counts,
        )
    if "overhead" in wanted and hymenoptera.exists():
        print("loop overhead against the baseline training.py", flush=True)
        data, _, _, classes = load_hymenoptera(hymenoptera, 0.0, 0, size)
        results["loop_overhead"] = loop_overhead(
            data, classes, args.weights, args.overhead_repeats, args.overhead_iterations, 16, args.baseline_rev
        )
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
