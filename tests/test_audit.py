"""The audit chain on a real SQLite file: retention pruning keeps it verifiable, and the key matters."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from gateway.audit import AuditEvent, AuditKeyError, AuditKeys, AuditLog, AuditTampered
from gateway.audit_head import HeadError
from gateway.audit_writer import AuditWriter, AuditWriterStopped

CHAIN, TEXT = Fernet.generate_key().decode(), Fernet.generate_key().decode()
KEYS = AuditKeys.from_secrets(CHAIN, TEXT)
NOW = datetime(2026, 11, 28, tzinfo=UTC)


def event(user: str) -> AuditEvent:
    return AuditEvent(user, "clinician", "/v1/classify", "m", "standard", 0.0, 200, f"note of {user}")


def opened(path: Path, keys: AuditKeys = KEYS, **kwargs: float) -> AuditLog:
    """The log at `path` with its head beside it (tests only: a deployment keeps the head on another volume)."""
    return AuditLog(path, keys, path.with_name("head.json"), **kwargs)


def filled(path: Path, ages_in_days: list[int]) -> AuditLog:
    log = opened(path)
    for i, age in enumerate(ages_in_days):
        log.append(event(f"u{i}"), at=NOW - timedelta(days=age))
    return log


def sql(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)


def test_pruning_past_retention_keeps_the_rest_of_the_chain_verifiable(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.sqlite", [3000, 2600, 2556, 10, 1])
    assert log.prune(2555, now=NOW) == 3
    assert [r["user"] for r in log.records()] == ["u3", "u4"]
    assert log.verify() == (2, [])
    log.append(event("u5"), at=NOW)
    assert log.verify() == (3, [])
    assert log.prune(2555, now=NOW) == 0
    assert log.prune(1, now=NOW + timedelta(days=30)) == 3  # every record: the anchor carries the chain and head
    assert log.verify() == (0, []) and log.tail().seq == 6
    log.open_for_writing()
    assert log.append(event("u6")) == 7 and log.verify() == (1, [])


def test_an_edited_anchor_or_a_deleted_first_record_after_pruning_is_caught(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.sqlite", [3000, 10, 1])
    log.prune(2555, now=NOW)
    sql(tmp_path / "audit.sqlite", "DELETE FROM audit WHERE seq = 2")
    assert log.verify()[1] == ["record 2: missing (deleted); chain resumes at 3"]
    sql(tmp_path / "audit.sqlite", "UPDATE anchor SET seq = 2")
    assert "anchor: edited (its MAC does not match)" in log.verify()[1]


@pytest.mark.parametrize(("statements", "problem"), [
    (["DELETE FROM audit WHERE seq > 3"], "records 4-5: missing from the end"),
    (["DELETE FROM audit"], "records 1-5: missing from the end"),
    (["DROP TABLE audit"], "records 1-5: missing from the end"),
    (["UPDATE audit SET mac = (CASE WHEN substr(mac, 1, 1) = '0' THEN '1' ELSE '0' END) || substr(mac, 2) "
      "WHERE seq = 5"], "record 5: the log's last record does not"),
    # cut, then a forged last record carrying the sealed MAC (which the head file holds in the clear)
    (["DELETE FROM audit WHERE seq > 3",
      "INSERT INTO audit SELECT 5, at, user, role, route, model, query_mode, epsilon, status, request, prev, "
      "(SELECT mac FROM sealed) FROM audit WHERE seq = 3"], "record 5: the log's last record does not verify"),
    # emptied, with a forged anchor far past the head
    (["DELETE FROM audit", "INSERT INTO anchor VALUES (1, 999999, 'x', '2000-01-01', 'y')"],
     "record 999999: the log's last record does not verify"),
])
def test_records_cut_off_the_end_are_caught_and_the_log_is_not_written_on(
        tmp_path: Path, statements: list[str], problem: str) -> None:
    path = tmp_path / "audit.sqlite"
    filled(path, [1] * 5).close()
    sealed_mac = json.loads((tmp_path / "head.json").read_bytes())["mac"]
    sql(path, f"CREATE TABLE sealed AS SELECT '{sealed_mac}' AS mac", *statements)
    log = opened(path)
    assert any(p.startswith(problem) for p in log.verify()[1]), log.verify()
    with pytest.raises(AuditTampered, match=f"audit log refused: {problem}"):
        log.open_for_writing()


def test_a_rolled_back_or_replaced_log_and_an_edited_or_lost_head_are_caught(tmp_path: Path) -> None:
    path, head = tmp_path / "audit.sqlite", tmp_path / "head.json"
    log = filled(path, [1] * 3)
    with sqlite3.connect(tmp_path / "older.sqlite") as older:
        sqlite3.connect(path).backup(older)
    log.append(event("u3"))
    older_copy = opened(tmp_path / "older.sqlite")
    assert older_copy.verify()[1][-1].startswith("records 4-4: missing from the end")
    (tmp_path / "new.sqlite").touch()
    assert opened(tmp_path / "new.sqlite").verify() == (0, [
        "records 1-4: missing from the end (truncated, rolled back or replaced); the sealed head is record 4"])

    sealed = head.read_text()
    head.write_text(sealed.replace('"seq": 4', '"seq": 3'))
    assert log.verify()[1] == [f"sealed head {head}: edited (its MAC does not match)"]
    head.write_bytes(b'{"seq": 4, "mac')  # torn by a crash: an operator who verified the chain seals it again
    assert opened(path).verify()[1] == [f"sealed head {head}: unreadable"] and opened(path).seal() == 4
    head.write_text(sealed)
    head.unlink()
    assert log.verify()[1][0].startswith(f"sealed head {head}: missing for a log that reaches record 4")
    with pytest.raises(HeadError, match="removed or replaced while this process sealed it"):
        log.append(event("u4"))  # a writer does not make a new head over whatever the log now ends with
    with pytest.raises(AuditTampered):
        opened(path).open_for_writing()
    operator = opened(path)  # fl-audit seal, once the log is known to be whole
    assert operator.seal() == 5 and operator.verify() == (5, [])
    opened(path).open_for_writing()


def test_records_committed_before_a_crash_but_not_yet_sealed_verify_and_are_sealed_at_start(tmp_path: Path) -> None:
    path, head = tmp_path / "audit.sqlite", tmp_path / "head.json"
    log = filled(path, [1] * 2)
    sealed_at_two = head.read_text()
    log.append(event("u2"))
    head.write_text(sealed_at_two)  # as if the process died between the commit and the seal
    assert log.verify() == (3, [])
    fresh = opened(path)
    fresh.open_for_writing()
    sql(path, "DELETE FROM audit WHERE seq = 3")
    assert fresh.verify()[1][-1].startswith("records 3-3: missing from the end")


def test_backdated_records_are_not_pruned_and_pruning_cuts_by_chain_position(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    log = filled(path, [10, 10, 10, 1, 1])
    sql(path, "UPDATE audit SET at = '2001-01-01T00:00:00+00:00' WHERE seq >= 4")
    with pytest.raises(AuditTampered, match="not pruned: record 4: edited"):
        log.prune(2, now=NOW)
    assert len(log.records()) == 5

    clock_went_back = filled(tmp_path / "skew" / "audit.sqlite", [10, 1, 10, 10])
    assert clock_went_back.prune(5, now=NOW) == 1  # the oldest records up to the first one within retention
    assert [r["user"] for r in clock_went_back.records()] == ["u1", "u2", "u3"]


def test_the_chain_key_alone_verifies_but_reads_and_writes_nothing_and_keys_are_checked(tmp_path: Path) -> None:
    filled(tmp_path / "audit.sqlite", [1, 1]).close()
    verifier = opened(tmp_path / "audit.sqlite", AuditKeys.from_secrets(CHAIN))
    assert verifier.verify() == (2, [])
    with pytest.raises(AuditKeyError, match="needs the text key"):
        verifier.records(decrypt=True)
    with pytest.raises(AuditKeyError, match="needs the text key"):
        verifier.append(event("u2"))
    other_text = opened(tmp_path / "audit.sqlite", AuditKeys.from_secrets(CHAIN, Fernet.generate_key().decode()))
    assert [r["request"] for r in other_text.records(decrypt=True)] == [None, None]
    assert [r["request"] for r in opened(tmp_path / "audit.sqlite").records(decrypt=True)] == [
        "note of u0", "note of u1"]
    other_chain = opened(tmp_path / "audit.sqlite", AuditKeys.from_secrets(Fernet.generate_key().decode(), TEXT))
    assert len(other_chain.verify()[1]) == 3  # both records and the head
    for chain, text, problem in ((CHAIN, "not-a-key", "must be a Fernet key"), ("short", TEXT, "at least 32 bytes")):
        with pytest.raises(AuditKeyError, match=problem):
            AuditKeys.from_secrets(chain, text)


def test_fl_audit_gives_one_line_errors_seals_and_prunes(tmp_path: Path) -> None:
    path, head = tmp_path / "audit.sqlite", tmp_path / "head.json"

    def fl_audit(*args: str, chain: str | None = CHAIN) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", **({"FL_AUDIT_CHAIN_KEY": chain} if chain is not None else {})}
        return subprocess.run([sys.executable, "-m", "gateway.audit_cli", *args, "--log", str(path),
                               "--head", str(head)], env=env, capture_output=True, text=True, timeout=60)

    missing = fl_audit("verify")
    assert missing.returncode == 2 and missing.stderr.strip() == f"fl-audit: --log: no such file: {path}"
    filled(path, [3000, 1]).close()
    no_key = fl_audit("verify", chain=None)
    assert no_key.returncode == 2 and no_key.stderr.startswith("fl-audit: --chain-key-env: environment variable "
                                                               "FL_AUDIT_CHAIN_KEY must hold a secret")
    no_text_key = fl_audit("show", "--decrypt")
    assert no_text_key.returncode == 2
    assert "--text-key-env: environment variable FL_AUDIT_TEXT_KEY" in no_text_key.stderr
    pruned = fl_audit("prune", "--days", "2555")
    assert pruned.returncode == 0 and "pruned 1 records" in pruned.stdout
    verified = fl_audit("verify")
    assert verified.returncode == 0 and "1 records up to record 2, chain intact" in verified.stdout
    head.unlink()
    unsealed = fl_audit("prune", "--days", "2555")
    assert unsealed.returncode == 1 and unsealed.stderr.startswith(f"fl-audit: not pruned: sealed head {head}")
    resealed = fl_audit("seal")
    assert resealed.returncode == 0 and f"{head}: sealed at record 2" in resealed.stdout
    assert fl_audit("verify", "--at-least", "2").returncode == 0
    assert Fernet(subprocess.run([sys.executable, "-m", "gateway.audit_cli", "new-key"], capture_output=True,
                                 text=True, timeout=60).stdout.strip().encode())  # a usable key


def test_the_writer_commits_waiting_records_together_and_releases_none_while_the_log_is_locked(
        tmp_path: Path) -> None:
    """Another process holds the write lock past several attempts: every record waits, none is dropped, none is
    reported written before the lock is released, and those that queued meanwhile share one commit."""
    path = tmp_path / "audit.sqlite"
    audit = opened(path, lock_timeout=0.2)
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
    writer = AuditWriter(opened(tmp_path / "audit.sqlite"))
    assert asyncio.run(writer.record(event("u0"))) == 1
    writer.close()
    with pytest.raises(AuditWriterStopped):
        asyncio.run(writer.record(event("u1")))
