"""Backups of what must outlive a crash: each hospital's ledger, the gateway's audit log, its sealed head and its
limits, the SuperLink's state, MLflow's store and artifacts.

A SQLite file is copied with SQLite's online backup (one read transaction: a consistent snapshot while its service
keeps writing, WAL or not), never by copying the file, which can tear a page or miss the WAL. Plain files and
folders are copied as they are. Items are copied one after another in the order given, which matters where two
items describe one state: a sealed audit head copied before its log is never ahead of the copied log (the log only
grows), and MLflow's database copied before its artifacts finds every artifact of a run it holds as finished.

A backup is a folder named by its time, made under a hidden name and renamed when whole, with a manifest of every
file's SHA-256; `verify_backup` rechecks them and SQLite's integrity. `restore_backup` verifies first, refuses to
write over anything unless told to replace it, and then keeps what it replaces beside it, so a restore loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

MANIFEST = "manifest.json"
FORMAT = 1
KINDS = ("sqlite", "file", "folder")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
STAMP = re.compile(r"^\d{8}T\d{12}Z$")  # a backup folder's name: only these are ever pruned by --keep
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

Kind = Literal["sqlite", "file", "folder"]


class BackupError(ValueError):
    """A backup cannot be made, verified or restored; the message names the item or option."""


@dataclass(frozen=True)
class BackupItem:
    name: str
    kind: Kind
    path: Path


def parse_item(kind: Kind, spec: str) -> BackupItem:
    """NAME=PATH, as the command line and the chart's CronJob give an item."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise BackupError(f"--{kind} {spec!r}: expected NAME=PATH")
    if not NAME.match(name):
        raise BackupError(f"--{kind} {name!r}: a name is lower-case letters, digits, '.', '_' or '-'")
    return BackupItem(name, kind, Path(path))


def check_items(items: Sequence[BackupItem]) -> None:
    """Every item before any is copied: names unique, each source present and of its kind."""
    if not items:
        raise BackupError("nothing to back up: give --sqlite, --file or --folder items")
    seen: set[str] = set()
    for item in items:
        where = f"--{item.kind} {item.name}"
        if item.name in seen or item.name == MANIFEST:
            raise BackupError(f"{where}: the name is given twice" if item.name in seen else
                              f"{where}: {MANIFEST} is the backup's own file")
        seen.add(item.name)
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


def _copy(item: BackupItem, target: Path) -> None:
    if item.kind == "sqlite":
        _copy_sqlite(item.path, target)
    elif item.kind == "file":
        shutil.copyfile(item.path, target)
    else:
        shutil.copytree(item.path, target, ignore=lambda folder, names: [  # a link is not followed out of the store
            n for n in names if (Path(folder) / n).is_symlink()])


