"""Experiments: a grid of run options x seeds, and the comparison of their runs.

MATLAB's Experiment Manager for this pipeline. ``--grid KEY=V1,V2`` names any run option (the
flow's ``network``, ``weights``, ``mode``, ``split_fractions``, a training option such as
``initial_learn_rate``, or an augmentation setting); every combination is run once per seed.
A network value may name its own weights, ``network=squeezenet-caffe@caffe.pth,resnet18@none``,
since one weights file rarely fits two architectures.
The seed varies what training draws (the new head's weights, the order, augmentation,
dropout); the data split is the same for every run (the experiment's split seed), so runs are
compared on the same test images and transfer runs of one network share one feature cache.

Plain functions on small records; flows/experiment.py runs them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields

import pandas as pd

from retrain.tasks import storage
from retrain.tasks.feature_sharing import shared_feature_folder
from retrain.tasks.reports import _save
from retrain.tasks.request import DEFAULTS, RunRequest
from retrain.tasks.runs import STATUS_COMPLETED, read_run
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.vocabulary import AUGMENTATION_KEYS, AugmentationSettings

# The request's plain choices (network, weights, mode, split_fractions) a grid may vary.
FLOW_KEYS = {f.name: str for f in fields(RunRequest) if f.type == "str"}


def _convert(key: str, text: str, kind: type):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--grid {key}: {text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    if kind is str:
        return text
    if text.lower() == "none":
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--grid {key}: {text!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["mode=transfer,finetune", "initial-learn-rate=1e-3,1e-4"]`` -> {key: [values]},
    keys in snake_case, values converted to the option's type."""
    options = {k: kind for k, kind in TrainingOptions.value_types().items() if k != "seed"}  # seeds: --seeds
    kinds = {**FLOW_KEYS, **AUGMENTATION_KEYS, **options}
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        key = "split_fractions" if key == "split" else key
        if not sep or not values.strip():
            raise ValueError(f"--grid takes KEY=V1,V2,..., not {item!r}")
        if key == "seed":
            raise ValueError("--grid seed=...: give seeds with --seeds 0,1,2")
        if key not in kinds:
            raise ValueError(f"--grid {key}: not a run option; choose from {', '.join(sorted(kinds))}")
        if key in grid:
            raise ValueError(f"--grid {key} given twice")
        # a split's fractions contain commas: V1;V2 separates its values
        parts = values.split(";") if key == "split_fractions" else values.split(",")
        grid[key] = [_convert(key, v.strip(), kinds[key]) for v in parts if v.strip()]
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes integers like 0,1,2, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, not {text!r}")
    return seeds


@dataclass
class PlannedRun:
    combination: dict  # the grid's values for this run
    seed: int
    parameters: dict  # keyword arguments of retrain_flow

    @property
    def label(self) -> str:
        return combination_label(self.combination)


def combination_label(combination: dict) -> str:
    """``network=resnet18@w.pth, mode=transfer``: weights named by file name, not full URL."""
    shown = {}
    for key, value in combination.items():
        if isinstance(value, str) and "@" in value:
            name, _, weights = value.partition("@")
            value = f"{name}@{weights.rsplit('/', 1)[-1]}"
        shown[key] = value
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "base"


