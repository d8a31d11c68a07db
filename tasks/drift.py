"""Drift: do the images a scoring job sees still look like the ones its model was judged on?

A model file carries a **reference profile** (``record["reference"]``), taken when the run is
evaluated, on its held-out images (val and test: the model never trained on them) with float32
torch: how many it predicted of each class, its confidence on each (the top score), and a seeded
sample of a few hundred embeddings (the pooled input of the head layer:
:class:`tasks.networks.WithEmbedding`). A scoring job takes the same from the images it scores,
out of the same forward pass (every engine gives the embedding; an exported ONNX file as its
second output), and :func:`judge` compares the two with three two-sample tests:

- ``class_mix``: chi-square test of homogeneity on the predicted-label counts
  (``scipy.stats.chi2_contingency``): the model now sees another mix of classes;
- ``confidence``: Kolmogorov-Smirnov on the top scores (``scipy.stats.ks_2samp``): it is
  less (or more) sure than it was;
- ``embedding``: maximum mean discrepancy with a Gaussian kernel (bandwidth: the median
  distance), its p-value from permutations: the images themselves look different, whatever
  the model predicts.

The verdict is drift when any test's p-value is under ``ALPHA / tests`` (Bonferroni: the chance
of a false alarm on a folder like the reference is at most ``ALPHA``). No verdict (``drift:
null``, with the reason) for a model file without a reference profile (made before profiles
existed), a reference or a job under its minimum of images.

Why our own MMD rather than alibi-detect's ``MMDDrift``: alibi-detect 0.13 pins numpy<2 and
pandas<3 (retrain needs pandas 3) and brings transformers, opencv and numba; the test itself is
the kernel matrix once and one matrix product for all permutations (below).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

PROFILE_VERSION = 1
ALPHA = 0.05  # family-wise false-alarm rate of one verdict
MIN_JOB_IMAGES = 50  # under this a job gets "too few images", not a verdict
MIN_REFERENCE_IMAGES = 20
REFERENCE_EMBEDDINGS = 300  # embeddings a model file keeps (float16: 300 KB at 512 wide)
REFERENCE_CONFIDENCES = 2000
# Embeddings a job compares (a fixed sample of its images, by path). The reference's 300 bound
# the test's power; 500 beside them cost 0.35 s (300 x 1000: 0.6 s, on a busy 2-core CPU).
JOB_EMBEDDINGS = 500
PERMUTATIONS = 200  # p-values down to 1/201, under the 0.05 / 3 threshold
CONFIDENCE_BINS = 10


def reference_profile(
    scores: torch.Tensor, embeddings: torch.Tensor | None, classes: list[str], split: str, seed: int = 0
) -> dict:
    """The profile a model file keeps, from its held-out images' softmax scores (N x K) and
    embeddings (N x C): plain values and tensors only (a model file loads with
    ``weights_only=True``)."""
    generator = torch.Generator().manual_seed(seed)
    confidence, labels = scores.max(1)
    keep = torch.randperm(len(scores), generator=generator)
    return {
        "version": PROFILE_VERSION,
        "images": len(scores),
        "split": split,
        "classes": list(classes),
        "label_counts": torch.bincount(labels, minlength=len(classes)).tolist(),
        "confidence": confidence[keep[:REFERENCE_CONFIDENCES]].float().clone(),
        "embeddings": None if embeddings is None else embeddings[keep[:REFERENCE_EMBEDDINGS]].half().clone(),
    }


def takes_embedding(path: str, rate: float) -> bool:
    """Whether a job keeps ``path``'s embedding for the drift test: a fixed sample by path (the
    same in every retry of a partition), ``rate`` of the images."""
    return rate >= 1.0 or zlib.crc32(path.encode("utf-8")) < rate * 2**32


def embedding_rate(images: int) -> float:
    """The share of a job's images whose embeddings it keeps: about ``JOB_EMBEDDINGS`` in all."""
    return min(1.0, JOB_EMBEDDINGS / max(images, 1))


def no_verdict(reason: str, images: int = 0, reference_images: int | None = None) -> dict:
    return {
        "drift": None,
        "reason": reason,
        "images": images,
        "reference_images": reference_images,
        "alpha": ALPHA,
        "tests": [],
    }


