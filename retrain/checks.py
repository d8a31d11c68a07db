"""Up-front checks, before Prefect, Dask or torch start: a command's locations (its data,
model, images and output, each there and of the right kind) and ``retrain.run``'s settings.
A run found a missing data folder inside its flow, after 15 s, with a failed flow run in the
UI; here each refusal is one line, in well under a second, that names the likely mistake: two
arguments swapped, an image or an ONNX file given as MODEL, a data folder with a single class.

The checks only refuse what the command would refuse later too; what they pass, the command
still decides (:func:`retrain.tasks.runs.resolve_model` which model file, the data store
which images). Imports only the store's file functions (fsspec, ~0.1 s): no torch.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from collections.abc import Collection

from retrain.tasks import storage
from retrain.tasks.vocabulary import IGNORED_NAMES, IMAGE_EXTENSIONS


class UsageError(ValueError):
    """The command was called wrongly (a location missing or of the wrong kind): refused in one
    line with exit status 2, and no log file (a traceback would only show this module)."""


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse ``args`` (a parsed ``retrain`` command line) with a :class:`UsageError` when a
    location it names is missing or of the wrong kind."""
    store = storage.absolute(args.store or storage.default_store()) if hasattr(args, "store") else None
    if store and storage.is_local(store) and _exists(store) and not _isdir(store):
        raise UsageError(f"the store {store} is a file: --store takes a folder (created when missing)")
    check = _CHECKS.get(args.command)
    if check is not None:
        check(args, store)


# ---- per command -----------------------------------------------------------------------------


def _training_data(args, store: str) -> None:
    """``run``'s and ``experiment``'s DATA, label table and option values."""
    _run_options(args)
    if args.data is not None:
        check_data(args.data, class_folders=not args.labels)
    if args.labels is not None:
        _file(args.labels, "--labels TABLE")