def plan_runs(
    base: dict, grid: dict[str, list], seeds: list[int], store: str, dataset: str, share_features: bool = True
) -> list[PlannedRun]:
    """Every grid combination x seed as retrain_flow parameters. ``base``: the flow
    parameters every run shares (network, weights, mode, split_fractions, options,
    augmentation...). Transfer runs get the shared feature folder of their frozen body."""
    split_seed = int((base.get("options") or {}).get("seed", 0))
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        combination = dict(zip(keys, values))
        for seed in seeds:
            parameters = {
                **base,
                "options": dict(base.get("options") or {}),
                "augmentation": dict(base.get("augmentation") or {}),
            }
            for key, value in combination.items():
                if key == "network" and "@" in value:  # NAME@WEIGHTS: a network with its own weights
                    parameters["network"], parameters["weights"] = value.split("@", 1)
                elif key in FLOW_KEYS:
                    parameters[key] = value
                elif key in AUGMENTATION_KEYS:
                    parameters["augmentation"][key] = value
                else:
                    parameters["options"][key] = value
            parameters["options"]["seed"] = seed
            parameters["split_seed"] = split_seed
            frozen_pretrained_body = (
                parameters.get("mode", "transfer") == "transfer" and parameters.get("weights") != "none"
            )
            if share_features and frozen_pretrained_body:  # a random body differs with every seed
                parameters["shared_features"] = _shared_features(parameters, store, dataset, split_seed)
            runs.append(PlannedRun(combination, seed, parameters))
    return runs


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _run_key(planned: PlannedRun) -> dict:
    # The number of training processes does not change a run's result (tasks/runs.py leaves it
    # out of the run's fingerprint too), so a rerun with another still finds its runs.
    parameters = {**planned.parameters, "options": dict(planned.parameters.get("options") or {})}
    parameters["options"].pop("processes", None)
    return parameters


def experiment_key(dataset: str, planned: list[PlannedRun], content: str = "") -> str:
    """The default experiment id: a digest of what its runs are (the data set's URL from
    :func:`tasks.datastore.materialize`, its images' ``content`` key from
    :func:`tasks.datastore.content_key` — labels and a label table's splits included —, every
    run's parameters), so the same command on the same images finds the same experiment and
    resumes it instead of starting over, and on changed images starts another."""
    return "exp-" + _digest([dataset, content, [_run_key(p) for p in planned]])[:12]


def run_id_in(experiment_id: str, planned: PlannedRun, content: str = "") -> str:
    """The run id of ``planned`` in the experiment, on images of ``content`` key: the same run
    of the same experiment is the same run folder on every rerun (reused when completed,
    resumed when not); with ``--experiment-id`` on changed images, a new run folder (a run is
    bound to its images, tasks/runs.py)."""
    return f"{experiment_id}-{_digest([_run_key(planned), content])[:8]}"


def _shared_features(parameters: dict, store: str, dataset: str, split_seed: int) -> dict:
    options = TrainingOptions.from_dict(parameters["options"])
    augmentation = AugmentationSettings.from_dict(parameters["augmentation"])
    key = {
        "data": dataset,
        "labels": parameters.get("labels"),
        "network": parameters.get("network", DEFAULTS.network),
        "weights": parameters.get("weights", DEFAULTS.weights),
        "split": parameters.get("split_fractions", DEFAULTS.split_fractions),
        "split_seed": split_seed,
        "augmentation": augmentation.to_dict(),
        "views": options.cache_views(augmentation),
    }
    return {"folder": shared_feature_folder(store, **key), "seed": split_seed}


# ---- the comparison -------------------------------------------------------------------------


