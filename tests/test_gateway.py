"""The inference gateway against real processes on 127.0.0.1: two hospitals' DP models trained here by
`fl-train-local`, model replicas and hospital nodes serving them, gateways in front (plain, at capacity, TLS with
client certificates, two sharing a real redis-server), all started with `fl-gateway` and killed at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
import redis
import schemathesis
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from servers import free_port, kill_group, wait_until

from gateway.audit import AuditKeys, AuditLog
from gateway.auth import mint_token
from privacy.noisy_vote import NoisyVote
from scripts.federation import create_client_certificate, init

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECRET = "gateway-test-secret-0123456789abcdef"
REDIS_PASSWORD = "redis-test-password-0123456789abcdef"
ISSUER = "federated-dp-llm"
TRAIN = ["model=tiny", "data.max_train_examples=200", "data.max_test_examples=32", "train.batch_size=16",
         "train.device=cpu", "train.num_threads=1", "federation.num_rounds=1"]
TEXT = "Displaced fracture of shaft of left femur"
VOTE = NoisyVote(epsilon_per_query=1.0, epsilon_per_user=2.0, delta=1e-5)
VOTE_TOTAL = 3.0  # each hospital model's epsilon over all users at the main gateway: 7 queries, 3 a user
RATE = 6
ANONYMOUS = 3  # requests per hour without a valid token, per address, at the gateways sharing redis
HEAD_TIMEOUT, IDLE_TIMEOUT = 2.0, 2  # seconds, at the busy gateway
TRACED = {"OTEL_TRACES_EXPORTER": "console"}  # the SDK's console exporter: each span a JSON line in the log


def token(user: str, role: str = "clinician", minutes: float = 30, now: float | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, role, minutes, ISSUER, now)}"}


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)
    runs: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(command, cwd=self.root, env={**self.env, **(env or {})}, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def replica(self, name: str, run: Path, hospital: str | None = None, env: dict[str, str] | None = None) -> None:
        self.ports[name] = free_port()
        self.start(name, [sys.executable, "-m", "gateway.cli", "replica", "--port", str(self.ports[name]),
                          *(["--hospital", hospital] if hospital else []), f"replica.source={run}",
                          "replica.device=cpu", "replica.num_threads=1"], env)

    def gateway(self, name: str, backends: list[str], *overrides: str, env: dict[str, str] | None = None) -> None:
        self.ports[name] = free_port()
        urls = ",".join(self.url(b) for b in backends)
        self.start(name, [sys.executable, "-m", "gateway.cli", "serve", f"port={self.ports[name]}",
                          f"routing.backends=[{urls}]", f"audit.path={self.root / name}-audit.sqlite",
                          f"audit.head_path={self.heads / name}-audit-head.json",
                          f"limits.sqlite_path={self.root / name}-limits.sqlite", "routing.health_interval=0.5",
                          *overrides], env)

    @property
    def heads(self) -> Path:
        """Where the gateways seal their audit heads: apart from their logs, as a deployment's second volume."""
        return self.root / "heads"

    def audit(self, name: str, text: bool = False) -> AuditLog:
        keys = AuditKeys.from_secrets(self.env["FL_AUDIT_CHAIN_KEY"], self.env["FL_AUDIT_TEXT_KEY"] if text else None)
        return AuditLog(self.root / f"{name}-audit.sqlite", keys, self.heads / f"{name}-audit-head.json")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def kill(self, name: str) -> None:
        kill_group(self.processes.pop(name))

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        process = name.removesuffix("-operations")  # a gateway's plain operations port

        def ready() -> bool:
            if self.processes[process].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")
            try:
                return httpx.get(self.url(name) + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{name} to be ready")


def train_hospitals(root: Path) -> dict[str, Path]:
    """Two hospitals' own DP classifiers, one DP causal LM and one DP chat model (a real DP-SGD run each, in
    parallel), as servable run folders."""
    runs = {name: root / f"run-{name}" for name in ("hospital-0", "hospital-1", "causal-lm", "chat")}
    jobs = [subprocess.Popen([sys.executable, "-m", "fl_client.local_job", "--hospital", hospital, *TRAIN, *extra,
                              f"output_dir={runs[name]}", f"tracking.mlflow_uri=sqlite:///{root}/mlflow-{name}.db"],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for name, hospital, extra in (("hospital-0", "0", []), ("hospital-1", "1", []),
                                          ("causal-lm", "0", ["task=causal-lm"]), ("chat", "0", ["task=chat"]))]
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output.decode()[-3000:]
    return runs


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("gateway")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FL_GATEWAY_JWT_SECRET": SECRET,
           "FL_AUDIT_CHAIN_KEY": Fernet.generate_key().decode(), "FL_AUDIT_TEXT_KEY": Fernet.generate_key().decode(),
           "FL_GATEWAY_REDIS_PASSWORD": REDIS_PASSWORD}
    s = Stack(root, env)
    try:
        s.runs = runs = train_hospitals(root)
        s.replica("replica-a", runs["hospital-0"])
        s.replica("replica-b", runs["hospital-0"])
        s.replica("node-0", runs["hospital-0"], "hospital-0")
        s.replica("node-1", runs["hospital-1"], "hospital-1")
        s.replica("lm", runs["causal-lm"])
        s.replica("chat", runs["chat"])
        s.replica("traced-replica", runs["hospital-0"], env=TRACED)
        init(root / "certs", [], [], days=1)
        create_client_certificate(root / "certs", "ehr", days=1)
        s.ports["redis"] = free_port()
        s.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(s.ports["redis"]),
                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", REDIS_PASSWORD])
        s.gateway("main", ["replica-a", "replica-b", "node-0", "node-1"], f"limits.requests_per_hour={RATE}",
                  f"privacy.epsilon_per_query={VOTE.epsilon_per_query}",
                  f"privacy.epsilon_per_user={VOTE.epsilon_per_user}", f"privacy.delta={VOTE.delta}",
                  f"privacy.epsilon_total={VOTE_TOTAL}",
                  "cors_origins=[https://ehr.example.org]", "routing.failure_threshold=2",
                  "routing.circuit_cooldown=300")
        s.gateway("busy", ["replica-a", "lm", "chat"], "limits.max_concurrent=1", "limits.requests_per_hour=1000000",
                  f"limits.header_timeout={HEAD_TIMEOUT}", f"limits.idle_timeout={IDLE_TIMEOUT}")
        certs = root / "certs"
        s.ports["tls-operations"] = free_port()
        s.gateway("tls", ["replica-a"], f"tls.certfile={certs / 'superlink.crt'}",
                  f"tls.keyfile={certs / 'superlink.key'}", f"tls.client_ca={certs / 'ca.crt'}",
                  f"metrics_port={s.ports['tls-operations']}")
        redis_url = f"redis://127.0.0.1:{s.ports['redis']}/0"
        for name in ("shared-1", "shared-2"):
            s.gateway(name, ["replica-a"], "limits.store=redis", f"limits.redis_url={redis_url}",
                      "limits.requests_per_hour=4", f"limits.unauthenticated_per_hour={ANONYMOUS}")
        s.gateway("traced", ["traced-replica"], "log_format=json", env=TRACED)
        for name in ("main", "busy", "shared-1", "shared-2", "tls-operations", "traced"):
            s.wait_ready(name)
        admin = token("root", "admin")
        for name in ("main", "busy"):
            wait_until(lambda name=name: all(b["healthy"] for b in httpx.get(  # type: ignore[misc]
                s.url(name) + "/admin/backends", headers=admin).json()), 120, f"every backend of {name}")
        yield s
    finally:
        for name in list(s.processes):
            s.kill(name)


def classify(s: Stack, user: str, gateway: str = "main", **extra: str) -> httpx.Response:
    return httpx.post(s.url(gateway) + "/v1/classify", json={"text": TEXT, **extra}, headers=token(user), timeout=60)


def spans_in(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"name"')]


def test_a_request_is_one_trace_and_one_log_line_from_the_gateway_into_the_replica_without_text_or_token(
        stack: Stack) -> None:
    headers = token("tracy")
    response = httpx.post(stack.url("traced") + "/v1/classify", json={"text": TEXT}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    wait_until(lambda: any(s["name"] == "POST /v1/classify" for s in spans_in(stack.log("traced"))), 30,
               "the gateway's request span")
    gateway = {s["name"]: s for s in spans_in(stack.log("traced"))}
    replica = {s["name"]: s for s in spans_in(stack.log("traced-replica"))}
    root = gateway["POST /v1/classify"]
    trace_id = root["context"]["trace_id"]
    assert {"auth", "rate_limit", "routing", "backend_call", "audit"} <= gateway.keys()
    for name in ("auth", "rate_limit", "routing", "audit"):
        assert gateway[name]["context"]["trace_id"] == trace_id and gateway[name]["parent_id"] == \
            root["context"]["span_id"], name
    call = gateway["backend_call"]
    assert call["parent_id"] == gateway["routing"]["context"]["span_id"] and call["kind"] == "SpanKind.CLIENT"
    served = replica["replica POST /v1/classify"]  # the replica continues the gateway's trace, under its call
    assert served["context"]["trace_id"] == trace_id and served["parent_id"] == call["context"]["span_id"]
    assert replica["classify"]["parent_id"] == served["context"]["span_id"]
    assert root["attributes"]["http.response.status_code"] == 200
    # With log_format json the gateway logs each request as a JSON line in the same trace: no user, no text.
    wait_until(lambda: '"event": "request"' in stack.log("traced"), 30, "the access event")
    logged = [json.loads(raw) for raw in stack.log("traced").splitlines() if raw.startswith("{")]
    (access,) = [line for line in logged if "component" in line and line["trace_id"] == trace_id.removeprefix("0x")]
    assert (access["component"], access["route"], access["status"], access["trace_id"]) == (
        "fl-gateway", "/v1/classify", 200, trace_id.removeprefix("0x"))
    assert access["level"] == "info" and access["duration_ms"] > 0
    exported = stack.log("traced") + stack.log("traced-replica")
    secret = headers["Authorization"].split()[1]
    assert TEXT not in exported and secret not in exported and "tracy" not in exported


def test_a_request_without_a_valid_token_is_401(stack: Stack) -> None:
    url = stack.url("main") + "/v1/classify"
    expired = token("ann", minutes=1, now=time.time() - 3600)
    forged = {"Authorization": f"Bearer {mint_token('another-secret-of-32-characters!', 'ann', 'admin', 30, ISSUER)}"}
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, expired, forged):
        response = httpx.post(url, json={"text": TEXT}, headers=headers, timeout=30)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
    assert "expired" in httpx.post(url, json={"text": TEXT}, headers=expired, timeout=30).json()["detail"]


def test_a_clinician_is_403_on_admin_endpoints(stack: Stack) -> None:
    url = stack.url("main") + "/admin/backends"
    assert httpx.get(url, headers=token("bob"), timeout=30).status_code == 403
    backends = httpx.get(url, headers=token("root", "admin"), timeout=30).json()
    assert [b["hospital"] for b in backends] == [None, None, "hospital-0", "hospital-1"]


def test_an_answer_carries_the_models_training_guarantee(stack: Stack) -> None:
    response = classify(stack, "carol")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert len(body["probabilities"]) == 22 and abs(sum(body["probabilities"].values()) - 1) < 1e-4
    report = json.loads((stack.runs["hospital-0"] / "privacy_report.json").read_text())
    guarantee = body["privacy"]["provenance"]["guarantees"][0]
    assert body["privacy"]["provenance"]["run_id"] == report["run_id"]
    assert guarantee["epsilon"] == report["guarantees"][0]["hospitals"]["hospital-0"]["epsilon"] > 0
    assert guarantee["delta"] == report["guarantees"][0]["delta"]
    assert "training example" in guarantee["unit_of_privacy"]
    assert body["privacy"]["epsilon_charged"] == 0.0 and body["privacy"]["query_mode"] == "standard"
    assert response.headers["x-backend"] in ("0", "1")  # replicas of the federated model, never a hospital node


def model_id(stack: Stack, run: str) -> str:
    return f"tiny+lora:{json.loads((stack.runs[run] / 'privacy_report.json').read_text())['run_id']}"


def test_completions_are_openai_shaped_and_come_from_the_causal_lm_replica(stack: Stack) -> None:
    response = httpx.post(stack.url("busy") + "/v1/completions", headers=token("kim"), timeout=60, json={
        "prompt": "Patient presents with", "max_tokens": 5, "seed": 1, "model": model_id(stack, "causal-lm")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 1
    assert body["usage"]["completion_tokens"] <= 5 and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    report = json.loads((stack.runs["causal-lm"] / "privacy_report.json").read_text())
    assert body["privacy"]["provenance"]["run_id"] == report["run_id"] and response.headers["x-backend"] == "1"
    assert response.headers["cache-control"] == "no-store"
    # a gateway without a causal-LM replica says so, in OpenAI's error shape, instead of sending the prompt to a
    # classifier
    refused = httpx.post(stack.url("main") + "/v1/completions", headers=token("kim"), timeout=60,
                         json={"prompt": "Patient presents with"})
    assert refused.status_code == 503 and "causal-lm" in refused.json()["error"]["message"]
    assert refused.json()["error"]["type"] == "server_error"


def test_the_openai_client_lists_chats_streams_and_is_refused(stack: Stack) -> None:
    """The official `openai` client against the gateway: the chat model in /v1/models with its guarantee, a chat
    answer with its provenance, the same answer streamed, stop sequences, and refusals it raises as OpenAI's."""
    jwt = token("olga")["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=stack.url("busy") + "/v1", api_key=jwt, max_retries=0, timeout=60)
    cards = {m.id: m for m in client.models.list().data}
    chat_id = model_id(stack, "chat")
    assert {card.task for card in cards.values()} == {"classification", "chat", "causal-lm"}  # type: ignore[attr-defined]
    report = json.loads((stack.runs["chat"] / "privacy_report.json").read_text())
    assert cards[chat_id].provenance["run_id"] == report["run_id"]  # type: ignore[attr-defined]
    trained_as = {"task": "chat", "answer": "title", "precision": "fp32"}  # what its answers mean
    assert cards[chat_id].provenance["trained_as"] == trained_as  # type: ignore[attr-defined]
    question = [{"role": "user", "content": TEXT}]
    whole = client.chat.completions.create(model=chat_id, messages=question, max_tokens=8)  # type: ignore[arg-type]
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content and whole.model == chat_id
    assert whole.usage is not None and whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    privacy = (whole.model_extra or {})["privacy"]
    assert privacy["provenance"]["run_id"] == report["run_id"] and privacy["epsilon_charged"] == 0.0
    assert privacy["provenance"]["guarantees"][0]["epsilon"] == \
        report["guarantees"][0]["hospitals"]["hospital-0"]["epsilon"]

    chunks: list[Any] = list(client.chat.completions.create(model=chat_id, messages=question, max_tokens=8,  # type: ignore[arg-type]
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.content  # greedy: the same answer
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert (chunks[0].model_extra or {})["privacy"] == privacy

    # a stop sequence ends the answer before it, whole or streamed
    free = client.completions.create(model=chat_id, prompt=TEXT, max_tokens=12).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    cut = client.completions.create(model=chat_id, prompt=TEXT, max_tokens=12, stop=[stop]).choices[0]
    assert cut.text == free[:free.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model=chat_id, prompt=TEXT, max_tokens=12, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text

    # what common clients send: a long stop string, a near-zero temperature (greedy, never an overflow), the
    # developer role, zero penalties, stream options, a max_tokens past the replica's cap (answers stay within it)
    long_stop = client.completions.create(model=chat_id, prompt=TEXT, max_tokens=12, stop="\nDiagnosis:")
    assert long_stop.choices[0].text == free
    cold = client.chat.completions.create(model=chat_id, messages=question, max_tokens=8, temperature=1e-40)
    assert cold.choices[0].message.content == answer.content
    accepted = client.chat.completions.create(
        model=chat_id, messages=[{"role": "developer", "content": "Code it."}, *question], max_tokens=1000,
        presence_penalty=0, frequency_penalty=0, stream=True, stream_options={"include_usage": True})
    assert [c.usage for c in accepted][-1].completion_tokens <= 256  # replica.max_new_tokens
    for _ in range(4):  # request-borne trouble never counts against a replica: its circuit stays closed
        client.chat.completions.create(model=chat_id, messages=question, max_tokens=2, temperature=1e-300)
    backends = httpx.get(stack.url("busy") + "/admin/backends", headers=token("root", "admin"), timeout=30).json()
    assert all(b["circuit"] == "closed" for b in backends)

    refusals: list[tuple[dict[str, Any], type[openai.APIStatusError], str, str]] = [
        ({"messages": [{"role": "doctor", "content": TEXT}]}, openai.BadRequestError, "messages.0.role", "'user'"),
        ({"messages": [{"role": "user", "content": ""}]}, openai.BadRequestError, "messages.0.content", "at least 1"),
        ({"messages": question, "n": 2}, openai.BadRequestError, "n", "less than or equal to 1"),
        ({"messages": question, "logit_bias": {"1": 5}}, openai.BadRequestError, "logit_bias", "not permitted"),
        ({"messages": [{"role": "user", "content": "fracture " * 400}] * 2}, openai.BadRequestError, "messages",
         "exceed the model's context of 512 tokens"),
        ({"messages": question, "model": "gpt-4o"}, openai.NotFoundError, "model", "GET /v1/models"),
        ({"messages": question, "model": model_id(stack, "hospital-0")}, openai.BadRequestError, "model",
         "a classification model"),
        ({"messages": question, "stop": ["x"] * 5}, openai.BadRequestError, "stop", "1-4 stop sequences"),
        ({"messages": question, "presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty", "0"),
    ]
    for request, error, param, message in refusals:
        with pytest.raises(error) as refused:
            client.chat.completions.create(**{"model": chat_id, "max_tokens": 4, **request})
        body = refused.value.body
        assert isinstance(body, dict) and body["param"] == param and message in body["message"], body
        assert TEXT not in body["message"] and "fracture" not in body["message"]  # input is never echoed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.url("busy") + "/v1", api_key="not-a-token", max_retries=0).models.list()


def test_past_the_rate_limit_a_user_gets_429_and_others_do_not(stack: Stack) -> None:
    statuses = [classify(stack, "dave").status_code for _ in range(RATE)]
    assert statuses == [200] * RATE
    refused = classify(stack, "dave")
    assert refused.status_code == 429 and 0 < int(refused.headers["retry-after"]) <= 3600
    assert classify(stack, "erin").status_code == 200


def test_noisy_votes_are_charged_until_the_budget_is_exhausted(stack: Stack) -> None:
    charged, remaining = [], []
    for _ in range(VOTE.queries_left(0.0)):
        response = classify(stack, "fay", privacy="noisy-vote")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["probabilities"] is None and body["model"] == "noisy-vote:hospital-0,hospital-1"
        assert body["privacy"]["provenance"]["hospitals"] == 2
        charged.append(body["privacy"]["epsilon_charged"])
        remaining.append(body["privacy"]["budget_remaining"])
    spent = [VOTE.epsilon_of(n * VOTE.rho_per_query) for n in range(VOTE.queries_left(0.0) + 1)]
    assert charged == pytest.approx([b - a for a, b in itertools.pairwise(spent)])
    assert remaining == pytest.approx([VOTE.epsilon_per_user - e for e in spent[1:]])
    refused = classify(stack, "fay", privacy="noisy-vote")
    assert refused.status_code == 403 and "privacy budget exhausted" in refused.json()["detail"]
    budget = httpx.get(stack.url("main") + "/v1/privacy/budget", headers=token("fay"), timeout=30).json()
    assert budget["queries_left"] == 0 and budget["epsilon_spent"] == pytest.approx(spent[-1])
    assert classify(stack, "fay").status_code == 200  # plain queries spend nothing and still work

    # every user's noisy votes also spend each hospital model's total, until it refuses whoever asks
    per_user, in_total = VOTE.queries_left(0.0), VOTE.queries_left(0.0, VOTE.rho_within(VOTE_TOTAL))
    others = [f"gus-{i // per_user}" for i in range(in_total - per_user)]
    assert len(set(others)) > 1 and [classify(stack, u, privacy="noisy-vote").status_code for u in others] == [
        200] * len(others)
    last = others[-1]
    shared = classify(stack, last, privacy="noisy-vote")
    assert shared.status_code == 403 and shared.json()["detail"].startswith(
        "deployment privacy budget exhausted for hospital-0, hospital-1")
    total_spent = VOTE.epsilon_of(in_total * VOTE.rho_per_query)
    own = httpx.get(stack.url("main") + "/v1/privacy/budget", headers=token(last), timeout=30).json()
    assert own["queries_left"] == 0 and own["epsilon_remaining"] > 0  # the user's own budget is not what binds
    deployment = httpx.get(stack.url("main") + "/admin/privacy/deployment", headers=token("root", "admin"),
                           timeout=30).json()
    assert deployment == [{"hospital": h, "epsilon_spent": pytest.approx(total_spent), "epsilon_total": VOTE_TOTAL,
                           "epsilon_remaining": pytest.approx(VOTE_TOTAL - total_spent), "queries_left": 0}
                          for h in ("hospital-0", "hospital-1")]
    metrics = httpx.get(stack.url("main") + "/metrics", timeout=30).text
    assert "privacy_deployment_budget_refusals_total 1.0" in metrics
    assert f'privacy_deployment_epsilon_spent{{hospital="hospital-1"}} {total_spent}' in metrics


def test_past_the_concurrency_cap_requests_get_503(stack: Stack) -> None:
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: classify(stack, f"load-{i}", "busy").status_code, range(16)))
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1


def test_cors_allows_only_the_configured_origin(stack: Stack) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(stack.url("main") + "/v1/classify", timeout=30, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    assert preflight("https://ehr.example.org").headers["access-control-allow-origin"] == "https://ehr.example.org"
    assert "access-control-allow-origin" not in preflight("https://evil.example.com").headers


def test_tls_gateway_requires_a_client_certificate_from_the_ca(stack: Stack) -> None:
    certs = stack.root / "certs"
    url = f"https://127.0.0.1:{stack.ports['tls']}"
    trusting_the_ca = ssl.create_default_context(cafile=certs / "ca.crt")
    with_certificate = ssl.create_default_context(cafile=certs / "ca.crt")
    with_certificate.load_cert_chain(certs / "clients" / "ehr.crt", certs / "clients" / "ehr.key")
    with httpx.Client(verify=with_certificate, timeout=30) as mutual:
        assert mutual.post(url + "/v1/classify", json={"text": TEXT}, headers=token("gil")).status_code == 200
    with pytest.raises(httpx.TransportError), httpx.Client(verify=trusting_the_ca, timeout=30) as anonymous:
        anonymous.get(url + "/health")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{stack.ports['tls']}/health", timeout=10)
    # probes and Prometheus use the plain operations port, which serves nothing else
    assert httpx.get(stack.url("tls-operations") + "/metrics", timeout=10).text.startswith("# HELP")
    assert httpx.post(stack.url("tls-operations") + "/v1/classify", json={"text": TEXT}, headers=token("gil"),
                      timeout=10).status_code == 404


def test_gateways_sharing_redis_share_one_rate_limit(stack: Stack) -> None:
    statuses = [classify(stack, "hal", gateway).status_code for gateway in ("shared-1", "shared-2") * 2]
    assert statuses == [200] * 4
    assert {classify(stack, "hal", g).status_code for g in ("shared-1", "shared-2")} == {429}
    assert redis.Redis(port=stack.ports["redis"], password=REDIS_PASSWORD).zcard("fl-gateway:rate:hal") == 4
    with pytest.raises(redis.AuthenticationError):  # nobody without the password gives a user their queries back
        redis.Redis(port=stack.ports["redis"]).delete("fl-gateway:spend:hal")
    wrong = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "limits.store=redis",
                            f"limits.redis_url=redis://127.0.0.1:{stack.ports['redis']}/0",
                            f"audit.path={stack.root / 'wrong-audit.sqlite'}",
                            f"audit.head_path={stack.heads / 'wrong-audit-head.json'}"],
                           env={**stack.env, "FL_GATEWAY_REDIS_PASSWORD": "not-the-password-but-long-enough-0123"},
                           cwd=stack.root, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        "fl-gateway: limits.redis_password_env: redis refused the password (AuthenticationError)")


def test_requests_without_a_valid_token_are_limited_per_address_across_gateways(stack: Stack) -> None:
    statuses = [httpx.post(stack.url(g) + "/v1/classify", json={"text": TEXT}, timeout=30).status_code
                for g in ("shared-1", "shared-2") * 2]
    assert statuses == [401] * ANONYMOUS + [429]
    assert classify(stack, "ida", "shared-2").status_code == 200  # a valid token is not held back


def test_when_redis_is_down_a_gateway_answers_503_and_recovers(stack: Stack) -> None:
    command = stack.processes["redis"].args
    stack.kill("redis")
    try:
        down = classify(stack, "jon", "shared-1")
        assert down.status_code == 503 and down.headers["retry-after"] == "5", down.text
        assert down.json()["detail"] == "limits and budgets cannot be checked now, retry shortly"
    finally:
        stack.start("redis", list(command))  # type: ignore[arg-type]
    wait_until(lambda: classify(stack, "jon", "shared-1").status_code == 200, 30, "the gateway to use redis again")


def test_while_another_process_holds_the_audit_log_answers_wait_and_none_goes_unaudited(stack: Stack) -> None:
    path = stack.root / "shared-2-audit.sqlite"
    before = len(stack.audit("shared-2").records())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as a backup tool or a stuck process would
    released = threading.Event()

    def ask(i: int) -> tuple[int, bool]:
        return classify(stack, f"locked-{i}", "shared-2").status_code, released.is_set()

    try:
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(ask, i) for i in range(4)]
            time.sleep(8)  # past the gateway's 5 s wait for the lock: it waits again
            assert httpx.get(stack.url("shared-2") + "/health", timeout=5).status_code == 200  # the loop is free
            assert not any(answer.done() for answer in answers)
            released.set()
            holder.execute("COMMIT")
            results = [answer.result() for answer in answers]
    finally:
        holder.close()
    assert results == [(200, True)] * 4  # every answer left after its record was written
    audit = stack.audit("shared-2")
    assert len(audit.records()) == before + 4 and audit.verify()[1] == []


def raw_http(port: int, head: bytes, body: bytes = b"") -> bytes:
    """One response to bytes sent as they are, read to its end without closing our side first (a server may take
    a half-closed connection for a client gone)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", answer.lower()).group(1)):  # type: ignore[union-attr]
            piece = conn.recv(65536)
            if not piece:
                break
            answer += piece
        return answer


def test_credentials_and_bodies_past_their_bounds_are_refused(stack: Stack) -> None:
    url = stack.url("busy") + "/v1/classify"

    def status(claims: dict[str, object]) -> int:
        signed = jwt.encode({"role": "clinician", "iss": ISSUER, "iat": int(time.time()),
                             "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")
        return httpx.post(url, json={"text": TEXT}, headers={"Authorization": f"Bearer {signed}"},
                          timeout=30).status_code

    decade = int(time.time()) + 10 * 365 * 86400  # signed with the deployment's own secret, for ten years
    assert [status({"sub": "ivy", "exp": decade}), status({"sub": ""}), status({"sub": "x" * 300}),
            status({"sub": "ivy\nforged"}), status({"sub": "ivy", "iat": str(int(time.time()))}),
            status({"sub": "ivy"}), status({"sub": "ivy", "iat": int(time.time()) + 30})  # a minting host ahead
            ] == [401, 401, 401, 401, 401, 200, 200]
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: {token('ivy')['Authorization']}\r\n"
            "Content-Type: application/json\r\n").encode()
    # a declared 100 MB body is refused unread; a chunked one once it passes the limit
    assert raw_http(stack.ports["busy"], head + b"Content-Length: 100000000\r\n\r\n").startswith(
        b"HTTP/1.1 413")
    chunk = b"x" * 65536
    chunked = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 70 + b"0\r\n\r\n"  # 4.6 MB, past 4 MiB
    answer = raw_http(stack.ports["busy"], head + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 413") and b"limits.max_body_bytes" in answer
    # JSON no encoder can echo (a lone surrogate, NaN, Infinity), huge or hostile keys: refused, never a 500
    phi, long_key = "Patient Jane Roe, MRN 12345", "k" * 5000
    for route, raw in [
        ("/v1/classify", '{"text": "\\ud800"}'), ("/v1/classify", '{"text": NaN}'),
        ("/v1/classify", '{"\\ud800": 1, "text": "x"}'), ("/v1/classify", f'{{"text": "{phi}", "{long_key}": 1}}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'),
        ("/v1/chat/completions", f'{{"messages": [{{"role": "nurse", "content": "{phi}"}}]}}'),
        ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "x", "\\udfff": "{phi}"}}]}}'),
    ]:
        refused = httpx.post(stack.url("busy") + route, content=raw.encode(), timeout=30,
                             headers={**token("ivy"), "Content-Type": "application/json"})
        assert refused.status_code in (400, 422) and phi not in refused.text, (raw[:80], refused.text[:300])
        assert len(refused.content) < 2000


def test_metrics_expose_latency_statuses_budgets_and_node_health(stack: Stack) -> None:
    text = httpx.get(stack.url("main") + "/metrics", timeout=30).text
    assert 'request_duration_seconds_bucket{le="0.2",route="/v1/classify"}' in text
    assert 'requests_total{route="/v1/classify",status="429"} 1.0' in text
    assert 'requests_total{route="/v1/classify",status="401"} 5.0' in text
    assert 'user="' not in text and "fay" not in text  # metrics are read without a token: they name no one
    charged = VOTE.queries_left(0.0, VOTE.rho_within(VOTE_TOTAL))  # every charged vote, fay's and gus's
    assert f"privacy_budget_spent_fraction_count {float(charged)}" in text
    assert 'privacy_budget_spent_fraction_bucket{le="0.25"} 0.0' in text  # a user's first vote already spent more
    remaining = VOTE.epsilon_per_user - VOTE.epsilon_of(VOTE.queries_left(0.0) * VOTE.rho_per_query)
    fay = stack.url("main") + "/admin/privacy/budget/fay"
    assert httpx.get(fay, headers=token("root", "admin"), timeout=30).json()["epsilon_remaining"] == \
        pytest.approx(remaining)
    assert httpx.get(fay, headers=token("fay"), timeout=30).status_code == 403
    assert f'federated_node_health{{backend="{stack.url("node-1")}",hospital="hospital-1"}} 1.0' in text
    busy = httpx.get(stack.url("busy") + "/metrics", timeout=30).text
    assert 'requests_total{route="/v1/classify",status="503"}' in busy


def test_the_gateway_process_serves_noisy_votes_without_loading_torch(stack: Stack) -> None:
    """After the votes charged above: the gateway, a proxy, never maps torch's library; a replica, which runs a
    model, does (the check can see it)."""
    def maps(name: str) -> str:
        return Path(f"/proc/{stack.processes[name].pid}/maps").read_text()

    assert "libtorch" in maps("node-0")
    assert "libtorch" not in maps("main")


def test_every_metric_in_the_alert_rules_and_dashboard_is_exported(stack: Stack) -> None:
    metrics = httpx.get(stack.url("main") + "/metrics").text.splitlines()
    exported = {line.split("{")[0].split(" ")[0] for line in metrics if line and not line.startswith("#")}
    monitoring = REPO / "docker" / "monitoring"
    text = (monitoring / "alerts.yml").read_text() + (monitoring / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"\b(request_duration_seconds_bucket|requests_total|privacy_budget_spent_fraction_\w+|"
                          r"federated_node_health|backend_circuit_open|requests_in_flight|"
                          r"privacy_budget_refusals_total)\b", text))
    assert used >= {"request_duration_seconds_bucket", "privacy_budget_spent_fraction_bucket", "federated_node_health"}
    assert used <= exported


def test_an_admin_drains_a_replica_by_opening_its_circuit(stack: Stack) -> None:
    admin, url = token("root", "admin"), stack.url("main") + "/admin/backends/0/circuit"
    opened = httpx.post(url, json={"state": "open"}, headers=admin, timeout=30).json()
    assert opened["circuit"] == "forced-open"
    served = {classify(stack, f"ivy-{i}").headers["x-backend"] for i in range(5)}
    assert served == {"1"}
    assert httpx.post(url, json={"state": "closed"}, headers=admin, timeout=30).json()["circuit"] == "closed"
    assert httpx.post(stack.url("main") + "/admin/backends/9/circuit", json={"state": "open"}, headers=admin,
                      timeout=30).status_code == 404


def test_when_a_replica_dies_requests_fail_over_and_its_health_drops(stack: Stack) -> None:
    stack.kill("replica-b")
    statuses = [classify(stack, f"jo-{i % 3}").status_code for i in range(9)]
    assert statuses == [200] * 9
    admin = token("root", "admin")
    wait_until(lambda: not httpx.get(stack.url("main") + "/admin/backends", headers=admin).json()[1]["healthy"],
               30, "the dead replica to be marked unhealthy")
    metrics = httpx.get(stack.url("main") + "/metrics").text
    assert f'federated_node_health{{backend="{stack.url("replica-b")}",hospital=""}} 0.0' in metrics
    assert httpx.get(stack.url("main") + "/ready").status_code == 200


def test_the_audit_log_holds_every_request_encrypted_and_catches_tampering(stack: Stack) -> None:
    log_path, head = stack.root / "main-audit.sqlite", stack.heads / "main-audit-head.json"
    records = stack.audit("main", text=True).records(decrypt=True)
    assert {r["status"] for r in records} >= {200, 401, 403, 429}
    votes = [r for r in records if r["query_mode"] == "noisy-vote" and r["status"] == 200]
    assert [r["epsilon"] for r in votes][:1] == [pytest.approx(VOTE.epsilon_of(VOTE.rho_per_query))]
    assert any(r["user"] == "carol" and r["request"] == TEXT for r in records)
    for name in ("main-audit.sqlite", "main-audit.sqlite-wal"):
        if (stack.root / name).exists():
            assert TEXT.encode() not in (stack.root / name).read_bytes()
    verifier_env = {k: v for k, v in stack.env.items() if k != "FL_AUDIT_TEXT_KEY"}  # the chain key alone

    def fl_audit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.audit_cli", *args, "--head", str(head)],
                              env=verifier_env, capture_output=True, text=True, timeout=60)

    def tampered(name: str, *statements: str) -> Path:
        copy = stack.root / f"{name}.sqlite"
        with sqlite3.connect(log_path) as source, sqlite3.connect(copy) as target:
            source.backup(target)
            for statement in statements:
                target.execute(statement)
        return copy

    newest = stack.audit("main").tail().seq
    intact = fl_audit("verify", "--log", str(tampered("intact")))
    assert intact.returncode == 0 and "chain intact" in intact.stdout, intact.stdout
    (stack.root / "replaced.sqlite").touch()
    for name, statements, problem in (
        ("edited", ["UPDATE audit SET user = 'mallory' WHERE seq = 3"], "record 3: edited"),
        ("deleted", ["DELETE FROM audit WHERE seq = 4"], "record 4: missing"),
        ("reordered", ["UPDATE audit SET seq = -1 WHERE seq = 5", "UPDATE audit SET seq = 5 WHERE seq = 6",
                       "UPDATE audit SET seq = 6 WHERE seq = -1"], "record 5: out of order"),
        ("truncated", [f"DELETE FROM audit WHERE seq > {newest - 3}"], f"records {newest - 2}-{newest}: missing"),
        ("emptied", ["DELETE FROM audit"], f"records 1-{newest}: missing from the end"),
        ("dropped", ["DROP TABLE audit"], f"records 1-{newest}: missing from the end"),
        ("replaced", None, f"records 1-{newest}: missing from the end"),
    ):
        path = stack.root / "replaced.sqlite" if statements is None else tampered(name, *statements)
        result = fl_audit("verify", "--log", str(path))
        assert result.returncode == 1 and f"TAMPERED: {problem}" in result.stdout, (name, result.stdout)

    # rolled back: the copy taken above, once the gateway has answered more (a Prometheus scrape saw the head)
    assert classify(stack, "after-copy").status_code == 200
    scraped = int(float(re.search(r"^audit_sealed_seq (\S+)$", httpx.get(stack.url("main") + "/metrics").text,
                                  re.MULTILINE)[1]))  # type: ignore[index]
    assert scraped > newest
    rolled_back = fl_audit("verify", "--log", str(stack.root / "intact.sqlite"))
    assert rolled_back.returncode == 1 and f"records {newest + 1}-" in rolled_back.stdout
    behind_witness = fl_audit("verify", "--log", str(log_path), "--at-least", str(scraped + 100))
    assert behind_witness.returncode == 1 and "(--at-least)" in behind_witness.stdout
    assert fl_audit("verify", "--log", str(log_path), "--at-least", str(scraped)).returncode == 0

    # backdated records are not pruned by a routine retention run: prune verifies first, and cuts nothing
    backdated = tampered("backdated", "UPDATE audit SET at = '2001-01-01T00:00:00+00:00' WHERE seq <= 5")
    pruned = fl_audit("prune", "--log", str(backdated), "--days", "1")
    assert pruned.returncode == 1 and pruned.stderr.startswith("fl-audit: not pruned: record 1: edited")
    assert sqlite3.connect(backdated).execute("SELECT COUNT(*) FROM audit").fetchone()[0] == scraped

    # a gateway does not write on over a cut: it refuses to start, in one line
    tampered("cut-audit", f"DELETE FROM audit WHERE seq > {newest - 3}")
    shutil.copy(head, stack.heads / "cut-audit-head.json")
    start = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", f"port={free_port()}",
                            f"audit.path={stack.root / 'cut-audit.sqlite'}",
                            f"audit.head_path={stack.heads / 'cut-audit-head.json'}",
                            f"limits.sqlite_path={stack.root / 'cut-limits.sqlite'}"],
                           env=stack.env, cwd=stack.root, capture_output=True, text=True, timeout=120)
    assert start.returncode == 2 and start.stderr.strip().splitlines() == [
        f"fl-gateway: audit log refused: records {newest - 2}-{scraped}: missing from the end (truncated, rolled "
        f"back or replaced); the sealed head is record {scraped}; run fl-audit verify"], start.stderr


def test_connections_that_send_their_head_slowly_or_sit_idle_are_closed(stack: Stack) -> None:
    """Slowloris: 30 connections that send half a request head, and 10 that send nothing, each get a 408 and are
    closed once the head is late; a kept-alive connection is closed once idle; meanwhile the gateway answers."""
    port = stack.ports["busy"]

    def opened(first_bytes: bytes) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), timeout=HEAD_TIMEOUT + 15)
        conn.sendall(first_bytes)
        return conn

    def read_all(conn: socket.socket) -> bytes:
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
        conn.close()
        return b"".join(chunks)

    start = time.monotonic()
    slow = [opened(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: ") for _ in range(30)]
    silent = [opened(b"") for _ in range(10)]
    assert httpx.get(stack.url("busy") + "/health", timeout=5).status_code == 200
    answers = [read_all(conn) for conn in slow + silent]
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers) and time.monotonic() - start < HEAD_TIMEOUT + 15

    in_time = opened(b"GET /health HTTP/1.1\r\n")  # a head that arrives in pieces but within the deadline
    time.sleep(HEAD_TIMEOUT / 4)
    in_time.sendall(b"Host: gateway\r\n\r\n")
    kept_alive = read_all(in_time)  # answered, then closed once idle for IDLE_TIMEOUT
    assert kept_alive.startswith(b"HTTP/1.1 200 ") and b"408" not in kept_alive

    # blank lines dripped after an answer restart no timer: the next head is still due HEAD_TIMEOUT after the answer
    dripping = opened(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
    dripped_until, answer = time.monotonic() + 3 * HEAD_TIMEOUT, b""
    while b"HTTP/1.1 408 " not in answer and time.monotonic() < dripped_until:
        if select.select([dripping], [], [], HEAD_TIMEOUT / 4)[0]:
            answer += dripping.recv(4096)
        else:
            dripping.sendall(b"\r\n")
    dripping.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in answer
    # a body refused unread (413) is not read as a next request: the connection closes with the refusal
    refused = opened(b"POST /v1/classify HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{")
    assert read_all(refused).startswith(b"HTTP/1.1 413 ")


def test_the_api_docs_load_everything_from_the_gateway(stack: Stack) -> None:
    """Offline (a hospital network reaches no CDN) /docs and /redoc still work: every script, style and icon they
    name is served by the gateway itself."""
    for page in ("/docs", "/redoc"):
        html = httpx.get(stack.url("main") + page, timeout=30)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
        assert assets and not [a for a in assets if not a.startswith("/")], (page, assets)
        for asset in assets:
            assert httpx.get(stack.url("main") + asset, timeout=30).status_code == 200, asset


def test_no_generated_request_makes_the_gateway_fail(stack: Stack) -> None:
    """Requests generated from the gateway's own OpenAPI schema, valid and invalid, as an admin: never a 5xx
    other than the documented 503/504 (a 500 would mean an unhandled error)."""
    schema = schemathesis.openapi.from_url(stack.url("busy") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/classify", "/v1/completions", "/v1/chat/completions", "/v1/models",
                                              "/admin/backends/{index}/circuit"}
    headers = token("fuzz", "admin")
    for operation in operations:

        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def never_a_server_error(case: schemathesis.Case) -> None:
            response = case.call(headers=headers, timeout=60)
            assert response.status_code not in (500, 501, 502), (case.method, case.path, response.text)

        never_a_server_error()
