"""Label issues: the training and validation images whose given label the data itself doubts.

Every image gets out-of-sample class probabilities from K-fold (stratified, seeded) multinomial
logistic regressions on the network's pooled features, the input of its head: the pretrained
body's in transfer mode (its body is frozen: after training, the pooled view 0 of training's
feature cache, so no second pass over the images) and before training; the trained body's in
finetune and scratch modes after training. cleanlab's confident learning counts the likely
label errors (``cleanlab.count.num_label_issues``) and scores each label
(``cleanlab.rank.get_label_quality_scores``, self-confidence); the flagged images are that many
of the lowest scores.

Why a logistic regression and not the network's own head trained K times: on pooled features
it is convex (no learn rate, epochs or seed to tune, the same answer every time) and costs
next to nothing. Measured on hymenoptera train/ with 10 % of the labels flipped (seed 0,
SqueezeNet-Caffe, a busy 2-core CPU): the regression flagged with precision 0.51 and recall
0.75 in 0.5 s; SqueezeNet's own head (its 1x1 convolution on the 14 x 14 maps, 30 epochs per
fold) 0.46 and 0.75 in 292 s.

Why two strengths of regression and 5 draws of the folds. The bar is cleanlab's own recipe on
a plain scikit-learn regression (C = 1, one 5-fold draw, ``cleanlab.filter.find_label_issues``).
At C = 1 a regression on 512 standardised features of a few hundred images fits its training
folds exactly, so its held-out probabilities are over-confident: a clean but unusual image gets
a confidently wrong probability and is flagged (low precision). The strength whose held-out
log-loss is best (C_GRID, tried on the first draw of the folds: about 0.01 on hymenoptera,
0.01 to 0.1 on MerchData) ranks the suspects far better, and averaging its probabilities over 5
draws removes the draw's noise (one draw moves recall by +-0.1). But confident learning counts
issues with confident probabilities: on the calibrated ones it counts too few (MerchData: 5.5
flagged for 6 flips) and recall falls. So the count is the plain regression's (its first draw,
fitted anyway in the search), the choice of images the calibrated ranking's. Measured on seeds
the benchmark does not report (its data and 10 % flips, frozen SqueezeNet-Caffe features;
MerchData seeds 10-29, hymenoptera 10-33), precision / recall, MerchData then hymenoptera:
baseline (mean of 5 draws) 0.734 / 0.895 and 0.351 / 0.764; C = 1, 5 draws, cleanlab's filter
0.828 / 0.867 and 0.409 / 0.750; best C, 5 draws, cleanlab's filter 0.900 / 0.808 and 0.556 /
0.762; kept (the plain count, the best C's ranking): 0.806 / 0.958 and 0.437 / 0.830, better
on both. On the benchmark's own seeds 0-2 (benchmarks/results/label-issues-20261206-031938.json):
MerchData 0.819 / 0.833 against 0.778 / 0.867 (recall: 15 of its 18 flips found, the baseline's
draws 15.6 on average; F1 0.826 against 0.820), hymenoptera 0.420 / 0.889 against 0.372 /
0.814. Cost: 45 fits instead of 5; on benchmarks/bench_scale.py's 2,400 images (12 classes,
transfer, 2 epochs, a quiet 2-core CPU) the step took 5.4 s of the run's 48.6 s wall (11 %).

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
from retrain.tasks.networks import NetworkSpec, WithEmbedding, build_network, get_spec, resolve_device
from retrain.tasks.preprocessing import Preprocessing, load_images
from retrain.tasks.reports import montage
from retrain.tasks.runs import RunConfig, read_run
from retrain.tasks.training.data import load_training_data
from retrain.tasks.training.devices import to_device

FOLDS = 5
REPEATS = 5  # draws of the folds, their probabilities averaged: see the module's docstring
# The regression's inverse strengths tried (on standardised features); the last, scikit-learn's
# default, is the plain regression whose confident probabilities cleanlab counts issues with.
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
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
    shards), pooled: N x C float32, the embeddings drift tests compare too
    (:class:`tasks.networks.WithEmbedding`: a hook on the head layer, so every architecture
    gives them without a body/head split)."""
    network = WithEmbedding(model.eval().to(device), spec.head_layer)
    with torch.inference_mode():
        captured = [
            network(preprocessing.normalize(to_device(images[start : start + FEATURE_BATCH], device)))[1].cpu()
            for start in range(0, len(images), FEATURE_BATCH)
        ]
    return torch.cat(captured).numpy() if captured else np.empty((0, 0), dtype=np.float32)


def flag_label_issues(
    paths: list[str], labels: np.ndarray, features: np.ndarray, classes: list[str], seed: int = 0
) -> pd.DataFrame:
    """The images whose given label (``labels``: class numbers into ``classes``) the
    ``features`` doubt, best suspects (lowest label quality) first: a DataFrame of
    :data:`COLUMNS`. Every class needs at least :data:`FOLDS` rows.

    The first draw of the folds is fitted at every strength of :data:`C_GRID`; how many labels
    are wrong is cleanlab's count (confident learning) on the plain regression's (C = 1, the
    last) probabilities; which ones, the lowest self-confidence under the strength with the
    best held-out log-loss, its probabilities averaged over :data:`REPEATS` draws. The
    module's docstring says why."""
    from cleanlab.count import num_label_issues
    from sklearn.model_selection import RepeatedStratifiedKFold
    from threadpoolctl import threadpool_limits

    rows = np.arange(len(labels))
    draws = list(RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=REPEATS, random_state=seed).split(features, labels))
    # One BLAS/OpenMP thread: these small products lose more to threads waiting on each other
    # (and on torch's) than they gain; 12x faster on 2 cores (2,040 x 512 features: 0.5 s for 5 folds).
    with threadpool_limits(1):
        first = {strength: _held_out(features, labels, draws[:FOLDS], strength) for strength in C_GRID}
        best = min(C_GRID, key=lambda strength: -np.log(first[strength][rows, labels] + 1e-15).mean())  # log-loss
        probabilities = (first[best] + _held_out(features, labels, draws[FOLDS:], best)) / REPEATS
    count = num_label_issues(labels, first[C_GRID[-1]])
    return rank_label_issues(paths, labels, probabilities, classes, count)


def _held_out(features: np.ndarray, labels: np.ndarray, folds: list, strength: float) -> np.ndarray:
    """The sum over ``folds`` (train, held-out row numbers) of the held-out rows' class
    probabilities from a logistic regression of inverse strength ``strength`` fitted on the
    training rows (on standardised features: pooled features differ in scale by channel)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    total = np.zeros((len(labels), int(labels.max()) + 1))
    for train, held_out in folds:
        # tol 1e-3, not 1e-4: the same verdicts (probabilities to 3 decimals are all a ranking needs)
        # in half the time (2,400 images, 12 classes: 9.6 s, not 17.5 s).
        model = make_pipeline(StandardScaler(), LogisticRegression(C=strength, tol=1e-3, max_iter=1000))
        total[held_out] += model.fit(features[train], labels[train]).predict_proba(features[held_out])
    return total


def rank_label_issues(
    paths: list[str], labels: np.ndarray, probabilities: np.ndarray, classes: list[str], count: int
) -> pd.DataFrame:
    """The ``count`` images of lowest label quality (cleanlab's self-confidence: the
    probability of the given label), best suspects first: a DataFrame of :data:`COLUMNS`."""
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    ranked = np.argsort(quality, kind="stable")[:count]
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
    return flag_label_issues(paths, labels, features, classes, seed=config.options.seed)


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
