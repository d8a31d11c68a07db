"""Training on several GPUs (or CPU processes) with torch DistributedDataParallel.

Fine-tune and scratch modes train in ``processes`` ranks, started with
``torch.multiprocessing`` from the process that runs the training flow (the GPU work pool's
flow run, or ``retrain run`` itself), on one machine: NCCL between GPUs, one GPU per rank;
gloo between CPU processes. Spawned from inside the flow run rather than by torchrun, so that
a work pool runs the same deployment and command whatever the machine has, the flow run
stays one Prefect run with its logs and live progress (the ranks relay them to it), and a
rank that fails takes the others down with it (``torch.multiprocessing`` watches them all).

Each iteration's global batch (``mini_batch_size`` images, the same ones in the same order
as in one process) is cut into ``processes`` consecutive parts, one per rank; each rank
augments its part with the draws the whole batch would have had, masks dropout by each
sample's position in the global batch (tasks/training/dropout.py), and weights its loss so
the averaged gradient is the global batch's mean: the result does not depend on the number
of processes beyond float rounding, and a checkpoint written by one count resumes in another.
Rank 0 alone validates, logs, writes checkpoints, the history and the model.
Transfer mode keeps its single-process path (the head on cached body features).

Interface relied on (tasks/training/data.py, steps.py): each rank builds its ``TrainingData``
as one process does and indexes ``train_images`` with the global batch's indices, taking its
part, read from the image shards (the launching process prepares them first: no rank
decodes, none holds the data set). Networks
with batch norm use SyncBatchNorm on CUDA (global batch statistics); gloo has none, so on CPU
processes their statistics are per rank and the result depends on the split.
"""

from __future__ import annotations

import logging
import os
import queue as queue_module
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

log = logging.getLogger("retrain.training")
# A rank waits this long for the others at a collective (rank 0 validating, writing a
# checkpoint) before it gives up; a rank that dies is noticed at once by the launcher.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
_POLL_S = 0.2


@dataclass(frozen=True)
class Ranks:
    """One process's place among ``size`` training processes."""

    rank: int
    size: int
    relay: Any = None  # rank 0: a queue to the launching process (logs, history); see launch

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def part(self, batch: int) -> tuple[int, int]:
        """[start, stop) of this rank's part of a global batch of ``batch`` samples:
        consecutive parts, the first ``batch % size`` one sample longer."""
        base, extra = divmod(batch, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """The sums over the ranks of a few numbers (loss and correct count for the history)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def from_leader(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's value of ``flag`` on every rank (early stopping is decided by rank 0)."""
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, 0)
        return bool(t.item())


def resolve_processes(processes: int | None, mode: str, device: torch.device) -> int:
    """How many training processes: transfer mode 1; the option when given; otherwise every
    visible GPU when training on CUDA, 1 on the CPU."""
    if mode == "transfer":
        return 1
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if processes is not None and processes > visible:
            raise ValueError(
                f"training option processes={processes}: only {visible} GPU(s) visible "
                f"(one process per GPU; CUDA_VISIBLE_DEVICES chooses them)"
            )
        return processes if processes is not None else max(1, visible)
    return processes if processes is not None else 1


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def launch(
    target: Callable[..., Any],
    args: tuple,
    processes: int,
    device: torch.device,
    logger: logging.Logger | logging.LoggerAdapter,
    on_validation: Callable[[pd.DataFrame], None] | None = None,
) -> None:
    """Run ``target(ranks, *args)`` in ``processes`` spawned processes joined in one process
    group; returns when all are done. Rank 0's log records and validation histories come back
    here (``logger``, ``on_validation``) while they run. A rank's failure raises here, after
    the others are stopped; so does an exception in ``on_validation`` or an interrupt."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    context = mp.get_context("spawn")
    relay = context.Queue()
    with tempfile.TemporaryDirectory(prefix="retrain-ddp-") as folder:
        store = os.path.join(folder, "store")  # the rendezvous: a file, no port to pick
        ranks = mp.start_processes(
            _rank_main,
            (target, args, processes, backend_for(device), store, relay, os.getpid()),
            nprocs=processes,
            join=False,
            start_method="spawn",
        )
        try:
            while not ranks.join(timeout=_POLL_S):
                _drain(relay, logger, on_validation)
            _drain(relay, logger, on_validation)
        except ProcessException as exc:
            raise RuntimeError(f"distributed training failed: {exc}") from None
        finally:
            for p in ranks.processes:
                if p.is_alive():
                    p.terminate()
            for p in ranks.processes:
                p.join(10)
            relay.close()


def _drain(relay, logger, on_validation) -> None:
    while True:
        try:
            kind, payload = relay.get_nowait()
        except queue_module.Empty:
            return
        if kind == "log":
            logger.log(*payload)
        elif kind == "history" and on_validation is not None:
            on_validation(payload)


def _die_with_parent(parent: int) -> None:
    """A rank ends when the process that launched it does (killed: kill -9, a work pool
    cancelling the flow run), so no orphan trains on or holds the GPU; the run resumes from its
    checkpoints (writes are atomic). torch sets SIGINT for this, which a process started with
    SIGINT ignored (nohup, a background job) never gets: SIGKILL here. Linux only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def _rank_main(rank: int, target, args: tuple, size: int, backend: str, store: str, relay, parent: int) -> None:
    _die_with_parent(parent)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        # The machine's cores shared between the ranks, not each rank using all of them.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks on this machine
    dist.init_process_group(
        backend, store=dist.FileStore(store, size), rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        target(Ranks(rank, size, relay if rank == 0 else None), *args)
    finally:
        dist.destroy_process_group()


class RelayHandler(logging.Handler):
    """Sends rank 0's log records to the launching process, which logs them with its logger
    (the Prefect run logger in a flow run)."""

    def __init__(self, relay):
        super().__init__(logging.DEBUG)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        self.relay.put(("log", (record.levelno, record.getMessage())))


def relay_logger(ranks: Ranks) -> logging.Logger:
    """Rank 0's logger: its records go to the launching process."""
    logger = logging.getLogger(f"retrain.training.rank{ranks.rank}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if ranks.relay is not None and not logger.handlers:
        logger.addHandler(RelayHandler(ranks.relay))
    return logger


def relay_history(ranks: Ranks) -> Callable[[pd.DataFrame], None]:
    def send(history: pd.DataFrame) -> None:
        ranks.relay.put(("history", history))

    return send
