"""What a retraining run asks for, in one place: :class:`RunRequest`.

Its defaults are the run's defaults everywhere: the ``retrain run`` flags are generated from it
(:func:`add_run_arguments`), the retrain flow's signature and ``retrain deploy``'s placeholder
defaults read them from :data:`DEFAULTS`. :meth:`RunRequest.check` validates it once (the
command line checks before Prefect starts; the flow's check of the same request in the same
process is then free), finds the pretrained weights without building the network, and gives
the run's one typed configuration, :class:`tasks.runs.RunConfig`. The words it is made of
(modes, augmentation settings, split fractions) are :mod:`tasks.vocabulary`'s.

Imports no torch, Prefect or pandas: ``retrain run --help`` and a refused flag stay quick.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from retrain.tasks.training.options import CHOICES, DEFAULT_LEARN_RATES, TrainingOptions
from retrain.tasks.vocabulary import MODES, AugmentationSettings, check_mode, parse_fractions

if TYPE_CHECKING:
    from retrain.tasks.runs import RunConfig


@dataclass(frozen=True)
class RunRequest:
    """A run's choices as given (the retrain flow's parameters that shape the model): plain
    values and dicts, as a flag, a Prefect parameter or a Python call gives them.
    :meth:`check` turns them into the run's typed :class:`~retrain.tasks.runs.RunConfig`."""

    network: str = "squeezenet"
    weights: str = "default"  # default (the network's pretrained weights), none, or a state-dict file URL
    mode: str = "transfer"  # transfer | finetune | scratch
    split_fractions: str = "0.7,0.15,0.15"  # train,val,test per label
    options: dict = field(default_factory=dict)  # TrainingOptions fields that differ from their defaults
    augmentation: dict = field(default_factory=AugmentationSettings().to_dict)

    def check(self, fetch_weights: bool = True) -> RunConfig:
        """Validate every choice, with a clear message for a bad one, before any work is done;
        ``fetch_weights`` also makes sure the pretrained weights can be had and fit. Returns
        the run's configuration without its data (the flow adds the data set and its content
        key once it has them). Checked once per process: the same request again returns the
        first answer."""
        key = json.dumps([asdict(self), fetch_weights], sort_keys=True, default=str)
        if key not in _CHECKED:
            _CHECKED[key] = self._check(fetch_weights)
        return _CHECKED[key]

    def _check(self, fetch_weights: bool) -> RunConfig:
        from retrain.tasks import storage
        from retrain.tasks.networks import get_spec
        from retrain.tasks.runs import RunConfig

        get_spec(self.network)  # an unknown name: ValueError with the closest names
        check_mode(self.mode)
        options = TrainingOptions.from_dict(dict(self.options or {}))
        augmentation = AugmentationSettings.from_dict(self.augmentation or {})
        fractions = parse_fractions(self.split_fractions)
        weights = "none" if self.mode == "scratch" else self.weights
        if weights not in ("default", "none"):
            weights = storage.absolute(weights)
        if fetch_weights and weights != "none":
            from retrain.tasks.networks import check_weights

            check_weights(self.network, weights)
        return RunConfig("", "", self.network, weights, self.mode, fractions, options, augmentation)


DEFAULTS = RunRequest()
_CHECKED: dict[str, RunConfig] = {}


def check_store_names(**names: str | None) -> None:
    """Each user-given name that becomes a folder of the store (``run_id``, ``model_name``,
    ``experiment_id``) checked before anything is written: ``../x`` would leave the store's
    folder for it. An empty or None name is unset (a default is chosen later)."""
    from retrain.tasks import storage

    for key, name in names.items():
        if name:
            storage.check_name(name, key.replace("_", " "))


# ---- the command line: `retrain run`'s flags come from here --------------------------------------

