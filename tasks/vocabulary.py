"""The words a run is described in, and their checks: modes, engines, split names, the
augmentation's settings and defaults, worker counts.

One home for each: the command line (``retrain --help`` and a refused flag), the run's
request, the training loop, inference and the experiment grid all read them from here.
Imports nothing heavy (no torch, Prefect or pandas), so the command line stays quick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# How much of a pretrained network learns: the head alone on a frozen body, everything from
# the pretrained weights, or everything from random weights.
MODES = ("transfer", "finetune", "scratch")
# The forward-pass engines of inference (tasks/inference.py); auto: the fastest one validated
# for a model on this hardware (tasks/engine_gate.py).
ENGINES = ("torch", "torch-bf16", "onnx", "onnx-int8")
ENGINE_CHOICES = ("auto", *ENGINES)
# The parts of a data split, in the order of ``--split``'s fractions.
SPLITS = ("train", "val", "test")
# What a run does about likely wrong labels (tasks/label_issues.py): list them in
# label_issues.csv, also train without them, or skip the step.
LABEL_ISSUES = ("find", "exclude", "off")
# The file name extensions of images (training, scoring and the command line's checks).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Entries a data set's listing skips besides hidden ones (tasks/datastore.py; retrain/checks.py).
IGNORED_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class AugmentationSettings:
    """The seed's imageAugmenter settings: random reflection in X, random translation in X
    and Y (pixels, at the network's input size). :class:`tasks.preprocessing.Augmentation`
    applies them."""

    reflect: bool = True
    max_translation: int = 30

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AugmentationSettings:
        """Checked settings from a dict such as ``{"reflect": False}``; missing ones take
        their defaults, an unknown key or a bad value is refused with a clear message."""
        unknown = sorted(set(values) - set(AUGMENTATION_KEYS))
        if unknown:
            raise ValueError(
                f"unknown augmentation setting(s): {', '.join(unknown)}; known: {', '.join(AUGMENTATION_KEYS)}"
            )
        settings = cls(**values)
        if not isinstance(settings.reflect, bool):
            raise ValueError(f"augmentation reflect={settings.reflect!r}: expected true or false")
        translation = settings.max_translation
        if not isinstance(translation, int) or isinstance(translation, bool) or translation < 0:
            raise ValueError(f"augmentation max_translation={translation!r}: expected an integer >= 0 (pixels)")
        return settings


# Each augmentation setting and its type (the experiment grid converts its values to these).
AUGMENTATION_KEYS = {f.name: {"bool": bool, "int": int}[str(f.type)] for f in fields(AugmentationSettings)}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> the train, val and test fractions of each label."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(SPLITS) or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6 or values[0] <= 0:
        raise ValueError(f"split must be three fractions train,val,test summing to 1 with train > 0, not {text!r}")
    return values  # type: ignore[return-value]


def check_dask_workers(workers) -> int | None:
    """A Dask cluster request's local worker count: None or 0 (no cluster: in process), or
    more processes."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ValueError(f"Dask workers (--dask-workers) must be an integer >= 0 (0: in process), not {workers!r}")
    return workers or None


def check_workers(workers: int | None, error: type[Exception] = ValueError) -> int | None:
    """A local scoring cluster's worker processes: None (one per core) or at least 1."""
    if workers is not None and workers < 1:
        raise error(f"workers must be at least 1, not {workers}")
    return workers
