"""Which HIPAA §164.312 and GDPR controls a deployment's configuration meets, with the evidence, from the three
places a deployment is configured: the gateway's config, the training config (its preset), and the Helm chart's
values. A control is met, not met, or not applicable; a required control not met fails the check.

This reads configuration, not a running cluster: it says what the deployment is set up to do (TLS on, tokens
short-lived, the audit log on and encrypted and kept 2555 days, budgets set, backups scheduled), which is what an
auditor asks first. What the software enforces whatever the configuration (secrets only from the environment and
Secrets, a chain key of 32 bytes or more, node authentication) is reported as met by design, naming where.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from fl_core.config import AppConfig

from .config import MIN_SECRET_BYTES, GatewayConfig

MET, NOT_MET, NOT_APPLICABLE = "met", "not met", "n/a"
HIPAA_RETENTION_DAYS = 6 * 365  # §164.316(b)(2)(i): documentation kept six years
MAX_TOKEN_MINUTES = 60  # §164.312(a)(2)(iii): automatic logoff; the reference deployment uses 30


@dataclass(frozen=True)
class Control:
    framework: str  # "HIPAA" or "GDPR"
    ref: str  # §164.312(b), Art. 32(1)(a), ...
    title: str
    required: bool
    status: str
    evidence: str


def _check(framework: str, ref: str, title: str, required: bool, met: bool, evidence: str) -> Control:
    return Control(framework, ref, title, required, MET if met else NOT_MET, evidence)


def _apart(a: str, b: str) -> bool:
    return PurePosixPath(a).parent != PurePosixPath(b).parent


def controls(gateway: GatewayConfig, training: AppConfig, chart: Mapping[str, Any]) -> list[Control]:
    """Every control, in the order an auditor reads them."""
    serving = chart.get("serving", {})
    redis_tls = bool(serving.get("redis", {}).get("tls", {}).get("enabled"))
    backup = chart.get("backup", {})
    audit, auth, query = gateway.audit, gateway.auth, gateway.privacy
    tls = gateway.tls.certfile is not None and gateway.tls.keyfile is not None
    dp = training.privacy
    return [
        _check("HIPAA", "§164.312(a)(1)", "Access control: unique user identification", True,
               bool(auth.secret_env),
               f"every /v1 request carries a JWT signed with ${auth.secret_env} (at least {MIN_SECRET_BYTES} bytes, "
               f"checked at start) naming its user and role; roles clinician and admin"),
        _check("HIPAA", "§164.312(a)(2)(iii)", "Automatic logoff", True, auth.token_minutes <= MAX_TOKEN_MINUTES,
               f"tokens expire after {auth.token_minutes:g} minutes (at most {MAX_TOKEN_MINUTES}); a longer "
               "lifetime is refused when a token is minted"),
        _check("HIPAA", "§164.312(a)(2)(iv)", "Encryption of ePHI at rest", False, bool(audit.text_key_env),
               f"the request text in the audit log is encrypted (Fernet, ${audit.text_key_env}), under a key apart "
               "from the chain's; the log's other fields (user, route, epsilon), the ledgers, MLflow's store and "
               "the backups are not encrypted by this software: put them on encrypted volumes (not checked here)"),
        _check("HIPAA", "§164.312(b)", "Audit controls", True,
               audit.retention_days >= HIPAA_RETENTION_DAYS and _apart(audit.path, audit.head_path),
               f"every request audited before its answer leaves, in a hash-chained log ({audit.path}) with its head "
               f"sealed apart ({audit.head_path}{'' if _apart(audit.path, audit.head_path) else ': NOT apart'}); "
               f"kept {audit.retention_days} days (at least {HIPAA_RETENTION_DAYS})"),
        _check("HIPAA", "§164.312(c)(1)", "Integrity", True, bool(audit.chain_key_env),
               f"the chain is keyed by ${audit.chain_key_env}: edits, deletions, truncation and rollback fail "
               "fl-audit verify; each hospital's privacy ledger is written before each release"),
        _check("HIPAA", "§164.312(d)", "Person or entity authentication", True,
               all(node.get("keySecret") for node in chart.get("supernodes", [])),
               "clinicians by signed tokens"
               + (" and client certificates" if gateway.tls.client_ca or serving.get("gateway", {}).get(
                   "clientCertificates") else "")
               + "; hospitals' nodes by their keys (SuperNode authentication, each node's keySecret)"),
        _check("HIPAA", "§164.312(e)(1)", "Transmission security", True,
               tls and bool(chart.get("superlink", {}).get("tlsSecret")),
               f"the gateway speaks TLS 1.2+ only ({'certificate set' if tls else 'NO certificate: plain HTTP'}); "
               f"the SuperLink TLS from Secret {chart.get('superlink', {}).get('tlsSecret')!r}; Redis "
               f"{'TLS' if redis_tls else 'without TLS (inside the cluster, behind its NetworkPolicy)'}"),
        _check("HIPAA", "§164.312(e)(2)(ii)", "Encryption in transit inside the cluster", False, redis_tls,
               "Redis (limits, budgets) " + ("speaks TLS only" if redis_tls else
                                             "is plain TCP: set serving.redis.tls.enabled (addressable)")),
        _check("GDPR", "Art. 25", "Data protection by design: a bounded privacy loss", True,
               dp.enabled and math.isfinite(dp.target_epsilon) and math.isfinite(query.epsilon_per_user)
               and math.isfinite(query.epsilon_total),
               f"training under DP-SGD at epsilon {dp.target_epsilon:g}, delta {dp.delta:g} per hospital "
               f"({dp.accountant}), capped by each node's ledger and policy; served queries {query.epsilon_per_query:g}"
               f" each, {query.epsilon_per_user:g} per user, {query.epsilon_total:g} per model"
               if dp.enabled else "training WITHOUT differential privacy (privacy.enabled=false)"),
        _check("GDPR", "Art. 5(1)(e)", "Storage limitation", True, 0 < audit.retention_days < 36_500,
               f"audit records pruned after {audit.retention_days} days (fl-audit prune, by chain position); "
               "patient records never leave their hospital"),
        _check("GDPR", "Art. 30", "Records of processing", True, True,
               "the audit log (who asked what, when, at what epsilon) and each hospital's privacy ledger (every "
               "run's spend, fl-ledger)"),
        _check("GDPR", "Art. 32(1)(a)", "Encryption", True, tls and bool(audit.text_key_env),
               "in transit: TLS (above); at rest: the audit log's request text"),
        _check("GDPR", "Art. 32(1)(b)", "Confidentiality of the services", True, True,
               "every component admits only its peers (ingress NetworkPolicies; egress is not restricted); every "
               "pod runs unprivileged with a read-only root; secrets only from Secrets and the environment, never "
               "from files in the chart or the repository"),
        _check("GDPR", "Art. 32(1)(c)", "Restore availability after an incident", True,
               bool(backup.get("enabled")) and bool(backup.get("claim")),
               f"fl-backup of the ledgers, audit logs, SuperLink and MLflow to {backup.get('claim')!r}, "
               f"{backup.get('schedule')}, {backup.get('keep')} kept; Redis's budgets by its append-only file on its "
               "own volume (not in these backups)" if backup.get("enabled") else
               "backup.enabled is false: no backups"),
        Control("GDPR", "Art. 17", "Right to erasure", False, NOT_APPLICABLE,
                "the hospital deletes the patient's records from its own data; no record left it. A model already "
                "trained is not untrained: each record's influence on it is bounded by the ledger's epsilon "
                "(fl-ledger note-erasure). What clinicians typed stays in the encrypted audit log for its "
                "retention, a record the law requires (Art. 17(3)(b)); README, Operations"),
        Control("GDPR", "Art. 20", "Right to data portability", False, NOT_APPLICABLE,
                "the system holds no patient's records outside their hospital; the hospital's own systems answer"),
    ]


def failed(found: list[Control]) -> list[Control]:
    return [c for c in found if c.required and c.status == NOT_MET]
