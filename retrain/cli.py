"""The ``retrain`` command: its arguments and ``--json`` output (its exit statuses and error
reports: :mod:`retrain.failures`).

``run`` and ``score`` are Prefect flows (they show in the UI); ``evaluate``, ``classify``,
``network`` and ``runs`` call the plain functions, so they answer in seconds without starting a
Prefect API. What each command does is in :mod:`retrain.commands` (``evaluate``, ``classify``,
``score`` and ``export`` call the Python API's function of the same name, in :mod:`retrain`,
and print its answer); this module imports nothing heavy, so ``retrain --help``
and an argument error answer at once.
With ``--json`` the last line of stdout is one JSON object; without it, output is for people.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading

# Quiet, offline-friendly Prefect defaults; the user's own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect's temporary local API takes 10-30 s to start on a small, busy machine; its default
# 20 s limit would fail the run before it begins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from retrain import (  # noqa: E402
    failures,  # noqa: E402  (standard library only: costs ms)
    orchestrator,
    server,
)
from retrain.tasks.request import add_run_arguments  # noqa: E402
from retrain.tasks.vocabulary import ENGINE_CHOICES  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="store URL (default $RETRAIN_STORE, else ./retrain-store in the current folder)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _hidden_alias(p: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """An old spelling of a flag, still accepted (scripts keep working) but not in the help."""
    p.add_argument(flag, dest=dest, help=argparse.SUPPRESS, **kwargs)


def _run_groups(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """``run --help``'s sections, in order (advanced: the run's internals, seldom changed)."""
    titles = {
        "data": "data",
        "network": "network",
        "training": "training (MATLAB trainingOptions)",
        "augmentation": "augmentation (MATLAB imageDataAugmenter)",
        "run": "run, promotion and scoring",
        "cluster": "cluster",
        "advanced": "advanced",
    }
    return {name: p.add_argument_group(title) for name, title in titles.items()}


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data",
        nargs="?",
        default=None,
        metavar="DATA",
        help="zip or folder of class folders, any fsspec URL (default: a generated sample set)",
    )
    groups = _run_groups(p)
    add_run_arguments(groups)  # network, weights, mode, split, augmentation, training options
    add_labels_argument(groups["data"])
    run = groups["run"]
    run.add_argument("--run-id", default=None, help="name the run (or resume that run)")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run even if an unfinished run with the same settings exists "
        "(with --run-id of an existing run: start that run over, replacing its files)",
    )
    run.add_argument(
        "--model-name",
        default=None,
        help="the model this run may be promoted to (default: the data set's name and a key of its classes)",
    )
    run.add_argument("--no-promote", action="store_true", help="skip the promotion gate")
    run.add_argument(
        "--allow-class-change",
        action="store_true",
        help="promote even if the current model has other classes (the two cannot be compared)",
    )
    cluster = groups["cluster"]
    cluster.add_argument(
        "--train-deployment",
        default=None,
        help="train as a flow run of this deployment (e.g. train/gpu) and wait for it",
    )
    cluster.add_argument(
        "--dask-address",
        default=None,
        metavar="URL",
        help="prepare the image shards and compute transfer mode's features on this Dask cluster "
        "(e.g. tcp://host:8786); default: in the training process",
    )
    cluster.add_argument(
        "--dask-workers",
        type=int,
        default=None,
        metavar="N",
        help="the same on a local Dask cluster of N processes started for the run",
    )
    issues = groups["data"].add_mutually_exclusive_group()
    issues.add_argument(
        "--exclude-label-issues",
        dest="label_issues",
        action="store_const",
        const="exclude",
        default="find",
        help="train without the images whose labels look wrong (label_issues.csv; found before training; "
        "default: list them only)",
    )
    issues.add_argument(
        "--no-label-issues",
        dest="label_issues",
        action="store_const",
        const="off",
        help="skip looking for likely wrong labels (label_issues.csv)",
    )
    run.add_argument("--score-folder", default=None, help="end by batch-scoring this folder with the new model")
    run.add_argument("--score-out", default=None, help="where the scores go (default <run>/scores)")
    _common(p)


def add_labels_argument(p) -> None:
    p.add_argument(
        "--labels",
        default=None,
        metavar="TABLE",
        help="CSV or parquet table (any fsspec URL) with columns path (relative to DATA, or a URL), label and "
        "optionally split (train/val/test), instead of class folders",
    )


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model file URL, run id in the store, or promoted model name")
    p.add_argument("data", metavar="DATA", help="zip or folder of class folders")
    p.add_argument("--chart", default=None, help="write the confusion chart PNG here")
    _engine_argument(p)
    _common(p)


def _classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model file URL, run id in the store, or promoted model name")
    p.add_argument("image", metavar="IMAGE", help="image URL")
    p.add_argument("--explain", default=None, metavar="OUT.png", help="also write the image with its Grad-CAM overlay")
    _common(p)


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model file URL, run id in the store, or promoted model name")
    p.add_argument(
        "images",
        metavar="IMAGES",
        help="folder of images (searched recursively) or list file of image URLs, any fsspec URL",
    )
    p.add_argument(
        "--score-out",
        default=None,
        metavar="URL",
        help="output URL for the parts, scores.parquet and summary.json (default <store>/scores/<job-id>)",
    )
    _hidden_alias(p, "--out", "score_out", default=None)
    p.add_argument(
        "--dask-address",
        default=None,
        metavar="URL",
        help="scheduler of an existing Dask cluster, e.g. tcp://host:8786 (default: start a local one)",
    )
    p.add_argument(
        "--dask-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes of the local Dask cluster (default: one per core)",
    )
    _hidden_alias(p, "--workers", "dask_workers", type=int, default=None)
    mini_batch, partition_size, to_label = _scoring_defaults()
    p.add_argument(
        "--mini-batch-size",
        type=int,
        default=mini_batch,
        help=f"images per forward pass (default {mini_batch})",
    )
    p.add_argument("--top-k", type=int, default=None, help="labels and scores kept per image (default min(5, classes))")
    p.add_argument(
        "--partition-size",
        type=int,
        default=partition_size,
        help=f"images per Dask task and output part (default {partition_size})",
    )
    p.add_argument(
        "--verify-content",
        action="store_true",
        help="tell changed images by a hash of their content (reads every image each run), not only by "
        "size and modification time or ETag (for stores that give neither)",
    )
    p.add_argument(
        "--to-label",
        type=int,
        default=to_label,
        metavar="N",
        help=f"list the N least certain images (smallest margin between the two top scores) in "
        f"<score-out>/to_label.csv, to label and give back with retrain run DATA --labels TABLE (default {to_label}; 0: none)",
    )
    _engine_argument(p)
    _common(p)


def _engine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default="auto",
        choices=ENGINE_CHOICES,
        help="forward-pass engine: auto (default) = the fastest engine validated for this model on this "
        "hardware; a reduced-precision engine that failed validation runs only when named, with a warning",
    )


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model file URL, run id in the store, or promoted model name")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="default %(default)s")
    p.add_argument("--out", required=True, metavar="FILE", help="URL of the exported file")
    p.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="ONNX only: the graph takes decoded uint8 RGB pixels (N x H x W x 3, any size), resizes and "
        "normalises them as retrain does and returns probabilities: a client needs only a JPEG decoder",
    )
    _common(p)


def _network_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="network to summarise")
    p.add_argument("--classes", type=int, default=5, help="classes for the new head")
    p.add_argument("--weights", default="none", help="weights to load (default: none, architecture only)")
    p.add_argument("--all-layers", action="store_true", help="list every layer (default: the first 40)")
    _common(p)


def _runs_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)


def _deploy_arguments(p: argparse.ArgumentParser) -> None:
    from retrain.deploy import placeholder_defaults

    for name, (default, what) in placeholder_defaults().items():
        flag = "--" + name.removeprefix("RETRAIN_").lower().replace("_", "-")
        p.add_argument(flag, dest=name, default=None, metavar="VALUE", help=f"{what} [${name}, default {default!r}]")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="DEPLOYMENT",
        help="apply only this deployment (repeatable): scheduled, gpu, batch",
    )
    p.add_argument("--cpu-pool-type", default="process", help="type of a CPU pool to create (default process)")
    p.add_argument(
        "--gpu-pool-type",
        default="process",
        help="type of the GPU pool to create: process, or kubernetes with --gpu-job-template",
    )
    p.add_argument(
        "--gpu-job-template",
        default=None,
        help="base job template (JSON) of the GPU pool, e.g. infra/k8s/gpu-work-pool.json",
    )
    p.add_argument("--no-create-pools", action="store_true", help="do not create missing work pools")
    p.add_argument("--prefect-file", default=None, help="default deployments/prefect.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one model (default: all)")
    _common(p)


def _rollback_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="model name")
    p.add_argument(
        "--to",
        dest="to_run",
        default=None,
        metavar="RUN_ID",
        help="the run to make current (default: the one that was current before the current one)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="make --to RUN_ID current even if it never was (the gate kept it out, or it never went through it)",
    )
    _common(p)


def _server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=server.DEFAULT_PORT, help="start: port (default %(default)s)")
    p.add_argument("--host", default=server.DEFAULT_HOST, help="start: address to listen on (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _experiment_arguments(p: argparse.ArgumentParser) -> None:
    from retrain.experiment_cli import add_experiment_arguments

    p.add_argument(
        "data",
        nargs="?",
        default=None,
        metavar="DATA",
        help="zip or folder of class folders, any fsspec URL (default: a generated sample set)",
    )
    groups = _run_groups(p)
    add_run_arguments(groups)
    add_labels_argument(groups["data"])
    groups["cluster"].add_argument(
        "--train-deployment",
        default=None,
        help="train every run as a flow run of this deployment (e.g. train/gpu): its pool's workers run them",
    )
    add_experiment_arguments(p)
    _common(p)


# Each command: its one-line help, its description (None: the help line) and its arguments.
SUBCOMMANDS = {
    "run": ("retrain a network on a data set (Prefect flow)", None, _run_arguments),
    "evaluate": ("accuracy, per-class metrics and confusion of a model on labelled images", None, _evaluate_arguments),
    "classify": ("label and score for one image", None, _classify_arguments),
    "score": (
        "batch-score a folder or list of images on Dask (Prefect flow); rerun to score only what changed",
        None,
        _score_arguments,
    ),
    "export": ("export a model to ONNX or TorchScript (MATLAB's exportONNXNetwork)", None, _export_arguments),
    "network": ("list networks, or show one's summary", None, _network_arguments),
    "runs": ("list the runs in the store", None, _runs_arguments),
    "deploy": (
        "apply deployments/prefect.yaml (work pools + deployments)",
        "Create the missing work pools and apply deployments/prefect.yaml against the Prefect API in "
        "PREFECT_API_URL. Each flag fills a {{ $RETRAIN_* }} placeholder of the file (flag > environment > default).",
        _deploy_arguments,
    ),
    "experiment": (
        "grid of run options x seeds, compared (MATLAB's Experiment Manager; Prefect flow)",
        "Every --grid combination is run once per seed (each a retrain run in the store); every other flag "
        "applies to all runs. Prints the comparison table (mean ± sd over seeds).",
        _experiment_arguments,
    ),
    "models": ("list the promoted models and their history", None, _models_arguments),
    "rollback": ("make an earlier run the current model again", None, _rollback_arguments),
    "server": (
        "start, stop or show the local Prefect server (with its UI) that retrain commands then use",
        "A Prefect server in the background, its database and log in PREFECT_HOME (default ~/.prefect). "
        "While it runs and no API is set (PREFECT_API_URL or the active Prefect profile), every retrain "
        "command uses it: runs stay in its UI, and no command waits for Prefect's temporary API to start.",
        _server_arguments,
    ),
}


# What ``retrain --help`` says first (the module's docstring is for readers of the code).
DESCRIPTION = (
    "Retrain pretrained image networks on your own images, then evaluate, classify, batch-score and export "
    "the models. run, score and experiment are Prefect flows (watch them in the UI of `retrain server "
    "start`); the other commands answer in seconds. `retrain COMMAND --help` tells more."
)
# Each command's usage line: its arguments, then [options] (the full list of flags is its help).
USAGE = {
    "run": "[DATA] [options]",
    "evaluate": "MODEL DATA [options]",
    "classify": "MODEL IMAGE [options]",
    "score": "MODEL IMAGES [options]",
    "export": "MODEL --out FILE [options]",
    "network": "[NAME] [options]",
    "experiment": "[DATA] --grid KEY=V1,V2 [options]",
    "models": "[NAME] [options]",
    "rollback": "NAME [options]",
    "server": "{start,stop,status} [options]",
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, with a wider flag column, except that the exit-status table of the epilog
    keeps its lines."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text is failures.EXIT_STATUSES:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse's, except that a flag it does not know is refused by the command's own parser
    (its usage, not retrain's) with the closest flags it has: ``--max-epocs`` -> ``--max-epochs``."""

    def parse_args(self, args=None, namespace=None):
        commands = self._subcommands()
        first = next((a for a in (sys.argv[1:] if args is None else args) if not a.startswith("-")), None)
        if commands and first is not None and first not in commands:  # `retrain rnu`: say which was meant
            import difflib

            close = difflib.get_close_matches(first, commands, n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}?" if close else f"the commands: {', '.join(commands)}"
            self.error(f"unknown command {first!r} ({hint})")
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommands().get(getattr(parsed, "command", None), self)
            command.error(unknown_arguments(extras, command))
        return parsed

    def _subcommands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def unknown_arguments(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """The message for arguments ``parser`` does not take, with a did-you-mean for each flag."""
    import difflib

    # Each spelling of a shown flag (an alias too: --epochs) -> its first one (--max-epochs),
    # compared without the dashes every flag shares.
    canonical = {
        flag.lstrip("-"): action.option_strings[0]
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for flag in action.option_strings
        if flag.startswith("--")
    }
    parts = []
    for extra in extras:
        flag = extra.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        close = difflib.get_close_matches(flag.lstrip("-"), canonical, n=4, cutoff=0.6)
        suggestions = list(dict.fromkeys(canonical[c] for c in close))[:2]
        parts.append(flag + (f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""))
    if not parts:
        return f"unrecognized arguments: {' '.join(extras)}"
    return f"unrecognized argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"


class _Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        print(f"retrain {version('retrain')}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line. With ``command``, only that subcommand gets its arguments (the others
    keep their help line): what ``retrain X ...`` needs, without importing what the other
    commands' defaults come from."""
    parser = _Parser(
        prog="retrain",
        description=DESCRIPTION,
        epilog=failures.EXIT_STATUSES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print retrain's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, description, add_arguments) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            usage=f"%(prog)s {USAGE[name]}" if name in USAGE else None,
            help=help_line,
            description=description,
            epilog=failures.EXIT_STATUSES,
            formatter_class=_HelpFormatter,
        )
        if command in (None, name):
            add_arguments(p)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word: ``retrain`` itself takes no option but
    --help), or None (then ``retrain`` answers with its usage or help: no subcommand's
    arguments are needed)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def _scoring_defaults() -> tuple[int, int, int]:
    """Images per forward pass, per partition and in to_label.csv of batch scoring, for the help text."""
    from retrain.tasks.scoring.layout import (  # torch-free
        DEFAULT_MINI_BATCH_SIZE,
        DEFAULT_PARTITION_SIZE,
        DEFAULT_TO_LABEL,
    )

    return DEFAULT_MINI_BATCH_SIZE, DEFAULT_PARTITION_SIZE, DEFAULT_TO_LABEL


