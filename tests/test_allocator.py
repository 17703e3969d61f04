"""A training process reuses its large freed buffers instead of faulting fresh pages in on every step, and hands
them back when a round ends."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fl_core.allocator import glibc

CYCLES = """
import json, resource, sys, torch
from fl_core.allocator import keep_freed_buffers, release_freed_buffers
def resident(): return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "keep":
    assert keep_freed_buffers()
torch.ones(64 << 18).sum()  # a first 64 MB buffer: mapped once either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):  # what a step does: large activations allocated, written, freed
    torch.ones(64 << 18).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = resident()
release_freed_buffers()
print(json.dumps({"faults": faults, "held": held, "released": resident()}))
"""


def _run(mode: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.skipif(glibc() is None, reason="glibc's mallopt only")
def test_a_freed_64_mb_buffer_is_reused_not_faulted_in_again_and_returned_after_the_round() -> None:
    default, kept = _run("default"), _run("keep")
    buffer = 64 << 20
    assert default["faults"] > 40 * buffer // 4096 // 2  # glibc's default: each cycle maps and faults afresh
    assert kept["faults"] < default["faults"] // 4  # kept: the heap's first few cycles only
    assert kept["held"] - kept["released"] > buffer // 2  # the kept buffer goes back when the round ends
