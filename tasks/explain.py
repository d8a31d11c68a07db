"""Why a model says what it says: the test images it gets most wrong and Grad-CAM maps.

``mistakes.png`` is fastai's ``plot_top_losses``: the test images with the highest
cross-entropy loss, each titled with its true and predicted label and the predicted score.
``gradcam.png`` overlays Grad-CAM (Selvaraju et al., 2017) on a sample of test images: the
gradient of the predicted class's score, averaged over each channel of the network's last
spatial feature map, weighs those channels into a heat map of where the evidence is.

Grad-CAM is computed with torch hooks: no maintained library fits better here (pytorch-grad-cam
and captum both need the target layer named per architecture, which :func:`find_cam_layer`
finds for any torchvision classifier), and it stays one backward pass per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from retrain.tasks import storage  # noqa: E402
from retrain.tasks.model_file import LoadedModel, load_model_file
from retrain.tasks.preprocessing import load_image, load_images  # noqa: E402
from retrain.tasks.reports import _save  # noqa: E402

DISPLAY_SIZE = (192, 192)  # the thumbnails in the figures


# ---- top losses ----------------------------------------------------------------------------


def top_losses(predictions: pd.DataFrame, count: int = 9) -> pd.DataFrame:
    """The ``count`` rows of a predictions table (tasks.evaluation.predictions_table, with
    true labels) with the highest loss, -log(score of the true class), highest first."""
    true_scores = np.array(
        [row[f"score:{label}"] for label, (_, row) in zip(predictions["true_label"], predictions.iterrows())],
        dtype=np.float64,
    )
    losses = -np.log(np.clip(true_scores, 1e-12, 1.0))
    ranked = predictions.assign(loss=losses).sort_values("loss", ascending=False, kind="stable")
    return ranked.head(count).reset_index(drop=True)


def plot_top_losses(predictions: pd.DataFrame, url: str, count: int = 9) -> str:
    """``mistakes.png``: the highest-loss images titled true / predicted / score / loss."""
    worst = top_losses(predictions, count)
    images = load_images(list(worst["path"]), DISPLAY_SIZE) if len(worst) else []
    titles = [
        f"true {r.true_label}\npredicted {r.label} ({r.score:.2f})\nloss {r.loss:.2f}" for r in worst.itertuples()
    ]
    colors = ["tab:red" if r.true_label != r.label else "black" for r in worst.itertuples()]
    return _grid(
        [img.permute(1, 2, 0).numpy() for img in images],
        titles,
        url,
        "Top losses: the test images the model gets most wrong",
        colors,
    )


# ---- Grad-CAM ------------------------------------------------------------------------------


def find_cam_layer(model: nn.Module, input_size: tuple[int, int]) -> str:
    """The module whose output is the network's last spatial feature map (N x C x H x W with
    H, W > 1) before the head: ``features`` in SqueezeNet, ``layer4`` in ResNet, the permuted
    stage output in Swin. Found by one forward pass of a blank image, so it works for any
    architecture; a module that finishes later (a container) wins over its children."""
    finished: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: finished.append((name, tuple(out.shape))) if torch.is_tensor(out) else None
        )
        for name, module in model.named_modules()
        if name and not isinstance(module, (nn.Dropout, nn.Identity))  # the same map under another name
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            model(torch.zeros(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    spatial = [name for name, shape in finished if len(shape) == 4 and shape[2] > 1 and shape[3] > 1]
    if not spatial:
        raise ValueError(f"{type(model).__name__} has no spatial feature map to explain")
    # The head itself (SqueezeNet's conv10) and what follows it are class maps, not features.
    last_learnable = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    candidates = [n for n in spatial if n != last_learnable and not n.startswith(last_learnable + ".")]
    order = [name for name, _ in finished]
    head_at = order.index(last_learnable) if last_learnable in order else len(order)
    before_head = [n for n in candidates if order.index(n) < head_at]
    return (before_head or candidates or spatial)[-1]


@dataclass
class CamResult:
    heatmaps: torch.Tensor  # N x H x W in [0, 1], at the input size
    predicted: list[int]
    scores: list[float]


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str, target: list[int] | None = None) -> CamResult:
    """Grad-CAM heat maps for a normalised batch ``x``, for the ``target`` classes (default:
    each image's predicted class)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        # A leaf of its own: its gradient is all Grad-CAM needs (whether the body is frozen or
        # not), and the clone handed on lets later in-place ops (DenseNet's relu_) work.
        captured["maps"] = output.detach().requires_grad_(True)
        return captured["maps"].clone()

    hook = model.get_submodule(layer).register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            probabilities = torch.softmax(logits.float(), dim=1)
            chosen = probabilities.argmax(1) if target is None else torch.tensor(target, device=logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        hook.remove()
        model.train(was_training)
    maps, grads = captured["maps"].detach(), captured["maps"].grad
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return CamResult(
        (cam / peak[:, None, None]).cpu(),
        chosen.tolist(),
        probabilities.gather(1, chosen[:, None]).squeeze(1).tolist(),
    )


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 image (3 x H x W) with a jet-coloured heat map (H x W, 0-1) blended in."""
    colored = plt.get_cmap("jet")(heatmap.numpy())[..., :3]
    base = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    return ((1 - alpha) * base + alpha * colored).clip(0, 1)


def explain_images(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int = 16) -> CamResult:
    """Grad-CAM of a loaded model's own predictions for uint8 images at its input size."""
    layer = find_cam_layer(loaded.model, loaded.preprocessing.input_size)
    device = next(loaded.model.parameters()).device
    parts = [
        grad_cam(loaded.model, loaded.preprocessing.normalize(pixels[i : i + batch_size].to(device)), layer)
        for i in range(0, len(pixels), batch_size)
    ]
    return CamResult(
        torch.cat([p.heatmaps for p in parts]),
        [c for p in parts for c in p.predicted],
        [s for p in parts for s in p.scores],
    )


def plot_grad_cam(loaded: LoadedModel, paths: list[str], true_labels: list[str] | None, url: str) -> str:
    """``gradcam.png``: each image with its Grad-CAM overlay, titled true -> predicted (score)."""
    pixels = load_images(paths, loaded.preprocessing.input_size)
    cams = explain_images(loaded, pixels)
    titles = [
        (f"true {true_labels[i]}\n" if true_labels else "") + f"{loaded.classes[p]} ({s:.2f})"
        for i, (p, s) in enumerate(zip(cams.predicted, cams.scores))
    ]
    panels = [overlay(img, cam) for img, cam in zip(pixels, cams.heatmaps)]
    return _grid(panels, titles, url, "Grad-CAM: where the evidence for the predicted class is")


def explain_image(loaded: LoadedModel, image_url: str, url: str) -> dict:
    """``retrain classify MODEL IMAGE --explain OUT.png``: the image beside its overlay."""
    pixels = load_image(image_url, loaded.preprocessing.input_size)[None]
    cams = explain_images(loaded, pixels)
    label, score = loaded.classes[cams.predicted[0]], cams.scores[0]
    _grid(
        [pixels[0].permute(1, 2, 0).numpy(), overlay(pixels[0], cams.heatmaps[0])],
        ["input", f"Grad-CAM: {label} ({score:.2f})"],
        url,
        image_url.rsplit("/", 1)[-1],
    )
    return {"explanation": url, "label": label, "score": score}


# ---- the stage -----------------------------------------------------------------------------


def explain_run(run_url: str, mistakes: int = 9, sample: int = 8, seed: int = 0) -> dict:
    """Write ``mistakes.png`` (top losses) and ``gradcam.png`` (a seeded sample of test
    images, the mistakes first) into the run folder from its ``predictions.parquet``."""
    layout = storage.RunLayout(run_url)
    predictions = storage.read_parquet(layout.predictions)
    if predictions.empty:  # a split with no test or validation part: nothing to explain, and no error
        return {"mistakes": None, "gradcam": None, "wrong": 0, "images": 0}
    mistakes_url = plot_top_losses(predictions, layout.mistakes, mistakes)
    wrong = predictions[predictions["true_label"] != predictions["label"]]
    right = predictions[predictions["true_label"] == predictions["label"]]
    chosen = pd.concat(
        [
            wrong.sample(n=min(len(wrong), sample // 2), random_state=seed),
            right.sample(n=min(len(right), sample), random_state=seed),
        ]
    ).head(sample)
    loaded = load_model_file(layout.trained)
    gradcam_url = plot_grad_cam(loaded, list(chosen["path"]), list(chosen["true_label"]), layout.gradcam)
    return {"mistakes": mistakes_url, "gradcam": gradcam_url, "wrong": int(len(wrong)), "images": int(len(predictions))}


def _grid(panels: list, titles: list[str], url: str, title: str, colors: list[str] | None = None) -> str:
    n = max(1, len(panels))
    cols = 4 if n % 4 == 0 or n > 9 else math.ceil(math.sqrt(n))  # 8 as 4 x 2, 9 as 3 x 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 3.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, panel, text) in enumerate(zip(axes.flat, panels, titles)):
        ax.imshow(panel)
        ax.set_title(text, fontsize=8, color=(colors[i] if colors else "black"))
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no test images", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    return _save(fig, url)
