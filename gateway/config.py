"""Typed gateway configuration: a Hydra structured config under `conf/gateway/`, validated before anything starts.

The gateway has its own config tree (it serves a trained model; it does not train one), composed the same way as
the training tree: `fl-gateway serve +preset=production routing.backends=[...]`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_core.config import CONF_DIR, LOG_FORMATS, composition_error, positive, require

GATEWAY_CONF_DIR = CONF_DIR / "gateway"
STORES = ("sqlite", "redis")
ROLES = ("clinician", "admin")
MIN_SECRET_BYTES = 32  # HMAC-SHA256 keys: RFC 7518 asks for at least the hash's 32 bytes (PyJWT warns below)


@dataclass
class TLSConfig:
    certfile: str | None = None
    keyfile: str | None = None
    client_ca: str | None = None  # set: every client must present a certificate signed by this CA (mTLS)


@dataclass
class AuthConfig:
    secret_env: str = "FL_GATEWAY_JWT_SECRET"  # HS256 signing secret, read from this environment variable
    token_minutes: float = 30.0
    issuer: str = "federated-dp-llm"


@dataclass
class LimitsConfig:
    requests_per_hour: int = 30  # per user, sliding window
    max_concurrent: int = 500  # requests in flight; beyond it: 503
    request_timeout: float = 45.0  # seconds, from arrival to answer, failover included
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive; then 408 and closed
    idle_timeout: int = 5  # seconds a kept-alive connection may wait for its next request
    max_body_bytes: int = 4_194_304  # past it a body is refused (413) unread; room for 64 escaped messages
    unauthenticated_per_hour: int = 60  # requests without a valid token, per client address, sliding window
    store: str = "sqlite"  # sqlite: one gateway; redis: several gateway replicas sharing limits and budgets
    sqlite_path: str = "gateway-state.sqlite"
    redis_url: str | None = None  # redis://HOST:PORT/DB, or rediss:// for TLS; never with the password in it
    redis_password_env: str | None = "FL_GATEWAY_REDIS_PASSWORD"  # (or NAME_FILE); null: a redis without one
    redis_ca: str | None = None  # rediss:// only: the CA file that signed redis's certificate (default: system CAs)


@dataclass
class QueryPrivacyConfig:
    """Budgets for queries that spend epsilon (the noisy vote over hospital models); plain queries spend none."""

    epsilon_per_query: float = 0.05
    epsilon_per_user: float = 5.0
    # every noisy-vote query also spends from each voting hospital model's total, whoever asks: what one of its
    # records is exposed to through all users together
    epsilon_total: float = 10.0
    delta: float = 1e-6


@dataclass
class AuditConfig:
    path: str = "audit.sqlite"
    head_path: str = "audit-head.json"  # the sealed head: keep it on another volume than the log
    chain_key_env: str = "FL_AUDIT_CHAIN_KEY"  # keys the hash chain: verifying the log needs only this one
    text_key_env: str = "FL_AUDIT_TEXT_KEY"  # Fernet key that encrypts request text; must differ from the chain key
    retention_days: int = 2555


@dataclass
class RoutingConfig:
    backends: list[str] = field(default_factory=list)  # model replica URLs, e.g. http://127.0.0.1:9001
    health_interval: float = 5.0  # seconds between active health checks
    failure_threshold: int = 3  # consecutive failed requests that open its circuit, or failed health checks
    circuit_cooldown: float = 30.0  # seconds an opened circuit waits before one trial request


@dataclass
class ReplicaConfig:
    """A model replica: a trained run (folder, `runs:/ID` or `models:/NAME/VERSION`) served on one device."""

    source: str = "outputs/latest"
    mlflow_uri: str = "sqlite:///mlflow.db"
    device: str = "auto"
    max_new_tokens: int = 256
    num_threads: int | None = None


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_format: str = "text"  # json: one JSON line per log record and per request (fl_core/logs.py) on stderr
    metrics_port: int | None = None  # also /health, /ready, /metrics here in plain HTTP (probes, Prometheus)
    cors_origins: list[str] = field(default_factory=list)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    privacy: QueryPrivacyConfig = field(default_factory=QueryPrivacyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)


def compose_gateway_config(overrides: Sequence[str] = (), check_files: bool = True) -> GatewayConfig:
    """Compose `conf/gateway/config.yaml` with overrides, then validate (`check_files`: that the certificate files
    exist too, which only the machine that serves can tell)."""
    ConfigStore.instance().store(name="gateway_schema", node=GatewayConfig)
    try:
        with initialize_config_dir(config_dir=str(GATEWAY_CONF_DIR), version_base="1.3"):
            raw = compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GatewayConfig), raw))
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err) from err
    assert isinstance(cfg, GatewayConfig)
    validate_gateway(cfg, check_files)
    return cfg


def _port(value: int, field_path: str) -> None:
    require(1 <= value <= 65535, field_path, f"must be a TCP port, 1-65535 (got {value})")


def _file(path: str | None, field_path: str) -> None:
    require(path is None or Path(path).is_file(), field_path, f"no such file: {path}")


def validate_gateway(cfg: GatewayConfig, check_files: bool = True) -> None:
    """Check every value; the first bad one raises ConfigError naming its field."""
    _port(cfg.port, "port")
    require(cfg.log_format in LOG_FORMATS, "log_format",
            f"unknown value {cfg.log_format!r}; choose one of {', '.join(LOG_FORMATS)}")
    if cfg.metrics_port is not None:
        _port(cfg.metrics_port, "metrics_port")
        require(cfg.metrics_port != cfg.port, "metrics_port", "must differ from port")
    for origin in cfg.cors_origins:
        parsed = urlparse(origin)
        require(origin == "*" or (parsed.scheme in ("http", "https") and bool(parsed.netloc) and not parsed.path),
                 "cors_origins", f"{origin!r} is not an origin like https://ehr.example.org")
    t = cfg.tls
    require((t.certfile is None) == (t.keyfile is None), "tls.keyfile", "tls.certfile and tls.keyfile go together")
    require(t.client_ca is None or t.certfile is not None, "tls.client_ca", "client certificates need tls.certfile")
    for name in ("certfile", "keyfile", "client_ca"):
        if check_files:
            _file(getattr(t, name), f"tls.{name}")
    positive(cfg.auth.token_minutes, "auth.token_minutes")
    require(bool(cfg.auth.secret_env), "auth.secret_env", "must name an environment variable")
    lim = cfg.limits
    positive(lim.requests_per_hour, "limits.requests_per_hour")
    positive(lim.max_concurrent, "limits.max_concurrent")
    positive(lim.request_timeout, "limits.request_timeout")
    positive(lim.header_timeout, "limits.header_timeout")
    positive(lim.idle_timeout, "limits.idle_timeout")
    positive(lim.max_body_bytes, "limits.max_body_bytes")
    positive(lim.unauthenticated_per_hour, "limits.unauthenticated_per_hour")
    require(lim.store in STORES, "limits.store", f"unknown value {lim.store!r}; choose one of {', '.join(STORES)}")
    redis_url = urlparse(lim.redis_url or "")
    require(redis_url.password is None and "password" not in parse_qs(redis_url.query), "limits.redis_url",
            "holds a password: pass it in the environment variable limits.redis_password_env names")
    if lim.store == "redis":
        require(redis_url.scheme in ("redis", "rediss", "unix"), "limits.redis_url",
                f"must be redis://HOST:PORT/DB for store redis (got {redis_url.scheme or 'no'} scheme)")
    if lim.redis_ca is not None:
        require(redis_url.scheme == "rediss", "limits.redis_ca", "needs a rediss:// limits.redis_url (TLS)")
        require(not check_files or Path(lim.redis_ca).is_file(), "limits.redis_ca", f"no such file: {lim.redis_ca}")
    p = cfg.privacy
    positive(p.epsilon_per_query, "privacy.epsilon_per_query")
    require(p.epsilon_per_user >= p.epsilon_per_query, "privacy.epsilon_per_user",
             f"must be >= privacy.epsilon_per_query={p.epsilon_per_query} (got {p.epsilon_per_user})")
    require(p.epsilon_total >= p.epsilon_per_user, "privacy.epsilon_total",
            f"must be >= privacy.epsilon_per_user={p.epsilon_per_user} (got {p.epsilon_total})")
    require(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1) (got {p.delta})")
    positive(cfg.audit.retention_days, "audit.retention_days")
    require(Path(cfg.audit.head_path).resolve() != Path(cfg.audit.path).resolve(), "audit.head_path",
            "must be another file than audit.path (and best on another volume)")
    r = cfg.routing
    for url in r.backends:
        parsed = urlparse(url)
        require(parsed.scheme in ("http", "https") and bool(parsed.hostname), "routing.backends",
                 f"{url!r} is not a URL like http://127.0.0.1:9001")
    positive(r.health_interval, "routing.health_interval")
    positive(r.failure_threshold, "routing.failure_threshold")
    positive(r.circuit_cooldown, "routing.circuit_cooldown")
    positive(cfg.replica.max_new_tokens, "replica.max_new_tokens")
    require(cfg.replica.num_threads is None or cfg.replica.num_threads >= 1, "replica.num_threads",
             f"must be >= 1 or null (got {cfg.replica.num_threads})")


def secret_from_env(name: str, field_path: str) -> str:
    """A secret the deployment passes in the environment, or in a file named by NAME_FILE (Docker and Kubernetes
    secrets); missing is a one-line config error, not a crash later."""
    value = os.environ.get(name, "")
    if not value and os.environ.get(f"{name}_FILE"):
        path = Path(os.environ[f"{name}_FILE"])
        require(path.is_file(), field_path, f"{name}_FILE names no readable file: {path}")
        value = path.read_text().strip()
    require(len(value.encode()) >= MIN_SECRET_BYTES, field_path,
            f"environment variable {name} must hold a secret of at least {MIN_SECRET_BYTES} bytes")
    return value
