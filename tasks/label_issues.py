"""Label issues: the training and validation images whose given label the data itself doubts.

Every image gets out-of-sample class probabilities from K-fold (stratified, seeded) multinomial
logistic regressions on the network's pooled features, the input of its head: the pretrained
body's in transfer mode (its body is frozen: after training, the pooled view 0 of training's
feature cache, so no second pass over the images) and before training; the trained body's in
finetune and scratch modes after training. cleanlab's confident
learning then finds the likely label errors (``cleanlab.filter.find_label_issues``) and scores
each label (``cleanlab.rank.get_label_quality_scores``).

Why a logistic regression and not the network's own head trained K times: on pooled features
it is convex (no learn rate, epochs or seed to tune, the same answer every time) and costs
next to nothing. Measured on hymenoptera train/ with 10 % of the labels flipped (seed 0,
SqueezeNet-Caffe, a busy 2-core CPU): the regression flagged with precision 0.51 and recall
0.75 in 0.5 s; SqueezeNet's own head (its 1x1 convolution on the 14 x 14 maps, 30 epochs per
fold) 0.46 and 0.75 in 292 s.

Outputs in the run folder: ``label_issues.csv`` (path, given_label, suggested_label,
label_quality, rank; the flagged images only, best suspects first) and ``label-issues.png``
(the top suspects, each titled with its given and suggested label). With ``exclude``, the
flagged images' rows in ``split.parquet`` become the part ``excluded``: training and
validation leave them out.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pandas as pd
import torch

from retrain.tasks import storage
from retrain.tasks.networks import NetworkSpec, build_network, get_spec, resolve_device
from retrain.tasks.preprocessing import Preprocessing, load_images
from retrain.tasks.reports import montage
from retrain.tasks.runs import RunConfig, read_run
from retrain.tasks.training.data import load_training_data
from retrain.tasks.training.devices import to_device

FOLDS = 5
MIN_PER_CLASS = FOLDS  # stratified K-fold needs K images of every class
PLOT_COUNT = 16  # suspects shown in label-issues.png
FEATURE_BATCH = 32
EXCLUDED = "excluded"  # split.parquet's part for the flagged images left out of training
COLUMNS = ["path", "given_label", "suggested_label", "label_quality", "rank"]


def pooled_head_inputs(
    model: torch.nn.Module,
    spec: NetworkSpec,
    preprocessing: Preprocessing,
    images,
    device: torch.device,
) -> np.ndarray:
    """What the network's head sees for each image (uint8 N x 3 x H x W, a tensor or image
    shards), averaged over its spatial positions: N x C float32. Taken by a hook on the head
    layer, so every architecture gives them without a body/head split."""
    captured: list[torch.Tensor] = []

    def keep(_module, args) -> None:
        x = args[0].float()
        captured.append((x.mean((2, 3)) if x.dim() == 4 else x.flatten(1)).cpu())

    hook = model.get_submodule(spec.head_layer).register_forward_pre_hook(keep)
    model.eval().to(device)
    try:
        with torch.inference_mode():
            for start in range(0, len(images), FEATURE_BATCH):
                model(preprocessing.normalize(to_device(images[start : start + FEATURE_BATCH], device)))
    finally:
        hook.remove()
    return torch.cat(captured).numpy() if captured else np.empty((0, 0), dtype=np.float32)


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = FOLDS, seed: int = 0):
    """Class probabilities (N x classes) of each row from a logistic regression that did not
    see it: stratified ``folds``-fold, shuffled by ``seed``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # One BLAS/OpenMP thread: these small products lose more to threads waiting on each other
    # (and on torch's) than they gain; 12x faster on 2 cores (2,040 x 512 features: 0.5 s a run).
    with threadpool_limits(1):
        return cross_val_predict(model, features, labels, cv=cv, method="predict_proba")


def rank_label_issues(paths: list[str], labels: np.ndarray, probabilities: np.ndarray, classes: list[str]):
    """The images cleanlab flags as likely label errors, best suspects (lowest label quality)
    first: a DataFrame of :data:`COLUMNS`."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame(
        {
            "path": np.asarray(paths, dtype=object)[ranked],
            "given_label": names[labels[ranked]],
            "suggested_label": names[probabilities[ranked].argmax(1)],
            "label_quality": quality[ranked],
            "rank": np.arange(1, len(ranked) + 1),
        },
        columns=COLUMNS,
    )


def too_few_images(counts: pd.Series, classes: list[str]) -> str | None:
    """Why a run's train and validation images are too few for K-fold, or None."""
    short = {c: int(counts.get(c, 0)) for c in classes if counts.get(c, 0) < MIN_PER_CLASS}
    if not short:
        return None
    listed = ", ".join(f"{c} ({n})" for c, n in short.items())
    return f"under {MIN_PER_CLASS} training and validation images in class {listed}: label issues skipped"


