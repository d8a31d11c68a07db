"""How a failed ``retrain`` command ends: one exit status per class of failure, one plain line
on stderr saying what failed (and what to do), and the traceback in a log file.

A failure that is not one of these classes is a bug: :func:`classify` returns None and the
command raises it, traceback and all, since that is what a report needs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable

from retrain import orchestrator, server
from retrain.orchestrator import DEFAULT_GRACE_S

# Exit statuses, one per failure class (the help's epilog and the README list them too).
EXIT_REFUSED = 2  # the input or request was refused: running it again as it is will not help
EXIT_STORE_FAILED = 3  # the store failed after retries (unreachable, full, credentials refused)
EXIT_ORCHESTRATOR = 4  # the Prefect API is unreachable (before the command, or for the grace)
EXIT_CLUSTER_LOST = 5  # the Dask scheduler is unreachable or went away during the job
EXIT_INTERRUPTED = 130
EXIT_RUNS_FAILED = 1  # an experiment ended, but some of its runs failed
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as for a program ended by SIGPIPE (`... | head -1`)
# What every further piece of a command's work would meet too: an experiment stops its runs.
SHARED_FAILURES = frozenset({EXIT_STORE_FAILED, EXIT_ORCHESTRATOR, EXIT_CLUSTER_LOST, EXIT_INTERRUPTED})
EXIT_STATUSES = f"""exit status:
  0    done
  {EXIT_RUNS_FAILED}    experiment: some runs failed (the others are kept: rerun the same command to retry them)
  {EXIT_REFUSED}    the input or request was refused (bad data, options, model file; a run already running)
  {EXIT_STORE_FAILED}    the store failed after retries (unreachable or stalled, full, no such bucket,
       credentials refused; $RETRAIN_STORE_RETRIES, $RETRAIN_STORE_TIMEOUT)
  {EXIT_ORCHESTRATOR}    the Prefect API is unreachable, before the command or for longer than
       $RETRAIN_API_GRACE_SECONDS (default {DEFAULT_GRACE_S:.0f}) while it ran
  {EXIT_CLUSTER_LOST}    the Dask cluster (--dask-address) is unreachable or was lost
  {EXIT_INTERRUPTED}  interrupted
  {EXIT_BROKEN_PIPE}  the output's reader went away (`retrain runs | head -1`): the rest was not printed
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
    and with --json an object with the error, its class and the exit status. A usage error
    (:class:`retrain.checks.UsageError`: a location missing or of the wrong kind) writes no
    log: its traceback would only show the check that refused it."""
    from retrain.checks import UsageError

    log = None if isinstance(exc, UsageError) else write_log(args, exc, message)
    if log:
        print(f"retrain {args.command}: details in {log}", file=sys.stderr)
    error_line(args, message)
    if args.json:
        print(json.dumps({"error": message, "type": type(exc).__name__, "status": status, "log": log}))
    return status


# The program's error line, held until its exit handlers have run (retrain/cli.py `finish`):
# Prefect's log while they send the last events ("EventsWorker - Still processing items"),
# and the error line is to be the last line on stderr. None: printed at once (an in-process
# caller, which has no such exit).
_held: list[str] | None = None


def hold_error_line() -> None:
    global _held
    _held = []


def error_line(args, message: str) -> None:
    """``retrain CMD: error: MESSAGE`` on stderr, now or, when held, at the program's end."""
    line = f"retrain {args.command}: error: {message}"
    if _held is None:
        print(line, file=sys.stderr)
    else:
        _held.append(line)


def release_error_line() -> None:
    """Print the held error line (the program's last act before it exits)."""
    for line in _held or ():
        print(line, file=sys.stderr)
    if _held:
        _held.clear()


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


def _scores_out(args) -> str | None:
    """The scores output a ``score`` or ``run`` command names (``--score-out``)."""
    return getattr(args, "score_out", None)


def _in_scores_out(args, filename) -> bool:
    """Whether ``filename`` is in the scores output the command names (outside the store,
    which is then not to blame)."""
    from retrain.tasks import storage

    out = _scores_out(args)
    if not out or not filename:
        return False
    out, filename = storage.absolute(out).rstrip("/"), storage.absolute(str(filename))
    return filename.startswith(out + "/")


def interrupted(exc: BaseException) -> bool:
    """Whether Ctrl-C is behind ``exc``: a KeyboardInterrupt, or an error raised while one was
    handled (Prefect's engine, interrupted while it creates a task run, fails in its crash
    handling with ValueError("Task run is not set"), the KeyboardInterrupt its context)."""
    chain, seen = [exc], set()
    while chain:
        link = chain.pop()
        if link is None or id(link) in seen:
            continue
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        chain += [link.__cause__, link.__context__]
    return False


def keep_interrupts() -> Callable[[], None]:
    """Make sure no Ctrl-C is lost; returns what undoes it. Python raises KeyboardInterrupt
    wherever the main thread is, and when that is a finalizer (a ``__del__`` the garbage
    collector runs) it prints "Exception ignored" and goes on: the interrupt was lost (a run
    interrupted there trained to its end and exited 0). Such an interrupt is delivered again."""
    import _thread
    import threading

    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # As if Ctrl-C came again in a moment: raised here, in the hook, it would be swallowed too.
            again = threading.Timer(0.01, _thread.interrupt_main)
            again.daemon = True
            again.start()
        else:
            previous(unraisable)

    sys.unraisablehook = hook

    def undo() -> None:
        sys.unraisablehook = previous

    return undo


def output_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a write to stdout after its reader went away (``retrain runs | head
    -1``) rather than a broken connection to the store: then the stdout pipe reports an error."""
    import select

    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file (tests)
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are reported whatever is asked for
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def end_quietly() -> int:
    """End a command whose output's reader went away as a program killed by SIGPIPE does: no
    message, status 141. Stdout then goes to /dev/null, so that what is still buffered (and the
    exit handlers' flushes) finds somewhere to go."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


class Unfinished(dict):
    """A command's result (what --json prints) when part of its work failed: printed as any
    result is, then the command ends with ``status`` and ``message`` as its last stderr line."""

    def __init__(self, result: dict, status: int, message: str):
        super().__init__(result)
        self.status, self.message = status, message


def exit_status(args, result: dict) -> int:
    """The status of a command that returned ``result``: 0, or an :class:`Unfinished` one's."""
    if not isinstance(result, Unfinished):
        return 0
    error_line(args, result.message)
    return result.status


def classify(args, exc: BaseException) -> tuple[str, int] | None:
    """The message and exit status of a failure; None for a bug (its traceback is what a
    report needs, so it is raised)."""
    import errno

    from retrain.checks import UsageError

    if isinstance(exc, UsageError):  # said at once: the error types below load torch with their modules
        return str(exc), EXIT_REFUSED
    from retrain.tasks import storage
    from retrain.tasks.parts import ClusterLostError

    if interrupted(exc):
        return "interrupted; what is in the store is kept: rerun the same command to resume", EXIT_INTERRUPTED
    if orchestrator.is_api_failure(exc):
        return str(orchestrator.failure_of(exc, orchestrator.configured_api_url())), EXIT_ORCHESTRATOR
    if isinstance(exc, ClusterLostError):
        return str(exc), EXIT_CLUSTER_LOST
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and _in_scores_out(args, exc.filename):
        return (
            f"no space left on device writing {exc.filename} (scores output {_scores_out(args)}); the parts "
            "written before are kept: free some space there and rerun the same command to resume",
            EXIT_STORE_FAILED,
        )
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
