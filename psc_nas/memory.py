"""Keep freed memory in the process instead of returning it to the kernel after every step.

Training allocates and frees the same large activation buffers at every step. glibc's malloc serves
blocks above ``M_MMAP_THRESHOLD`` (dynamic, 128 KiB to 32 MiB) with fresh ``mmap`` calls and gives the
heap top back with ``M_TRIM_THRESHOLD``: each step then page-faults its buffers in again, and the
kernel zeroes every page. Measured on the default search's trial (docs/benchmarks/search.md, "System
time"): most of the system CPU time was these minor faults. Raising both thresholds keeps the pages
mapped and reused; peak resident memory grows by at most what one step already needed.

``keep_freed_memory()`` is called once at the start of psc-search, psc-train and psc-export (and by the
benchmarks). Environment variables (``MALLOC_MMAP_THRESHOLD_``) would do the same, but only when set
before the process starts; ``mallopt`` works at run time. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("psc_nas")

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap is kept

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True when applied (idempotent)."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS, Windows): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES - 1)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    if not _done:
        log.debug("mallopt refused the thresholds; memory is returned to the kernel as usual")
    return _done