# What each training option is, for its help text (MATLAB's trainingOptions in snake_case).
_OPTION_HELP = {
    "solver": "optimizer",
    "initial_learn_rate": "learn rate at the start",
    "max_epochs": "passes over the training images",
    "mini_batch_size": "images per training step",
    "shuffle": "when the training images are shuffled",
    "validation_frequency": "validate every N iterations (or epochs: --validation-frequency-unit)",
    "validation_frequency_unit": "unit of --validation-frequency",
    "validation_patience": "stop after N validations without a lower validation loss",
    "l2_regularization": "weight decay",
    "momentum": "sgdm's momentum",
    "learn_rate_schedule": "piecewise: multiply the learn rate by --learn-rate-drop-factor every "
    "--learn-rate-drop-period epochs",
    "learn_rate_drop_factor": "see --learn-rate-schedule",
    "learn_rate_drop_period": "epochs; see --learn-rate-schedule",
    "head_learn_rate_factor": "finetune: the new head's learn rate over the body's",
    "output_network": "the weights the run keeps",
    "checkpoint_frequency": "checkpoint every N epochs or iterations (0: none)",
    "checkpoint_frequency_unit": "unit of --checkpoint-frequency",
    "execution_environment": "auto: CUDA when present",
    "seed": "random seed of the split, the new head's weights and the shuffling",
    "verbose": "more training output",
    "classic_loop": "transfer: train on every augmented image through the whole network, not on cached features",
    "feature_cache_views": "transfer: augmented views per training image in the feature cache",
    "feature_cache_memory_mb": "transfer: a larger feature cache is kept on disk",
    "feature_engine": "transfer: what computes the body's features; auto: the fastest engine that keeps "
    "validation accuracy within 0.5 point of float32, torch: float32",
    "processes": "finetune/scratch: training processes, one per GPU",
}
# What an option left at None means, for its help text.
_NONE_MEANS = {
    "initial_learn_rate": "per mode: " + ", ".join(f"{m} {r:g}" for m, r in DEFAULT_LEARN_RATES.items()),
    "validation_patience": "never stop early",
    "feature_cache_views": "automatic",
    "processes": "every visible GPU in finetune/scratch mode on CUDA, else 1",
}
# The settings of the run's internals: under "advanced" in `retrain run --help`.
_ADVANCED = frozenset(
    {
        "classic_loop",
        "feature_cache_views",
        "feature_cache_memory_mb",
        "feature_engine",
        "processes",
        "checkpoint_frequency",
        "checkpoint_frequency_unit",
    }
)
# The short names other tools use (fastai, Keras, PyTorch scripts), accepted too.
_ALIASES = {"max_epochs": "--epochs", "initial_learn_rate": "--lr", "mini_batch_size": "--batch-size"}


def add_run_arguments(groups: Mapping[str, Any]) -> None:
    """The request's flags, with their defaults and allowed values, into ``groups`` (argparse
    argument groups by name: network, data, augmentation, training, advanced): network,
    weights, mode, split, augmentation and one flag per TrainingOptions field."""
    network = groups["network"]
    network.add_argument(
        "--network",
        default=DEFAULTS.network,
        help="any torchvision classifier (resnet50, efficientnet_b0, vit_b_16, ...; `retrain network` lists them), "
        "squeezenet or squeezenet-caffe (default %(default)s)",
    )
    network.add_argument(
        "--weights",
        default=DEFAULTS.weights,
        metavar="WEIGHTS",
        help="default (the network's pretrained weights), none, or a state-dict file URL (default %(default)s)",
    )
    network.add_argument(
        "--mode",
        default=DEFAULTS.mode,
        choices=list(MODES),
        help="transfer: train a new head on the frozen network; finetune: train all of it from the pretrained "
        "weights; scratch: from random weights (default %(default)s)",
    )
    groups["data"].add_argument(
        "--split",
        default=DEFAULTS.split_fractions,
        metavar="TRAIN,VAL,TEST",
        help="fractions of each class for training, validation and test (default %(default)s)",
    )
    augmentation = groups["augmentation"]
    augmentation.add_argument("--no-reflect", action="store_true", help="no random horizontal reflection")
    augmentation.add_argument(
        "--max-translation",
        type=int,
        default=DEFAULTS.augmentation["max_translation"],
        metavar="PIXELS",
        help="random X/Y translation, pixels (default %(default)s)",
    )
    defaults = TrainingOptions()
    for name, kind in TrainingOptions.value_types().items():
        flags = ["--" + name.replace("_", "-")] + ([_ALIASES[name]] if name in _ALIASES else [])
        group = groups["advanced" if name in _ADVANCED else "training"]
        default = getattr(defaults, name)
        if kind is bool:
            group.add_argument(
                *flags, action="store_true", default=None, help=f"{_OPTION_HELP[name]} (default {default})"
            )
            continue
        shown = f"default {default}" if default is not None else f"default: {_NONE_MEANS[name]}"
        group.add_argument(
            *flags,
            dest=name,
            type=kind,
            default=None,
            choices=CHOICES.get(name),
            metavar=None if name in CHOICES else {int: "N", float: "X"}[kind],
            help=f"{_OPTION_HELP[name]} ({shown})",
        )


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The request the flags of :func:`add_run_arguments` describe."""
    options: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in fields(TrainingOptions) if getattr(args, f.name, None) is not None
    }
    return RunRequest(
        network=args.network,
        weights=args.weights,
        mode=args.mode,
        split_fractions=args.split,
        options=options,
        augmentation={"reflect": not args.no_reflect, "max_translation": args.max_translation},
    )
