"""glibc malloc settings for processes that run large tensor work on the CPU.

PyTorch takes every CPU activation and gradient from malloc. glibc serves blocks above its
mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings that are faulted in page
by page and unmapped on free, and trims the heap top back to the kernel. A forward pass of
SqueezeNet at 227 px holds 26 MB per 8 images in one activation; a training batch of 32 has
blocks of over 100 MB. So every pass pays for memory it had a moment ago in page faults.
Dask's nanny makes it worse: it starts each worker with ``MALLOC_TRIM_THRESHOLD_=65536``,
which also turns the adaptive threshold off. Measured on this project's 2-core machine with
``benchmarks/bench_allocator.py`` (medians of 3 fresh processes each):

- scoring (read, decode, forward in one worker-like process, Dask's environment): 36.4 CPU ms
  per image and 6,034 page faults per image with glibc's settings; 18.6 ms and 14 with the
  inference settings (1.96x).
- fine-tuning (batch 32, classic loop): 1.16 s per iteration and 160,000 page faults with
  glibc's settings; 0.86 s and 23,000 with the training settings (1.35x).

The price is memory kept for reuse: up to 64 MiB of freed heap for inference, up to 512 MiB
for training. The training settings suit passes of the whole network, the same blocks every
step; training the head on cached features (transfer mode) alternates small steps with
validation batches of ~90 MB and copies of the best weights, which in a heap without mmap
leave holes that grow it epoch after epoch (1.6 to 2.2 GB over 840 iterations at 9,600
images, benchmarks/bench_scale.py), so it takes the inference settings. A process may switch
(an experiment trains several runs in one process): each workload's settings are complete.
``RETRAIN_MALLOC_TUNING=0`` leaves glibc's settings alone (for a process that must hand memory
back at once).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("retrain.allocator")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MiB = 2**20
GLIBC_MMAP_MAX, GLIBC_TOP_PAD = 65536, 128 * 1024  # glibc's defaults
SETTINGS = {
    # Blocks up to 32 MiB (glibc's largest mmap threshold) from the heap; keep 64 MiB free.
    "inference": {
        _M_MMAP_THRESHOLD: 32 * MiB,
        _M_MMAP_MAX: GLIBC_MMAP_MAX,
        _M_TRIM_THRESHOLD: 64 * MiB,
        _M_TOP_PAD: GLIBC_TOP_PAD,
    },
    # Training blocks exceed any threshold: no mmap at all, keep 512 MiB free, grow by 64 MiB.
    "training": {_M_MMAP_THRESHOLD: 32 * MiB, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 512 * MiB, _M_TOP_PAD: 64 * MiB},
}
_current: list[str] = []  # the workload whose settings are in effect in this process


def tune_allocator(workload: str) -> bool:
    """Apply the ``workload`` settings ("inference" or "training") to this process's glibc
    malloc, unless they are in effect already; True when it acted. Nothing on other platforms,
    other C libraries, or with ``RETRAIN_MALLOC_TUNING=0``."""
    if workload not in SETTINGS:
        raise ValueError(f"workload must be one of {sorted(SETTINGS)}, not {workload!r}")
    if (
        _current == [workload]
        or os.environ.get("RETRAIN_MALLOC_TUNING", "1") == "0"
        or not sys.platform.startswith("linux")
    ):
        return False
    _current[:] = [workload]
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(option, value) == 1 for option, value in SETTINGS[workload].items())
    except (OSError, AttributeError):  # not glibc
        return False
    log.debug("malloc tuned for %s: %s", workload, "done" if ok else "refused")
    return ok
