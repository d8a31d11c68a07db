"""One iteration's work, two ways: the classic loop (every augmented image through the whole
network) or the head on transfer mode's cached body features. Both offer ``prepare`` (the
batch of an iteration, on the host: may run on a worker thread), ``logits`` and
``val_scores``; the loop does not know which one it drives."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from retrain.tasks.evaluation import predict_scores
from retrain.tasks.preprocessing import Augmentation, Preprocessing
from retrain.tasks.training.data import TrainingData
from retrain.tasks.training.devices import autocast, pinned, to_device
from retrain.tasks.training.feature_files import FeatureCache
from retrain.tasks.training.features import network_layout
from retrain.tasks.training.options import TrainingOptions
from retrain.tasks.training.schedule import epoch_views, seeded_generator


def dropout_to_float(features: torch.Tensor, p: float) -> torch.Tensor:
    """Float32 copy of a float16 batch of cached features with inverted dropout applied, as
    ``nn.Dropout`` does in training. On the CPU the mask comes from 16-bit random integers,
    four per 64-bit draw (``p`` rounded to 1/65536), and is applied to the float16 values
    before the conversion: torch's per-element Bernoulli sampling on float32 otherwise costs
    more than the rest of a head step on cached features."""
    if p <= 0 or features.device.type != "cpu":
        return nn.functional.dropout(features.float(), p, training=p > 0, inplace=True)
    n = features.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    bits = bits.view(features.shape)
    if p == 0.5:  # the sign bit: all ones (keep) or zero, each with probability 1/2
        features.view(torch.int16).bitwise_and_(bits >> 15)
    else:
        features = torch.where(bits < round(65536 * (1 - p)) - 32768, features, 0)
    return torch.mul(features, 1.0 / (1.0 - p), out=torch.empty(features.shape, dtype=torch.float32))


class _StoredRest(nn.Module):
    """``rest`` on features in the stored layout (N x H x W x C maps, or N x C vectors). A
    1x1 convolution head (SqueezeNet's conv10) runs as the equivalent matrix product over
    channels, with the same parameters: on channels-last features that is one pass over them
    where the convolution makes several."""

    def __init__(self, rest: nn.Module):
        super().__init__()
        self.rest = rest
        first = rest[0] if isinstance(rest, nn.Sequential) and len(rest) else None
        pointwise = (
            isinstance(first, nn.Conv2d)
            and first.kernel_size == (1, 1)
            and first.stride == (1, 1)
            and first.padding in ((0, 0), "valid")
            and first.dilation == (1, 1)
            and first.groups == 1
            and first.padding_mode == "zeros"
        )
        self.pointwise = first if pointwise else None
        self.after = rest[1:] if pointwise else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pointwise is not None and features.dim() == 4:
            conv = self.pointwise
            out = nn.functional.linear(features, conv.weight.reshape(conv.out_channels, -1), conv.bias)
            return self.after(out.permute(0, 3, 1, 2))
        return self.rest(network_layout(features))


class ClassicSteps:
    """Every augmented image through the whole network (finetune, scratch, classic_loop)."""

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        data: TrainingData,
        augmentation: Augmentation,
        options: TrainingOptions,
        device: torch.device,
        train_model: nn.Module | None = None,
    ):
        self.model, self.preprocessing, self.data = model, preprocessing, data
        self.augmentation, self.options, self.device = augmentation, options, device
        # What the training forward pass runs: the model, or its DistributedDataParallel
        # wrapper (validation, on rank 0 alone, runs the model itself).
        self.train_model = train_model if train_model is not None else model
        self.feature_info: dict | None = None  # no feature cache

    def close(self, trained: bool) -> None:
        pass

    def prepare(self, epoch: int, position: int, indices: torch.Tensor, part: tuple[int, int] | None = None) -> tuple:
        """The augmented images and targets of an iteration's batch, or of its ``part``
        [start, stop) (one training process's share), augmented as in the whole batch."""
        start, stop = part if part is not None else (0, len(indices))
        mine = indices[start:stop]
        generator = seeded_generator(self.options.seed, epoch, position)
        images = self.augmentation(self.data.train_images[mine], generator, first=start, total=len(indices))
        return pinned(images, self.device), pinned(self.data.train_targets[mine], self.device)

    def logits(self, prepared: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = prepared
        x = self.preprocessing.normalize(images.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        return self.train_model(x), targets.to(self.device, non_blocking=True)

    def val_scores(self) -> torch.Tensor:
        with autocast(self.device, training=False):
            return predict_scores(self.model, self.data.val_images, self.preprocessing, self.device)


class CachedSteps:
    """The head (and the parameter-free layers around it) on cached body features; the
    dropout before the head acts on the features."""

    def __init__(
        self,
        model: nn.Module,
        rest: nn.Module,
        dropout: float,
        cache: FeatureCache,
        data: TrainingData,
        options: TrainingOptions,
        device: torch.device,
        shared: bool = False,
    ):
        self.model, self.rest, self.dropout, self.cache, self.data = model, _StoredRest(rest), dropout, cache, data
        self.options, self.device, self.shared = options, device, shared
        self.feature_info: dict | None = cache.describe()  # what the cache held and cost

    def close(self, trained: bool) -> None:
        """Let go of the cache: delete its files once trained (a resume would not need them),
        and a temporary folder's files in any case."""
        if trained or self.cache.temporary:
            self.cache.close(delete=trained and not self.shared)  # a cache shared with other runs stays

    def prepare(self, epoch: int, position: int, indices: torch.Tensor, part: tuple[int, int] | None = None) -> tuple:
        if part is not None:  # transfer mode trains in one process: the whole batch
            indices = indices[part[0] : part[1]]
        views = epoch_views(len(self.data.train_targets), self.cache.views, epoch, self.options.seed)[indices]
        targets = pinned(self.data.train_targets[indices], self.device)
        if self.cache.device.type == "cpu":  # gather on the host, copy the batch over
            return pinned(self.cache.train_batch(views, indices), self.device), targets
        return (views, indices), targets  # the cache is on the device: gather there

    def logits(self, prepared: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        features, targets = prepared
        if isinstance(features, tuple):
            features = self.cache.train_batch(*features)
        features = dropout_to_float(features.to(self.device, non_blocking=True), self.dropout)
        return self.rest(features), targets.to(self.device, non_blocking=True)

    def pooled_features(self, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Every training image as it is (view 0) and every validation image, averaged over
        spatial positions: (N x C, M x C) float32, what tasks/label_issues.py fits its K-fold
        heads on (the frozen body's output, so no second pass over the images)."""

        def pooled(features: torch.Tensor) -> np.ndarray:  # stored layout: N x H x W x C, or N x C
            features = features.float()
            return (features.mean((1, 2)) if features.dim() == 4 else features).cpu().numpy()

        indices = torch.arange(len(self.data.train_targets)).split(batch_size)
        train = np.concatenate([pooled(self.cache.train_batch(torch.zeros_like(i), i)) for i in indices])
        val = [pooled(features) for features in self.cache.val_batches(batch_size)]
        return train, np.concatenate(val) if val else np.empty((0, train.shape[1]), dtype=np.float32)

    def val_scores(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = []
        staging: torch.Tensor | None = None  # float32 batches on the CPU: one buffer, reused
        try:
            with torch.inference_mode(), autocast(self.device, training=False):
                for features in self.cache.val_batches(256, reuse=True):  # each used before the next
                    features = to_device(features, self.device)
                    if features.device.type == "cpu":
                        if staging is None or len(staging) < len(features):
                            staging = torch.empty(features.shape, dtype=torch.float32)
                        features = staging[: len(features)].copy_(features)
                    logits = self.rest(features.float())
                    out.append(torch.softmax(logits.float(), dim=1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.empty((0, 0))


def validation_metrics(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    loss = float(nn.functional.nll_loss(torch.log(scores.clamp_min(1e-12)), targets))
    accuracy = int((scores.argmax(1) == targets).sum()) / len(targets)  # 0.9, not float32's 0.8999999761581421
    return loss, accuracy
