"""Keeping a training step's large buffers in the process's heap between steps, and handing them back after.

glibc serves every allocation above its mmap threshold (32 MB at most, as it adapts) with a fresh mapping and
returns it to the kernel on free, so a tensor of that size costs page faults and zeroing on every step. A DP-SGD
step over a batch of 256 short texts allocates several (MiniLM's feed-forward activations and the adapters' padded
low-rank paths, [256, 32, 1536] floats: 50 MB each): measured here, a third of the step's time went to the kernel
(`docs/benchmarks.md`). Raising the thresholds lets freed buffers be reused instead; what a round kept is returned
when it ends, so a long-lived process (a simulated hospital, a worker) does not grow by a heap's fragments a round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
REUSE_BELOW = 1 << 28  # buffers up to 256 MiB come from the heap and go back to it


@cache
def glibc() -> ctypes.CDLL | None:
    """This process's C library, where it is glibc (whose mallopt parameters these are)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")  # images without ldconfig find no path


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False (and nothing changed) elsewhere."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_BELOW)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, REUSE_BELOW))


def release_freed_buffers() -> None:
    """Return the heap's free pages to the kernel: once a round ends, what its steps kept is garbage."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
