"""glibc ``malloc`` tuning for the exchange hot path (process-wide, opt-out).

Every received chunk becomes a Python ``bytes`` of ``chunk_bytes`` (grpcio has no zero-copy
receive), allocated and freed ~100 times per 100 MB. With glibc's defaults the freed memory at
the top of the thread's heap is returned to the kernel as soon as it exceeds the (dynamic) trim
threshold of about two chunks, so the next chunk page-faults all of its pages again: profiling
the client (py-spy --native) showed ``madvise`` and page-fault time, and the client's CPU time per
100 MB fetch halved once trimming was raised out of the way (benchmarks/exchange.py; README,
"Exchange engine"). :func:`tune_malloc` fixes the mmap threshold (so allocations up to
``mmap_threshold_bytes`` come from the reusable heap) and raises the trim threshold (so the heap
keeps up to ``trim_threshold_bytes`` of free memory for the next chunks instead of handing it
back). The cost is that up to ``trim_threshold_bytes`` of freed memory per arena stays mapped.

A no-op (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
# Largest value glibc accepts for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MAX_MMAP_THRESHOLD_BYTES = 32 << 20
DEFAULT_TRIM_THRESHOLD_BYTES = 32 << 20

_lock = threading.Lock()
_applied: tuple[int, int] | None = None


def tune_malloc(
    mmap_threshold_bytes: int = MAX_MMAP_THRESHOLD_BYTES,
    trim_threshold_bytes: int = DEFAULT_TRIM_THRESHOLD_BYTES,
) -> bool:
    """Set glibc's mmap and trim thresholds for this process (idempotent, thread-safe).

    Args:
        mmap_threshold_bytes: allocations above this size are mmapped (at most 32 MiB).
        trim_threshold_bytes: free memory a heap keeps before returning it to the kernel.

    Returns:
        True when glibc accepted both settings (now or on an earlier call with the same
        values), False on another C library or when glibc refused them.
    """
    global _applied
    if not 0 < mmap_threshold_bytes <= MAX_MMAP_THRESHOLD_BYTES or trim_threshold_bytes <= 0:
        raise ValueError(
            f"mmap threshold must be in (0, {MAX_MMAP_THRESHOLD_BYTES}] and trim threshold > 0, "
            f"got {mmap_threshold_bytes} and {trim_threshold_bytes}"
        )
    wanted = (mmap_threshold_bytes, trim_threshold_bytes)
    with _lock:
        if _applied == wanted:
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            logger.debug("no mallopt in this C library: allocator left as it is")
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        accepted = mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
        accepted = mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes) == 1 and accepted
        if accepted:
            _applied = wanted
        else:
            logger.warning("glibc refused the malloc thresholds %s", wanted)
        return accepted
