"""Tamper-evident audit log: an append-only SQLite table whose records are chained by HMAC-SHA256.

Each record's MAC covers its fields and the previous record's MAC, under a key derived from the deployment's audit
key (environment), so editing, deleting or reordering any record breaks the chain at that point, and nobody without
the key can rebuild it. Request text is encrypted (Fernet) and never stored in plaintext. Retention pruning deletes
old records and keeps an anchor (the last pruned record's sequence number and MAC, itself MAC'd), from which the
remaining chain still verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .database import open_database, write_transaction

GENESIS = "0" * 64
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


class AuditKeyError(ValueError):
    """The audit key is missing or malformed."""


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


def _keys(key: str) -> tuple[Fernet, bytes]:
    try:
        fernet = Fernet(key.encode())
    except (ValueError, TypeError):
        raise AuditKeyError("audit key must be a Fernet key (fl-audit new-key prints one)") from None
    chain_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fl-audit chain").derive(key.encode())
    return fernet, chain_key


def _mac(chain_key: bytes, values: list[object]) -> str:
    payload = json.dumps([v.hex() if isinstance(v, bytes) else v for v in values], separators=(",", ":"))
    return hmac.new(chain_key, payload.encode(), hashlib.sha256).hexdigest()


class AuditLog:
    def __init__(self, path: Path, key: str, lock_timeout: float = 30.0) -> None:
        self._fernet, self._chain_key = _keys(key)
        # FULL sync: a record is on disk when its commit returns, power cut included (group commit pays for it)
        self._db = open_database(path, SCHEMA, synchronous="FULL", timeout=lock_timeout)
        self._lock = threading.Lock()

    def _head(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            row = self._db.execute("SELECT seq, mac FROM anchor WHERE id = 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def append(self, event: AuditEvent, at: datetime | None = None) -> int:
        """Add one record at the head of the chain; returns its sequence number."""
        return self.append_all([event], at)[0]

    def append_all(self, events: Sequence[AuditEvent], at: datetime | None = None) -> list[int]:
        """Add records at the head of the chain in one transaction (one commit for all: group commit); returns
        their sequence numbers. Raises sqlite3.OperationalError, having written none, if the write lock stays taken."""
        stamp = (at or datetime.now(UTC)).isoformat()
        tokens = [self._fernet.encrypt(event.request_text.encode()) for event in events]
        with write_transaction(self._db, self._lock) as db:
            last_seq, prev = self._head()
            for i, (event, token) in enumerate(zip(events, tokens, strict=True), start=last_seq + 1):
                values: list[object] = [i, stamp, event.user, event.role, event.route, event.model,
                                        event.query_mode, float(event.epsilon), int(event.status), token, prev]
                prev = _mac(self._chain_key, values)
                db.execute(f"INSERT INTO audit ({', '.join(FIELDS)}, mac) VALUES ({', '.join('?' * 12)})",
                           [*values, prev])
        return list(range(last_seq + 1, last_seq + 1 + len(events)))

    def verify(self) -> tuple[int, list[str]]:
        """(records checked, problems): each problem names the record where the chain breaks and how."""
        problems: list[str] = []
        anchor = self._db.execute("SELECT seq, mac, pruned_before, anchor_mac FROM anchor WHERE id = 1").fetchone()
        expected_seq, expected_prev = 1, GENESIS
        if anchor is not None:
            if _mac(self._chain_key, ["anchor", anchor[0], anchor[1], anchor[2]]) != anchor[3]:
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
            if _mac(self._chain_key, values) != mac:
                problems.append(f"record {seq}: edited (its MAC does not match its contents)")
            expected_seq, expected_prev = seq + 1, mac
        return count, problems

    def prune(self, retention_days: int, now: datetime | None = None) -> int:
        """Delete records older than the retention period, keeping the chain verifiable; returns how many."""
        cutoff = ((now or datetime.now(UTC)) - timedelta(days=retention_days)).isoformat()
        with write_transaction(self._db, self._lock) as db:
            last = db.execute("SELECT seq, mac FROM audit WHERE at < ? ORDER BY seq DESC LIMIT 1",
                              (cutoff,)).fetchone()
            if last is None:
                return 0
            removed = db.execute("DELETE FROM audit WHERE seq <= ?", (last[0],)).rowcount
            anchor_mac = _mac(self._chain_key, ["anchor", last[0], last[1], cutoff])
            db.execute("INSERT OR REPLACE INTO anchor (id, seq, mac, pruned_before, anchor_mac) "
                       "VALUES (1, ?, ?, ?, ?)", (last[0], last[1], cutoff, anchor_mac))
        return int(removed)

    def records(self, decrypt: bool = False) -> list[dict[str, object]]:
        """Every record, oldest first; with `decrypt`, the request text too (needs the key, as every call does)."""
        out = []
        for row in self._db.execute(f"SELECT {', '.join(FIELDS)}, mac FROM audit ORDER BY seq"):
            record = dict(zip((*FIELDS, "mac"), row, strict=True))
            token = record.pop("request")
            if decrypt:
                try:
                    record["request"] = self._fernet.decrypt(bytes(token)).decode()
                except InvalidToken:
                    record["request"] = None
            out.append(record)
        return out

    def close(self) -> None:
        self._db.close()
