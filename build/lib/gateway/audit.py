"""Tamper-evident audit log: an append-only SQLite table whose records are chained by HMAC-SHA256.

Each record's MAC covers its fields and the previous record's MAC, under the chain key, so editing, deleting or
reordering any record breaks the chain at that point, and nobody without the key can rebuild it. After each commit
the newest record is sealed in a head kept apart (`audit_head`), so records cut off the end are caught too. Request
text is encrypted under a second key (Fernet) and never stored in plaintext. Retention pruning first verifies the
chain, then deletes its oldest records up to the first one still within retention and keeps an anchor (the last
pruned record's sequence number and MAC, itself MAC'd), from which the rest still verifies.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.fernet import InvalidToken

from .audit_head import ChainPosition, HeadError, SealedHead
from .audit_keys import AuditKeyError, AuditKeys
from .database import open_database, write_transaction

GENESIS = ChainPosition(0, "0" * 64)
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, at TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, route TEXT NOT NULL,
    model TEXT NOT NULL, query_mode TEXT NOT NULL, epsilon REAL NOT NULL, status INTEGER NOT NULL,
    request BLOB NOT NULL, prev TEXT NOT NULL, mac TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, mac TEXT NOT NULL, pruned_before TEXT NOT NULL,
    anchor_mac TEXT NOT NULL);
"""
FIELDS = ("seq", "at", "user", "role", "route", "model", "query_mode", "epsilon", "status", "request", "prev")

__all__ = ["AuditEvent", "AuditKeyError", "AuditKeys", "AuditLog", "AuditTampered"]


class AuditTampered(ValueError):
    """The log does not verify, so it is not written to or pruned until someone has looked."""


@dataclass(frozen=True)
class AuditEvent:
    user: str
    role: str
    route: str
    model: str
    query_mode: str
    epsilon: float
    status: int
    request_text: str


