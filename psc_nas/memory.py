"""Keep freed memory in the process: fewer page faults, less system time.

Training 3D networks on a CPU allocates and frees tensors of many megabytes every step. glibc's
``malloc`` serves blocks above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with
fresh ``mmap`` calls and gives freed heap tops back to the kernel past its trim threshold, so every
step maps, zero-fills (one minor page fault per 4 KiB page) and unmaps the same memory again. On the
default ``psc-search`` that was a quarter of all CPU time spent in the kernel
(docs/benchmarks/search.md, "System time").

:func:`keep_freed_memory` tells glibc, at run time through ``mallopt``, to serve blocks up to the
largest mmap threshold it accepts from the heap, to keep freed memory (no trimming) and to use few
arenas. The ``MALLOC_*`` environment variables do the same but only before the process starts;
``mallopt`` works from inside it. Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLDS = (1 << 30, 1 << 25)  # glibc caps it at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): try 1 GiB, then that
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap top instead of returning it to the kernel
ARENA_MAX = 2  # one per core of the machines this runs on; each arena keeps its own freed memory

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's allocator to keep freed memory; True if it did (now or on an earlier call), False
    where the C library is not glibc or refused. Idempotent: the first call decides, later ones return
    its answer."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not any(mallopt(M_MMAP_THRESHOLD, threshold) for threshold in MMAP_THRESHOLDS):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))
