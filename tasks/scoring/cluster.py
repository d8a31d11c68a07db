"""The Dask side of a scoring job: the cluster (a local one started for the job, possibly in
the background while the rest starts up, or an existing one) and mapping partitions over it.

A local cluster is one process per core, one thread each; its workers import torch and the
inference path while they start (``preload``), so that cost is paid while the driver lists
the images, checks the model and Prefect's API starts, not after.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from retrain.tasks.scoring.layout import ClusterLostError, ScoringError, ScoringIncompleteError

if TYPE_CHECKING:  # torch, imported when a job maps partitions: not before the local cluster starts
    from retrain.tasks.scoring.partition import PartResult, WorkerModel

# Imported by each local worker as it starts: torch, torchvision, ONNX Runtime, the predictor.
WORKER_PRELOAD = "retrain.tasks.scoring.partition"


@contextmanager
def quiet_dask() -> Iterator[None]:
    """Prefect's log handlers would otherwise show all of Dask's INFO chatter."""
    levels = {name: logging.getLogger(name).level for name in ("distributed", "distributed.client", "tornado")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    # A lost scheduler makes the client log its failed reconnects with tracebacks; the job
    # reports the loss itself (ClusterLostError), in one line.
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def _nanny_environ_restored() -> Iterator[None]:
    """Dask's nanny puts its worker environment (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS=1...)
    into this process's ``os.environ`` and leaves it there, so every process started later
    (a training run, a server) would inherit one thread and a slow allocator. Put it back."""
    import dask

    keys = set(dask.config.get("distributed.nanny.pre-spawn-environ", {})) | {"PYTHONHASHSEED"}
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_MAIN_HIDDEN = threading.Lock()
_main_hidden_for = 0  # local clusters running now


@contextmanager
def _workers_skip_main() -> Iterator[None]:
    """Processes spawned meanwhile do not run the user's ``__main__``. Python's spawn
    (Dask's default start method) runs the parent's main script again in each child, under
    the name ``__mp_main__``, so that its functions can be unpickled there: a script with no
    ``if __name__ == "__main__":`` guard around ``retrain.score(...)`` would start a job in
    each worker, which fails ("Nanny failed to start"). Dask's workers never need it: a task's
    function defined in ``__main__`` reaches them by value (cloudpickle)."""
    from multiprocessing import spawn

    global _main_hidden_for
    with _MAIN_HIDDEN:
        if _main_hidden_for == 0:
            real = spawn.get_preparation_data

            def without_main(name: str) -> dict:
                data = real(name)
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
                return data

            without_main.real = real  # type: ignore[attr-defined]
            spawn.get_preparation_data = without_main
        _main_hidden_for += 1
    try:
        yield
    finally:
        with _MAIN_HIDDEN:
            _main_hidden_for -= 1
            if _main_hidden_for == 0:
                spawn.get_preparation_data = spawn.get_preparation_data.real


def _worker_count(workers: int | None) -> int:
    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 1:
        raise ScoringError(f"workers must be at least 1, not {n}")
    return n


class LocalClusterStart:
    """A local cluster starting in a background thread: call :meth:`address` when the job is
    ready for it (it waits for the start, re-raising its error), :meth:`close` at the end."""

    def __init__(self, workers: int | None = None):
        self.workers = _worker_count(workers)
        self._cluster = None
        self._error: BaseException | None = None
        # For the cluster's life, not only its start: a nanny restarts a worker that died.
        self._main_hidden = ExitStack()
        self._main_hidden.enter_context(_workers_skip_main())
        self._thread = threading.Thread(target=self._start, name="dask-local-cluster", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        from distributed import LocalCluster

        try:
            with _nanny_environ_restored(), quiet_dask():
                # All workers spawn inside the constructor (so the nanny's environment is put back
                # once they have); each imports torch as it starts, while the driver works on.
                self._cluster = LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                    preload=[WORKER_PRELOAD],
                )
        except BaseException as exc:  # handed to the caller of address()
            self._error = exc

    def address(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._cluster.scheduler_address

    def close(self) -> None:
        if self in _PRESTARTED:  # started early but never taken by a job: no later job may take it
            _PRESTARTED.remove(self)
        self._thread.join()
        if self._cluster is not None:
            with quiet_dask():
                self._cluster.close()
            self._cluster = None
        self._main_hidden.close()


_PRESTARTED: list[LocalClusterStart] = []


def prestart_local_cluster(workers: int | None = None) -> LocalClusterStart:
    """Start a local cluster now, in the background, for the next job in this process that
    asks for a local cluster of this size (the CLI calls it before Prefect's API starts)."""
    started = LocalClusterStart(workers)
    _PRESTARTED.append(started)
    return started


class _GivenCluster:
    """A cluster someone else runs (an address, or one started early by its own owner)."""

    def __init__(self, address: str | LocalClusterStart):
        self._address = address

    def address(self) -> str:
        return self._address if isinstance(self._address, str) else self._address.address()

    def close(self) -> None:
        pass


def start_cluster(address: str | None = None, workers: int | None = None) -> LocalClusterStart | _GivenCluster:
    """The cluster a job runs on, starting now: ``address`` as given, a local cluster started
    in advance by :func:`prestart_local_cluster` (its starter closes it), or a new local cluster
    starting in the background (the caller closes it). ``.address()`` waits for it."""
    if address:
        return _GivenCluster(address)
    n = _worker_count(workers)
    early = next((c for c in _PRESTARTED if c.workers == n), None)
    if early is not None:
        _PRESTARTED.remove(early)
        return _GivenCluster(early)
    return LocalClusterStart(n)


@contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None) -> Iterator[str]:
    """The scheduler address of :func:`start_cluster`'s cluster, closed on exit when it is ours."""
    cluster = start_cluster(address, workers)
    try:
        yield cluster.address()
    finally:
        cluster.close()


def _lost(client) -> bool:
    """Whether ``client`` lost its scheduler (it is reconnecting, or gave up and closed)."""
    return client.status not in ("running", "newly-created")


def _cluster_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of Dask's own connections (CommClosedError, a closed
    stream), which are OSErrors a store failure must not be taken for."""
    return type(exc).__module__.startswith(("distributed.", "tornado."))


def _address_of(client) -> str:
    try:
        return client.scheduler.address
    except AttributeError:
        return "(the scheduler)"


def cluster_lost(address: str, detail: str = "") -> ClusterLostError:
    return ClusterLostError(
        f"compute cluster lost: {address}: the Dask scheduler went away during the job{detail}; the finished "
        "partitions are kept: rerun the same command against a running scheduler to score the missing partitions"
    )


@contextmanager
def dask_client(address: str) -> Iterator:
    """A client of the scheduler at ``address``. A scheduler that does not answer, or goes away
    while the job runs, raises :class:`ClusterLostError` (what failed and what to do), not the
    client's connection errors."""
    from distributed import Client

    check_tls_settings(address)
    with quiet_dask():
        try:
            client = Client(address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ClusterLostError(
                f"compute cluster unreachable: {address}: the Dask scheduler did not answer ({exc}); start it "
                "(or fix --dask-address) and rerun the same command"
            ) from exc
        try:
            yield client
        except ClusterLostError:
            raise
        except Exception as exc:  # the scheduler's connection failing under the job, typically
            # The client's own connection closing is the loss too, even when the client has not
            # noticed it yet (a gather can fail before its status changes).
            if _lost(client) or _cluster_connection(exc):
                raise cluster_lost(address, f" ({type(exc).__name__}: {exc})") from exc
            raise
        finally:
            try:
                client.close(timeout=10)
            except Exception:  # a lost scheduler cannot be told goodbye
                pass


def check_tls_settings(address: str) -> None:
    """A ``tls://`` scheduler (infra/compose.yaml's) lets in only clients holding a certificate
    of its CA, which Dask reads from its settings (``DASK_DISTRIBUTED__COMM__TLS__*``); without
    them Dask fails with a TypeError about an ``ssl_context``. Say instead what is missing."""
    if not address.startswith("tls://"):
        return
    from distributed.security import Security

    security = Security()
    if not (security.tls_ca_file and security.tls_client_cert):
        raise ScoringError(
            f"{address} is a TLS Dask scheduler: this client needs the cluster's CA and a client "
            "certificate (DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT "
            "and DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY; see infra/README.md)"
        )


def store_failure(exc: BaseException | None) -> bool:
    """Whether a part failed because its output or the store failed (full, unreachable,
    refusing the credentials), not because of its images: every other part would fail the
    same way, each after the store's own retries."""
    import errno

    from retrain.tasks import storage

    if exc is None or _cluster_connection(exc):
        return False  # the cluster's own connections (CommClosedError...): its loss, not the store's
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, storage.StorageError) or storage.transient(exc) or storage.access_refused(exc)


