"""glibc's malloc told to keep the memory it frees: a CPU engine step reallocates the same
multi-MB buffers every step.

By default glibc serves large allocations with mmap and gives freed memory back to the OS
(trimming the heap's top past 128 KiB, a threshold it raises as it goes), so each step's
buffers (the sampler's cumulative sums, the experts' intermediate activations) fault their pages
in again: measured on the 2-core CPU, the sampler of 32 sequences took 6.1 ms instead of 1.3 ms
once the GEMMs were fast (../shared/reviews/cpu-performance.md). vLLM preloads tcmalloc for the
same reason. `keep_freed_memory` does it with glibc's own knobs, at run time (mallopt), in the
process that calls it: allocations up to 32 MiB (mmap's largest threshold) come from the heap,
and the heap is not trimmed below 1 GiB of free memory. A user who set MALLOC_MMAP_THRESHOLD_
or MALLOC_TRIM_THRESHOLD_, or preloads another allocator, is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process (Linux with glibc, nothing set by the user);
    → whether they are in effect."""
    global _done
    if _done:
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    if not sys.platform.startswith("linux") or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    if "tcmalloc" in preload or "jemalloc" in preload:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        )
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if ok:
        log.info(
            "malloc: buffers up to %d MiB from the heap, no trimming below %d MiB free",
            MMAP_THRESHOLD >> 20,
            TRIM_THRESHOLD >> 20,
        )
    _done = ok
    return ok
