"""Backups of what must outlive a crash: each hospital's ledger, the gateway's audit log, its sealed head and its
limits (in SQLite, or shared in Redis), the SuperLink's state, MLflow's store and artifacts.

A SQLite file is copied with SQLite's online backup (one read transaction: a consistent snapshot while its service
keeps writing, WAL or not), never by copying the file, which can tear a page or miss the WAL. Plain files and
folders are copied as they are, and the gateway's keys in a Redis as of one instant (`backup_redis`). Items are
copied one after another in the order given, which matters where two items describe one state: a sealed audit head
copied before its log is never ahead of the copied log (the log only grows), and MLflow's database copied before
its artifacts finds every artifact of a run it holds as finished.

A backup is a folder named by its time, made under a hidden name and renamed when whole, with a manifest of every
file's SHA-256; `verify_backup` rechecks them, SQLite's integrity and a Redis copy's count of keys. `restore_backup`
verifies first, refuses to write over anything unless told to replace it, and then keeps what it replaces (beside
it, or for Redis in a backup of its own), so a restore loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import redis

from . import backup_redis
from .backup_redis import RedisAccess

MANIFEST = "manifest.json"
FORMAT = 1
KINDS = ("sqlite", "file", "folder", "redis")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
STAMP = re.compile(r"^\d{8}T\d{12}Z$")  # a backup folder's name: only these are ever pruned by --keep
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

Kind = Literal["sqlite", "file", "folder", "redis"]


class BackupError(ValueError):
    """A backup cannot be made, verified or restored; the message names the item or option."""


@dataclass(frozen=True)
class BackupItem:
    name: str
    kind: Kind
    source: str  # a path; for redis, a URL

    @property
    def path(self) -> Path:
        return Path(self.source)


def parse_item(kind: Kind, spec: str) -> BackupItem:
    """NAME=PATH (NAME=URL for redis), as the command line and the chart's CronJob give an item."""
    name, sep, source = spec.partition("=")
    if not sep or not source:
        shown = "" if kind == "redis" else f" {spec!r}"  # a malformed URL is not repeated: it might hold a password
        raise BackupError(f"--{kind}{shown}: expected NAME={'URL' if kind == 'redis' else 'PATH'}")
    if not NAME.match(name):
        raise BackupError(f"--{kind} {name!r}: a name is lower-case letters, digits, '.', '_' or '-'")
    problem = backup_redis.url_problem(source) if kind == "redis" else None
    if problem:
        raise BackupError(f"--redis {name}: {problem}")
    return BackupItem(name, kind, source)