def _run_options(args) -> None:
    """The values of the run's flags, each refused by its own validator (none loads torch; the
    network and its weights are the command's to check, with torch): ``--max-epochs 0``,
    ``--split 0.5,0.5``, ``--dask-workers -1``, a run id that is no folder name."""
    from retrain.tasks.request import check_store_names, request_from_args
    from retrain.tasks.training.cluster import ClusterRequest
    from retrain.tasks.training.options import TrainingOptions
    from retrain.tasks.vocabulary import AugmentationSettings, parse_fractions

    request = request_from_args(args)
    try:
        TrainingOptions.from_dict(request.options)
        AugmentationSettings.from_dict(request.augmentation)
        parse_fractions(request.split_fractions)
        check_store_names(
            run_id=getattr(args, "run_id", None),
            model_name=args.model_name,
            experiment_id=getattr(args, "experiment_id", None),
        )
        ClusterRequest.from_dict(
            {"address": getattr(args, "dask_address", None), "workers": getattr(args, "dask_workers", None)}
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _run(args, store: str) -> None:
    _training_data(args, store)
    if args.score_folder is not None:
        check_images(args.score_folder, "--score-folder")
        _score_out(args.score_out, args.score_folder)


def _evaluate(args, store: str) -> None:
    check_model(args.model, store, args.data, "retrain evaluate MODEL DATA")
    check_data(args.data, class_folders=False)


def _classify(args, store: str) -> None:
    check_model(args.model, store, args.image, "retrain classify MODEL IMAGE")
    _file(args.image, "IMAGE")
    if _is_model_file(args.image):
        raise UsageError(f"IMAGE {args.image} is a model file, not an image")


def _score(args, store: str) -> None:
    check_model(args.model, store, args.images, "retrain score MODEL IMAGES")
    check_images(args.images, "IMAGES")
    _score_out(args.score_out, args.images)


def _score_out(score_out: str | None, images: str) -> None:
    """A given --score-out that is a file, inside the images or holding a user's files: refused
    here, before a server or cluster starts for the job (the job refuses it again)."""
    from retrain.tasks.scoring.layout import ScoringError, check_output

    if score_out is None:
        return
    if _exists(score_out) and not _isdir(score_out):
        raise UsageError(f"--score-out {score_out} is a file: the scores go into a folder (created when missing)")
    try:
        check_output(storage.absolute(score_out), storage.absolute(images))
    except ScoringError as exc:
        raise UsageError(str(exc)) from None


def _export(args, store: str) -> None:
    check_model(args.model, store, None, "retrain export MODEL")
    if _exists(args.out) and _isdir(args.out):
        raise UsageError(
            f"--out {args.out} is a folder: give the file to write, e.g. {storage.join(args.out, 'model.onnx')}"
        )


_CHECKS = {
    "run": _run,
    "experiment": _training_data,
    "evaluate": _evaluate,
    "classify": _classify,
    "score": _score,
    "export": _export,
}


# ---- the kinds of location ---------------------------------------------------------------------


def check_data(data: str, class_folders: bool = True) -> None:
    """DATA: a zip, or a folder of class folders (with ``class_folders``: two or more, found as
    the data store finds them, through single wrapper folders such as ``MerchData/``). A zip's
    contents are checked when it is extracted (tasks/datastore.py), with its safety checks."""
    if not _exists(data):
        raise UsageError(f"DATA {data} not found: give a zip or a folder of class folders")
    if not _isdir(data):
        if _suffix(data) == ".zip":
            return
        kind = "an image" if _suffix(data) in IMAGE_EXTENSIONS else "a file"
        raise UsageError(f"DATA {data} is {kind}: give a zip or a folder of class folders (one per class)")
    if class_folders and storage.is_local(data):  # a remote folder is listed once, by the data store
        _check_class_folders(storage.absolute(data))


def _check_class_folders(root: str) -> None:
    """Two or more class folders below ``root``, looked for as tasks/datastore.py
    ``find_class_root`` does: through single wrapper folders to the first folder with more."""
    folder, single = root, None
    while True:
        dirs, files = _children(folder)
        if len(dirs) == 1 and not files:  # a wrapper folder (MerchData.zip holds MerchData/), or one class
            folder = single = os.path.join(folder, dirs[0])
            continue
        if len(dirs) == 1 or (not dirs and single is not None and files):
            one = dirs[0] if dirs else os.path.basename(single)
            raise UsageError(f"only one class folder, {one} (in {root}): a classifier needs two or more")
        if dirs:
            return
        raise UsageError(
            f"no class folders under {root}: expected one sub-folder per class holding its images "
            "(the label is the folder name)"
        )


def _children(folder: str) -> tuple[list[str], list[str]]:
    dirs, files = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or entry.name in IGNORED_NAMES or storage.TMP_MARKER in entry.name:
                continue
            (dirs if entry.is_dir() else files).append(entry.name)
    return dirs, files


def check_images(images: str, what: str) -> None:
    """Images to score: a folder (searched recursively), a list file of image URLs, or one image."""
    if not _exists(images):
        raise UsageError(f"{what} {images} not found: give a folder of images, a list file of image URLs or an image")
    if _is_model_file(images):
        raise UsageError(f"{what} {images} is a model file, not images")


def check_model(model: str, store: str, other: str | None, usage: str) -> None:
    """MODEL: a model file, a run (its folder, or its id in ``store``) or a promoted model's
    name, as :func:`retrain.tasks.runs.resolve_model` looks for them. ``other``: the command's
    next argument, named in the message when the two look swapped."""
    swapped = other is not None and _names_a_model(other, store)
    hint = f"; arguments swapped? the model comes first: {usage}" if swapped else ""
    if _exists(model):
        if _isdir(model):
            if _exists(storage.RunLayout(model).model):
                return
            kind = "a folder of images" if _holds_images(model) else "a folder without a model.pt"
            raise UsageError(f"MODEL {model} is {kind}, not a model{hint}")
        suffix = _suffix(model)
        if suffix in IMAGE_EXTENSIONS:
            raise UsageError(f"MODEL {model} is an image, not a model{hint}")
        if suffix == ".onnx":
            raise UsageError(
                f"MODEL {model} is an ONNX file: retrain reads its own model files (model.pt, written by "
                "`retrain run`; `retrain export` makes the ONNX file from one): give that file, its run id "
                "or its promoted model name"
            )
        return
    if _names_a_model(model, store):
        return
    raise UsageError(
        f"MODEL {model!r} not found: no model file or run folder there, no run {model!r} with a model and no "
        f"promoted model {model!r} in the store {store} (`retrain runs` and `retrain models` list them){hint}"
    )


def _names_a_model(name: str, store: str) -> bool:
    """Whether ``name`` is a model file, a run with its model, or a promoted model's name."""
    if _is_model_file(name) or _exists(storage.RunLayout(name).model):
        return True
    if "/" in name or not name or name.startswith("."):  # not one name of the store
        return False
    layout = storage.StoreLayout(store)
    return _exists(layout.run(name).model) or _exists(layout.model(name).current)


def _holds_images(folder: str) -> bool:
    """Whether a local ``folder`` has an image among its first files (a look, not a listing)."""
    if not storage.is_local(folder):
        return False
    for seen, (_, _, files) in enumerate(os.walk(storage.absolute(folder))):
        if any(_suffix(f) in IMAGE_EXTENSIONS for f in files) or seen > 20:
            return seen <= 20
    return False


def _is_model_file(url: str) -> bool:
    return _suffix(url) in (".pt", ".pth") and _exists(url) and not _isdir(url)


def _file(url: str, what: str) -> None:
    if not _exists(url):
        raise UsageError(f"{what} {url} not found")
    if _isdir(url):
        raise UsageError(f"{what} {url} is a folder: give a file")


def _exists(url: str) -> bool:
    return storage.exists(storage.absolute(url))


def _isdir(url: str) -> bool:
    return storage.isdir(storage.absolute(url))


def _suffix(url: str) -> str:
    return posixpath.splitext(url.rstrip("/"))[1].lower()


# ---- the Python API --------------------------------------------------------------------------------


def run_settings(settings: dict, parameters: Collection[str]) -> dict:
    """``retrain.run``'s keyword arguments as the retrain flow's ``parameters``: a training
    option given flat (``max_epochs=3``, as ``--max-epochs 3``) joins ``options``; a name that
    is neither is refused with the closest names, before Prefect sees it."""
    from dataclasses import fields

    from retrain.tasks.training.options import TrainingOptions

    settings = _split_setting(settings)
    parameters = [name for name in parameters if name != "split_fractions"] + ["split"]
    option_names = [f.name for f in fields(TrainingOptions)]
    unknown = [name for name in settings if name not in parameters and name not in option_names]
    if unknown:
        import difflib

        said = []
        for name in unknown:
            close = difflib.get_close_matches(name, [*parameters, *option_names], n=2, cutoff=0.6)
            said.append(repr(name) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise TypeError(f"retrain.run() got unknown setting(s): {', '.join(said)}")
    flat = {name: value for name, value in settings.items() if name in option_names and name not in parameters}
    if "split" in settings:  # the flow's parameter keeps its name (deployments and experiments give it)
        settings = {**{k: v for k, v in settings.items() if k != "split"}, "split_fractions": settings["split"]}
    if not flat:
        return settings
    given = dict(settings.get("options") or {})
    twice = sorted(set(flat) & set(given))
    if twice:
        raise TypeError(f"retrain.run(): training option(s) {', '.join(twice)} given both flat and in options")
    return {**{k: v for k, v in settings.items() if k not in flat}, "options": {**given, **flat}}


def _split_setting(settings: dict) -> dict:
    """``split_fractions=``, the old name of ``split=`` (the ``--split`` flag's), as ``split``
    with a DeprecationWarning; both given is a TypeError."""
    if "split_fractions" not in settings:
        return settings
    if "split" in settings:
        raise TypeError("retrain.run(): split given twice (split_fractions is its old name)")
    import warnings

    warnings.warn("retrain.run(split_fractions=...) is deprecated: use split=", DeprecationWarning, stacklevel=4)
    return {**{k: v for k, v in settings.items() if k != "split_fractions"}, "split": settings["split_fractions"]}
