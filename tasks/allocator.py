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
for training. ``RETRAIN_MALLOC_TUNING=0`` leaves glibc's settings alone (for a process that
must hand memory back at once).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("retrain.allocator")

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MiB = 2**20
SETTINGS = {
    # Blocks up to 32 MiB (glibc's largest mmap threshold) from the heap; keep 64 MiB free.
    "inference": {_M_MMAP_THRESHOLD: 32 * MiB, _M_TRIM_THRESHOLD: 64 * MiB},
    # Training blocks exceed any threshold: no mmap at all, keep 512 MiB free, grow by 64 MiB.
    "training": {_M_MMAP_THRESHOLD: 32 * MiB, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 512 * MiB, _M_TOP_PAD: 64 * MiB},
}
_applied: set[str] = set()


def tune_allocator(workload: str) -> bool:
    """Apply the ``workload`` settings ("inference" or "training") to this process's glibc
    malloc, once per process and workload; True when it acted. Nothing on other platforms,
    other C libraries, or with ``RETRAIN_MALLOC_TUNING=0``."""
    if workload not in SETTINGS:
        raise ValueError(f"workload must be one of {sorted(SETTINGS)}, not {workload!r}")
    if (
        workload in _applied
        or os.environ.get("RETRAIN_MALLOC_TUNING", "1") == "0"
        or not sys.platform.startswith("linux")
    ):
        return False
    _applied.add(workload)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(option, value) == 1 for option, value in SETTINGS[workload].items())
    except (OSError, AttributeError):  # not glibc
        return False
    log.debug("malloc tuned for %s: %s", workload, "done" if ok else "refused")
    return ok