def judge(
    reference: dict | None,
    classes: list[str],
    label_counts: dict[str, int],
    confidence: np.ndarray,
    embeddings: np.ndarray | None,
    seed: int = 0,
) -> dict:
    """drift.json: this job's images, by predicted label, top score (one per image) and
    embedding (a sample; None where the engine gives none), against the model's reference."""
    images = len(confidence)
    if not reference:
        return no_verdict(
            "the model file has no reference profile (made before drift checks existed): retrain it to get one",
            images,
        )
    ref_images = int(reference["images"])
    if ref_images < MIN_REFERENCE_IMAGES:
        return no_verdict(
            f"the model's reference holds {ref_images} held-out images, under the {MIN_REFERENCE_IMAGES} a test needs",
            images,
            ref_images,
        )
    if images < MIN_JOB_IMAGES:
        return no_verdict(
            f"too few images: this run scored {images}, a verdict needs {MIN_JOB_IMAGES}", images, ref_images
        )
    counts = np.asarray([label_counts.get(c, 0) for c in classes])
    tests = [
        _class_mix(np.asarray(reference["label_counts"]), counts),
        _confidence(reference["confidence"].numpy(), confidence),
    ]
    note = None
    if reference.get("embeddings") is not None and embeddings is not None and len(embeddings) >= 2:
        tests.append(_embedding(reference["embeddings"].float(), torch.from_numpy(embeddings).float(), seed))
    else:
        note = "no embedding test: " + (
            "the engine gave no embeddings (an ONNX file exported before they were)"
            if embeddings is None
            else "the reference has no embeddings"
        )
    threshold = ALPHA / len(tests)
    for test in tests:
        test["threshold"] = threshold
        test["drift"] = bool(test["p_value"] < threshold)
    return {
        "drift": any(t["drift"] for t in tests),
        "reason": note,
        "images": images,
        "embeddings": 0 if embeddings is None else len(embeddings),
        "reference_images": ref_images,
        "alpha": ALPHA,
        "tests": tests,
        "class_mix": {
            "classes": list(classes),
            "reference": [int(n) for n in reference["label_counts"]],
            "job": counts.tolist(),
        },
        "confidence_histogram": {
            "edges": np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1).round(2).tolist(),
            "reference": _histogram(reference["confidence"].numpy()),
            "job": _histogram(confidence),
        },
    }


def _histogram(values: np.ndarray) -> list[int]:
    return np.histogram(np.clip(values, 0.0, 1.0), bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0].tolist()


def _class_mix(reference: np.ndarray, job: np.ndarray) -> dict:
    from scipy.stats import chi2_contingency

    table = np.stack([reference, job])
    table = table[:, table.sum(0) > 0]  # a class neither predicted has no expected count
    if table.shape[1] < 2:  # both predicted one and the same class only
        statistic, p_value = 0.0, 1.0
    else:
        result = chi2_contingency(table, correction=False)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return {"name": "class_mix", "method": "chi-square, predicted labels", "statistic": statistic, "p_value": p_value}


def _confidence(reference: np.ndarray, job: np.ndarray) -> dict:
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, job)
    return {
        "name": "confidence",
        "method": "Kolmogorov-Smirnov, top score",
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
    }


def _embedding(reference: torch.Tensor, job: torch.Tensor, seed: int) -> dict:
    statistic, p_value = mmd_test(reference, job, PERMUTATIONS, seed)
    return {
        "name": "embedding",
        "method": f"MMD, Gaussian kernel (median bandwidth), {PERMUTATIONS} permutations",
        "statistic": statistic,
        "p_value": p_value,
    }


def mmd_test(x: torch.Tensor, y: torch.Tensor, permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[float, float]:
    """The unbiased squared MMD between samples ``x`` and ``y`` (rows) and its permutation
    p-value. The kernel matrix is computed once; a permutation is a membership vector, so all
    of them are one matrix product: (permutations x N) @ (N x N)."""
    z = torch.cat([x, y]).double()
    n, total = len(x), len(z)
    m = total - n
    distances = torch.cdist(z, z).pow_(2)
    bandwidth = distances[~torch.eye(total, dtype=torch.bool)].median().clamp_min(1e-12)
    kernel = torch.exp(-distances / bandwidth)
    kernel.fill_diagonal_(0.0)  # the unbiased estimate leaves out each point with itself
    generator = torch.Generator().manual_seed(seed)
    members = torch.zeros(permutations + 1, total, dtype=torch.float64)
    members[0, :n] = 1.0  # the observed split first
    for row in range(1, permutations + 1):
        members[row, torch.randperm(total, generator=generator)[:n]] = 1.0
    reach = members @ kernel
    within_x = (reach * members).sum(1)
    between = (reach * (1.0 - members)).sum(1)
    within_y = kernel.sum() - within_x - 2.0 * between
    mmd2 = within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2.0 * between / (n * m)
    p_value = (1 + int((mmd2[1:] >= mmd2[0]).sum())) / (permutations + 1)
    return float(mmd2[0]), p_value


def verdict_line(result: dict) -> str:
    """drift.json in one line, for the terminal and the logs."""
    if result["drift"] is None:
        return f"drift: no verdict: {result['reason']}"
    tests = ", ".join(f"{t['name']} p={t['p_value']:.3g}" for t in result["tests"])
    threshold = result["tests"][0]["threshold"]
    if result["drift"]:
        failed = ", ".join(t["name"] for t in result["tests"] if t["drift"])
        return (
            f"DRIFT: these {result['images']:,} images do not look like the model's held-out images "
            f"({failed}; {tests}; threshold {threshold:.3g})"
        )
    return f"drift: none in {result['images']:,} images ({tests}; threshold {threshold:.3g})"