def check_items(items: Sequence[BackupItem]) -> None:
    """Every item before any is copied: names unique, each source present and of its kind."""
    if not items:
        raise BackupError("nothing to back up: give --sqlite, --file, --folder or --redis items")
    seen: set[str] = set()
    for item in items:
        where = f"--{item.kind} {item.name}"
        if item.name in seen or item.name == MANIFEST:
            raise BackupError(f"{where}: the name is given twice" if item.name in seen else
                              f"{where}: {MANIFEST} is the backup's own file")
        seen.add(item.name)
        if item.kind == "redis":
            continue  # reached when it is copied: a URL's problems were named when it was parsed
        if item.kind == "folder":
            if not item.path.is_dir():
                raise BackupError(f"{where}: no such folder: {item.path}")
        elif not item.path.is_file():
            raise BackupError(f"{where}: no such file: {item.path}")
        elif item.kind == "sqlite" and not _is_sqlite(item.path):
            raise BackupError(f"{where}: not a SQLite database: {item.path}")


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_sqlite(source: Path, target: Path) -> None:
    """SQLite's online backup in one step: one read transaction, so the copy is the database as of one commit."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no WAL beside it
    finally:
        dst.close()
        src.close()


def _copy(item: BackupItem, target: Path, access: RedisAccess | None) -> int | None:
    """Copy one item to `target`; for redis, returns how many keys."""
    if item.kind == "redis":
        with _redis(f"--redis {item.name}", item.source, access) as client:
            return backup_redis.take_snapshot(client, target)
    if item.kind == "sqlite":
        _copy_sqlite(item.path, target)
    elif item.kind == "file":
        shutil.copyfile(item.path, target)
    else:
        shutil.copytree(item.path, target, ignore=lambda folder, names: [  # a link is not followed out of the store
            n for n in names if (Path(folder) / n).is_symlink()])
    return None


@contextmanager
def _redis(where: str, url: str, access: RedisAccess | None) -> Iterator[redis.Redis]:
    """A client of the Redis at `url`, its errors one line naming `where` and never the password."""
    if access is None:
        raise BackupError(f"{where}: no password for redis (--redis-password-env)")
    if access.ca_file is not None and not url.startswith("rediss://"):
        raise BackupError(f"--redis-ca: {where} is plain redis://, not rediss:// (TLS)")
    try:
        client = backup_redis.connect(url, access)
        try:
            yield client
        finally:
            client.close()
    except redis.AuthenticationError as err:
        raise BackupError(f"{where}: redis refused the password ({type(err).__name__})") from None
    except redis.RedisError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise BackupError(f"{where}: redis at {url}: {type(err).__name__}: {first}") from None


def _files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def create_backup(items: Sequence[BackupItem], destination: Path, keep: int | None = None,
                  now: datetime | None = None, redis_access: RedisAccess | None = None) -> Path:
    """Copy `items` in order into a new folder under `destination`; returns it. With `keep`, the oldest backups
    beyond the newest `keep` are removed once the new one is whole. Redis items are reached with `redis_access`."""
    check_items(items)
    if keep is not None and keep < 1:
        raise BackupError(f"--keep: must be >= 1 (got {keep})")
    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging, final = destination / f".partial-{stamp}", destination / stamp
    if final.exists():
        raise BackupError(f"--to: {final} exists")
    staging.mkdir(mode=0o700)
    try:
        entries = []
        for item in items:
            target = staging / item.name
            keys = _copy(item, target, redis_access)
            for path in [target, *target.rglob("*")]:  # the owner's alone, as the folder is
                if not path.is_symlink():
                    path.chmod(0o700 if path.is_dir() else 0o600)
            files = [{"path": str(p.relative_to(staging)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in _files(target)]
            for p in _files(target):
                _fsync(p)
            source = item.source if item.kind == "redis" else str(item.path.resolve())
            entries.append({"name": item.name, "kind": item.kind, "source": source, "files": files,
                            **({"keys": keys} if keys is not None else {})})
        manifest = {"format": FORMAT, "created": now.isoformat(), "items": entries}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(staging / MANIFEST)
        staging.rename(final)
        _fsync(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep is not None:  # only whole backups of the same items; anything else in the folder is not ours to delete
        names = sorted(item.name for item in items)
        ours = sorted(p for p in destination.iterdir() if STAMP.match(p.name) and p.is_dir() and not p.is_symlink()
                      and _item_names(p) == names)
        for old in ours[:-keep]:
            shutil.rmtree(old)
    return final


def _item_names(backup: Path) -> list[str] | None:
    try:
        return sorted(item.name for item in read_manifest(backup))
    except BackupError:
        return None


@dataclass(frozen=True)
class BackedUpFile:
    path: str  # relative to the backup's folder
    bytes: int
    sha256: str


@dataclass(frozen=True)
class BackedUpItem:
    name: str
    kind: str
    source: str  # a path; for redis, a URL
    files: list[BackedUpFile]
    keys: int | None = None  # redis: how many keys the copy holds


def read_manifest(backup: Path) -> list[BackedUpItem]:
    """The items a backup holds, from its manifest, each checked to lie inside the backup: a name as `create`
    makes them, one kind of ours, and every file under its item's folder (a manifest is not trusted to point
    elsewhere: a backup volume may have been written by someone else)."""
    where = backup / MANIFEST
    try:
        manifest = json.loads(where.read_text())
        if manifest["format"] != FORMAT:
            raise BackupError(f"{where}: format {manifest['format']!r}, this version reads format {FORMAT}")
        items = [BackedUpItem(str(item["name"]), str(item["kind"]), str(item["source"]),
                              [BackedUpFile(str(f["path"]), int(f["bytes"]), str(f["sha256"])) for f in item["files"]],
                              int(item["keys"]) if "keys" in item else None)
                 for item in manifest["items"]]
    except FileNotFoundError:
        raise BackupError(f"{backup}: no {MANIFEST} (not a backup, or not a whole one)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BackupError(f"{where}: unreadable ({type(err).__name__})") from None
    for item in items:
        if (not NAME.match(item.name) or item.kind not in KINDS or (not item.files and item.kind != "folder")
                or (item.kind == "redis") != (item.keys is not None)):
            raise BackupError(f"{where}: item {item.name!r} is not one fl-backup makes")
        for entry in item.files:
            parts = Path(entry.path).parts
            single = item.kind != "folder" and entry.path == item.name
            inside = item.kind == "folder" and len(parts) > 1 and parts[0] == item.name and ".." not in parts
            if Path(entry.path).is_absolute() or not (single or inside):
                raise BackupError(f"{where}: item {item.name!r} lists {entry.path!r}, outside its own folder")
    return items


def verify_backup(backup: Path) -> list[str]:
    """Problems with a backup: a file missing, added, changed, or a SQLite copy that fails its integrity check."""
    problems: list[str] = []
    listed: set[str] = set()
    for item in read_manifest(backup):
        for entry in item.files:
            path = backup / entry.path
            listed.add(entry.path)
            if not path.is_file():
                problems.append(f"{entry.path}: missing")
            elif path.stat().st_size != entry.bytes or _sha256(path) != entry.sha256:
                problems.append(f"{entry.path}: changed since the backup was made")
            elif item.kind == "sqlite" and _integrity(path) != "ok":
                problems.append(f"{entry.path}: fails SQLite's integrity check")
            elif item.kind == "redis" and (problem := _snapshot_problem(path, item.keys)):
                problems.append(f"{entry.path}: {problem}")
    for path in _files(backup):
        relative = str(path.relative_to(backup))
        if relative != MANIFEST and relative not in listed:
            problems.append(f"{relative}: not in the manifest")
    problems += [f"{p.relative_to(backup)}: a symbolic link (fl-backup makes none)" for p in backup.rglob("*")
                 if p.is_symlink()]
    return problems


def _snapshot_problem(path: Path, keys: int | None) -> str | None:
    try:
        count = len(backup_redis.read_snapshot(path).keys)
    except ValueError as err:
        return str(err)
    return None if count == keys else f"holds {count} keys, the manifest {keys}"


def _integrity(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    except sqlite3.DatabaseError as err:
        return str(err)
    finally:
        db.close()


@dataclass(frozen=True)
class Restored:
    name: str
    target: str  # a path, or a Redis URL
    kept: str | None  # where what was there before is kept, if anything was


def restore_backup(backup: Path, targets: Mapping[str, str] | None = None, in_place: bool = False,
                   replace: bool = False, now: datetime | None = None,
                   redis_access: RedisAccess | None = None) -> list[Restored]:
    """Put each item of a verified backup at its target: `targets[name]`, or, with `in_place`, a file or folder
    where the manifest says it was backed up from (trust that only for a backup volume nobody else writes: a
    manifest is not signed). A Redis item needs its target: the password would go to whatever URL a manifest names.
    Everything is checked before anything is written: the backup whole, every item given a target, no target in
    the way unless `replace`, every Redis payload accepted by its target, and then what is replaced (a SQLite file
    with its WAL) is moved aside, not deleted. Restored files are the owner's alone (0600, folders 0700). Stop the
    services that write these files first: a running one would keep its open file. A Redis item writes its keys
    only, all or none; when some are there already, all of the gateway's keys there are first backed up into
    BACKUP.replaced/, a backup like any other. Keys there that the backup lacks are left as they are."""
    backup = backup.resolve()  # `restore .` keeps what it replaces beside the folder's own name
    problems = verify_backup(backup)
    if problems:
        raise BackupError(f"{backup}: does not verify: {problems[0]}")
    items = read_manifest(backup)
    targets = dict(targets or {})
    names = [item.name for item in items]
    for name in targets:
        if name not in names:
            raise BackupError(f"--to {name}: no such item in the backup (it has {', '.join(names)})")
    missing = [item for item in items if item.name not in targets and (not in_place or item.kind == "redis")]
    if missing and missing[0].kind == "redis" and in_place:
        raise BackupError(f"--to {missing[0].name}: a redis item is restored only to --to {missing[0].name}=URL, "
                          "never --in-place (the manifest is not signed: the password would go to the URL it names)")
    if missing:
        raise BackupError(f"--to {missing[0].name}: no target (give --to NAME=PATH for every item, or --in-place to "
                          "restore files and folders where the manifest says each came from)")
    plan = [(item, targets.get(item.name, item.source)) for item in items]
    for item, target in plan:
        if item.kind == "redis":
            _check_redis_target(backup, item, target, replace, redis_access)
            continue
        if "://" in target:
            raise BackupError(f"--to {item.name}: a {item.kind} item goes to a path, not a URL")
        in_the_way = [p for p in _with_side_files(Path(target), item.kind) if p.exists() or p.is_symlink()]
        if in_the_way and not replace:
            raise BackupError(f"{item.name}: {in_the_way[0]} exists (restore elsewhere with --to {item.name}=PATH, "
                              "or --replace to move it aside)")
    suffix = f".replaced-{(now or datetime.now(UTC)).strftime('%Y%m%dT%H%M%S%fZ')}"
    restored = []
    for item, target in plan:
        if item.kind == "redis":
            restored.append(_restore_redis(backup, item, target, replace, redis_access))
            continue
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(path.name + suffix)
        kept = None
        for existing, moved in zip(_with_side_files(path, item.kind), _with_side_files(aside, item.kind),
                                   strict=True):
            if existing.exists() or existing.is_symlink():
                existing.rename(moved)  # NAME.replaced-TIME and its NAME.replaced-TIME-wal: still one database
                kept = str(aside)
        staging = path.with_name(f".{path.name}.restoring")
        if staging.is_dir():
            shutil.rmtree(staging)
        staging.unlink(missing_ok=True)
        if item.kind == "folder":
            shutil.copytree(backup / item.name, staging)
            for copied in [staging, *staging.rglob("*")]:
                copied.chmod(0o700 if copied.is_dir() else 0o600)
        else:
            shutil.copyfile(backup / item.name, staging)
            staging.chmod(0o600)
        staging.rename(path)
        restored.append(Restored(item.name, target, kept))
    return restored


def _check_redis_target(backup: Path, item: BackedUpItem, url: str, replace: bool,
                        access: RedisAccess | None) -> None:
    """A Redis target: a URL without a password, reachable, accepting every payload, and holding none of the
    backup's keys unless `replace`."""
    problem = backup_redis.url_problem(url)
    if problem:
        raise BackupError(f"--to {item.name}: {problem}")
    snapshot = backup_redis.read_snapshot(backup / item.name)
    with _redis(f"--to {item.name}", url, access) as client:
        keys = backup_redis.to_write(client, snapshot)
        there = backup_redis.existing(client, keys)
        if there and not replace:
            raise _keys_in_the_way(item.name, there, len(keys), url)
        try:
            backup_redis.check_payloads(client, keys)
        except backup_redis.Refused as err:
            raise BackupError(f"{item.name}: {err}; nothing was restored") from None


