"""The audit chain's sealed head: the newest committed record's sequence number and MAC, under the chain key, in a
file kept apart from the log (another volume). A log cut at its end, rolled back to an older copy, emptied, dropped
or replaced by a new file no longer reaches its sealed head, and `verify` and the gateway's start say so.

The head is rewritten in place and synced (one `fdatasync` per commit, no rename). It is one disk sector or less,
which disks write whole; a head torn all the same reads as edited, and the log is then checked by `fl-audit verify`
and sealed again by `fl-audit seal`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .audit_keys import AuditKeys

HEAD_BYTES = 512  # one sector; a head is about 150 bytes, padded with spaces


@dataclass(frozen=True)
class ChainPosition:
    seq: int  # 0 with the genesis MAC: before the first record
    mac: str


class HeadError(ValueError):
    """The sealed head cannot be read or was edited."""


class SealedHead:
    def __init__(self, path: Path, keys: AuditKeys) -> None:
        self.path, self._keys = path, keys
        self._fd: int | None = None

    def read(self) -> ChainPosition | None:
        """The sealed position, or None when no head was ever sealed here."""
        try:
            raw = json.loads(self.path.read_bytes())
            position, tag = ChainPosition(int(raw["seq"]), str(raw["mac"])), str(raw["head_mac"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            raise HeadError(f"sealed head {self.path}: unreadable") from None
        if self._keys.mac(["head", position.seq, position.mac]) != tag:
            raise HeadError(f"sealed head {self.path}: edited (its MAC does not match)")
        return position

    def seal(self, position: ChainPosition) -> None:
        """Rewrite the head in place and sync it: durable when this returns. A head removed or replaced since this
        process opened it is not made anew (that would seal whatever the log now ends with): HeadError."""
        body = json.dumps({"seq": position.seq, "mac": position.mac,
                           "head_mac": self._keys.mac(["head", position.seq, position.mac])}).encode()
        if self._fd is not None:
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                raise HeadError(f"sealed head {self.path}: removed or replaced while this process sealed it")
        else:
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            if created:  # the file's name is durable too
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        os.pwrite(self._fd, body.ljust(HEAD_BYTES), 0)  # (a longer head left by an older version is overwritten)
        os.ftruncate(self._fd, HEAD_BYTES)
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
