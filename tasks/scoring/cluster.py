"""The Dask side of a scoring job: the cluster (a local one started for the job, possibly in
the background while the rest starts up, or an existing one) and a client of it. Mapping the
partitions over it is the parts engine's (tasks/parts.py), with its lost-scheduler handling.

A local cluster is one process per core, one thread each; on a machine with NVIDIA GPUs, one
process per GPU, pinned to it (tasks/scoring/partition.py decodes the JPEGs there with nvJPEG
and reads the files with CPU threads). Its workers import torch and the inference path while
they start (``preload``), so that cost is paid while the driver lists the images, checks the
model and Prefect's API starts, not after.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from retrain.tasks.parts import ClusterLostError, cluster_connection, cluster_lost, lost
from retrain.tasks.scoring.layout import ScoringError
from retrain.tasks.vocabulary import check_workers

# Imported by each local worker as it starts: torch, torchvision, ONNX Runtime, the predictor.
WORKER_PRELOAD = "retrain.tasks.scoring.partition"
# Tasks a GPU worker runs at once: while one partition is read and decoded, another runs
# forward and writes its part (each task reads with its own threads: partition.GPU_READ_THREADS).
GPU_WORKER_THREADS = 2


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


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs local workers are pinned to, as CUDA_VISIBLE_DEVICES names them: those
    it lists where it is set (CUDA stops at the first invalid entry, e.g. -1), else one per GPU
    device file (Linux: /dev/nvidia0, ...; a container has those of its own GPUs); none
    elsewhere. Read without importing torch or starting CUDA: the cluster starts while the
    command itself is still starting up."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        count = len([f for f in glob.glob("/dev/nvidia*") if f[len("/dev/nvidia") :].isdigit()])
        return [str(i) for i in range(count)]
    gpus = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def _worker_count(workers: int | None, gpus: list[str]) -> int:
    """``workers`` as asked, else one per GPU, else one per core."""
    return check_workers((len(gpus) or os.cpu_count() or 1) if workers is None else workers, ScoringError)


def _gpu_pinned_nanny(gpus: list[str]) -> type:
    """Dask's nanny for worker ``name`` (0, 1, ... in a local cluster) with its environment's
    CUDA_VISIBLE_DEVICES set to GPU ``name`` (round robin where there are more workers than
    GPUs): its process sees that GPU alone, as ``cuda``, from its start (also when the nanny
    restarts it)."""
    from distributed import Nanny

    class GpuPinnedNanny(Nanny):
        def __init__(self, *args, name=None, env: dict | None = None, **kwargs):
            pinned = {**(env or {}), "CUDA_VISIBLE_DEVICES": gpus[int(name) % len(gpus)]}
            super().__init__(*args, name=name, env=pinned, **kwargs)

    return GpuPinnedNanny


class LocalClusterStart:
    """A local cluster starting in a background thread: call :meth:`address` when the job is
    ready for it (it waits for the start, re-raising its error), :meth:`close` at the end."""

    def __init__(self, workers: int | None = None):
        self.gpus = visible_gpus()
        self.workers = _worker_count(workers, self.gpus)
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
                    threads_per_worker=GPU_WORKER_THREADS if self.gpus else 1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                    preload=[WORKER_PRELOAD],
                    **({"worker_class": _gpu_pinned_nanny(self.gpus)} if self.gpus else {}),
                )
        except BaseException as exc:  # handed to the caller of address()
            self._error = exc

    def address(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._cluster.scheduler_address

    def close(self) -> None:
        self._thread.join()
        if self._cluster is not None:
            with quiet_dask():
                self._cluster.close()
            self._cluster = None
        self._main_hidden.close()


class _GivenCluster:
    """A cluster someone else runs, at ``address``."""

    def __init__(self, address: str):
        self._address = address

    def address(self) -> str:
        return self._address

    def close(self) -> None:
        pass


def start_cluster(address: str | None = None, workers: int | None = None) -> LocalClusterStart | _GivenCluster:
    """The cluster a job runs on, starting now: ``address`` as given, or a new local cluster
    starting in the background (the caller closes it). ``.address()`` waits for it."""
    if address:
        return _GivenCluster(address)
    return LocalClusterStart(workers)


@contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None) -> Iterator[str]:
    """The scheduler address of :func:`start_cluster`'s cluster, closed on exit when it is ours."""
    cluster = start_cluster(address, workers)
    try:
        yield cluster.address()
    finally:
        cluster.close()


@contextmanager
def dask_client(address: str) -> Iterator:
    """A client of the scheduler at ``address``. A scheduler that does not answer, or goes away
    while the job runs, raises :class:`ClusterLostError` (what failed and what to do), not the
    client's connection errors."""
    from distributed import Client

    check_tls_settings(address)
    with quiet_dask():
        try:
            # How long an unanswered scheduler is waited for: Dask's own setting,
            # distributed.comm.timeouts.connect (30 s; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT).
            client = Client(address)
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
            if lost(client) or cluster_connection(exc):
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
