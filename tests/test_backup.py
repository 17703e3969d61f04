"""fl-backup against real stores: a copy taken while the ledger and the audit log are written, restored into a
fresh folder and checked by their own tools; a damaged backup refused; a restore that never overwrites; MLflow's
store and artifacts back after they were lost."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from fl_core.backup_cli import main
from gateway.audit import AuditKeys, AuditLog
from privacy.ledger import Ledger, balance_of

CHAIN, TEXT = Fernet.generate_key().decode(), Fernet.generate_key().decode()
BIN = Path(sys.executable).parent

# A gateway's audit writer and a node's ledger, each committing as fast as it can until told to stop.
WRITER = """
import sys, time
from pathlib import Path
from gateway.audit import AuditEvent, AuditKeys, AuditLog
from privacy.accountant import AccountantState
from privacy.ledger import Ledger, SpendRequest
folder, chain, text = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
log = AuditLog(folder / "audit.sqlite", AuditKeys.from_secrets(chain, text), folder / "heads" / "audit.head")
log.open_for_writing()
ledger = Ledger(folder / "ledger.sqlite")
i = 0
while not (folder / "stop").exists():
    log.append_all([AuditEvent(f"u{i}", "clinician", "/v1/classify", "m", "standard", 0.0, 200, f"note {i} {k}")
                    for k in range(3)])
    plan = AccountantState(((1.0, 0.05, 10 + i),))
    ledger.reserve(SpendRequest(f"run-{i}", "h0", "icd10", None, "plan", plan, 1e-5, 1.0, 0.05))
    i += 1
