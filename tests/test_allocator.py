"""A training process reuses its large freed buffers instead of faulting fresh pages in on every step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fl_core.allocator import keep_freed_buffers

CYCLES = """
import resource, sys, torch
from fl_core.allocator import keep_freed_buffers
if sys.argv[1] == "keep":
    assert keep_freed_buffers()
torch.ones(64 << 18).sum()  # a first 64 MB buffer: mapped once either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):  # what a step does: a large activation allocated, written, freed
    torch.ones(64 << 18).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not keep_freed_buffers(), reason="glibc's mallopt only")
def test_a_freed_64_mb_buffer_is_reused_not_faulted_in_again() -> None:
    default, kept = _page_faults("default"), _page_faults("keep")
    assert default > 40 * (64 << 20) // 4096 // 2  # glibc's default: each cycle maps and faults its pages afresh
    assert kept < default // 4  # kept: the heap's first few cycles only
