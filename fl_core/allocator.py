"""Keeping a training step's large buffers in the process's heap between steps.

glibc serves every allocation above its mmap threshold (32 MB at most, as it adapts) with a fresh mapping and
returns it to the kernel on free, so a tensor of that size costs page faults and zeroing on every step. A DP-SGD
step over a batch of 256 short texts allocates several (MiniLM's feed-forward activations and the adapters' padded
low-rank paths, [256, 32, 1536] floats: 50 MB each): measured here, a third of the step's time went to the kernel
(`docs/benchmarks.md`). Raising the threshold and the heap's trim threshold lets freed buffers be reused instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
REUSE_BELOW = 1 << 30  # buffers up to 1 GiB come from the heap and return to it


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False (and nothing changed) elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    libc = ctypes.CDLL(path)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, REUSE_BELOW))
