"""The run's privacy report, in JSON for machines and Markdown for a privacy officer, logged with the run.

It states which guarantee holds for which unit (a record; a hospital when hospital-level DP is on), every number
as an accountant computed it (each hospital's own, re-checked by the server, and the server's hospital-level one),
the secure-aggregation parameters, who refused the run and why, and each hospital's ledger balance afterwards.
"""

from __future__ import annotations

import math
from typing import Any

from fl_core.config import AppConfig
from privacy.calibration import epsilon_for

from .admission import Admission, Answers

HOSPITAL_LEVEL_SAMPLE_RATE = 1.0  # every admitted hospital takes part in every round: no amplification claimed


def hospital_level_epsilon(cfg: AppConfig, rounds: int) -> float:
    """epsilon for one hospital's whole dataset after `rounds` noised aggregates (Gaussian mechanism, RDP)."""
    c = cfg.privacy.client_level
    return epsilon_for(c.noise_multiplier, c.delta, HOSPITAL_LEVEL_SAMPLE_RATE, rounds, "rdp") if rounds else 0.0


def build_report(cfg: AppConfig, run_id: str, spend: dict[str, dict[str, float]], rounds: int,
                 admission: Admission | None, closing: Answers) -> dict[str, Any]:
    p, c, sa = cfg.privacy, cfg.privacy.client_level, cfg.strategy.secagg
    guarantees: list[dict[str, Any]] = [{
        "unit_of_privacy": f"one training example ({cfg.data.name} text) in one hospital's dataset",
        "mechanism": "DP-SGD (Opacus): per-example clipping, Gaussian noise, Poisson sampling" if p.enabled
        else "none: this run trained without DP-SGD",
        "delta": p.delta, "accountant": p.accountant, "max_grad_norm": p.max_grad_norm,
        "target_epsilon": p.target_epsilon if p.enabled and p.noise_multiplier is None else None,
        "hospitals": spend,
    }]
    if c.enabled:
        guarantees.append({
            "unit_of_privacy": "one hospital's whole dataset",
            "mechanism": "client-side fixed clipping of each hospital's update, Gaussian noise added by the server "
                         "to the (SecAgg+) aggregate, hospitals weighted equally",
            "trust": "holds for everyone who sees the global model; the server is trusted to add the noise",
            "epsilon": hospital_level_epsilon(cfg, rounds), "delta": c.delta, "accountant": "rdp",
            "noise_multiplier": c.noise_multiplier, "clipping_norm": c.clipping_norm,
            "sample_rate": HOSPITAL_LEVEL_SAMPLE_RATE, "rounds": rounds,
        })
    return {
        "run_id": run_id,
        "guarantees": guarantees,
        "secure_aggregation": {
            "protocol": "SecAgg+" if sa.enabled else "none", "num_shares": sa.num_shares,
            "reconstruction_threshold": sa.reconstruction_threshold, "clipping_range": sa.clipping_range,
            "quantization_range": sa.quantization_range, "modulus_range": sa.modulus_range,
            "max_weight": sa.max_weight,
        },
        "admission": {
            "admitted": sorted(admission.hospitals.values()) if admission else [],
            "refused": dict(admission.refusals) if admission else {},
        },
        "ledger_after_run": closing,
    }


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Privacy report, run `{report['run_id']}`", ""]
    record = report["guarantees"][0]
    lines += [f"## Record-level guarantee: {record['unit_of_privacy']}", "", f"Mechanism: {record['mechanism']}.",
              f"Accountant {record['accountant']}, delta {_number(record['delta'])}, per-example clipping norm "
              f"{_number(record['max_grad_norm'])}, target epsilon {_number(record['target_epsilon'])}.", "",
              "| hospital | epsilon | sigma | sampling rate | steps |", "|---|---|---|---|---|"]
    for hospital, s in sorted(record["hospitals"].items()):
        lines.append(f"| {hospital} | {_number(s['epsilon'])} | {_number(s['noise_multiplier'])} | "
                     f"{_number(s['sample_rate'])} | {s['steps']} |")
    for g in report["guarantees"][1:]:
        lines += ["", f"## Hospital-level guarantee: {g['unit_of_privacy']}", "", f"Mechanism: {g['mechanism']}.",
                  f"Trust: {g['trust']}.", f"epsilon {_number(g['epsilon'])} at delta {_number(g['delta'])} "
                  f"({g['accountant']}), sigma {_number(g['noise_multiplier'])}, "
                  f"clipping norm {_number(g['clipping_norm'])}, "
                  f"{g['rounds']} rounds, hospital sampling rate {_number(g['sample_rate'])}."]
    sa = report["secure_aggregation"]
    lines += ["", "## Secure aggregation", "", ", ".join(f"{k} {_number(v)}" for k, v in sa.items()) + "."]
    adm = report["admission"]
    lines += ["", "## Admission", "", f"Admitted: {', '.join(adm['admitted']) or 'none'}."]
    lines += [f"- refused by {h}: {reason}" for h, reason in sorted(adm["refused"].items())]
    lines += ["", "## Ledger after the run (RDP composition of every run on this dataset)", "",
              "| hospital | status | epsilon this run | lifetime epsilon | at delta | summed epsilon | budget "
              "| remaining |",
              "|---|---|---|---|---|---|---|---|"]
    for hospital, b in sorted(report["ledger_after_run"].items()):
        lines.append(f"| {hospital} | {b.get('status', b.get('error', '-'))} | {_number(b.get('epsilon'))} | "
                     f"{_number(b.get('lifetime_epsilon'))} | {_number(b.get('lifetime_delta'))} | "
                     f"{_number(b.get('summed_epsilon'))} | {_number(b.get('budget_epsilon'))} | "
                     f"{_number(b.get('remaining_epsilon'))} |")
    return "\n".join(lines) + "\n"
