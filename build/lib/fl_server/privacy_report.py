"""The run's privacy report, in JSON for machines and Markdown for a privacy officer, logged with the run.

It states which guarantee holds for which unit and under which neighbouring relation (a record, replaced by another,
dataset sizes public; a hospital's whole dataset when hospital-level DP is on), every number as an accountant
computed it (each hospital's own, re-checked by the server, and the server's hospital-level one), everything a
hospital sent and under which status (`privacy.release`), the secure-aggregation parameters, who refused the run
and why, each hospital's ledger balance afterwards and, when run, the privacy audit's empirical lower bound.
"""

from __future__ import annotations

import math
from typing import Any

from fl_core.config import AppConfig
from privacy.accountant import DESCRIPTIONS, NEIGHBOURING_RELATION
from privacy.release import RELEASES, Status
from strategies.hospital_dp import hospital_level_epsilon as gaussian_hospital_level_epsilon

from .admission import Admission, Answers

HOSPITAL_LEVEL_RELATION = ("replace-one at the hospital level: one hospital's whole dataset replaced by any other; "
                           "the roster of admitted hospitals is public")


def hospital_level_epsilon(cfg: AppConfig, rounds: int) -> float:
    """epsilon for one hospital's whole dataset after `rounds` noised aggregates."""
    c = cfg.privacy.client_level
    return gaussian_hospital_level_epsilon(c.noise_multiplier, c.delta, rounds)


def releases(cfg: AppConfig, admission: Admission | None) -> list[dict[str, Any]]:
    """Every field a hospital may send in this run, with its status; outside-guarantee fields name who sent them."""
    outside = {} if admission is None else {
        h: str(plan.get("outside_guarantee", "")).split(",") for h, plan in admission.plans.items()}
    rows = []
    for f in RELEASES:
        if f.message == "evaluate" and not cfg.strategy.federated_evaluation:
            continue
        row: dict[str, Any] = {"message": f.message, "field": f.name, "status": str(f.status), "what": f.what}
        if f.status is Status.OUTSIDE:
            row["released_by"] = sorted(h for h, names in outside.items() if f.name in names)
        rows.append(row)
    return rows


