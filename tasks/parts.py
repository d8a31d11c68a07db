"""The one resumable-parts job: image shards, feature shards and scoring partitions are each
a folder of keyed parts, computed by this engine.

A :class:`PartsJob` is a folder and its :class:`Part`\\ s: each part has a name (its file in
the folder) and the arguments of the job's ``compute`` function, which computes the part,
writes it atomically to ``job.url(part)`` (``storage.write_bytes``, ``row_files.write_npy``:
a reader never sees half a part) and returns a small picklable record. The engine

1. lists what is there, once (:func:`present`: ``storage.names_in``, listed afresh, since
   workers elsewhere write there), and so which parts are missing (:meth:`PartsJob.missing`);
2. computes the missing ones in this process (:func:`compute_here`) or mapped over a Dask
   client (:func:`map_on_dask`: a local cluster or one at an address, whichever the client
   was made for), trying a failed part once more, ending the job at the first failure the
   job calls fatal (by default a store failure: :func:`store_failure`), reporting a lost
   scheduler as :class:`ClusterLostError`;
3. checks that every part is there and writes the manifest, where the job has one
   (:func:`finish`).

:func:`run_parts` does the three. A rerun after a crash or a kill -9 finds the finished parts
and computes only the missing ones: that is what makes each of these jobs resumable.

Scoring (tasks/scoring) uses :func:`present` for the parts folder, :func:`map_on_dask` with
``score_partition`` as the job's compute, ``fatal`` = a bad model or :func:`store_failure`,
``incomplete`` = ``ScoringIncompleteError`` and ``no_workers`` = ``ScoringError``; and
:func:`lost`, :func:`cluster_connection`, :func:`cluster_lost` and :class:`ClusterLostError`
for its ``dask_client``. Starting a cluster and connecting to it stay in
tasks/scoring/cluster.py.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from retrain.tasks import storage


class ClusterLostError(RuntimeError):
    """The Dask scheduler could not be reached, or went away during the job. Not a refusal and
    not a store failure: the parts finished before are kept, and the same command run against a
    running scheduler computes only the missing ones."""


class PartsIncompleteError(RuntimeError):
    """Some parts failed as a whole (not a store failure: a worker crash, say); the others are
    saved and a rerun computes only the missing ones."""


# ---- failures ---------------------------------------------------------------------------------


def cluster_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of Dask's own connections (CommClosedError, a closed
    stream), which are OSErrors a store failure must not be taken for."""
    return type(exc).__module__.startswith(("distributed.", "tornado."))


def store_failure(exc: BaseException | None) -> bool:
    """Whether a part failed because its output or the store failed (full, unreachable,
    refusing the credentials), not because of its inputs: every other part would fail the
    same way, each after the store's own retries."""
    if exc is None or cluster_connection(exc):
        return False  # the cluster's own connections (CommClosedError...): its loss, not the store's
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, storage.StorageError) or storage.transient(exc) or storage.access_refused(exc)


def lost(client) -> bool:
    """Whether ``client`` lost its scheduler (it is reconnecting, or gave up and closed)."""
    return client.status not in ("running", "newly-created")


def address_of(client) -> str:
    try:
        return client.scheduler.address
    except AttributeError:
        return "(the scheduler)"


def cluster_lost(address: str, detail: str = "", what: str = "partitions") -> ClusterLostError:
    todo = "score the missing partitions" if what == "partitions" else f"compute the missing {what}"
    return ClusterLostError(
        f"compute cluster lost: {address}: the Dask scheduler went away during the job{detail}; the finished "
        f"{what} are kept: rerun the same command against a running scheduler to {todo}"
    )


# ---- the job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One part: its file name in the job's folder, and what the job's compute function takes."""

    name: str
    args: tuple = ()


@dataclass(frozen=True)
class PartsJob:
    """A folder of keyed parts. ``compute(*part.args)`` computes a part, writes it atomically
    to ``url(part)`` (leaving a part already there as it is: a duplicate Dask task) and
    returns a small record; it runs here or on a Dask worker, so on Dask it and its arguments
    must pickle. ``manifest``: a file written last, holding ``manifest_record``, saying that
    every part is there (None: the job has none)."""

    folder: str
    parts: tuple[Part, ...]
    compute: Callable[..., Any]
    what: str = "parts"  # what a part is called in messages: "image shards", "partitions"
    label: str = "part"  # the Dask task keys' prefix
    manifest: str | None = None
    manifest_record: dict = field(default_factory=dict)
    # A failure that ends the job at once, with that part's error (no retry: every part would fail).
    fatal: Callable[[BaseException], bool] = store_failure
    # The error for parts that failed twice (the others done), and for a cluster with no worker.
    incomplete: Callable[[str], Exception] = PartsIncompleteError
    no_workers: Callable[[str], Exception] = RuntimeError

    def url(self, part: Part) -> str:
        return storage.join(self.folder, part.name)

    def missing(self, present_names: set[str]) -> list[Part]:
        """The parts (in plan order) not among ``present_names``."""
        return [p for p in self.parts if p.name not in present_names]

    def finished(self, present_names: set[str]) -> bool:
        """Every part there and the manifest written (a job without one: every part there)."""
        return (self.manifest is None or self.manifest in present_names) and not self.missing(present_names)


def present(folder: str) -> set[str]:
    """The names in ``folder``, listed afresh (other processes write there); none when it is
    missing. Unfinished ``*.tmp-*`` debris is listed too: no part is named so."""
    return storage.names_in(folder)


# ---- computing ----------------------------------------------------------------------------------


