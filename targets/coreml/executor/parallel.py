"""Threads and memory for the reference executor: BLAS pinned to one thread, big products split
by rows, freed memory kept for reuse.

OpenBLAS's own worker threads spin while they wait; on a machine where other processes compete
for the cores (a shared 2-core build machine, CI) a 2-thread product took 2.5x the CPU time and
up to 2.4x the wall time of a 1-thread one. So while a program runs, BLAS gets one thread
(:func:`edgeq.runtime.single_threaded_blas`) and the executor splits a large product, or a large rounding,
into row blocks run on a small pool of Python threads (numpy releases the GIL in BLAS calls and
ufunc loops), which wait by blocking instead of spinning. Every row is computed by the same
single-threaded kernel whatever the split, so the result does not depend on the thread count.

Every op allocates its result, a few MB for a transformer layer's activations. glibc returns
freed blocks of that size to the kernel (mmap, heap trimming), so the next op's allocation page
faults on every 4 KiB: a third of MiniLM's run time (75k faults per batch). :func:`keep_freed_memory`
raises glibc's mmap and trim thresholds (mallopt(3)) so freed blocks are reused: 40 % less CPU
time. The process keeps up to the thresholds' worth of freed memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from edgeq.runtime import single_threaded_blas  # noqa: F401  (the executor calls it from here)

# below this much work a second thread costs more than it saves (measured: ~50 µs per hand-off)
MIN_FLOPS = 4_000_000
MIN_ELEMENTS = 200_000

_PREFIX = "edgeq-coreml"
_pool: ThreadPoolExecutor | None = None
_memory_kept = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """On glibc, keep freed blocks up to 32 MiB in the heap and up to 512 MiB of free heap (once per process)."""
    global _memory_kept
    if _memory_kept or not sys.platform.startswith("linux"):
        return
    _memory_kept = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):  # glibc, not musl
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)
    except OSError:  # no C library to tune: slower, same results
        pass


MAX_WORKERS = 8  # beyond this the blocks of a transformer layer get too small to pay for the hand-off


def workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def _get_pool() -> ThreadPoolExecutor | None:
    global _pool
    if _pool is None and workers() > 1:
        _pool = ThreadPoolExecutor(workers(), thread_name_prefix=_PREFIX)
    return _pool


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def rows(fn, n: int, work: int, min_work: int) -> None:
    """Call ``fn(start, stop)`` over row blocks covering ``range(n)``, on the pool when ``work`` is large."""
    pool = _get_pool()
    if pool is None or work < min_work or n < 2 or threading.current_thread().name.startswith(_PREFIX):
        fn(0, n)  # (inside a pool thread: never wait on the pool from it)
        return
    first, *rest = _blocks(n, min(workers(), n))
    futures = [pool.submit(fn, a, b) for a, b in rest]
    try:
        fn(*first)  # the calling thread takes a block itself
    finally:
        for f in futures:
            f.result()


def matmul_2d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y`` for contiguous 2-d float32 operands, split by rows of ``x`` when large."""
    out = np.empty((x.shape[0], y.shape[1]), np.result_type(x, y))

    def block(a, b):
        np.matmul(x[a:b], y, out=out[a:b])

    rows(block, x.shape[0], 2 * x.size * y.shape[1], MIN_FLOPS)
    return out


def batched_matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y`` for contiguous 3-d operands with the same leading dimension, split along it when large."""
    out = np.empty((x.shape[0], x.shape[1], y.shape[2]), np.result_type(x, y))

    def block(a, b):
        np.matmul(x[a:b], y[a:b], out=out[a:b])

    rows(block, x.shape[0], 2 * x.size * y.shape[2], MIN_FLOPS)
    return out


def map_flat(fn, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``fn(src, dst)`` (elementwise, writing ``dst``; ``out`` may be ``x``) over blocks of the flattened
    elements, on the pool when large. Returns ``out``."""
    src, dst = np.ascontiguousarray(x).reshape(-1), out.reshape(-1)

    def block(a, b):
        fn(src[a:b], dst[a:b])

    rows(block, src.size, src.size, MIN_ELEMENTS)
    return out
