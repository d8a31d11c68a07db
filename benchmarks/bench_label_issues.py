"""Label issues at training time against cleanlab on a scikit-learn logistic regression, with 10 %
of the labels flipped (issue 23's "Must show" for label issues).

The data: MerchData (../shared/data/MerchData.zip, 5 classes x 15) and hymenoptera ``train/``
(ants and bees, 245 photos), given to ``retrain run`` through ``--labels`` tables written here.
Per data set and seed (seeds 0, 1, 2), the table fixes the split, drawn per class from the seed:
MerchData 10 training, 2 validation and 3 test images a class; hymenoptera ``train/`` 85 %
training and 15 % validation, and its ``val/`` (153 photos, full paths in the table) as the test
images. Of the training and validation images (the ones the label-issue step judges) 10 % are
drawn at random and given another class (drawn at random among the others); test labels stay
true, so test accuracy measures the model, not the flips. Three runs, each the command
``retrain run DATA --labels TABLE --network squeezenet-caffe --weights W --mode transfer
--max-epochs E --seed S --no-promote --fresh [FLAG] --json`` (the Caffe ImageNet weights in
../shared/weights; E: ``--epochs``, default 6), parsed and run in this process as the program
runs it, so that the runs share one start-up:

- clean: the true labels, ``--no-label-issues``;
- flipped: the flipped labels; its ``label_issues.csv`` against the flipped set: precision
  (flagged images that were flipped / flagged) and recall (flipped images flagged / flipped);
- flipped with ``--exclude-label-issues``: the final model trained without the flagged images.

The baseline, in this process on the same images and the same given labels (the flipped run's
``split.parquet``, training and validation images): the frozen SqueezeNet body's features,
average-pooled (512 per image; tasks/networks.py and tasks/preprocessing.py, the code the run
uses), out-of-sample probabilities from a 5-fold (stratified, shuffled) scikit-learn
LogisticRegression (standardised features), and ``cleanlab.filter.find_label_issues`` on them;
the same precision and recall, their mean (± sd) over 5 draws of the folds: which images share
a fold moves the verdict as much as a method does. The goal: retrain's at least as good. Beside
them, test accuracy of the three runs (their ``--json`` ``test_accuracy``) and how many images
the third left out. The JSON record (``--json-out``, else benchmarks/results/) is rewritten after
every seed.

On a split this small one image moves a figure a lot (MerchData: about 6 flips and 15 test
images per seed): read the means over seeds. Other work on the machine makes the walls noisy;
the load average is recorded with them. Run from the project root:

    .venv/bin/python benchmarks/bench_label_issues.py
    .venv/bin/python benchmarks/bench_label_issues.py --datasets merch --seeds 0   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "squeezenet1_1_caffe-2c890718.pth"
MERCH = SHARED / "data" / "MerchData.zip"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
FLIPPED_FRACTION = 0.10
FOLDS = 5  # the baseline's, and the issue's default K
# The baseline's draws of its folds: which images share a fold moves a K-fold verdict (on
# hymenoptera seed 0, precision 0.33-0.44 over 5 draws), so the baseline is their mean.
BASELINE_DRAWS = 5
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}
# What the record keeps of each run's --json and summary.json (label_issues*: the step's
# counts and seconds).
RUN_KEYS = (
    "test_accuracy",
    "val_accuracy",
    "test_images",
    "seconds",
    "wall_seconds",
    "label_issues",
    "label_issues_excluded",
    "label_issues_seconds",
)


# ---- the data sets and their label tables ---------------------------------------------------------


def class_folder_images(folder: Path) -> pd.DataFrame:
    """path (absolute), label (the class folder's name) of every image in ``folder``'s class folders."""
    rows = [
        (os.path.abspath(p), p.parent.name)
        for p in sorted(folder.glob("*/*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return pd.DataFrame(rows, columns=["path", "label"])


def split_per_class(images: pd.DataFrame, fractions: dict[str, float], rng: np.random.Generator) -> pd.Series:
    """Each image's split (train, val or test), drawn per class: round(fraction x class size)
    images to each part but train, the rest to train."""
    split = pd.Series("train", index=images.index)
    for _, group in images.groupby("label", sort=True):
        order = rng.permutation(group.index.to_numpy())
        start = 0
        for part, fraction in fractions.items():
            count = round(fraction * len(group))
            split[order[start : start + count]] = part
            start += count
    return split


def dataset(name: str, work: Path, seed: int) -> tuple[Path, pd.DataFrame]:
    """The data folder of ``name`` and its true table (path, label, split) for ``seed``."""
    rng = np.random.default_rng(seed)
    if name == "merch":
        folder = work / "MerchData"
        if not folder.exists():
            with zipfile.ZipFile(MERCH) as archive:
                archive.extractall(work)
        images = class_folder_images(folder)
        return folder, images.assign(split=split_per_class(images, {"val": 2 / 15, "test": 3 / 15}, rng))
    train = class_folder_images(HYMENOPTERA / "train")
    train = train.assign(split=split_per_class(train, {"val": 0.15}, rng))
    test = class_folder_images(HYMENOPTERA / "val").assign(split="test")
    return HYMENOPTERA / "train", pd.concat([train, test], ignore_index=True)


def flip_labels(table: pd.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[pd.DataFrame, set[str]]:
    """``table`` with ``fraction`` of its training and validation rows (drawn at random, at
    least one) given another class, drawn at random among the others; and the flipped paths."""
    judged = table.index[table["split"] != "test"].to_numpy()
    chosen = rng.choice(judged, size=max(1, round(fraction * len(judged))), replace=False)
    classes = sorted(table["label"].unique())
    flipped = table.copy()
    for row in sorted(chosen):
        others = [c for c in classes if c != table.at[row, "label"]]
        flipped.at[row, "label"] = others[int(rng.integers(len(others)))]
    return flipped, set(table.loc[chosen, "path"])


# ---- the measures ----------------------------------------------------------------------------------


def precision_recall(flagged: set[str], flipped: set[str]) -> dict:
    """Precision and recall of ``flagged`` against ``flipped`` (both restricted by the caller to
    the images judged); precision is None when nothing was flagged."""
    hits = len(flagged & flipped)
    return {
        "flagged": len(flagged),
        "flipped": len(flipped),
        "hits": hits,
        "precision": hits / len(flagged) if flagged else None,
        "recall": hits / len(flipped) if flipped else None,
    }


def frozen_features(paths: list[str], batch: int = 16) -> np.ndarray:
    """The frozen SqueezeNet body's features of ``paths``, average-pooled: N x 512, loaded and
    normalised by the code a run uses (the same images, size and Caffe preprocessing)."""
    import torch

    from retrain.tasks.networks import build_network, get_spec
    from retrain.tasks.preprocessing import load_images
    from retrain.tasks.training.body_head import split_at_head

    spec = get_spec("squeezenet-caffe")
    model, _ = build_network(spec.name, 2, str(WEIGHTS))  # the head is not used
    body = split_at_head(model.eval(), spec).body
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            images = load_images(paths[start : start + batch], spec.preprocessing.input_size)
            out.append(body(spec.preprocessing.normalize(images)).mean(dim=(2, 3)).numpy())
    return np.concatenate(out)


def baseline_issues(features: np.ndarray, labels: list[str], seed: int) -> np.ndarray:
    """Row numbers cleanlab flags, given out-of-sample probabilities of a 5-fold logistic
    regression on ``features`` (cleanlab's own recipe for data with features)."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(model, features, y, cv=folds, method="predict_proba")
    return find_label_issues(y, probabilities, return_indices_ranked_by="self_confidence")


# ---- the runs --------------------------------------------------------------------------------------


def retrain_run(data: Path, table: Path, seed: int, epochs: int, flags: list[str], store: Path) -> dict:
    """``retrain run DATA --labels TABLE ... --json``: what the command returns, its summary.json
    and its seconds. Parsed and run as the ``retrain`` program does, but in this process (as the
    resident process of ``retrain server`` runs it): the runs share one start of Python, torch and
    Prefect's temporary API, about 25 s a run on 2 cores, that has nothing to do with labels."""
    from retrain.cli import build_parser
    from retrain.commands import COMMANDS

    argv = ["run", str(data), "--labels", str(table), "--store", str(store), "--network", "squeezenet-caffe"]
    argv += ["--weights", str(WEIGHTS), "--mode", "transfer", "--max-epochs", str(epochs), "--seed", str(seed)]
    argv += ["--no-promote", "--fresh", *flags, "--json"]
    started = time.perf_counter()
    printed = COMMANDS["run"](build_parser("run").parse_args(argv))
    wall = time.perf_counter() - started
    summary = json.loads((Path(printed["run_url"]) / "summary.json").read_text())  # the step's seconds too
    return {**summary, **printed, "wall_seconds": wall}


def one_seed(name: str, seed: int, epochs: int, work: Path, features: dict[str, np.ndarray]) -> dict:
    """The three runs and the baseline of data set ``name`` at ``seed``."""
    data, table = dataset(name, work, seed)
    flipped_table, flipped = flip_labels(table, FLIPPED_FRACTION, np.random.default_rng([seed, 1]))
    tables = {}
    for kind, t in (("clean", table), ("flipped", flipped_table)):
        tables[kind] = work / f"{name}-{seed}-{kind}.csv"
        t.to_csv(tables[kind], index=False)
    store = work / "store"
    runs = {
        "clean": retrain_run(data, tables["clean"], seed, epochs, ["--no-label-issues"], store),
        "flipped": retrain_run(data, tables["flipped"], seed, epochs, [], store),
        "excluded": retrain_run(data, tables["flipped"], seed, epochs, ["--exclude-label-issues"], store),
    }
    split = pd.read_parquet(Path(runs["flipped"]["run_url"]) / "split.parquet")
    judged = split[split["split"] != "test"].reset_index(drop=True)
    judged_paths = set(judged["path"])
    flipped &= judged_paths  # a flipped file the run could not use is not judged
    issues = pd.read_csv(Path(runs["flipped"]["run_url"]) / "label_issues.csv")
    record = {"dataset": name, "seed": seed, "judged": len(judged), "test_images": runs["clean"]["test_images"]}
    record["retrain"] = precision_recall(set(issues["path"]) & judged_paths, flipped)

    started = time.perf_counter()
    missing = [p for p in judged["path"] if p not in features]
    if missing:
        features.update(zip(missing, frozen_features(missing)))
    features_seconds = time.perf_counter() - started
    started = time.perf_counter()
    judged_features = np.stack([features[p] for p in judged["path"]])
    draws = [
        precision_recall(
            set(judged["path"].iloc[baseline_issues(judged_features, list(judged["label"]), shuffle)]), flipped
        )
        for shuffle in range(seed * BASELINE_DRAWS, (seed + 1) * BASELINE_DRAWS)
    ]
    record["baseline"] = {
        **{key: _mean([d[key] for d in draws]) for key in ("flagged", "flipped", "hits", "precision", "recall")},
        **{f"{key}_sd": _sd([d[key] for d in draws]) for key in ("precision", "recall")},
        "draws": draws,
        "features_seconds": features_seconds,
        "seconds_per_draw": (time.perf_counter() - started) / BASELINE_DRAWS,
    }

    for kind, run in runs.items():
        record[kind] = {k: run.get(k) for k in RUN_KEYS}
    return record


# ---- the report ------------------------------------------------------------------------------------


def _text(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _sd(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def report(results: dict) -> None:
    header = (
        f"{'data set':<12}{'seed':>5}{'judged':>7}{'flipped':>8} | {'retrain P':>9}{'R':>6}{'flag':>5} | "
        f"{'baseline P':>10}{'R':>6}{'flag':>5} | {'test acc clean':>14}{'flipped':>8}{'excl.':>7}{'left out':>9}"
    )
    print("\n" + header)
    for name in results["datasets"]:
        records = [r for r in results["records"] if r["dataset"] == name]
        for r in records:
            ours, base = r["retrain"], r["baseline"]
            print(
                f"{name:<12}{r['seed']:>5}{r['judged']:>7}{ours['flipped']:>8} | "
                f"{_text(ours['precision']):>9}{_text(ours['recall'], 2):>6}{ours['flagged']:>5} | "
                f"{_text(base['precision']):>10}{_text(base['recall'], 2):>6}{base['flagged']:>5.0f} | "
                f"{_text(r['clean']['test_accuracy']):>14}{_text(r['flipped']['test_accuracy']):>8}"
                f"{_text(r['excluded']['test_accuracy']):>7}{r['excluded']['label_issues_excluded'] or 0:>9}"
            )
        mean = {
            key: _mean([r[part][field] for r in records])
            for key, part, field in (
                ("retrain_precision", "retrain", "precision"),
                ("retrain_recall", "retrain", "recall"),
                ("baseline_precision", "baseline", "precision"),
                ("baseline_recall", "baseline", "recall"),
                ("clean", "clean", "test_accuracy"),
                ("flipped", "flipped", "test_accuracy"),
                ("excluded", "excluded", "test_accuracy"),
            )
        }
        results.setdefault("means", {})[name] = mean
        print(
            f"{name + ' mean':<24}{'':>8} | {_text(mean['retrain_precision']):>9}{_text(mean['retrain_recall'], 2):>6}"
            f"{'':>5} | {_text(mean['baseline_precision']):>10}{_text(mean['baseline_recall'], 2):>6}{'':>5} | "
            f"{_text(mean['clean']):>14}{_text(mean['flipped']):>8}{_text(mean['excluded']):>7}"
        )
    walls = [r[kind]["wall_seconds"] for r in results["records"] for kind in ("clean", "flipped", "excluded")]
    print(
        f"{len(walls)} runs, {statistics.mean(walls):.0f} s wall each on average; whole benchmark "
        f"{results['seconds']:.0f} s; load average {results['load_average_start'][0]:.1f} at the start, "
        f"{results['load_average_end'][0]:.1f} at the end"
    )
    print(f"results: {results['json_out']}")


def write_record(results: dict) -> None:
    """The JSON record as it stands: written after every seed, so a stopped run keeps its figures."""
    out = Path(results["json_out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="merch,hymenoptera", help="merch, hymenoptera or both (default)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=6, help="max epochs of every run (default 6)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if not (WEIGHTS.exists() and MERCH.exists() and HYMENOPTERA.exists()):
        sys.exit("the benchmark needs ../shared/weights, ../shared/data/MerchData.zip and hymenoptera_data")
    names = [n for n in args.datasets.split(",") if n]
    unknown = set(names) - {"merch", "hymenoptera"}
    if unknown:
        sys.exit(f"unknown data set(s): {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="bench-label-issues-"))
    os.environ.pop("PREFECT_API_URL", None)  # Prefect's temporary API, in a home of its own:
    os.environ["PREFECT_HOME"] = str(work / "prefect")  # set before retrain imports Prefect
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the table, not every task's log
    results: dict = {
        "cores": os.cpu_count(),
        "epochs": args.epochs,
        "flipped_fraction": FLIPPED_FRACTION,
        "datasets": names,
        "json_out": args.json_out
        or str(ROOT / "benchmarks" / "results" / f"label-issues-{time.strftime('%Y%m%d-%H%M%S')}.json"),
        "load_average_start": os.getloadavg(),
        "records": [],
    }
    started = time.perf_counter()
    try:
        for name in names:
            features: dict[str, np.ndarray] = {}  # per image: the same across seeds
            for seed in (int(s) for s in args.seeds.split(",")):
                record = one_seed(name, seed, args.epochs, work, features)
                results["records"].append(record)
                results["seconds"] = time.perf_counter() - started
                write_record(results)
                ours, base = record["retrain"], record["baseline"]
                print(
                    f"{name} seed {seed}: retrain P {_text(ours['precision'])} R {_text(ours['recall'])}, "
                    f"baseline P {_text(base['precision'])} ± {_text(base['precision_sd'])} "
                    f"R {_text(base['recall'])} ± {_text(base['recall_sd'])}; test accuracy clean "
                    f"{_text(record['clean']['test_accuracy'])}, flipped {_text(record['flipped']['test_accuracy'])}, "
                    f"excluded {_text(record['excluded']['test_accuracy'])}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    report(results)
    write_record(results)


if __name__ == "__main__":
    main()
