"""How a failed ``retrain`` command ends: one exit status per class of failure, one plain line
on stderr saying what failed (and what to do), and the traceback in a log file.

A failure that is not one of these classes is a bug: :func:`classify` returns None and the
command raises it, traceback and all, since that is what a report needs.
"""

from __future__ import annotations

import json
import os
import sys

from retrain.tasks import orchestrator, server
from retrain.tasks.orchestrator import DEFAULT_GRACE_S

# Exit statuses, one per failure class (the help's epilog and the README list them too).
EXIT_REFUSED = 2  # the input or request was refused: running it again as it is will not help
EXIT_STORE_FAILED = 3  # the store failed after retries (unreachable, full, credentials refused)
EXIT_ORCHESTRATOR = 4  # the Prefect API is unreachable (before the command, or for the grace)
EXIT_CLUSTER_LOST = 5  # the Dask scheduler is unreachable or went away during the job
EXIT_INTERRUPTED = 130
EXIT_STATUSES = f"""exit status:
  0    done
  {EXIT_REFUSED}    the input or request was refused (bad data, options, model file; a run already running)
  {EXIT_STORE_FAILED}    the store failed after retries (unreachable, full, credentials refused)
  {EXIT_ORCHESTRATOR}    the Prefect API is unreachable, before the command or for longer than
       $RETRAIN_API_GRACE_SECONDS (default {DEFAULT_GRACE_S:.0f}) while it ran
  {EXIT_CLUSTER_LOST}    the Dask cluster (--dask-address) is unreachable or was lost
  {EXIT_INTERRUPTED}  interrupted
After 3, 4, 5 and 130 what is in the store is kept: rerun the same command to resume.
The last line on stderr says what failed; a traceback goes to the log file it names."""


def log_dir() -> str:
    """Where a failed command's traceback goes: ``$RETRAIN_LOG_DIR``, else
    ``$XDG_STATE_HOME/retrain`` (``~/.local/state/retrain``)."""
    if os.environ.get("RETRAIN_LOG_DIR"):
        return os.environ["RETRAIN_LOG_DIR"]
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "retrain")


def write_log(args, exc: BaseException, message: str) -> str | None:
    """The command line, the message and the traceback, in a new file of :func:`log_dir`."""
    import time
    import traceback

    try:
        folder = log_dir()
        os.makedirs(folder, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = os.path.join(folder, f"{args.command}-{stamp}-{os.getpid()}.log")
        with open(path, "w") as f:
            f.write(f"retrain {' '.join(sys.argv[1:])}\n{message}\n\n")
            f.write("".join(traceback.format_exception(exc)))
        return path
    except OSError:  # no place for a log is no reason to hide the message
        return None


def report(args, exc: BaseException, message: str, status: int) -> int:
    """Report a failure: its traceback to a log file, one plain line (the last) on stderr,
    and with --json an object with the error, its class and the exit status."""
    log = write_log(args, exc, message)
    if log:
        print(f"retrain {args.command}: details in {log}", file=sys.stderr)
    print(f"retrain {args.command}: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": message, "type": type(exc).__name__, "status": status, "log": log}))
    return status


def _user_errors() -> tuple[type[BaseException], ...]:
    """What refuses a request (bad input, data, model or option). Imported when a command
    failed: the modules that raise them are loaded by then."""
    from retrain.tasks.datastore import DataSetError
    from retrain.tasks.model_file import ModelFileError
    from retrain.tasks.networks import WeightsUnavailableError
    from retrain.tasks.preprocessing import ImageDecodeError

    return (
        server.ServerError,
        DataSetError,
        WeightsUnavailableError,
        ModelFileError,
        ImageDecodeError,
        FileNotFoundError,
        ValueError,
    )


def classify(args, exc: BaseException) -> tuple[str, int] | None:
    """The message and exit status of a failure; None for a bug (its traceback is what a
    report needs, so it is raised)."""
    import errno

    from retrain.tasks import storage
    from retrain.tasks.scoring.layout import ClusterLostError

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; what is in the store is kept: rerun the same command to resume", EXIT_INTERRUPTED
    if orchestrator.is_api_failure(exc):
        return str(orchestrator.failure_of(exc, orchestrator.configured_api_url())), EXIT_ORCHESTRATOR
    if isinstance(exc, ClusterLostError):
        return str(exc), EXIT_CLUSTER_LOST
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = (
            f" writing {exc.filename}"
            if exc.filename
            else f" (store {getattr(args, 'store', None) or storage.default_store()})"
        )
        return (
            f"store full: no space left on device{where}; what was written before is kept: "
            "free some space and rerun the same command to resume",
            EXIT_STORE_FAILED,
        )
    if isinstance(exc, storage.StorageError):
        return str(exc), EXIT_STORE_FAILED
    if isinstance(exc, _user_errors()):
        return (str(exc) if not isinstance(exc, FileNotFoundError) else f"not found: {exc}"), EXIT_REFUSED
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError)):
        return f"{type(exc).__name__}: {exc}", EXIT_REFUSED
    if storage.transient(exc):  # a store failure that escaped the retries (a remote filesystem called directly)
        return f"store failure: {type(exc).__name__}: {exc}", EXIT_STORE_FAILED
    return None
