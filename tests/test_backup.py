"""fl-backup against real stores: a copy taken while the ledger and the audit log are written, restored into a
fresh folder and checked by their own tools; a damaged backup refused; a restore that never overwrites; MLflow's
store and artifacts back after they were lost; the gateways' limits and privacy spend in a real redis-server, copied
while they are charged and restored into a fresh one."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet
from servers import free_port, redis_server

from fl_core.backup_cli import main
from fl_core.backup_redis import Refused, put_back, read_snapshot
from gateway.audit import AuditKeys, AuditLog
from gateway.limits import REDIS_PREFIX, RedisLimitStore
from privacy.ledger import Ledger, balance_of
from scripts.federation import init

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
    (["create", "--to", "B", "--redis", "x=http://127.0.0.1:6379/0"], "--redis x: expected redis://HOST:PORT/DB"),
    (["create", "--to", "B", "--redis", "x=redis://127.0.0.1:6379/0?ssl_cert_reqs=none"], "--redis x: expected"),
    (["create", "--to", "B", "--redis", "x=redis://:hunter2-in-the-url@127.0.0.1:6379/0"], "--redis x: holds a "
     "password: pass it in the environment variable --redis-password-env names"),
    (["create", "--to", "B", "--redis", "redis://:hunter2-in-the-url@127.0.0.1:6379/0"], "--redis: expected NAME=URL"),
    (["restore", "B", "--to", "redis://:hunter2-in-the-url@127.0.0.1:6379/0"], "--to: expected NAME=PATH"),
    (["restore", "B", "--to", "redis://:hunter2-in-the-url@127.0.0.1:6379/0?db=0"], "--to: expected NAME=PATH"),
    (["create", "--to", "B", "--redis", "x=redis://127.0.0.1:6379/0"], "--redis-password-env: environment variable "
     "FL_GATEWAY_REDIS_PASSWORD must hold a secret"),
    (["create", "--to", "B", "--redis", "x=redis://127.0.0.1:6379/0", "--redis-ca", "/no/such.crt"],
     "--redis-ca: no such file: /no/such.crt"),
])
def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            args: list[str], message: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FL_GATEWAY_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("FL_GATEWAY_REDIS_PASSWORD_FILE", raising=False)
    with pytest.raises(SystemExit) as failed:
        main(args)
    err = capsys.readouterr().err
    assert failed.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "hunter2" not in err  # a URL that holds a password is never repeated
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


REDIS_PASSWORD = "redis-password-of-32-characters!"
USERS = 5


def verify(backup: Path) -> int | str | None:
    """`fl-backup verify`'s exit code."""
    with pytest.raises(SystemExit) as done:
        main(["verify", str(backup)])
    return done.value.code


def gateway_keys(client: redis.Redis) -> dict[bytes, bytes]:
    """Each of the gateway's keys in a Redis, with its value as DUMP gives it."""
    return {key: client.dump(key) for key in client.scan_iter(match=REDIS_PREFIX + "*")}  # type: ignore[misc]


def consistent(client: redis.Redis) -> float:
    """Check the invariants every state the gateway leaves holds, and return the hospital model's total: each query
    is charged to one user and to the model together, and each take in a window counts it and adds it at once."""
    spends = [float(client.get(f"{REDIS_PREFIX}spend:u{i}") or 0) for i in range(USERS)]
    total = float(client.get(f"{REDIS_PREFIX}deployment-spend:h0") or 0)
    assert total == sum(spends) and total > 0
    for i in range(USERS):
        window = f"{REDIS_PREFIX}rate:u{i}"
        assert int(client.get(window + ":seq") or 0) == client.zcard(window)
    return total