class AuditLog:
    def __init__(self, path: Path, keys: AuditKeys, head_path: Path, lock_timeout: float = 30.0) -> None:
        self._keys = keys
        # FULL sync: a record is on disk when its commit returns, power cut included (group commit pays for it)
        self._db = open_database(path, SCHEMA, synchronous="FULL", timeout=lock_timeout)
        self._head = SealedHead(head_path, keys)
        self._lock = threading.Lock()
        self._seal_lock, self._sealed = threading.Lock(), -1  # a slower writer thread never moves the head back

    def tail(self) -> ChainPosition:
        """The newest record, or the pruning anchor when every record is pruned, or genesis."""
        row = self._db.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            row = self._db.execute("SELECT seq, mac FROM anchor WHERE id = 1").fetchone()
        return ChainPosition(int(row[0]), str(row[1])) if row else GENESIS

    def _authentic_mac(self, seq: int) -> str | None:
        """The MAC of record `seq`, or of the anchor at `seq`, if it checks against its contents under the chain key
        (a stored MAC alone proves nothing: the head's is in the clear); None otherwise."""
        row = self._db.execute(f"SELECT {', '.join(FIELDS)}, mac FROM audit WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            return str(row[-1]) if self._keys.mac(list(row[:-1])) == row[-1] else None
        anchor = self._db.execute("SELECT seq, mac, pruned_before, anchor_mac FROM anchor WHERE id = 1 AND seq = ?",
                                  (seq,)).fetchone()
        if anchor is not None and self._keys.mac(["anchor", *anchor[:3]]) == anchor[3]:
            return str(anchor[1])
        return None

    def head_problems(self) -> list[str]:
        """Whether the log still reaches its sealed head: records cut off its end, a rollback to an older copy, an
        emptied or replaced file. Cheap (the head, the last record and the sealed one, each checked under the chain
        key): the gateway checks it before it writes; `verify` checks the whole chain besides."""
        try:
            head = self._head.read()
        except HeadError as err:
            return [str(err)]
        tail = self.tail()
        if tail != GENESIS and self._authentic_mac(tail.seq) != tail.mac:
            return [f"record {tail.seq}: the log's last record does not verify (edited or forged)"]
        if head is None:
            return [] if tail == GENESIS else [
                f"sealed head {self._head.path}: missing for a log that reaches record {tail.seq}; it cannot be "
                "checked for records cut off its end (fl-audit seal, once the log is known to be whole)"]
        if tail.seq < head.seq:
            return [f"records {tail.seq + 1}-{head.seq}: missing from the end (truncated, rolled back or replaced); "
                    f"the sealed head is record {head.seq}"]
        anchor = self._db.execute("SELECT seq FROM anchor WHERE id = 1").fetchone()
        if anchor is not None and head.seq < int(anchor[0]) and self._authentic_mac(int(anchor[0])) is not None:
            return []  # the sealed record was pruned since; the (authentic) anchor vouches for the chain up to there
        if self._authentic_mac(head.seq) != head.mac:
            return [f"record {head.seq}: not the sealed record (the log was rewritten or replaced)"]
        return []

    def open_for_writing(self) -> None:
        """Refuse a log that does not reach its sealed head (writing on would bury the cut), then seal its tail:
        records committed before a crash but not yet sealed are sealed now."""
        problems = self.head_problems()
        if problems:
            raise AuditTampered(f"audit log refused: {problems[0]}; run fl-audit verify")
        self._head.seal(self.tail())

    def append(self, event: AuditEvent, at: datetime | None = None) -> int:
        """Add one record at the head of the chain; returns its sequence number."""
        return self.append_all([event], at)[0]

    def append_all(self, events: Sequence[AuditEvent], at: datetime | None = None) -> list[int]:
        """Add records at the head of the chain in one transaction (one commit for all: group commit), then seal the
        new head; returns their sequence numbers. Raises sqlite3.OperationalError, having written none, if the write
        lock stays taken."""
        if self._keys.text is None:
            raise AuditKeyError("writing audit records needs the text key")
        stamp = (at or datetime.now(UTC)).isoformat()
        tokens = [self._keys.text.encrypt(event.request_text.encode()) for event in events]
        with write_transaction(self._db, self._lock) as db:
            first = self.tail()
            prev = first.mac
            for i, (event, token) in enumerate(zip(events, tokens, strict=True), start=first.seq + 1):
                values: list[object] = [i, stamp, event.user, event.role, event.route, event.model,
                                        event.query_mode, float(event.epsilon), int(event.status), token, prev]
                prev = self._keys.mac(values)
                db.execute(f"INSERT INTO audit ({', '.join(FIELDS)}, mac) VALUES ({', '.join('?' * 12)})",
                           [*values, prev])
        with self._seal_lock:
            if first.seq + len(events) > self._sealed:
                self._head.seal(ChainPosition(first.seq + len(events), prev))
                self._sealed = first.seq + len(events)
        return list(range(first.seq + 1, first.seq + 1 + len(events)))

    def verify(self) -> tuple[int, list[str]]:
        """(records checked, problems): each problem names the record where the chain breaks and how."""
        problems: list[str] = []
        anchor = self._db.execute("SELECT seq, mac, pruned_before, anchor_mac FROM anchor WHERE id = 1").fetchone()
        expected_seq, expected_prev = 1, GENESIS.mac
        if anchor is not None:
            if self._keys.mac(["anchor", anchor[0], anchor[1], anchor[2]]) != anchor[3]:
                problems.append("anchor: edited (its MAC does not match)")
            expected_seq, expected_prev = int(anchor[0]) + 1, str(anchor[1])
        count = 0
        for row in self._db.execute(f"SELECT {', '.join(FIELDS)}, mac FROM audit ORDER BY seq"):
            count += 1
            values, mac = list(row[:-1]), row[-1]
            seq, prev = values[0], values[-1]
            if seq != expected_seq:
                problems.append(f"record {expected_seq}: missing (deleted); chain resumes at {seq}")
            elif prev != expected_prev:
                problems.append(f"record {seq}: out of order (does not follow record {seq - 1})")
            if self._keys.mac(values) != mac:
                problems.append(f"record {seq}: edited (its MAC does not match its contents)")
            expected_seq, expected_prev = seq + 1, mac
        return count, problems + self.head_problems()

    def seal(self) -> int:
        """Seal the log's tail as its head, once the whole chain verifies (a log from before sealed heads, one whose
        head volume was lost, or a head torn by a crash); returns the sealed record's sequence number. A head that
        reads but disagrees with the log is not overwritten: that is the cut it exists to show."""
        _, problems = self.verify()
        problems = [p for p in problems if not p.startswith(f"sealed head {self._head.path}: ")]
        if problems:
            raise AuditTampered(f"not sealed: {problems[0]}")
        tail = self.tail()
        self._head.seal(tail)
        return tail.seq

    def prune(self, retention_days: int, now: datetime | None = None) -> int:
        """Delete the records older than the retention period, keeping the chain verifiable; returns how many. The
        chain is verified first (a backdated record fails its MAC, so `at` is trusted only once verified), and the
        cut is a chain position: every record before the first one still within retention."""
        cutoff = ((now or datetime.now(UTC)) - timedelta(days=retention_days)).isoformat()
        _, problems = self.verify()
        if problems:
            raise AuditTampered(f"not pruned: {problems[0]}; run fl-audit verify")
        with write_transaction(self._db, self._lock) as db:
            last = db.execute(
                "SELECT seq, mac FROM audit WHERE seq < COALESCE((SELECT MIN(seq) FROM audit WHERE at >= ?), "
                "9223372036854775807) ORDER BY seq DESC LIMIT 1", (cutoff,)).fetchone()
            if last is None:
                return 0
            values = list(db.execute(f"SELECT {', '.join(FIELDS)} FROM audit WHERE seq = ?", (last[0],)).fetchone())
            if self._keys.mac(values) != last[1]:  # backdated since it was verified
                raise AuditTampered(f"not pruned: record {last[0]} changed while pruning")
            removed = db.execute("DELETE FROM audit WHERE seq <= ?", (last[0],)).rowcount
            anchor_mac = self._keys.mac(["anchor", last[0], last[1], cutoff])
            db.execute("INSERT OR REPLACE INTO anchor (id, seq, mac, pruned_before, anchor_mac) "
                       "VALUES (1, ?, ?, ?, ?)", (last[0], last[1], cutoff, anchor_mac))
        return int(removed)

    def records(self, decrypt: bool = False) -> list[dict[str, object]]:
        """Every record, oldest first; with `decrypt`, the request text too (needs the text key)."""
        if decrypt and self._keys.text is None:
            raise AuditKeyError("reading request text needs the text key")
        out = []
        for row in self._db.execute(f"SELECT {', '.join(FIELDS)}, mac FROM audit ORDER BY seq"):
            record = dict(zip((*FIELDS, "mac"), row, strict=True))
            token = record.pop("request")
            if decrypt and self._keys.text is not None:
                try:
                    record["request"] = self._keys.text.decrypt(bytes(token)).decode()
                except InvalidToken:
                    record["request"] = None
            out.append(record)
        return out

    def close(self) -> None:
        self._head.close()
        self._db.close()
