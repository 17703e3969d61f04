"""`fl-audit`: verify the audit chain, prune past retention, show records, or make a new audit key.

The key comes from the environment variable the gateway uses (FL_AUDIT_KEY by default): verifying needs it,
because the chain is keyed; showing request text needs it, because the text is encrypted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from cryptography.fernet import Fernet

from fl_core.entry import OneLineParser

from .audit import AuditKeyError, AuditLog


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fl-audit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, text in (("verify", "check the whole chain; exit 1 on any edit, deletion or reordering"),
                       ("prune", "delete records older than --days, keeping the chain verifiable"),
                       ("show", "print records as JSON lines")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--log", type=Path, default=Path("audit.sqlite"), help="the audit database")
        cmd.add_argument("--key-env", default="FL_AUDIT_KEY", help="environment variable holding the key")
    sub.choices["prune"].add_argument("--days", type=int, default=2555)
    sub.choices["show"].add_argument("--decrypt", action="store_true", help="include request text")
    sub.add_parser("new-key", help="print a new audit key (store it as a secret, never in the repository)")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"fl-audit: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "new-key":
        print(Fernet.generate_key().decode())
        return
    if not args.log.is_file():
        _fail(f"--log: no such file: {args.log}")
    key = os.environ.get(args.key_env, "")
    if not key:
        _fail(f"--key-env: environment variable {args.key_env} is not set")
    try:
        log = AuditLog(args.log, key)
    except AuditKeyError as err:
        _fail(f"--key-env: {err}")
    if args.command == "verify":
        count, problems = log.verify()
        for problem in problems:
            print(f"TAMPERED: {problem}")
        print(f"{args.log}: {count} records, {'chain intact' if not problems else f'{len(problems)} problems'}")
        raise SystemExit(1 if problems else 0)
    if args.command == "prune":
        if args.days < 1:
            _fail(f"--days: must be >= 1 (got {args.days})")
        print(f"{args.log}: pruned {log.prune(args.days)} records older than {args.days} days")
        return
    for record in log.records(decrypt=args.decrypt):
        print(json.dumps(record))


if __name__ == "__main__":
    main()
