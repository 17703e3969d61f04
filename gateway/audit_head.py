"""The audit chain's sealed head: the newest committed record's sequence number and MAC, under the chain key, in a
file kept apart from the log (another volume). A log cut at its end, rolled back to an older copy, emptied, dropped
or replaced by a new file no longer reaches its sealed head, and `verify` and the gateway's start say so."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .audit_keys import AuditKeys


@dataclass(frozen=True)
class ChainPosition:
    seq: int  # 0 with the genesis MAC: before the first record
    mac: str


class HeadError(ValueError):
    """The sealed head cannot be read or was edited."""


class SealedHead:
    def __init__(self, path: Path, keys: AuditKeys) -> None:
        self.path, self._keys = path, keys

    def read(self) -> ChainPosition | None:
        """The sealed position, or None when no head was ever sealed here."""
        try:
            raw = json.loads(self.path.read_text())
            position, tag = ChainPosition(int(raw["seq"]), str(raw["mac"])), str(raw["head_mac"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            raise HeadError(f"sealed head {self.path}: unreadable") from None
        if self._keys.mac(["head", position.seq, position.mac]) != tag:
            raise HeadError(f"sealed head {self.path}: edited (its MAC does not match)")
        return position

    def seal(self, position: ChainPosition) -> None:
        """Replace the head atomically and durably (written, synced, renamed, directory synced)."""
        body = json.dumps({"seq": position.seq, "mac": position.mac,
                           "head_mac": self._keys.mac(["head", position.seq, position.mac])})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        with open(partial, "w") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