def compute_here(job: PartsJob, todo: Sequence[Part], on_done: Callable[[Part, Any], None] | None = None) -> list[Any]:
    """Compute ``todo`` in this process, in order; ``on_done(part, record)`` after each. A part
    that fails is tried once more unless the failure is fatal (``job.fatal``); its second
    failure is raised as it is, ending the job (the parts before it are kept)."""
    records = []
    for part in todo:
        try:
            record = job.compute(*part.args)
        except Exception as exc:
            if job.fatal(exc):
                raise
            record = job.compute(*part.args)
        records.append(record)
        if on_done is not None:
            on_done(part, record)
    return records


def map_on_dask(
    client,
    job: PartsJob,
    todo: Sequence[Part],
    on_done: Callable[[Part, Any], None] | None = None,
    worker_timeout_s: float = 300.0,
) -> list[Any]:
    """Map ``job.compute`` over ``todo`` on the Dask ``client``; ``on_done(part, record)`` is
    called in this (the driver's) thread as each finishes. Parts are handed out as threads
    free up (one more than the cluster's threads in flight), so that a fatal failure
    (``job.fatal``: the output or the store failing) ends the job at the first failed part,
    with that part's error, and no more are started. A part that fails otherwise (a worker
    killed, say) is tried once more, then reported in ``job.incomplete`` after the others are
    done. A scheduler that goes away raises :class:`ClusterLostError`. Returns the records
    in the order the parts finished."""
    from distributed import as_completed

    if not todo:
        return []
    try:
        client.wait_for_workers(1, timeout=worker_timeout_s)
    except TimeoutError:
        if lost(client):
            raise cluster_lost(address_of(client), what=job.what) from None
        raise job.no_workers(f"no Dask worker joined the cluster within {worker_timeout_s:.0f} s") from None

    def submit(part: Part):
        return client.submit(job.compute, *part.args, key=f"{job.label}-{part.name}-{uuid.uuid4().hex[:8]}")

    waiting = list(reversed(todo))  # popped from the end: in plan order
    running = as_completed()
    futures: dict = {}  # future -> (part, attempt)

    def top_up() -> None:
        try:
            threads = sum(client.nthreads().values())
        except (OSError, TimeoutError) as exc:  # the scheduler does not answer
            raise cluster_lost(address_of(client), f" ({type(exc).__name__}: {exc})", job.what) from exc
        room = threads + 1 - running.count()
        while waiting and room > 0:
            part = waiting.pop()
            future = submit(part)
            futures[future], room = (part, 1), room - 1
            running.add(future)

    records, failures = [], []  # failures: (part, exception or None, what happened)
    try:
        top_up()
        for future in running:
            part, attempt = futures[future]
            if future.status != "finished":  # error, or cancelled
                exc = future.exception() if future.status == "error" else None
                if exc is not None and job.fatal(exc):
                    raise exc
                if exc is not None and attempt == 1 and not lost(client):
                    retry = submit(part)
                    futures[retry] = (part, 2)
                    running.add(retry)
                    continue
                failures.append((part, exc, f"{type(exc).__name__}: {exc}" if exc else future.status))
            else:
                record = future.result()
                records.append(record)
                if on_done is not None:
                    on_done(part, record)
            if lost(client):
                break
            top_up()
    finally:
        try:
            client.cancel(list(futures))
        except Exception:  # a lost scheduler: nothing left to cancel there
            pass
    if (failures or waiting) and lost(client):  # cancelled by the scheduler going away, not failed
        raise cluster_lost(
            address_of(client), what=job.what
        )  # the workers may have written more parts than reported here
    if failures:
        part, exc, happened = failures[0]
        raise job.incomplete(
            f"{len(failures)} of {len(todo)} {job.what} failed (first: {job.url(part)}: {happened}); "
            f"the others are saved, rerun the job to retry these"
        ) from exc
    return records


def finish(job: PartsJob) -> None:
    """Check that every part is in the folder (listed afresh), then write the manifest."""
    left = job.missing(present(job.folder))
    if left:
        raise PartsIncompleteError(
            f"{job.what} {[p.name for p in left[:5]]} of {job.folder} are missing after computing them"
        )
    if job.manifest is not None:
        storage.write_json(storage.join(job.folder, job.manifest), job.manifest_record)


@dataclass
class PartsRun:
    """What :func:`run_parts` did: the records of the parts it computed, in the order they
    finished, how many parts the job has, and where they were computed."""

    records: list[Any]
    total: int
    computed: int
    where: str  # "in process" or "dask"

    @property
    def reused(self) -> int:
        return self.total - self.computed


def run_parts(
    job: PartsJob,
    client: Callable[[], Any] | None = None,
    on_done: Callable[[Part, Any], None] | None = None,
    present_names: set[str] | None = None,
) -> PartsRun:
    """Compute the job's missing parts, check and write the manifest (unless the job was
    finished already). ``client``: returns the Dask client to map the parts over, called only
    when some part is missing (a rerun that finds every part starts no cluster); None: in this
    process. ``present_names``: what is in the folder, when the caller has listed it already."""
    names = present(job.folder) if present_names is None else present_names
    if job.finished(names):
        return PartsRun([], len(job.parts), 0, "in process")
    todo = job.missing(names)
    where = "dask" if todo and client is not None else "in process"
    if where == "dask":
        records = map_on_dask(client(), job, todo, on_done)
    else:
        records = compute_here(job, todo, on_done)
    finish(job)
    return PartsRun(records, len(job.parts), len(todo), where)
