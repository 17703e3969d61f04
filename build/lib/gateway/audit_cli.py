"""`fl-audit`: verify the audit chain, seal its head, prune past retention, show records, or make a new key.

The keys come from the environment variables the gateway uses (or from files named by NAME_FILE): every command
needs the chain key, because the chain is keyed; only `show --decrypt` needs the text key, because the text is
encrypted under it. A privacy officer who verifies the log is given the chain key alone and reads no patient text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from cryptography.fernet import Fernet

from fl_core.config import ConfigError
from fl_core.entry import OneLineParser, quiet_on_closed_pipe

from .audit import AuditKeyError, AuditKeys, AuditLog, AuditTampered
from .config import AuditConfig, secret_from_env

DEFAULTS = AuditConfig()


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fl-audit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, text in (("verify", "check the whole chain and its sealed head; exit 1 on any edit, deletion, "
                                  "reordering, truncation or rollback"),
                       ("seal", "seal the log's newest record as its head, once the chain verifies (a log from "
                                "before sealed heads, or a lost head volume)"),
                       ("prune", "verify, then delete records older than --days, keeping the chain verifiable"),
                       ("show", "print records as JSON lines")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--log", type=Path, default=Path(DEFAULTS.path), help="the audit database")
        cmd.add_argument("--head", type=Path, default=Path(DEFAULTS.head_path), help="the sealed head")
        cmd.add_argument("--chain-key-env", default=DEFAULTS.chain_key_env,
                         help="environment variable holding the chain key")
    sub.choices["verify"].add_argument(
        "--at-least", type=int, default=0, metavar="SEQ",
        help="also fail unless the log reaches record SEQ (the audit_sealed_seq metric Prometheus last scraped: a "
             "witness kept outside the gateway's volumes)")
    sub.choices["prune"].add_argument("--days", type=int, default=DEFAULTS.retention_days)
    show = sub.choices["show"]
    show.add_argument("--decrypt", action="store_true", help="include request text (needs the text key)")
    show.add_argument("--text-key-env", default=DEFAULTS.text_key_env,
                      help="environment variable holding the text key")
    sub.add_parser("new-key", help="print a new key (make one for the chain and another for the text; store them "
                                   "as secrets, never in the repository)")
    return parser


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"fl-audit: {message}", file=sys.stderr)
    raise SystemExit(code)


def _open(args: argparse.Namespace) -> AuditLog:
    if not args.log.is_file():
        _fail(f"--log: no such file: {args.log}")
    try:
        chain = secret_from_env(args.chain_key_env, "--chain-key-env")
        text = secret_from_env(args.text_key_env, "--text-key-env") if getattr(args, "decrypt", False) else None
    except ConfigError as err:
        _fail(str(err))
    try:
        keys = AuditKeys.from_secrets(chain, text)
    except AuditKeyError as err:
        _fail(f"{'--text-key-env' if 'text key' in str(err) else '--chain-key-env'}: {err}")
    return AuditLog(args.log, keys, args.head)


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "new-key":
        print(Fernet.generate_key().decode())
        return
    if args.command == "prune" and args.days < 1:
        _fail(f"--days: must be >= 1 (got {args.days})")
    log = _open(args)
    try:
        if args.command == "verify":
            count, problems = log.verify()
            reached = log.tail().seq
            if reached < args.at_least:
                problems.append(f"records {reached + 1}-{args.at_least}: missing from the end (--at-least)")
            for problem in problems:
                print(f"TAMPERED: {problem}")
            print(f"{args.log}: {count} records up to record {reached}, "
                  f"{'chain intact' if not problems else f'{len(problems)} problems'}")
            raise SystemExit(1 if problems else 0)
        if args.command == "seal":
            print(f"{args.head}: sealed at record {log.seal()}")
        elif args.command == "prune":
            print(f"{args.log}: pruned {log.prune(args.days)} records older than {args.days} days")
        else:
            for record in log.records(decrypt=args.decrypt):
                print(json.dumps(record))
    except AuditTampered as err:
        _fail(str(err), code=1)


if __name__ == "__main__":
    main()