def test_redis_copied_while_budgets_are_charged_restores_a_state_that_existed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(REDIS_PASSWORD + "\n")
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD_FILE", str(secret))  # as Docker and Kubernetes secrets give it
    monkeypatch.delenv("FL_GATEWAY_REDIS_PASSWORD", raising=False)
    with ExitStack() as servers:
        live, fresh = (servers.enter_context(redis_server(REDIS_PASSWORD)) for _ in range(2))
        live_url, fresh_url = f"redis://127.0.0.1:{live}/0", f"redis://127.0.0.1:{fresh}/0"
        source = redis.Redis(port=live, password=REDIS_PASSWORD)
        source.set("other-app:session", "not the gateway's")  # another application's keys in the same Redis
        store, stop, charged = RedisLimitStore(live_url, REDIS_PASSWORD), threading.Event(), [0]

        def charge() -> None:  # the gateways: one query after another, to a user and the hospital model together
            while not stop.is_set():
                user = f"u{charged[0] % USERS}"
                store.take_window(f"rate:{user}", 10**9, 3600.0)
                assert store.take_spends([f"spend:{user}", "deployment-spend:h0"], 0.5, [1e9, 1e9]).allowed
                charged[0] += 1

        writer = threading.Thread(target=charge)
        writer.start()
        try:
            while charged[0] < 50:
                time.sleep(0.01)
            before = charged[0]
            main(["create", "--to", str(tmp_path / "backups"), "--redis", f"limits={live_url}"])
            after = charged[0]
            while charged[0] < after + 20:  # still charging after the copy
                assert writer.is_alive()
                time.sleep(0.01)
        finally:
            stop.set()
            writer.join(timeout=30)
        backup = Path(capsys.readouterr().out.strip())
        assert verify(backup) == 0
        main(["restore", str(backup), "--to", f"limits={fresh_url}"])
        out = capsys.readouterr().out
        assert out.splitlines()[-1] == f"limits: restored to {fresh_url}"

        restored = redis.Redis(port=fresh, password=REDIS_PASSWORD)
        snapshot = read_snapshot(backup / "limits")
        # Every key the copy holds is there, and nothing else: the other application's key was not copied.
        assert set(gateway_keys(restored)) == {k.key for k in snapshot.keys} and restored.dbsize() == len(
            snapshot.keys) == 3 * USERS + 1
        manifest = json.loads((backup / "manifest.json").read_text())
        assert manifest["items"][0]["keys"] == len(snapshot.keys)
        # One state that existed: the invariants hold, and it lies between the charges before and after the copy.
        assert before * 0.5 <= consistent(restored) <= after * 0.5
        # Each window keeps the moment it ends; the spends keep none.
        for key in snapshot.keys:
            expected = snapshot.time_ms + key.pttl if key.pttl > 0 else -1
            assert restored.pexpiretime(key.key.decode()) == expected, key.key
        assert sum(k.pttl > 0 for k in snapshot.keys) == 2 * USERS
        assert source.get("other-app:session") == b"not the gateway's"
        for text in (out, (backup / "manifest.json").read_text(), (backup / "limits").read_text()):
            assert REDIS_PASSWORD not in text


