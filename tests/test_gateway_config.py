"""Gateway config: the reference deployment's values, one-line errors naming the field, token minting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.fernet import Fernet

from fl_core.config import ConfigError
from gateway.config import compose_gateway_config
from tests.servers import accepts_connections, free_port, wait_until


def test_defaults_are_the_issues_and_the_production_preset_is_the_reference_deployment(monkeypatch) -> None:
    default = compose_gateway_config()
    assert (default.limits.request_timeout, default.limits.max_concurrent, default.auth.token_minutes,
            default.limits.requests_per_hour, default.audit.retention_days) == (45.0, 500, 30.0, 30, 2555)
    for name in ("FL_GATEWAY_TLS_CERT", "FL_GATEWAY_TLS_KEY"):
        monkeypatch.setenv(name, __file__)  # the preset names files that must exist; any file will do here
    prod = compose_gateway_config(["+preset=production"])
    assert (prod.port, prod.metrics_port, prod.tls.certfile is not None) == (8443, 8080, True)
    assert (prod.privacy.epsilon_per_query, prod.privacy.epsilon_per_user, prod.privacy.delta) == (0.05, 5.0, 1e-6)
    assert (prod.limits.max_concurrent, prod.limits.request_timeout, prod.limits.requests_per_hour) == (500, 45.0, 30)
    assert (prod.auth.token_minutes, prod.audit.retention_days, prod.limits.store) == (30.0, 2555, "redis")


@pytest.mark.parametrize(("override", "field"), [
    ("port=0", "port"),
    ("routing.backends=[ftp://x]", "routing.backends"),
    ("limits.store=memcached", "limits.store"),
    ("log_format=xml", "log_format"),
    ("limits.store=redis", "limits.redis_url"),
    ("tls.certfile=/nonexistent.crt", "tls.keyfile"),
    ("cors_origins=[https://ehr.example.org/path]", "cors_origins"),
    ("privacy.epsilon_per_user=0.01", "privacy.epsilon_per_user"),
    ("limits.max_concurrent=abc", "limits.max_concurrent"),
    ("limits.max_body_bytes=0", "limits.max_body_bytes"),
    ("limits.unauthenticated_per_hour=0", "limits.unauthenticated_per_hour"),
    ("audit.head_path=audit.sqlite", "audit.head_path"),
    ("privacy.epsilon_total=1.0", "privacy.epsilon_total"),
    ("limits.redis_url='redis://redis:6379/0?password=secret'", "limits.redis_url"),
    ("limits.header_timeout=0", "limits.header_timeout"),
    ("limits.idle_timeout=0", "limits.idle_timeout"),
])
def test_a_bad_value_is_an_error_naming_its_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_gateway_config([override])
    assert err.value.field_path == field and "\n" not in str(err.value)


def run_cli(*args: str, secret: str | None, **keys: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", **({"FL_GATEWAY_JWT_SECRET": secret} if secret else {}), **keys}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_fl_gateway_token_mints_a_token_with_the_role_and_expiry() -> None:
    secret = "a-deployment-secret-of-some-length"
    minted = run_cli("token", "--user", "dr.who", "--role", "admin", "--minutes", "5", secret=secret)
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), secret, algorithms=["HS256"], issuer="federated-dp-llm")
    assert (claims["sub"], claims["role"], claims["exp"] - claims["iat"]) == ("dr.who", "admin", 300)
    no_secret = run_cli("token", "--user", "x", "--role", "clinician", secret=None)
    assert no_secret.returncode == 2
    assert no_secret.stderr.strip() == ("fl-gateway: auth.secret_env: environment variable FL_GATEWAY_JWT_SECRET "
                                        "must hold a secret of at least 32 bytes")
    weak = run_cli("token", "--user", "x", "--role", "clinician", secret="sixteen-chars-ok")
    assert weak.returncode == 2 and "at least 32 bytes" in weak.stderr
    for minutes in ("5256000", "31"):  # past auth.token_minutes (30): the gateway would refuse the token
        long_lived = run_cli("token", "--user", "x", "--role", "clinician", "--minutes", minutes, secret=secret)
        assert long_lived.returncode == 2 and long_lived.stderr.startswith("fl-gateway: --minutes: ")
    bad_user = run_cli("token", "--user", "dr who", "--role", "clinician", secret=secret)
    assert bad_user.returncode == 2 and bad_user.stderr.startswith("fl-gateway: user: ")
    bad_role = run_cli("token", "--user", "x", "--role", "nurse", secret=secret)
    assert bad_role.returncode == 2 and "--role" in bad_role.stderr and len(bad_role.stderr.splitlines()) == 1
    serve = run_cli("serve", "limits.store=redis", secret=secret)
    assert serve.returncode == 2 and serve.stderr.startswith("fl-gateway: limits.redis_url:")


def test_the_gateway_refuses_to_start_without_two_distinct_audit_keys(tmp_path: Path) -> None:
    secret, key = "a-deployment-secret-of-some-length", Fernet.generate_key().decode()
    where = [f"audit.path={tmp_path / 'audit.sqlite'}", f"audit.head_path={tmp_path / 'head.json'}",
             f"limits.sqlite_path={tmp_path / 'limits.sqlite'}"]
    no_text_key = run_cli("serve", *where, secret=secret, FL_AUDIT_CHAIN_KEY=key)
    assert no_text_key.returncode == 2 and no_text_key.stderr.startswith(
        "fl-gateway: audit.text_key_env: environment variable FL_AUDIT_TEXT_KEY must hold a secret")
    for chain_key in (key, f"{key}\n", f"{key[:-1]}!{key[-1]}"):  # one Fernet key, however it is dressed
        one_key = run_cli("serve", *where, secret=secret, FL_AUDIT_CHAIN_KEY=chain_key, FL_AUDIT_TEXT_KEY=key)
        assert one_key.returncode == 2 and one_key.stderr.strip() == (
            "fl-gateway: audit.text_key_env: must hold another key than FL_AUDIT_CHAIN_KEY: whoever verifies the "
            "audit chain must not be able to read request text")
    not_fernet = run_cli("serve", *where, secret=secret, FL_AUDIT_CHAIN_KEY=key, FL_AUDIT_TEXT_KEY="x" * 40)
    assert not_fernet.returncode == 2 and "audit.text_key_env: the text key must be a Fernet key" in not_fernet.stderr
    assert not (tmp_path / "audit.sqlite").exists()  # refused before anything was written


def test_a_gateway_without_backends_says_so_and_is_not_ready(tmp_path: Path) -> None:
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "FL_GATEWAY_JWT_SECRET": "a-deployment-secret-of-some-length",
           "FL_AUDIT_CHAIN_KEY": Fernet.generate_key().decode(), "FL_AUDIT_TEXT_KEY": Fernet.generate_key().decode()}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", f"port={port}", f"audit.path={tmp_path / 'audit.sqlite'}",
         f"audit.head_path={tmp_path / 'head.json'}", f"limits.sqlite_path={tmp_path / 'limits.sqlite'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: accepts_connections(port), 60, "the gateway")
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).status_code == 503
    finally:
        gateway.terminate()
        _, err = gateway.communicate(timeout=30)
    assert err.startswith("fl-gateway: warning: routing.backends is empty: every model request is refused (503)")