# Commands whose flows talk to the Prefect API.
PREFECT_COMMANDS = frozenset({"run", "score", "experiment", "deploy"})


def _watch_api(args, url: str, grace_s: float) -> orchestrator.ApiWatch:
    """End the program once the API has not answered for ``grace_s`` seconds: whatever the
    command waits on then (Prefect's client retrying call after call) waits no longer. The
    store keeps what was written (every write is atomic), so the rerun resumes."""

    def lost(error: orchestrator.OrchestratorError) -> None:
        failures.report(args, error, str(error), failures.EXIT_ORCHESTRATOR)
        failures.release_error_line()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(failures.EXIT_ORCHESTRATOR)

    # After os._exit, the resource tracker of a local Dask cluster's processes (started later,
    # with this interpreter's -W options) frees their semaphores and would warn about them
    # below the error line; the freeing is what matters.
    sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    return orchestrator.ApiWatch(url, grace_s, lost).start()


def main(argv: list[str] | None = None, watch_api: bool = False) -> int:
    """Run the command in ``argv``; returns its exit status. ``watch_api`` (the ``retrain``
    program): bound Prefect's client retries and end the process once the Prefect API stays
    away for the grace."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv) or "").parse_args(argv)  # "": no subcommand, so none's arguments
    if watch_api:  # the program, which ends through finish(): the error line waits for the exit handlers
        failures.hold_error_line()
    if args.command != "server":
        server.use_local_server()  # the local server, when it runs and no other API is set
    watch = None
    restore_unraisable_hook = failures.keep_interrupts()
    try:
        from retrain.checks import check_arguments

        check_arguments(args)  # a location missing or of the wrong kind: refused before anything starts
        if args.command in PREFECT_COMMANDS:
            starting = server.start_for_command(args.command)  # no API set, none up: the local server, started now
            grace = orchestrator.grace_seconds()
            if watch_api:  # the program's own environment (in-process callers keep Prefect's settings)
                orchestrator.bound_client_retries(grace)
            url = orchestrator.configured_api_url()
            if url:  # a server the user chose: down now is said now, not after Prefect's retries
                if not starting:
                    orchestrator.check_api(url)
                watch = _watch_api(args, url, grace) if watch_api else None
        from retrain.commands import COMMANDS

        result = COMMANDS[args.command](args)
        if args.json:
            print(json.dumps(result, default=str))
    except (Exception, KeyboardInterrupt) as exc:
        if failures.output_gone(exc):  # `retrain runs | head -1`: not a failure of the command
            return failures.end_quietly()
        failure = failures.classify(args, exc)
        if failure is None:
            raise
        return failures.report(args, exc, *failure)
    finally:
        restore_unraisable_hook()
        if watch is not None:
            watch.stop()
    return failures.exit_status(args, result)


def entry() -> None:
    """The ``retrain`` program: :func:`main` here, or in the resident process when the local
    server runs one (retrain/resident.py: the same command without the imports), then
    :func:`finish`."""
    argv = sys.argv[1:]
    status = _delegated(argv)
    finish(main(argv, watch_api=True) if status is None else status)


def _delegated(argv: list[str]) -> int | None:
    """The exit status of ``argv`` run by the resident process; None to run it here."""
    args = build_parser(_command_of(argv) or "").parse_args(argv)  # --help and bad flags: answered here
    if args.command == "server" or server.use_local_server() is None:
        return None
    from retrain import resident

    return resident.delegate(argv, server.prefect_home())


def finish(status: int) -> None:
    """End the process without the interpreter's teardown. With torch and Prefect loaded that
    teardown (freeing every module's objects) took 6-8 s of a ``retrain run`` on a busy 2-core
    machine; what an exit must do still happens: output flushed, other threads finished, exit
    handlers run (Prefect's send the last logs and events to the API)."""
    status = _flush(status)
    if status == failures.EXIT_ORCHESTRATOR:  # Prefect's exit handlers would only retry sending to the lost API
        failures.release_error_line()
        os._exit(_flush(status))
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    # Prefect's last logs and events sent while its temporary API is up: its exit handlers stop
    # that API before its log worker's own drain, which then fails on stderr ("--- Error logging
    # to API ---"), and the failed run's last logs never reached the UI.
    from retrain.early_api import drain_prefect_workers

    drain_prefect_workers()
    atexit._run_exitfuncs()
    failures.release_error_line()  # after the exit handlers, which may log: the last line on stderr
    os._exit(_flush(status))


def _flush(status: int) -> int:
    """Flush stdout and stderr; ``status``, or 141 when the output's reader went away before
    it got what was still buffered."""
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BrokenPipeError as exc:
        if not failures.output_gone(exc):
            raise
        return failures.end_quietly()
    return status


if __name__ == "__main__":
    entry()
