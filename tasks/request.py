"""What a retraining run asks for, in one place: :class:`RunRequest`.

Its defaults are the run's defaults everywhere: the ``retrain run`` flags are generated from it
(:func:`add_run_arguments`), the retrain flow's signature and ``retrain deploy``'s placeholder
defaults read them from :data:`DEFAULTS`. :meth:`RunRequest.check` validates it once (the
command line checks before Prefect starts; the flow's check of the same request in the same
process is then free) and finds the pretrained weights without building the network.

Imports no torch, Prefect or pandas: ``retrain run --help`` and a refused flag stay quick.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from retrain.tasks.training.options import TrainingOptions

# The vocabulary of a request. The networks are torchvision's registry (tasks.networks), which
# needs torch: a network name is checked by RunRequest.check, not by the command line.
MODES = ("transfer", "finetune", "scratch")
AUGMENTATION_KEYS = ("reflect", "max_translation")  # tasks.preprocessing.Augmentation's fields


@dataclass(frozen=True)
class RunRequest:
    """A run's choices (the retrain flow's parameters that shape the model)."""

    network: str = "squeezenet"
    weights: str = "default"  # default (the network's pretrained weights), none, or a state-dict file URL
    mode: str = "transfer"  # transfer | finetune | scratch
    split_fractions: str = "0.7,0.15,0.15"  # train,val,test per label
    options: dict = field(default_factory=dict)  # TrainingOptions fields that differ from their defaults
    augmentation: dict = field(default_factory=lambda: {"reflect": True, "max_translation": 30})

    def check(self, fetch_weights: bool = True) -> CheckedRequest:
        """Validate every choice, with a clear message for a bad one, before any work is done;
        ``fetch_weights`` also makes sure the pretrained weights can be had and fit. Checked
        once per process: the same request again returns the first answer."""
        key = json.dumps([asdict(self), fetch_weights], sort_keys=True, default=str)
        if key not in _CHECKED:
            _CHECKED[key] = self._check(fetch_weights)
        return _CHECKED[key]

    def _check(self, fetch_weights: bool) -> CheckedRequest:
        from retrain.tasks import storage
        from retrain.tasks.networks import get_spec

        get_spec(self.network)  # an unknown name: ValueError with the closest names
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        options = TrainingOptions.from_dict(dict(self.options or {}))
        augmentation = check_augmentation(self.augmentation or {})
        fractions = parse_fractions(self.split_fractions)
        weights = "none" if self.mode == "scratch" else self.weights
        if weights not in ("default", "none"):
            weights = storage.absolute(weights)
        if fetch_weights and weights != "none":
            from retrain.tasks.networks import check_weights

            check_weights(self.network, weights)
        return CheckedRequest(self.network, weights, self.mode, fractions, options, augmentation)


@dataclass(frozen=True)
class CheckedRequest:
    """A validated request: weights as an absolute URL ("none" in scratch mode), options as a
    TrainingOptions, the split as three fractions."""

    network: str
    weights: str
    mode: str
    fractions: tuple[float, float, float]
    options: TrainingOptions
    augmentation: dict


DEFAULTS = RunRequest()
_CHECKED: dict[str, CheckedRequest] = {}


def check_store_names(**names: str | None) -> None:
    """Each user-given name that becomes a folder of the store (``run_id``, ``model_name``,
    ``experiment_id``) checked before anything is written: ``../x`` would leave the store's
    folder for it. An empty or None name is unset (a default is chosen later)."""
    from retrain.tasks import storage

    for key, name in names.items():
        if name:
            storage.check_name(name, key.replace("_", " "))


def check_augmentation(values: dict) -> dict:
    """The seed's image augmenter settings: ``reflect`` (true/false) and ``max_translation``
    (pixels >= 0); missing ones take their defaults."""
    unknown = sorted(set(values) - set(AUGMENTATION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown augmentation setting(s): {', '.join(unknown)}; known: {', '.join(AUGMENTATION_KEYS)}"
        )
    checked = {**DEFAULTS.augmentation, **values}
    if not isinstance(checked["reflect"], bool):
        raise ValueError(f"augmentation reflect={checked['reflect']!r}: expected true or false")
    translation = checked["max_translation"]
    if not isinstance(translation, int) or isinstance(translation, bool) or translation < 0:
        raise ValueError(f"augmentation max_translation={translation!r}: expected an integer >= 0 (pixels)")
    return checked


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6 or values[0] <= 0:
        raise ValueError(f"split must be three fractions train,val,test summing to 1 with train > 0, not {text!r}")
    return values  # type: ignore[return-value]


# ---- the command line: `retrain run`'s flags come from here --------------------------------------

# What an option left at None means, for its help text.
_NONE_MEANS = {
    "initial_learn_rate": "per mode",
    "validation_patience": "never stop early",
    "feature_cache_views": "automatic",
    "processes": "every visible GPU in finetune/scratch mode on CUDA, else 1",
}
_FLAG_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The request's flags (network, weights, mode, split, augmentation) and one flag per
    TrainingOptions field, with their defaults."""
    parser.add_argument(
        "--network",
        default=DEFAULTS.network,
        help="any torchvision classifier (resnet50, efficientnet_b0, vit_b_16, ...; `retrain network` lists them), "
        "squeezenet or squeezenet-caffe",
    )
    parser.add_argument(
        "--weights",
        default=DEFAULTS.weights,
        help="default (the network's pretrained weights), none, or a state-dict file URL",
    )
    parser.add_argument("--mode", default=DEFAULTS.mode, choices=list(MODES))
    parser.add_argument("--split", default=DEFAULTS.split_fractions, help="train,val,test fractions per label")
    parser.add_argument("--no-reflect", action="store_true", help="no random horizontal reflection")
    parser.add_argument(
        "--max-translation",
        type=int,
        default=DEFAULTS.augmentation["max_translation"],
        help="random X/Y translation, pixels",
    )
    group = parser.add_argument_group("training options (MATLAB trainingOptions)")
    defaults = TrainingOptions()
    for f in fields(TrainingOptions):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", bool):
            group.add_argument(flag, action="store_true", default=None, help=f"(default {default})")
            continue
        group.add_argument(
            flag,
            type=_FLAG_TYPES.get(str(f.type), str),
            default=None,
            metavar=f.name.upper(),
            help=f"default {default}" if default is not None else f"default: {_NONE_MEANS[f.name]}",
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