"""


def fl(command: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "FL_AUDIT_CHAIN_KEY": CHAIN}
    return subprocess.run([str(BIN / command), *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def audit_count(folder: Path) -> int:
    with sqlite3.connect(f"file:{folder / 'audit.sqlite'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])


def test_a_backup_taken_while_both_stores_write_restores_whole_and_verifies(tmp_path: Path) -> None:
    live, backups, restored = tmp_path / "live", tmp_path / "backups", tmp_path / "restored"
    live.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(live), CHAIN, TEXT])
    try:
        deadline = time.monotonic() + 60
        while not (live / "ledger.sqlite").exists() or audit_count(live) < 30:
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.1)
        audited_before = audit_count(live)
        ledger_before = {e.run_id: e for e in Ledger(live / "ledger.sqlite").entries()}
        made = fl("fl-backup", "create", "--to", backups, "--file", f"audit-head={live / 'heads' / 'audit.head'}",
                  "--sqlite", f"audit={live / 'audit.sqlite'}", "--sqlite", f"ledger={live / 'ledger.sqlite'}")
        assert made.returncode == 0, made.stderr
        when_made = audit_count(live)
        while audit_count(live) <= when_made:  # the writers go on past the copy
            assert writer.poll() is None and time.monotonic() < deadline + 60, "the writer stopped"
            time.sleep(0.05)
    finally:
        (live / "stop").touch()
        writer.wait(timeout=60)
    backup = Path(made.stdout.strip())
    assert backup.parent == backups and fl("fl-backup", "verify", backup).returncode == 0

    out = fl("fl-backup", "restore", backup, "--to", f"audit={restored / 'audit.sqlite'}",
             "--to", f"audit-head={restored / 'heads' / 'audit.head'}", "--to", f"ledger={restored / 'ledger.sqlite'}")
    assert out.returncode == 0, out.stderr
    # The audit log restored with its head verifies, and holds every record committed before the backup began.
    verified = fl("fl-audit", "verify", "--log", restored / "audit.sqlite", "--head", restored / "heads" / "audit.head")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    keys = AuditKeys.from_secrets(CHAIN, TEXT)
    copy = AuditLog(restored / "audit.sqlite", keys, restored / "heads" / "audit.head").records(decrypt=True)
    original = AuditLog(live / "audit.sqlite", keys, live / "heads" / "audit.head").records(decrypt=True)
    assert audited_before <= len(copy) < len(original)
    assert copy == original[: len(copy)]  # a prefix of the live log: one consistent moment
    # The ledger's entries from before the backup are all there; the copy is the live ledger as of one commit,
    # and its balance is that commit's.
    copied = Ledger(restored / "ledger.sqlite").entries()
    assert ledger_before.keys() <= {e.run_id for e in copied}
    live_entries = {e.run_id: e for e in Ledger(live / "ledger.sqlite").entries()}
    assert {e.run_id for e in copied} == {f"run-{i}" for i in range(len(copied))}  # the first ones written
    assert len(copied) < len(live_entries) and all(e == live_entries[e.run_id] for e in copied)
    assert Ledger(restored / "ledger.sqlite").balance("h0", "icd10") == balance_of("h0", "icd10", copied, None)


def make_backup(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "limits.sqlite"
    with sqlite3.connect(source) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (k TEXT)")
        db.execute("INSERT INTO t VALUES ('budget')")
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "adapter.bin").write_bytes(b"weights")
    main(["create", "--to", str(tmp_path / "backups"), "--sqlite", f"limits={source}",
          "--folder", f"artifacts={tmp_path / 'artifacts'}"])
    (backup,) = (tmp_path / "backups").iterdir()
    return backup, source


def test_a_damaged_backup_is_refused_and_a_restore_never_overwrites(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    backup, source = make_backup(tmp_path)
    assert not list((tmp_path / "backups").glob(".partial-*"))
    # Restoring with no target for an item, or where the live file still is: refused before anything is written.
    with pytest.raises(SystemExit) as refused:
        main(["restore", str(backup), "--to", f"limits={tmp_path / 'elsewhere.sqlite'}"])
    assert refused.value.code == 2
    assert "--to artifacts: no target" in capsys.readouterr().err and not (tmp_path / "elsewhere.sqlite").exists()
    with pytest.raises(SystemExit) as refused:
        main(["restore", str(backup), "--in-place"])
    assert refused.value.code == 2
    assert f"limits: {source} exists" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.replaced-*"))
    # --replace moves the live file and its WAL aside; nothing is deleted.
    with sqlite3.connect(source) as db:
        db.execute("INSERT INTO t VALUES ('written after the backup')")
    main(["restore", str(backup), "--in-place", "--replace"])
    with sqlite3.connect(source) as db:
        assert db.execute("SELECT k FROM t").fetchall() == [("budget",)]
    (aside,) = tmp_path.glob("limits.sqlite.replaced-*Z")  # with its -wal beside it
    with sqlite3.connect(aside) as db:
        assert len(db.execute("SELECT k FROM t").fetchall()) == 2
    assert (tmp_path / "artifacts" / "adapter.bin").read_bytes() == b"weights"
    assert (tmp_path / "artifacts" / "adapter.bin").stat().st_mode & 0o777 == 0o600  # the owner's alone
    assert len(list(tmp_path.glob("artifacts.replaced-*"))) == 1
    # A byte changed in the backup: verify says which file, and restore refuses it.
    (backup / "artifacts" / "adapter.bin").write_bytes(b"weightz")
    with pytest.raises(SystemExit) as bad:
        main(["verify", str(backup)])
    assert bad.value.code == 1 and "BAD: artifacts/adapter.bin: changed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["restore", str(backup), "--to", f"limits={tmp_path / 'fresh' / 'limits.sqlite'}",
              "--to", f"artifacts={tmp_path / 'fresh' / 'artifacts'}"])
    assert refused.value.code == 2 and "does not verify" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["create", "--to", "B", "--sqlite", "x=/no/such.db"], "--sqlite x: no such file: /no/such.db"),
    (["create", "--to", "B", "--folder", "x"], "--folder 'x': expected NAME=PATH"),
    (["create", "--to", "B", "--file", "Bad Name=/etc/hostname"], "a name is lower-case letters"),
    (["create", "--to", "B", "--sqlite", "x=/etc/hostname"], "--sqlite x: not a SQLite database"),
    (["create", "--to", "B", "--file", "x=/etc/hostname", "--folder", "x=/etc"], "--folder x: the name is given twice"),
    (["create", "--to", "B", "--file", "x=/etc/hostname", "--keep", "0"], "--keep: must be >= 1"),
    (["verify", "/no/such/backup"], "no manifest.json"),
])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            args: list[str], message: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as failed:
        main(args)
    err = capsys.readouterr().err
    assert failed.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "B").exists() or not any((tmp_path / "B").iterdir())


def test_an_empty_folder_is_backed_up_and_restored(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()  # a new deployment's MLflow artifacts
    main(["create", "--to", str(tmp_path / "b"), "--folder", f"artifacts={tmp_path / 'artifacts'}"])
    (backup,) = (tmp_path / "b").iterdir()
    main(["restore", str(backup), "--to", f"artifacts={tmp_path / 'restored'}"])
    assert (tmp_path / "restored").is_dir() and not list((tmp_path / "restored").iterdir())


def test_keep_removes_only_the_oldest_backups_of_the_same_items(tmp_path: Path) -> None:
    (tmp_path / "head").write_text("x")
    (tmp_path / "b" / "lost+found").mkdir(parents=True)  # what a volume holds besides: never ours to delete
    main(["create", "--to", str(tmp_path / "b"), "--file", f"other={tmp_path / 'head'}"])
    for _ in range(3):
        main(["create", "--to", str(tmp_path / "b"), "--file", f"head={tmp_path / 'head'}", "--keep", "2"])
    kept = sorted(p for p in (tmp_path / "b").iterdir() if p.name != "lost+found")
    assert (tmp_path / "b" / "lost+found").is_dir() and len(kept) == 3  # another store's backup kept too
    assert sorted(json.loads((p / "manifest.json").read_text())["items"][0]["name"] for p in kept) == [
        "head", "head", "other"]


def test_a_backup_whose_manifest_points_outside_it_or_holds_a_link_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A backup volume may be written by someone else: nothing in a backup reads or writes outside it."""
    backup, _ = make_backup(tmp_path)
    manifest = json.loads((backup / "manifest.json").read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the backup")
    for item, entry in ((".." , f"../{secret.name}"), ("artifacts", f"artifacts/../../{secret.name}"),
                        ("limits", str(secret))):
        crafted = json.loads(json.dumps(manifest))
        crafted["items"][-1 if item == "artifacts" else 0].update(
            {"name": item, "files": [{"path": entry, "bytes": 18, "sha256": "0" * 64}]} if item != "artifacts"
            else {"files": [{"path": entry, "bytes": 18, "sha256": "0" * 64}]})
        (backup / "manifest.json").write_text(json.dumps(crafted))
        with pytest.raises(SystemExit) as refused:
            main(["restore", str(backup), "--in-place", "--replace"])
        assert refused.value.code == 2 and "manifest.json" in capsys.readouterr().err, entry
    (backup / "manifest.json").write_text(json.dumps(manifest))
    (backup / "artifacts" / "link").symlink_to(secret)
    with pytest.raises(SystemExit) as bad:
        main(["verify", str(backup)])
    assert bad.value.code == 1 and "artifacts/link: a symbolic link" in capsys.readouterr().out


def test_mlflow_store_and_artifacts_lost_come_back_from_a_backup(tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    store, artifacts = tmp_path / "mlflow.db", tmp_path / "mlartifacts"
    uri = f"sqlite:///{store}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("backup", artifact_location=artifacts.as_uri())
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metric("epsilon", 7.99, step=1)
        mlflow.log_text("adapter", "adapter/README.md")
    main(["create", "--to", str(tmp_path / "backups"), "--sqlite", f"mlflow={store}",
          "--folder", f"mlartifacts={artifacts}"])
    (backup,) = (tmp_path / "backups").iterdir()
    store.unlink()
    for side in ("-wal", "-shm"):
        (tmp_path / f"mlflow.db{side}").unlink(missing_ok=True)
    shutil.rmtree(artifacts)
    main(["restore", str(backup), "--in-place"])
    restored = MlflowClient(tracking_uri=uri)
    assert restored.get_metric_history(run.info.run_id, "epsilon")[0].value == 7.99
    local = restored.download_artifacts(run.info.run_id, "adapter/README.md", str(tmp_path / "dl"))
    assert Path(local).read_text() == "adapter"
