"""`fl-privacy`: a privacy officer plans a run's noise before any training happens (`calibrate`), and checks a
configuration's claim empirically (`audit`: a one-run canary audit in a real federated run; the audit itself lives
in `fl_server.privacy_audit`, since it runs Flower, and loads only for that command)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NoReturn

from fl_core.entry import quiet_on_closed_pipe

ACCOUNTANTS = ("pld", "rdp")  # privacy.accountant.ACCOUNTANTS, without importing them before arguments check


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, non-zero exit, no usage dump
        print(f"fl-privacy: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fl-privacy", description="Differential-privacy planning for federated-dp-llm.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cal = commands.add_parser("calibrate", help="noise multiplier for a target epsilon, or epsilon for a sigma")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon over all planned steps")
    target.add_argument("--noise-multiplier", type=float, help="fixed sigma: report the epsilon it gives")
    cal.add_argument("--delta", type=float, required=True)
    cal.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    plan = cal.add_argument_group("the run's plan, as a training run derives its sampling from it")
    plan.add_argument("--examples", type=int, help="the hospital's training records (train.max_examples, or all)")
    plan.add_argument("--batch-size", type=int, help="expected Poisson batch (train.batch_size)")
    plan.add_argument("--epochs", type=int, default=1, help="local epochs per round (train.local_epochs; default 1)")
    plan.add_argument("--rounds", type=int, help="federated rounds (federation.num_rounds)")
    raw = cal.add_argument_group("or the sampling itself")
    raw.add_argument("--sample-rate", type=float, help="Poisson sampling rate (1 / ceil(examples / batch))")
    raw.add_argument("--steps", type=int, help="total DP-SGD steps across all rounds")
    aud = commands.add_parser("audit", help="empirical epsilon lower bound of a configuration, from canaries in a "
                                            "real federated run (Steinke, Nasr & Jagielski 2023)")
    aud.add_argument("--canaries", type=int, default=1000, help="canaries given to each audited hospital")
    aud.add_argument("--confidence", type=float, default=0.95)
    aud.add_argument("--sabotage", choices=("none", "no-noise"), default="none",
                     help="no-noise: audit a deliberately broken product (no DP noise, same claims): shows the power")
    aud.add_argument("--output", type=Path, default=Path("outputs") / "audit", help="folder for the run and audit")
    aud.add_argument("overrides", nargs="*", help="Hydra overrides of the audited run's config")
    return parser


def _check(ok: bool, message: str) -> None:
    if not ok:
        print(f"fl-privacy: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _audit(args: argparse.Namespace) -> None:
    _check(0 < args.confidence < 1, f"--confidence must be strictly between 0 and 1, got {args.confidence}")
    _check(args.canaries >= 40, f"--canaries must be at least 40, got {args.canaries}")
    from fl_core.config import ConfigError
    from fl_server.privacy_audit import audit_from_cli

    from .audit import AuditError

    try:
        audit_from_cli(list(args.overrides), args.output.resolve(), args.canaries, args.confidence, args.sabotage)
    except (ConfigError, AuditError) as err:
        _check(False, str(err))


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        _audit(args)
        return
    from .accountant import NEIGHBOURING_RELATION
    from .calibration import UnreachableTarget, calibrate_noise, epsilon_for

    _check(0 < args.delta < 1, f"--delta must be in (0, 1), got {args.delta}")
    _sampling(args)
    if args.epsilon is not None:
        _check(math.isfinite(args.epsilon) and args.epsilon > 0, f"--epsilon must be > 0, got {args.epsilon}")
        try:
            sigma = calibrate_noise(args.epsilon, args.delta, args.sample_rate, args.steps, kind=args.accountant)
        except UnreachableTarget as err:
            _check(False, f"--epsilon: {err}")
    else:
        _check(args.noise_multiplier > 0, f"--noise-multiplier must be > 0, got {args.noise_multiplier}")
        sigma = args.noise_multiplier
    epsilon = epsilon_for(sigma, args.delta, args.sample_rate, args.steps, args.accountant)
    planned = {"examples": args.examples, "batch_size": args.batch_size, "epochs": args.epochs,
               "rounds": args.rounds} if args.examples is not None else {}
    print(json.dumps({
        "noise_multiplier": sigma, "epsilon": epsilon, "target_epsilon": args.epsilon, "delta": args.delta,
        **planned, "sample_rate": args.sample_rate, "steps": args.steps, "accountant": args.accountant,
        "neighbouring_relation": NEIGHBOURING_RELATION,
    }, indent=2))


def _sampling(args: argparse.Namespace) -> None:
    """Fill in `sample_rate` and `steps`: given, or derived from the run's plan by the training's own rule."""
    from .calibration import sampling_plan

    plan = {"--examples": args.examples, "--batch-size": args.batch_size, "--rounds": args.rounds}
    if args.sample_rate is None and args.steps is None:
        for option, value in plan.items():
            _check(value is not None, f"{option} is required (or give --sample-rate and --steps)")
            _check(value >= 1, f"{option} must be >= 1, got {value}")
        _check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
        sampling = sampling_plan(args.examples, args.batch_size, args.epochs, args.rounds)
        args.sample_rate, args.steps = sampling.sample_rate, sampling.total_steps
        return
    given = [option for option, value in plan.items() if value is not None]
    _check(not given, f"{given[0] if given else ''}: give the run's plan or --sample-rate and --steps, not both")
    _check(args.sample_rate is not None, "--sample-rate is required with --steps")
    _check(args.steps is not None, "--steps is required with --sample-rate")
    _check(0 < args.sample_rate <= 1, f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    _check(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")


if __name__ == "__main__":
    main()