def _files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def create_backup(items: Sequence[BackupItem], destination: Path, keep: int | None = None,
                  now: datetime | None = None) -> Path:
    """Copy `items` in order into a new folder under `destination`; returns it. With `keep`, the oldest backups
    beyond the newest `keep` are removed once the new one is whole."""
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
            _copy(item, target)
            for path in [target, *target.rglob("*")]:  # the owner's alone, as the folder is
                if not path.is_symlink():
                    path.chmod(0o700 if path.is_dir() else 0o600)
            files = [{"path": str(p.relative_to(staging)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in _files(target)]
            for p in _files(target):
                _fsync(p)
            entries.append({"name": item.name, "kind": item.kind, "source": str(item.path.resolve()),
                            "files": files})
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
    source: Path
    files: list[BackedUpFile]


def read_manifest(backup: Path) -> list[BackedUpItem]:
    """The items a backup holds, from its manifest, each checked to lie inside the backup: a name as `create`
    makes them, one kind of ours, and every file under its item's folder (a manifest is not trusted to point
    elsewhere: a backup volume may have been written by someone else)."""
    where = backup / MANIFEST
    try:
        manifest = json.loads(where.read_text())
        if manifest["format"] != FORMAT:
            raise BackupError(f"{where}: format {manifest['format']!r}, this version reads format {FORMAT}")
        items = [BackedUpItem(str(item["name"]), str(item["kind"]), Path(item["source"]),
                              [BackedUpFile(str(f["path"]), int(f["bytes"]), str(f["sha256"])) for f in item["files"]])
                 for item in manifest["items"]]
    except FileNotFoundError:
        raise BackupError(f"{backup}: no {MANIFEST} (not a backup, or not a whole one)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BackupError(f"{where}: unreadable ({type(err).__name__})") from None
    for item in items:
        if not NAME.match(item.name) or item.kind not in KINDS or (not item.files and item.kind != "folder"):
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
    for path in _files(backup):
        relative = str(path.relative_to(backup))
        if relative != MANIFEST and relative not in listed:
            problems.append(f"{relative}: not in the manifest")
    problems += [f"{p.relative_to(backup)}: a symbolic link (fl-backup makes none)" for p in backup.rglob("*")
                 if p.is_symlink()]
    return problems


def _integrity(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    except sqlite3.DatabaseError as err:
        return str(err)
    finally:
        db.close()


def restore_backup(backup: Path, targets: Mapping[str, Path] | None = None, in_place: bool = False,
                   replace: bool = False, now: datetime | None = None) -> list[tuple[str, Path]]:
    """Put each item of a verified backup at its target: `targets[name]`, or, with `in_place`, where the manifest
    says it was backed up from (trust that only for a backup volume nobody else writes: a manifest is not signed).
    Everything is checked before anything is written: the backup whole, every item given a target, no target in
    the way unless `replace`, and then what is replaced (a SQLite file with its WAL) is moved aside, not deleted.
    Restored files are the owner's alone (0600, folders 0700). Stop the services that write these files first: a
    running one would keep its open file. Returns (name, path)."""
    problems = verify_backup(backup)
    if problems:
        raise BackupError(f"{backup}: does not verify: {problems[0]}")
    items = read_manifest(backup)
    targets = dict(targets or {})
    names = [item.name for item in items]
    for name in targets:
        if name not in names:
            raise BackupError(f"--to {name}: no such item in the backup (it has {', '.join(names)})")
    missing = [name for name in names if name not in targets and not in_place]
    if missing:
        raise BackupError(f"--to {missing[0]}: no target (give --to NAME=PATH for every item, or --in-place to "
                          "restore where the manifest says each came from)")
    plan = [(item, targets.get(item.name, item.source)) for item in items]
    for item, target in plan:
        in_the_way = [p for p in _with_side_files(target, item.kind) if p.exists() or p.is_symlink()]
        if in_the_way and not replace:
            raise BackupError(f"{item.name}: {in_the_way[0]} exists (restore elsewhere with --to {item.name}=PATH, "
                              "or --replace to move it aside)")
    suffix = f".replaced-{(now or datetime.now(UTC)).strftime('%Y%m%dT%H%M%S%fZ')}"
    restored = []
    for item, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        aside = target.with_name(target.name + suffix)
        for existing, moved in zip(_with_side_files(target, item.kind), _with_side_files(aside, item.kind),
                                   strict=True):
            if existing.exists() or existing.is_symlink():
                existing.rename(moved)  # NAME.replaced-TIME and its NAME.replaced-TIME-wal: still one database
        staging = target.with_name(f".{target.name}.restoring")
        if staging.is_dir():
            shutil.rmtree(staging)
        staging.unlink(missing_ok=True)
        if item.kind == "folder":
            shutil.copytree(backup / item.name, staging)
            for path in [staging, *staging.rglob("*")]:
                path.chmod(0o700 if path.is_dir() else 0o600)
        else:
            shutil.copyfile(backup / item.name, staging)
            staging.chmod(0o600)
        staging.rename(target)
        restored.append((item.name, target))
    return restored


def _with_side_files(target: Path, kind: str) -> list[Path]:
    """A path and, for SQLite, the WAL and shared-memory files that would otherwise be read into the restored file."""
    if kind != "sqlite":
        return [target]
    return [target, *(target.with_name(target.name + side) for side in SQLITE_SIDE_FILES)]
