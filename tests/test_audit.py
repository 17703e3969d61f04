"""The audit chain on a real SQLite file: retention pruning keeps it verifiable, and the key matters."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from gateway.audit import AuditEvent, AuditKeyError, AuditLog
from gateway.audit_writer import AuditWriter, AuditWriterStopped

KEY = Fernet.generate_key().decode()
NOW = datetime(2026, 11, 28, tzinfo=UTC)


def event(user: str) -> AuditEvent:
    return AuditEvent(user, "clinician", "/v1/classify", "m", "standard", 0.0, 200, f"note of {user}")


def filled(path: Path, ages_in_days: list[int]) -> AuditLog:
    log = AuditLog(path, KEY)
    for i, age in enumerate(ages_in_days):
        log.append(event(f"u{i}"), at=NOW - timedelta(days=age))
    return log


def test_pruning_past_retention_keeps_the_rest_of_the_chain_verifiable(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.sqlite", [3000, 2600, 2556, 10, 1])
    assert log.prune(2555, now=NOW) == 3
    assert [r["user"] for r in log.records()] == ["u3", "u4"]
    assert log.verify() == (2, [])
    log.append(event("u5"), at=NOW)
    assert log.verify() == (3, [])
    assert log.prune(2555, now=NOW) == 0


def test_an_edited_anchor_or_a_deleted_first_record_after_pruning_is_caught(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.sqlite", [3000, 10, 1])
    log.prune(2555, now=NOW)
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        db.execute("DELETE FROM audit WHERE seq = 2")
    assert log.verify()[1] == ["record 2: missing (deleted); chain resumes at 3"]
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        db.execute("UPDATE anchor SET seq = 2")
    assert "anchor: edited (its MAC does not match)" in log.verify()[1]


def test_another_key_cannot_verify_or_decrypt_and_a_malformed_key_is_refused(tmp_path: Path) -> None:
    filled(tmp_path / "audit.sqlite", [1, 1])
    other = AuditLog(tmp_path / "audit.sqlite", Fernet.generate_key().decode())
    assert len(other.verify()[1]) == 2
    assert [r["request"] for r in other.records(decrypt=True)] == [None, None]
    assert [r["request"] for r in AuditLog(tmp_path / "audit.sqlite", KEY).records(decrypt=True)] == [
        "note of u0", "note of u1"]
    with pytest.raises(AuditKeyError):
        AuditLog(tmp_path / "audit.sqlite", "not-a-key")


def test_fl_audit_gives_one_line_errors_and_prunes(tmp_path: Path) -> None:
    def fl_audit(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", **({"FL_AUDIT_KEY": key} if key is not None else {})}
        return subprocess.run([sys.executable, "-m", "gateway.audit_cli", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    path = tmp_path / "audit.sqlite"
    filled(path, [3000, 1]).close()
    missing = fl_audit("verify", "--log", str(tmp_path / "nope.sqlite"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("fl-audit: --log: no such file")
    no_key = fl_audit("verify", "--log", str(path), key=None)
    assert no_key.returncode == 2 and "FL_AUDIT_KEY is not set" in no_key.stderr
    pruned = fl_audit("prune", "--log", str(path), "--days", "2555")
    assert pruned.returncode == 0 and "pruned 1 records" in pruned.stdout
    assert fl_audit("verify", "--log", str(path)).returncode == 0
    assert Fernet(fl_audit("new-key").stdout.strip().encode())  # a usable key


def test_the_writer_commits_waiting_records_together_and_releases_none_while_the_log_is_locked(
        tmp_path: Path) -> None:
    """Another process holds the write lock past several attempts: every record waits, none is dropped, none is
    reported written before the lock is released, and those that queued meanwhile share one commit."""
    path = tmp_path / "audit.sqlite"
    audit = AuditLog(path, KEY, lock_timeout=0.2)
    writer = AuditWriter(audit)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    released = False

    async def one(user: str) -> tuple[int, bool]:
        seq = await writer.record(event(user))
        return seq, released  # was the lock released when this record was reported committed?

    async def main() -> list[tuple[int, bool]]:
        nonlocal released
        pending = asyncio.gather(*(one(f"u{i}") for i in range(50)))
        await asyncio.sleep(1.5)  # several lock timeouts
        released = True
        holder.execute("COMMIT")
        return await pending

    results = asyncio.run(main())
    writer.close()
    assert sorted(seq for seq, _ in results) == list(range(1, 51))
    assert all(after_release for _, after_release in results)
    assert audit.verify() == (50, [])
    stamps = {r["at"] for r in audit.records()}
    assert len(stamps) <= 2  # the first record's own commit, then everything that queued behind it


def test_a_closed_writer_refuses_records_rather_than_leave_them_waiting(tmp_path: Path) -> None:
    writer = AuditWriter(AuditLog(tmp_path / "audit.sqlite", KEY))
    assert asyncio.run(writer.record(event("u0"))) == 1
    writer.close()
    with pytest.raises(AuditWriterStopped):
        asyncio.run(writer.record(event("u1")))