def build_report(cfg: AppConfig, run_id: str, spend: dict[str, dict[str, float]], rounds: int,
                 admission: Admission | None, closing: Answers, audit: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
    p, c, sa = cfg.privacy, cfg.privacy.client_level, cfg.strategy.secagg
    sizes = {} if admission is None else {
        h: {"num_examples": plan.get("num_examples"), "num_test_examples": plan.get("num_test_examples")}
        for h, plan in admission.plans.items()}
    guarantees: list[dict[str, Any]] = [{
        "unit_of_privacy": f"one training example ({cfg.data.name} text) in one hospital's dataset",
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "mechanism": "DP-SGD: per-example clipping (Opacus), Gaussian noise, Poisson sampling at the plan's rate"
        + (", and a Gaussian release of each noised federated evaluation" if cfg.strategy.federated_evaluation
           else "") if p.enabled else "none: this run trained without DP-SGD",
        "delta": p.delta, "accountant": f"{p.accountant}: {DESCRIPTIONS[p.accountant]}",
        "max_grad_norm": p.max_grad_norm,
        "target_epsilon": p.target_epsilon if p.enabled and p.noise_multiplier is None else None,
        "hospitals": spend,
        "dataset_sizes": sizes,
    }]
    if c.enabled:
        guarantees.append({
            "unit_of_privacy": "one hospital's whole dataset",
            "neighbouring_relation": HOSPITAL_LEVEL_RELATION,
            "mechanism": "each hospital's update clipped on its node" + (" (inside SecAgg+)" if sa.enabled else "")
                         + ", hospitals weighted equally, Gaussian noise of std sigma * C / n added by the server to "
                         "the mean of the n updates aggregated (sensitivity 2C / n)",
            "trust": "holds for everyone who sees the global model; the server is trusted to add the noise",
            "covers": "the global model only: not what a hospital releases on its own (its noised evaluations, "
                      "accounted record by record, and any field its policy releases outside the guarantee)",
            "epsilon": hospital_level_epsilon(cfg, rounds), "delta": c.delta, "accountant": "Renyi DP (Gaussian)",
            "noise_multiplier": c.noise_multiplier, "clipping_norm": c.clipping_norm, "rounds": rounds,
        })
    return {
        "run_id": run_id,
        "guarantees": guarantees,
        "releases": releases(cfg, admission),
        "secure_aggregation": {
            "protocol": "SecAgg+" if sa.enabled else "none", "num_shares": sa.num_shares,
            "reconstruction_threshold": sa.reconstruction_threshold, "clipping_range": sa.clipping_range,
            "quantization_range": sa.quantization_range, "modulus_range": sa.modulus_range,
            "max_weight": sa.max_weight,
            "trust": "hides each hospital's update from an honest-but-curious server; the guarantee above does "
                     "not rely on it",
        },
        "admission": {
            "admitted": sorted(admission.hospitals.values()) if admission else [],
            "refused": dict(admission.refusals) if admission else {},
        },
        "ledger_after_run": closing,
        **({"audit": audit} if audit is not None else {}),
    }


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Privacy report, run `{report['run_id']}`", ""]
    record = report["guarantees"][0]
    lines += [f"## Record-level guarantee: {record['unit_of_privacy']}", "",
              f"Neighbouring relation: {record['neighbouring_relation']}.", f"Mechanism: {record['mechanism']}.",
              f"Accountant: {record['accountant']}; delta {_number(record['delta'])}, per-example clipping norm "
              f"{_number(record['max_grad_norm'])}, target epsilon {_number(record['target_epsilon'])}.", "",
              "| hospital | epsilon | sigma | sampling rate | steps | N | N test |", "|---|---|---|---|---|---|---|"]
    for hospital, s in sorted(record["hospitals"].items()):
        size = record["dataset_sizes"].get(hospital, {})
        lines.append(f"| {hospital} | {_number(s['epsilon'])} | {_number(s['noise_multiplier'])} | "
                     f"{_number(s['sample_rate'])} | {s['steps']} | {_number(size.get('num_examples'))} | "
                     f"{_number(size.get('num_test_examples'))} |")
    for g in report["guarantees"][1:]:
        lines += ["", f"## Hospital-level guarantee: {g['unit_of_privacy']}", "",
                  f"Neighbouring relation: {g['neighbouring_relation']}.", f"Mechanism: {g['mechanism']}.",
                  f"Trust: {g['trust']}.", f"Covers: {g['covers']}.",
                  f"epsilon {_number(g['epsilon'])} at delta {_number(g['delta'])} "
                  f"({g['accountant']}), sigma {_number(g['noise_multiplier'])}, "
                  f"clipping norm {_number(g['clipping_norm'])}, {g['rounds']} rounds."]
    lines += ["", "## What each hospital sent", "", "| message | field | status | what |", "|---|---|---|---|"]
    for r in report["releases"]:
        by = f" (sent by {', '.join(r['released_by']) or 'no hospital'})" if "released_by" in r else ""
        lines.append(f"| {r['message']} | {r['field']} | {r['status']}{by} | {r['what']} |")
    sa = report["secure_aggregation"]
    lines += ["", "## Secure aggregation", "",
              ", ".join(f"{k} {_number(v)}" for k, v in sa.items() if k != "trust") + f". {sa['trust']}."]
    adm = report["admission"]
    lines += ["", "## Admission", "", f"Admitted: {', '.join(adm['admitted']) or 'none'}."]
    lines += [f"- refused by {h}: {reason}" for h, reason in sorted(adm["refused"].items())]
    lines += ["", "## Ledger after the run (composition of every run on this dataset)", "",
              "| hospital | status | epsilon this run | lifetime epsilon | at delta | summed epsilon | budget "
              "| remaining |",
              "|---|---|---|---|---|---|---|---|"]
    for hospital, b in sorted(report["ledger_after_run"].items()):
        lines.append(f"| {hospital} | {b.get('status', b.get('error', '-'))} | {_number(b.get('epsilon'))} | "
                     f"{_number(b.get('lifetime_epsilon'))} | {_number(b.get('lifetime_delta'))} | "
                     f"{_number(b.get('summed_epsilon'))} | {_number(b.get('budget_epsilon'))} | "
                     f"{_number(b.get('remaining_epsilon'))} |")
    if "audit" in report:
        a = report["audit"]
        lines += ["", "## Privacy audit (one run, Steinke, Nasr & Jagielski 2023)", "",
                  f"{a['hospital']}" + (f", sabotaged ({a['sabotage']})" if a["sabotage"] != "none" else "")
                  + f": empirical epsilon lower bound {_number(a['epsilon_lower_bound'])} at {a['confidence']:.0%} "
                  f"confidence, beside the accountant's {_number(a['epsilon_claimed'])}: {a['canaries']} canary "
                  f"pairs, {a['guesses']} guesses, {a['correct']} correct, {a['rounds']} rounds."]
    return "\n".join(lines) + "\n"
