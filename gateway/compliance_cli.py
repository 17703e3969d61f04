"""`fl-compliance`: the HIPAA §164.312 and GDPR controls a deployment's configuration meets, with the evidence.

    fl-compliance --values my-values.yaml                  # the production presets and the chart with your values
    fl-compliance --gateway +preset=production --gateway audit.retention_days=365 --json

Exit 0 when every required control is met, 1 when one is not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import yaml

from fl_core.config import ConfigError, compose_config, to_app_config
from fl_core.entry import OneLineParser, quiet_on_closed_pipe

from .compliance import controls, failed
from .config import compose_gateway_config

PRESET = "+preset=production"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fl-compliance", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", metavar="OVERRIDE",
                        help=f"an override of the gateway's config (default: {PRESET})")
    parser.add_argument("--training", action="append", metavar="OVERRIDE",
                        help=f"an override of the training config (default: {PRESET})")
    parser.add_argument("--chart", type=Path, default=Path("helm/federated-dp-llm"),
                        help="the Helm chart, for its default values")
    parser.add_argument("--values", type=Path, action="append", default=[], metavar="FILE",
                        help="a values file given to helm install, merged over the chart's as helm does")
    parser.add_argument("--json", action="store_true", help="one JSON object per control")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"fl-compliance: {message}", file=sys.stderr)
    raise SystemExit(2)


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of values: maps merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


def chart_values(chart: Path, files: list[Path]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option, path in (("--chart", chart / "values.yaml"), *(("--values", f) for f in files)):
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError:
            _fail(f"{option}: no such file: {path}")
        except yaml.YAMLError as err:
            _fail(f"{option}: {path} is not YAML ({type(err).__name__})")
        if not isinstance(loaded, dict):
            _fail(f"{option}: {path} does not hold a map of values")
        values = merged(values, loaded)
    return values


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    chart = chart_values(args.chart, args.values)
    try:
        gateway = compose_gateway_config(args.gateway or [PRESET], check_files=False)
    except ConfigError as err:
        _fail(f"--gateway: {err}")
    try:
        training = to_app_config(compose_config(args.training or [PRESET]))
    except ConfigError as err:
        _fail(f"--training: {err}")
    found = controls(gateway, training, chart)
    for control in found:
        if args.json:
            print(json.dumps(asdict(control)))
        else:
            print(f"{control.status.upper():<8} {control.framework:<5} {control.ref:<20} {control.title}"
                  f"{' (addressable)' if not control.required and control.status != 'n/a' else ''}: "
                  f"{control.evidence}")
    missing = failed(found)
    if not args.json:
        print(f"{len(found)} controls: {sum(c.status == 'met' for c in found)} met, {len(missing)} required not met")
    raise SystemExit(1 if missing else 0)


if __name__ == "__main__":
    main()
