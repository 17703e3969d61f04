"""`fl-ledger`: a hospital's privacy officer reads, exports and caps the node's lifetime privacy spend.

Without `--ledger`, it reads every hospital folder under the node home (`FEDERATED_DP_LLM_NODE_HOME`), which is where
simulated hospitals keep theirs; a real node passes its state folder's `ledger.sqlite`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from fl_client.node import LEDGER_FILE, node_home
from fl_core.entry import quiet_on_closed_pipe

from .ledger import ABORTED, ANY_DATASET, RESERVED, Ledger, LedgerError, check_erasure_reference


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        print(f"fl-ledger: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fl-ledger", description="Lifetime privacy spend of a hospital's node.")
    parser.add_argument("--ledger", type=Path, action="append",
                        help="ledger file (repeatable); default: every hospital under the node home")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    show = commands.add_parser("show", help="lifetime balance per hospital and dataset")
    show.add_argument("--json", action="store_true")
    history = commands.add_parser("history", help="every run's entry and every refused run, oldest first")
    history.add_argument("--hospital")
    reservations = commands.add_parser("reservations", help="open reservations, with how long their run has been "
                                                            "silent (a node expires them after its "
                                                            "reservation-timeout)")
    reservations.add_argument("--json", action="store_true")
    export = commands.add_parser("export", help="every entry, for audit")
    fmt = export.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--json", action="store_true")
    budget = commands.add_parser("set-budget", help="cap a hospital's lifetime epsilon")
    budget.add_argument("hospital")
    budget.add_argument("epsilon", type=float)
    budget.add_argument("--delta", type=float, default=1e-5)
    budget.add_argument("--dataset", default=ANY_DATASET, help="one dataset only (default: each dataset)")
    abort = commands.add_parser("abort", help="close a crashed run's open reservations, keeping what it spent")
    abort.add_argument("run_id")
    erasure = commands.add_parser("note-erasure", help="record that a patient's records were erased from a "
                                                       "dataset, with the epsilon that bounds their influence on "
                                                       "every run before (README, Operations)")
    erasure.add_argument("hospital")
    erasure.add_argument("dataset")
    erasure.add_argument("reference", help="the request's ticket number (never a patient's name or record id)")
    erasures = commands.add_parser("erasures", help="every erasure noted, oldest first")
    erasures.add_argument("--json", action="store_true")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"fl-ledger: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _ledgers(args: argparse.Namespace) -> list[Ledger]:
    if args.ledger:
        missing = [p for p in args.ledger if not p.is_file()]
        if missing and args.command != "set-budget":
            _fail(f"--ledger: {missing[0]} does not exist")
        return [Ledger(p) for p in args.ledger]
    if args.command == "set-budget":
        return [Ledger(node_home() / args.hospital / LEDGER_FILE)]
    if args.command == "note-erasure":  # the hospital's existing ledger: an erasure never makes one
        path = node_home() / args.hospital / LEDGER_FILE
        if not path.is_file():
            _fail(f"{args.hospital}: no ledger at {path}; pass --ledger PATH")
        return [Ledger(path)]
    found = sorted(node_home().glob(f"*/{LEDGER_FILE}"))
    if not found:
        _fail(f"no ledger under {node_home()}; pass --ledger PATH")
    return [Ledger(p) for p in found]


def _number(value: object) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return "-" if value is None else str(value)


def _show(ledgers: list[Ledger], as_json: bool) -> None:
    rows = [b.as_row() for ledger in ledgers for b in ledger.balances()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'hospital':<16}{'dataset':<12}{'lifetime eps':>13}{'at delta':>10}{'summed eps':>12}"
          f"{'budget':>9}{'remaining':>11}{'runs':>6}{'open':>6}")
    for r in rows:
        print(f"{r['hospital']:<16}{r['dataset']:<12}{_number(r['rdp_epsilon']):>13}{r['delta']:>10.0e}"
              f"{_number(r['summed_epsilon']):>12}{_number(r['budget_epsilon']):>9}"
              f"{_number(r['remaining_epsilon']):>11}{r['runs']:>6}{r['open_reservations']:>6}")


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "set-budget":  # checked before any ledger file is opened or created
        if not (math.isfinite(args.epsilon) and args.epsilon > 0):
            _fail(f"EPSILON must be > 0, got {args.epsilon}")
        if not 0 < args.delta < 1:
            _fail(f"--delta must be in (0, 1), got {args.delta}")
    try:
        if args.command == "note-erasure":
            check_erasure_reference(args.reference)
    except LedgerError as err:
        _fail(str(err))
    ledgers = _ledgers(args)
    try:
        if args.command == "show":
            _show(ledgers, args.json)
        elif args.command == "history":
            for ledger in ledgers:
                lines = [(e.created_at, f"{e.created_at}  {e.hospital:<14} {e.dataset:<11} {e.run_id:<34} "
                          f"{e.status:<9} epsilon {_number(e.epsilon)} of planned {_number(e.planned_epsilon)} at "
                          f"delta {e.delta:g}, sigma {e.noise_multiplier:.4f}, q {e.sample_rate:.4g}, "
                          f"{e.spent.steps} steps" + (f" ({e.closed_reason})" if e.closed_reason else ""))
                         for e in ledger.entries(args.hospital)]
                lines += [(str(r["at"]), f"{r['at']}  {r['hospital']:<14} {r['dataset']:<11} {r['run_id'] or '-':<34} "
                           f"refused   {r['reason']}") for r in ledger.refusals(args.hospital)]
                for _, line in sorted(lines):
                    print(line)
        elif args.command == "reservations":
            now = datetime.now(UTC)
            rows: list[dict[str, object]] = [
                    {"hospital": e.hospital, "dataset": e.dataset, "run_id": e.run_id, "flower_run": e.flower_run,
                     "silent_seconds": round((now - datetime.fromisoformat(e.updated_at)).total_seconds()),
                     "planned_epsilon": e.planned_epsilon, "spent_epsilon": e.epsilon, "delta": e.delta}
                    for ledger in ledgers for e in ledger.entries() if e.status == RESERVED]
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in [] if args.json else rows:
                print(f"{r['hospital']!s:<16}{r['dataset']!s:<12}{r['run_id']!s:<36}silent "
                      f"{r['silent_seconds']!s:>7} s  planned epsilon {_number(r['planned_epsilon'])}, "
                      f"spent {_number(r['spent_epsilon'])}")
        elif args.command == "export":
            entries = [e.as_row() for ledger in ledgers for e in ledger.entries()]
            if args.json:
                print(json.dumps(entries, indent=2))
            elif entries:
                writer = csv.DictWriter(sys.stdout, fieldnames=list(entries[0]))
                writer.writeheader()
                writer.writerows(entries)
        elif args.command == "set-budget":
            for ledger in ledgers:
                ledger.set_budget(args.hospital, args.epsilon, args.delta, args.dataset)
            print(f"{args.hospital}: lifetime budget epsilon {args.epsilon:g} at delta {args.delta:g} "
                  f"({'every dataset' if args.dataset == ANY_DATASET else args.dataset})")
        elif args.command == "abort":
            closed = [ledger.close(e.run_id, e.hospital, e.dataset, ABORTED) for ledger in ledgers
                      for e in ledger.entries() if e.run_id == args.run_id and e.status == RESERVED]
            if not closed:
                _fail(f"run {args.run_id} has no open reservation")
            for e in closed:
                print(f"{e.hospital}/{e.dataset}: run {e.run_id} aborted; it keeps epsilon {_number(e.epsilon)}")
        elif args.command == "note-erasure":
            for ledger in ledgers:
                row = ledger.note_erasure(args.hospital, args.dataset, args.reference)
                print(f"{args.hospital}/{args.dataset}: erasure {args.reference} noted; the erased records' influence "
                      f"on the {row['runs']} runs before it is bounded by epsilon {_number(row['rdp_epsilon'])} at "
                      f"delta {row['delta']:g}")
        elif args.command == "erasures":
            noted = [row for ledger in ledgers for row in ledger.erasures()]
            if args.json:
                print(json.dumps(noted, indent=2))
            for r in [] if args.json else noted:
                print(f"{r['at']}  {r['hospital']!s:<14} {r['dataset']!s:<11} {r['reference']!s:<24} "
                      f"{r['runs']} runs, epsilon {_number(r['rdp_epsilon'])} at delta {r['delta']:g}")
    except LedgerError as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
