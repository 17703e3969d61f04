"""Files a node derives from its records and keeps between the processes of a run (cached prefixes, optimiser
state): written atomically and owner-only, in a folder of the node's state that holds at most a few of them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_owner_only(path: Path, payload: object, keep: int) -> None:
    """`payload` to `path` (torch's format), atomically, in an owner-only folder, which then keeps only the `keep`
    most recently used `*.pt` files. Raises OSError; what is half written is removed."""
    staging: Path | None = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        handle, name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # owner-only, unique
        staging = Path(name)
        with os.fdopen(handle, "wb") as out:
            torch.save(payload, out)
        staging.replace(path)  # atomic: a concurrent process never reads half a file
        staging = None
        for old in sorted(path.parent.glob("*.pt"), key=_mtime, reverse=True)[keep:]:
            old.unlink(missing_ok=True)
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)


def mark_used(path: Path) -> None:
    """A file read again is the last to be pruned."""
    os.utime(path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by a process beside this one
        return 0.0