def test_a_redis_restore_refuses_to_overwrite_and_keeps_what_it_replaces(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", REDIS_PASSWORD)
    with redis_server(REDIS_PASSWORD) as port:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis(port=port, password=REDIS_PASSWORD)
        store = RedisLimitStore(url, REDIS_PASSWORD)
        store.take_spends(["spend:ann", "deployment-spend:h0"], 0.5, [9.0, 9.0])
        store.take_window("rate:ann", 100, 3600.0)
        window = f"{REDIS_PREFIX}rate:ann"
        ends = client.pexpiretime(window)
        anonymous = f"{REDIS_PREFIX}anon:10.0.0.9".encode()
        client.set(anonymous, "1", px=300)  # a window about to end
        client.set("other-app:x", "1")
        main(["create", "--to", str(tmp_path / "backups"), "--redis", f"limits={url}"])
        backup = Path(capsys.readouterr().out.strip())
        backed_up = gateway_keys(client)
        assert anonymous in backed_up
        del backed_up[anonymous]
        time.sleep(0.4)  # it has ended since the copy: not brought back, nor counted in the way
        store.take_spends(["spend:ann", "deployment-spend:h0"], 0.5, [9.0, 9.0])  # spent after the copy
        store.take_spends(["spend:bob"], 0.5, [9.0])  # a user the copy does not know
        client.set("other-app:x", "2")
        changed = gateway_keys(client)

        with pytest.raises(SystemExit) as refused:
            main(["restore", str(backup), "--to", f"limits={url}"])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and err.strip() == (
            f"fl-backup: limits: 4 of its 4 keys are in {url} (restore elsewhere with --to limits=URL, or --replace "
            "to back them up and write over them)")
        assert gateway_keys(client) == changed and not list(tmp_path.glob("backups/*.replaced"))

        main(["restore", str(backup), "--to", f"limits={url}", "--replace"])
        out = capsys.readouterr().out
        (kept,) = (tmp_path / "backups" / f"{backup.name}.replaced").iterdir()
        assert out.strip() == f"limits: restored to {url} (what was there is kept in {kept})"
        now = gateway_keys(client)
        assert {k: now[k] for k in backed_up} == backed_up  # the copy's keys are back as they were
        assert anonymous not in now
        assert abs(client.pexpiretime(window) - ends) <= 2  # and the window ends when it did (ms, the copy's clock)
        assert now[f"{REDIS_PREFIX}spend:bob".encode()] == changed[f"{REDIS_PREFIX}spend:bob".encode()]
        assert client.get("other-app:x") == b"2"  # never the gateway's to touch
        # What was replaced is a backup of its own, and putting it back undoes the restore.
        assert verify(kept) == 0
        main(["restore", str(kept), "--to", f"limits={url}", "--replace"])
        assert gateway_keys(client) == changed

        # A changed byte, or a copy whose keys the manifest does not count (its hashes made to match): both found.
        capsys.readouterr()
        copy = backup / "limits"
        original = copy.read_text()
        copy.write_text(original.replace('"pttl": -1', '"pttl": -2', 1))
        with pytest.raises(SystemExit) as bad:
            main(["verify", str(backup)])
        assert bad.value.code == 1 and "BAD: limits: changed since the backup was made" in capsys.readouterr().out
        copy.write_text(original)
        forge(backup, lambda snapshot: snapshot["keys"].pop(), recount=False)
        with pytest.raises(SystemExit) as bad:
            main(["verify", str(backup)])
        assert bad.value.code == 1 and "BAD: limits: holds 4 keys, the manifest 5" in capsys.readouterr().out
        with pytest.raises(SystemExit) as refused:
            main(["restore", str(backup), "--to", f"limits={url}", "--replace"])
        assert refused.value.code == 2 and "does not verify" in capsys.readouterr().err
        assert gateway_keys(client) == changed

        # A wrong password, or no Redis there: one line naming the option, never the password.
        nobody = f"redis://127.0.0.1:{free_port()}/0"
        for env, target, message in (("x" * 40, url, "--redis limits: redis refused the password"),
                                     (REDIS_PASSWORD, nobody, "--redis limits: redis at")):
            monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", env)
            with pytest.raises(SystemExit) as failed:
                main(["create", "--to", str(tmp_path / "other"), "--redis", f"limits={target}"])
            err = capsys.readouterr().err
            assert failed.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
            assert REDIS_PASSWORD not in err and env not in err
        assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_an_empty_redis_over_tls_is_a_backup_too(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A new deployment's Redis holds none of the gateway's keys yet: still a backup, and it restores to none."""
    init(tmp_path / "certs", [], [], days=1)  # the federation's CA and a server certificate for 127.0.0.1
    ca = tmp_path / "certs" / "ca.crt"
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", REDIS_PASSWORD)
    with redis_server(REDIS_PASSWORD, tmp_path / "certs") as port:
        url = f"rediss://127.0.0.1:{port}/0"
        client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD, ssl=True, ssl_ca_certs=str(ca))
        client.set("other-app:x", "1")
        for args, message in ((["--redis", f"limits={url}"], "--redis limits: redis at"),  # not the system's CA
                              (["--redis", f"limits=redis://127.0.0.1:{port}/0", "--redis-ca", str(ca)],
                               "--redis-ca: --redis limits is plain redis://")):
            with pytest.raises(SystemExit) as failed:
                main(["create", "--to", str(tmp_path / "backups"), *args])
            assert failed.value.code == 2 and message in capsys.readouterr().err
        main(["create", "--to", str(tmp_path / "backups"), "--redis", f"limits={url}", "--redis-ca", str(ca)])
        backup = Path(capsys.readouterr().out.strip())
        assert json.loads((backup / "manifest.json").read_text())["items"][0]["keys"] == 0
        assert verify(backup) == 0
        main(["restore", str(backup), "--to", f"limits={url}", "--redis-ca", str(ca)])
        assert capsys.readouterr().out.splitlines()[-1] == f"limits: restored to {url}"
        assert client.keys("*") == [b"other-app:x"]


def forge(backup: Path, change: Callable[[dict[str, Any]], object], recount: bool = True) -> None:
    """Change a backup's Redis copy and make its manifest match (size, hash and, with `recount`, its count of keys),
    as anyone who can write the backup volume could: only what the copy holds can give it away."""
    copy = backup / "limits"
    snapshot = json.loads(copy.read_text())
    change(snapshot)
    copy.write_text(json.dumps(snapshot))
    manifest = json.loads((backup / "manifest.json").read_text())
    (item,) = [i for i in manifest["items"] if i["name"] == "limits"]
    item["files"][0].update(bytes=copy.stat().st_size, sha256=hashlib.sha256(copy.read_bytes()).hexdigest())
    if recount:
        item["keys"] = len(snapshot["keys"])
    (backup / "manifest.json").write_text(json.dumps(manifest))


def backed_up_redis(tmp_path: Path, port: int, capsys: pytest.CaptureFixture[str], *items: str) -> Path:
    """A backup of three of the gateway's keys in the Redis at `port`, after the other `items` (as --file NAME=PATH)."""
    client = redis.Redis(port=port, password=REDIS_PASSWORD)
    for user in ("ann", "bob", "cy"):
        client.set(f"{REDIS_PREFIX}spend:{user}", "0.5")
    main(["create", "--to", str(tmp_path / "backups"), *(a for i in items for a in ("--file", i)),
          "--redis", f"limits=redis://127.0.0.1:{port}/0"])
    return Path(capsys.readouterr().out.strip())


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `fl-backup` refuses `args` with."""
    with pytest.raises(SystemExit) as failed:
        main(args)
    err = capsys.readouterr().err
    assert failed.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert REDIS_PASSWORD not in err
    return err.strip()


def test_a_copy_forged_with_another_applications_key_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup volume may be written by someone else: a key outside the gateway's is never restored."""
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", REDIS_PASSWORD)
    with redis_server(REDIS_PASSWORD) as port:
        backup = backed_up_redis(tmp_path, port, capsys)
        client = redis.Redis(port=port, password=REDIS_PASSWORD)
        before = gateway_keys(client)

        def outside(snapshot: dict[str, Any]) -> None:
            snapshot["keys"][0]["key"] = base64.b64encode(b"other-app:session").decode()

        forge(backup, outside)
        assert verify(backup) == 1
        assert "BAD: limits: holds a key outside 'fl-gateway:'" in capsys.readouterr().out
        assert "does not verify" in refused(["restore", str(backup), "--to", f"limits=redis://127.0.0.1:{port}/0",
                                             "--replace"], capsys)
        assert gateway_keys(client) == before and client.dbsize() == len(before)


def test_a_copy_with_a_payload_redis_refuses_restores_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """MULTI/EXEC does not undo the commands before one that fails: the restore stages every payload first."""
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", REDIS_PASSWORD)
    (tmp_path / "head").write_text("sealed head")
    with ExitStack() as servers:
        live, fresh = (servers.enter_context(redis_server(REDIS_PASSWORD)) for _ in range(2))
        backup = backed_up_redis(tmp_path, live, capsys, f"head={tmp_path / 'head'}")

        def corrupt_the_last(snapshot: dict[str, Any]) -> None:  # its checksum no longer matches
            dump = bytearray(base64.b64decode(snapshot["keys"][-1]["dump"]))
            dump[-1] ^= 0xFF
            snapshot["keys"][-1]["dump"] = base64.b64encode(bytes(dump)).decode()

        forge(backup, corrupt_the_last)
        assert verify(backup) == 0  # its hashes match: only Redis can tell
        last = base64.b64decode(json.loads((backup / "limits").read_text())["keys"][-1]["key"]).decode()
        restored, empty = tmp_path / "restored", redis.Redis(port=fresh, password=REDIS_PASSWORD)
        err = refused(["restore", str(backup), "--to", f"head={restored / 'head'}",
                       "--to", f"limits=redis://127.0.0.1:{fresh}/0"], capsys)
        assert err.startswith(f"fl-backup: limits: redis refused the copy of key {last!r}")
        assert not restored.exists() and empty.dbsize() == 0  # not the file before it, no key, nothing staged left
        # Over the keys it would replace: nothing changed, nothing kept aside.
        client = redis.Redis(port=live, password=REDIS_PASSWORD)
        client.set(f"{REDIS_PREFIX}spend:ann", "1.0")
        before = gateway_keys(client)
        refused(["restore", str(backup), "--to", f"head={restored / 'head'}",
                 "--to", f"limits=redis://127.0.0.1:{live}/0", "--replace"], capsys)
        assert gateway_keys(client) == before and client.dbsize() == len(before)
        assert not (tmp_path / "backups" / f"{backup.name}.replaced").exists()
        # And where Redis refuses a payload only at the restore itself: still none of the keys.
        with pytest.raises(Refused):
            put_back(empty, read_snapshot(backup / "limits"), False, lambda: pytest.fail("nothing is in the way"))
        assert empty.dbsize() == 0


def test_a_redis_item_is_restored_only_where_the_operator_says(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest is not signed: --in-place would send the gateway's Redis password to any URL written in it."""
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", REDIS_PASSWORD)
    (tmp_path / "head").write_text("sealed head")
    with redis_server(REDIS_PASSWORD) as port, socket.socket() as listener:
        backup = backed_up_redis(tmp_path, port, capsys, f"head={tmp_path / 'head'}")
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        manifest = json.loads((backup / "manifest.json").read_text())
        manifest["items"][1]["source"] = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        (backup / "manifest.json").write_text(json.dumps(manifest))
        assert refused(["restore", str(backup), "--in-place", "--replace"], capsys) == (
            "fl-backup: --to limits: a redis item is restored only to --to limits=URL, never --in-place (the "
            "manifest is not signed: the password would go to the URL it names)")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
        assert (tmp_path / "head").read_text() == "sealed head" and not list(tmp_path.glob("head.replaced-*"))
        # Files in place, the Redis where --to says.
        main(["restore", str(backup), "--in-place", "--replace", "--to", f"limits=redis://127.0.0.1:{port}/0"])
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"limits: restored to redis://127.0.0.1:{port}/0")
        assert len(list(tmp_path.glob("head.replaced-*"))) == 1


def test_a_restore_run_inside_the_backup_or_unable_to_keep_what_it_replaces(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_GATEWAY_REDIS_PASSWORD", REDIS_PASSWORD)
    with redis_server(REDIS_PASSWORD) as port:
        url = f"redis://127.0.0.1:{port}/0"
        backup = backed_up_redis(tmp_path, port, capsys)
        client = redis.Redis(port=port, password=REDIS_PASSWORD)
        client.set(f"{REDIS_PREFIX}spend:ann", "1.0")
        before = gateway_keys(client)
        monkeypatch.chdir(backup)
        # Where what --replace replaces would be kept cannot be written (a file in the way, as a read-only volume).
        aside = backup.with_name(f"{backup.name}.replaced")
        aside.write_text("")
        err = refused(["restore", ".", "--to", f"limits={url}", "--replace"], capsys)
        assert err.startswith(f"fl-backup: --replace limits: cannot back up what it replaces into {aside} (")
        assert gateway_keys(client) == before and client.dbsize() == len(before)
        aside.unlink()
        main(["restore", ".", "--to", f"limits={url}", "--replace"])
        (kept,) = aside.iterdir()
        assert capsys.readouterr().out.strip() == f"limits: restored to {url} (what was there is kept in {kept})"
        assert client.get(f"{REDIS_PREFIX}spend:ann") == b"0.5"
