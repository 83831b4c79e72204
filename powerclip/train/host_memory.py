"""Keep freed host memory in the process on CPU training runs (glibc ``mallopt``).

Why: every CPU training step frees and re-allocates the same activations and gradients (hundreds of
MB). glibc serves blocks above its mmap threshold (at most 32 MB even after its dynamic adjustment;
an embedding gradient of 49408 x 512 floats is 100 MB) with fresh ``mmap`` calls, and trims the
heap top back to the kernel on ``free``; the next step then page-faults every page in again,
zero-filled by the kernel, a cost paid again on every step (BENCHMARKS.md: the "stock settings" row
of tools/bench_train.py turns this off together with the fused optimiser). PyTorch's CPU
tuning guide recommends jemalloc or tcmalloc for the same reason; setting glibc's two thresholds
does it without an LD_PRELOAD: large blocks come from the heap and freed memory stays mapped for
the next step. The cost is that the process keeps its peak-step memory mapped, as GPU caching
allocators do.

GPU runs are left alone (their tensors do not live in malloc'd memory), and so is any libc other
than glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 2**31 - 1  # mallopt takes a C int: the largest value it can express (2 GiB)
FALLBACK_MMAP_BYTES = 32 * 2**20  # glibc < 2.35 refuses mmap thresholds above 32 MB


def keep_freed_host_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (and the workers it forks later).

    Returns True when both were set; False (and changes nothing) when the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("host memory: not glibc, allocator left as it is")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim_ok = bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    mmap_ok = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) or bool(
        libc.mallopt(M_MMAP_THRESHOLD, FALLBACK_MMAP_BYTES))
    if not (trim_ok and mmap_ok):
        log.warning("host memory: glibc refused mallopt (trim %s, mmap %s); steps keep page-faulting",
                    trim_ok, mmap_ok)
        return False
    log.info("host memory: freed blocks stay mapped between steps (glibc trim/mmap thresholds raised; "
             "train.keep_freed_host_memory=false turns this off)")
    return True