def find_run_label_issues(run_url: str, exclude: bool = False, trained: bool = False) -> dict:
    """Label issues of a run's training and validation images: writes ``label_issues.csv``
    and ``label-issues.png`` into the run folder; with ``exclude``, marks the flagged rows of
    ``split.parquet`` :data:`EXCLUDED`. ``trained``: the run's ``trained.pt`` exists, and in
    finetune and scratch modes its body gives the features. A rerun of the run reuses its CSV.

    Returns ``{"label_issues": count or None, "label_issues_excluded": count (with exclude),
    "skipped": why or None, "label_issues_seconds"}``."""
    started = time.perf_counter()
    layout = storage.RunLayout(run_url)
    try:
        issues = _issues(layout, trained)
    finally:
        if storage.exists(layout.pooled_features):
            storage.remove(layout.pooled_features)  # training's hand-over: only the CSV is kept
    if isinstance(issues, str):
        return {"label_issues": None, "skipped": issues, "label_issues_seconds": time.perf_counter() - started}
    result = {"label_issues": len(issues), "skipped": None}
    if exclude:
        split = storage.read_parquet(layout.split)
        flagged = split["path"].isin(issues["path"]) & split["split"].isin(["train", "val"])
        split.loc[flagged, "split"] = EXCLUDED
        storage.write_parquet(layout.split, split)
        result["label_issues_excluded"] = int(flagged.sum())
    result["label_issues_seconds"] = time.perf_counter() - started
    return result


def _issues(layout: storage.RunLayout, trained: bool) -> pd.DataFrame | str:
    """The run's label issues (the CSV's rows; read back when a rerun finds the CSV), or why
    there are none to find."""
    split = storage.read_parquet(layout.split)
    classes = sorted(split["label"].unique())
    reason = too_few_images(split.loc[split["split"].isin(["train", "val"]), "label"].value_counts(), classes)
    if reason:
        return reason
    if storage.exists(layout.label_issues):
        return pd.read_csv(io.BytesIO(storage.read_bytes(layout.label_issues)), keep_default_na=False)
    config = RunConfig.from_record(read_run(layout.url)["config"])
    issues = _find(layout.url, config, split, classes, trained)
    storage.write_bytes(layout.label_issues, issues.to_csv(index=False).encode())
    _plot_suspects(issues.head(PLOT_COUNT), get_spec(config.network).preprocessing, layout.label_issues_plot)
    return issues


def _find(run_url: str, config: RunConfig, split: pd.DataFrame, classes: list[str], trained: bool) -> pd.DataFrame:
    """The K-fold probabilities and cleanlab's verdict for the run's train and val images."""
    paths = list(split.loc[split["split"] == "train", "path"]) + list(split.loc[split["split"] == "val", "path"])
    labels = pd.Categorical(
        list(split.loc[split["split"] == "train", "label"]) + list(split.loc[split["split"] == "val", "label"]),
        categories=classes,
    ).codes.astype(np.int64)
    features = _pooled_features(run_url, config, split, classes, trained)
    probabilities = out_of_sample_probabilities(features, labels, seed=config.options.seed)
    return rank_label_issues(paths, labels, probabilities, classes)


def _pooled_features(
    run_url: str, config: RunConfig, split: pd.DataFrame, classes: list[str], trained: bool
) -> np.ndarray:
    """The head's pooled inputs for the train then val images: transfer mode's training left
    them (``pooled_features.npz``, from its feature cache: no second pass over the images);
    else one pass of the pretrained network, or after training in finetune and scratch modes
    of the trained one."""
    layout = storage.RunLayout(run_url)
    if trained and config.mode == "transfer" and storage.exists(layout.pooled_features):
        with np.load(io.BytesIO(storage.read_bytes(layout.pooled_features))) as saved:
            features = np.concatenate([saved["train"], saved["val"]])
        if len(features) == split["split"].isin(["train", "val"]).sum():
            return features
    spec = get_spec(config.network)
    if trained and config.mode != "transfer":
        from retrain.tasks.model_file import load_model_file

        model = load_model_file(layout.trained).model
    elif config.mode == "scratch":
        raise ValueError("scratch mode has no pretrained body to find label issues with before training")
    else:
        model, _ = build_network(spec.name, len(classes), config.weights)
    device = resolve_device(config.options.execution_environment)
    data = load_training_data(split, classes, spec.preprocessing.input_size, layout.store)
    try:
        return np.concatenate(
            [
                pooled_head_inputs(model, spec, spec.preprocessing, images, device)
                for images in (data.train_images, data.val_images)
                if len(images)
            ]
        )
    finally:
        data.close()


def _plot_suspects(suspects: pd.DataFrame, preprocessing: Preprocessing, url: str) -> str | None:
    """label-issues.png: the top suspects, titled given -> suggested; none when none flagged."""
    if suspects.empty:
        return None
    images = load_images(list(suspects["path"]), preprocessing.input_size)
    titles = [f"#{r.rank} given: {r.given_label}\nsuggested: {r.suggested_label}" for r in suspects.itertuples()]
    return montage(images, titles, url)