@dataclass
class RunResult:
    label: str
    combination: dict
    seed: int
    run_id: str | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    seconds: float | None = None
    feature_cache: str | None = None  # built, reused or None
    error: str | None = None
    run: str | None = None
    model: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def finite(value):
    """``value`` with every NaN or infinity (a mean over no finished run) as None: what JSON,
    which has neither, can say."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def finished_summary(store: str, run_id: str) -> dict | None:
    """The summary of run ``run_id`` if it completed (model published, summary written), else
    None: a rerun of the experiment reuses a finished run instead of training it again."""
    layout = storage.StoreLayout(store).run(run_id)
    if not storage.exists(layout.summary) or read_run(layout.url).get("status") != STATUS_COMPLETED:
        return None
    return storage.read_json(layout.summary)


def run_result(planned: PlannedRun, summary: dict, seconds: float) -> RunResult:
    """The comparison's record of a finished run, from its summary and training.json."""
    training = storage.read_json(storage.RunLayout(summary["run"]).training)
    cache = training.get("feature_cache") or {}
    return RunResult(
        planned.label,
        planned.combination,
        planned.seed,
        run_id=summary["run_id"],
        val_accuracy=summary["val_accuracy"],
        test_accuracy=summary["test_accuracy"],
        seconds=seconds,
        feature_cache=("reused" if cache.get("reused") else "built") if cache else None,
        run=summary["run"],
        model=summary["model"],
        extra={"train_seconds": training.get("seconds"), "feature_seconds": cache.get("seconds")},
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def comparison_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per grid combination: runs, failures, mean and sd over seeds of validation and
    test accuracy and of wall time; best (highest mean validation accuracy) first."""
    rows = []
    for label in dict.fromkeys(r.label for r in results):
        group = [r for r in results if r.label == label]
        done = [r for r in group if r.error is None]
        val, val_sd = _mean_sd([r.val_accuracy for r in done])
        test, test_sd = _mean_sd([r.test_accuracy for r in done])
        secs, secs_sd = _mean_sd([r.seconds for r in done])
        rows.append(
            {
                "combination": label,
                **group[0].combination,
                "runs": len(done),
                "failed": len(group) - len(done),
                "val_accuracy": val,
                "val_accuracy_sd": val_sd,
                "test_accuracy": test,
                "test_accuracy_sd": test_sd,
                "seconds": secs,
                "seconds_sd": secs_sd,
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values(["val_accuracy", "seconds"], ascending=[False, True], na_position="last", kind="stable")


def best_run(results: list[RunResult], table: pd.DataFrame) -> RunResult | None:
    """The best combination's (by mean validation accuracy over seeds, never the test set)
    best run by validation accuracy."""
    ranked = table[table["runs"] > 0]
    if not len(ranked):
        return None
    label = ranked.iloc[0]["combination"]
    candidates = [r for r in results if r.label == label and r.error is None]
    return max(candidates, key=lambda r: (r.val_accuracy or 0.0, -(r.seconds or 0.0)))


def mean_sd_text(mean: float | None, sd: float | None, digits: int = 4) -> str:
    """``mean ± sd``, or "-" where no run gave a value (failed runs; a split without that part)."""
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| combination | runs | validation accuracy | test accuracy | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        failed = f" ({row.failed} failed)" if row.failed else ""
        lines.append(
            f"| {row.combination} | {row.runs}{failed} | {mean_sd_text(row.val_accuracy, row.val_accuracy_sd)} | "
            f"{mean_sd_text(row.test_accuracy, row.test_accuracy_sd)} | {mean_sd_text(row.seconds, row.seconds_sd, 1)} |"
        )
    return "\n".join(lines)


def accuracy_vs_time_plot(results: list[RunResult], table: pd.DataFrame, url: str, title: str) -> str:
    """Each run as a point (test accuracy against wall time), each combination's mean ± sd
    as a cross: what a better accuracy costs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(table.itertuples()):
        done = [r for r in results if r.label == row.combination and r.error is None]
        color = colors(i % 10)
        accuracies = [math.nan if r.test_accuracy is None else r.test_accuracy for r in done]  # no test part: none
        ax.scatter([r.seconds for r in done], accuracies, color=color, alpha=0.45, s=22)
        if row.runs:
            ax.errorbar(
                row.seconds,
                row.test_accuracy,
                xerr=row.seconds_sd,
                yerr=row.test_accuracy_sd,
                fmt="o",
                color=color,
                capsize=3,
                label=row.combination,
            )
    ax.set_xlabel("wall time per run (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if (table["runs"] > 0).any():  # no finished run, no point to name
        ax.legend(fontsize=7, loc="best")
    return _save(fig, url)


def write_experiment(folder: str, record: dict, results: list[RunResult], table: pd.DataFrame) -> dict:
    """``experiment.json``, ``runs.csv``, ``table.csv`` and ``accuracy_vs_time.png`` in
    ``folder``; returns the URLs."""
    urls = {
        "runs": storage.write_bytes(
            storage.join(folder, "runs.csv"),
            pd.DataFrame([r.to_dict() for r in results]).to_csv(index=False).encode(),
        ),
        "table": storage.write_bytes(storage.join(folder, "table.csv"), table.to_csv(index=False).encode()),
        "plot": accuracy_vs_time_plot(
            results, table, storage.join(folder, "accuracy_vs_time.png"), f"Experiment {record['experiment_id']}"
        ),
    }
    storage.write_json(storage.join(folder, "experiment.json"), {**record, "files": urls})
    return urls
