"""`fl-backup`: consistent copies of a deployment's state while it runs, checked, and restored.

    fl-backup create --to /backups --file audit-head=/heads/audit.head --sqlite audit=/data/audit.db \\
        --sqlite limits=/data/limits.db --keep 14
    fl-backup verify /backups/20261207T020000000000Z
    fl-backup restore /backups/20261207T020000000000Z --to audit=/restore/audit.db --to audit-head=/restore/head
    FL_GATEWAY_REDIS_PASSWORD_FILE=/run/secrets/redis fl-backup create --to /backups --redis limits=redis://redis:6379/0

Items are copied in the order given: a sealed head before its audit log, MLflow's database before its artifacts.
A Redis is reached with the password the gateway uses, from the environment variable --redis-password-env names (or
a file named by NAME_FILE), never from the command line. After a restore, check the domain's own invariants too:
`fl-audit verify` on the restored log and head, and `fl-ledger show` balances against the last report.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from gateway.config import LimitsConfig, secret_from_env

from .backup import (
    NAME,
    BackupError,
    BackupItem,
    create_backup,
    parse_item,
    read_manifest,
    restore_backup,
    verify_backup,
)
from .backup_redis import RedisAccess
from .config import ConfigError
from .entry import OneLineParser, quiet_on_closed_pipe


def _item(kind: str, spec: str) -> BackupItem:
    try:
        return parse_item(kind, spec)  # type: ignore[arg-type]
    except BackupError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _target(spec: str) -> tuple[str, str]:
    name, sep, target = spec.partition("=")
    if not sep or not NAME.match(name) or not target:
        shown = f" {name}" if NAME.match(name) else ""  # anything else might be a URL that holds a password
        raise argparse.ArgumentTypeError(f"--to{shown}: expected NAME=PATH (or NAME=URL for a redis item)")
    return name, target


def _redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-password-env", default=LimitsConfig.redis_password_env, metavar="NAME",
                        help="environment variable holding the password of the gateway's Redis, or NAME_FILE a file "
                             "that does (default: the gateway's, %(default)s)")
    parser.add_argument("--redis-ca", type=Path, default=None, metavar="FILE",
                        help="for rediss://: the CA that signed Redis's certificate (default: the system's CAs)")


def _redis_access(args: argparse.Namespace) -> RedisAccess:
    """The password as the gateway reads it (gateway.config.secret_from_env), asked for only when a Redis is."""
    if args.redis_ca is not None and not args.redis_ca.is_file():
        raise BackupError(f"--redis-ca: no such file: {args.redis_ca}")
    return RedisAccess(secret_from_env(args.redis_password_env, "--redis-password-env"), args.redis_ca)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fl-backup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    create = sub.add_parser("create", help="copy the items, in order, into a new folder under --to")
    create.add_argument("--to", type=Path, required=True, help="the folder that holds the backups")
    for kind, text in (("sqlite", "a SQLite database, copied by SQLite's online backup"),
                       ("file", "a plain file (the audit log's sealed head)"),
                       ("folder", "a folder (MLflow's artifacts)"),
                       ("redis", "the gateway's limits and privacy spend in a Redis (redis://HOST:PORT/DB, or "
                                 "rediss://), its keys as of one instant")):
        create.add_argument(f"--{kind}", dest="items", action="append", type=partial(_item, kind), default=[],
                            metavar="NAME=URL" if kind == "redis" else "NAME=PATH", help=text)
    _redis_options(create)
    create.add_argument("--keep", type=int, default=None, help="keep only the newest KEEP backups under --to")
    verify = sub.add_parser("verify", help="check every file of a backup against its manifest and SQLite's "
                                           "integrity check; exit 1 on any problem")
    verify.add_argument("backup", type=Path)
    restore = sub.add_parser("restore", help="verify a backup, then put its items back (stop their services first)")
    restore.add_argument("backup", type=Path)
    restore.add_argument("--to", dest="targets", action="append", type=_target, default=[], metavar="NAME=PATH",
                         help="where item NAME goes, a Redis URL for a redis item (one for every item, unless "
                              "--in-place)")
    restore.add_argument("--in-place", action="store_true",
                         help="files and folders without --to go where the manifest says they came from (only for "
                              "a backup volume nobody else writes: a manifest is not signed); a redis item always "
                              "needs --to NAME=URL")
    restore.add_argument("--replace", action="store_true",
                         help="move what is at a target aside (NAME.replaced-TIME; a Redis's keys into a backup in "
                              "BACKUP.replaced/) instead of refusing")
    _redis_options(restore)
    return parser


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "create":
            access = _redis_access(args) if any(item.kind == "redis" for item in args.items) else None
            print(create_backup(args.items, args.to, keep=args.keep, redis_access=access))
        elif args.command == "verify":
            problems = verify_backup(args.backup)
            for problem in problems:
                print(f"BAD: {problem}")
            print(f"{args.backup}: {'intact' if not problems else f'{len(problems)} problems'}")
            raise SystemExit(1 if problems else 0)
        else:
            redis = any(item.kind == "redis" for item in read_manifest(args.backup))
            for done in restore_backup(args.backup, dict(args.targets), in_place=args.in_place, replace=args.replace,
                                       redis_access=_redis_access(args) if redis else None):
                kept = f" (what was there is kept in {done.kept})" if done.kept else ""
                print(f"{done.name}: restored to {done.target}{kept}")
    except (BackupError, ConfigError) as err:
        print(f"fl-backup: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