def _keys_in_the_way(name: str, there: int, total: int, url: str) -> BackupError:
    return BackupError(f"{name}: {there} of its {total} keys are in {url} (restore elsewhere with --to {name}=URL, "
                       "or --replace to back them up and write over them)")


def _restore_redis(backup: Path, item: BackedUpItem, url: str, replace: bool, access: RedisAccess | None) -> Restored:
    snapshot = backup_redis.read_snapshot(backup / item.name)

    folder = backup.with_name(backup.name + ".replaced")

    def keep_aside() -> Path:
        try:
            return create_backup([BackupItem(item.name, "redis", url)], folder, redis_access=access)
        except OSError as err:  # a read-only backup volume, say: refused before anything is written
            raise BackupError(f"--replace {item.name}: cannot back up what it replaces into {folder} "
                              f"({err.strerror or type(err).__name__}); nothing was restored") from None

    with _redis(f"--to {item.name}", url, access) as client:
        try:
            kept = backup_redis.put_back(client, snapshot, replace, keep_aside)
        except backup_redis.Refused as err:  # a payload the check accepted, refused now
            raise BackupError(f"{item.name}: {err}; nothing was restored") from None
        except backup_redis.InTheWay:  # written there since the check
            keys = backup_redis.to_write(client, snapshot)
            raise _keys_in_the_way(item.name, backup_redis.existing(client, keys), len(keys), url) from None
    return Restored(item.name, url, str(kept) if kept else None)


def _with_side_files(target: Path, kind: str) -> list[Path]:
    """A path and, for SQLite, the WAL and shared-memory files that would otherwise be read into the restored file."""
    if kind != "sqlite":
        return [target]
    return [target, *(target.with_name(target.name + side) for side in SQLITE_SIDE_FILES)]