def run_partitions(
    client,
    model: WorkerModel,
    todo: list[tuple[list[str], str]],
    mini_batch_size: int,
    k: int,
    on_done: Callable[[PartResult], None] | None = None,
    torch_threads: int | None = None,
    worker_timeout_s: float = 300.0,
) -> list[PartResult]:
    """Map :func:`score_partition` over ``todo`` (file list, part URL) on ``client``; calls
    ``on_done`` in this (the driver's) thread as each finishes. Partitions are handed out as
    threads free up (one more than the cluster's threads in flight), so that a failure of the
    output or the store (:func:`store_failure`) ends the job at the first failed part, with
    that part's error, and no more are started. A partition that fails otherwise (a worker
    killed, say) is tried once more, then reported in :class:`ScoringIncompleteError` after
    the others are done; a bad model fails fast."""
    from distributed import as_completed
    from retrain.tasks.model_file import ModelFileError
    from retrain.tasks.scoring.partition import score_partition

    if not todo:
        return []
    try:
        client.wait_for_workers(1, timeout=worker_timeout_s)
    except TimeoutError:
        if _lost(client):
            raise cluster_lost(_address_of(client)) from None
        raise ScoringError(f"no Dask worker joined the cluster within {worker_timeout_s:.0f} s") from None

    def submit(paths: list[str], url: str):
        return client.submit(
            score_partition,
            model,
            paths,
            url,
            mini_batch_size,
            k,
            None,
            torch_threads,
            key=f"score-{url.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:8]}",
        )

    waiting = list(reversed(todo))  # popped from the end: in plan order
    running = as_completed()
    futures: dict = {}  # future -> (paths, url, attempt)

    def top_up() -> None:
        try:
            threads = sum(client.nthreads().values())
        except (OSError, TimeoutError) as exc:  # the scheduler does not answer
            raise cluster_lost(_address_of(client), f" ({type(exc).__name__}: {exc})") from exc
        room = threads + 1 - running.count()
        while waiting and room > 0:
            paths, url = waiting.pop()
            future = submit(paths, url)
            futures[future], room = (paths, url, 1), room - 1
            running.add(future)

    results, failures = [], []
    try:
        top_up()
        for future in running:
            paths, url, attempt = futures[future]
            if future.status != "finished":  # error, or cancelled
                exc = future.exception() if future.status == "error" else None
                if isinstance(exc, ModelFileError) or store_failure(exc):
                    raise exc
                if exc is not None and attempt == 1 and not _lost(client):
                    retry = submit(paths, url)
                    futures[retry] = (paths, url, 2)
                    running.add(retry)
                    continue
                failures.append((url, f"{type(exc).__name__}: {exc}" if exc else future.status))
            else:
                result = future.result()
                results.append(result)
                if on_done:
                    on_done(result)
            if _lost(client):
                break
            top_up()
    finally:
        try:
            client.cancel(list(futures))
        except Exception:  # a lost scheduler: nothing left to cancel there
            pass
    if (failures or waiting) and _lost(client):  # cancelled by the scheduler going away, not failed
        raise cluster_lost(_address_of(client))  # the workers may have written more parts than reported here
    if failures:
        raise ScoringIncompleteError(
            f"{len(failures)} of {len(todo)} partitions failed (first: {failures[0][0]}: {failures[0][1]}); "
            f"the others are saved, rerun the job to retry these"
        )
    return results
