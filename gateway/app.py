"""The inference gateway: who asks (JWT), how often (rate limit), at what privacy cost (budgets), through which
replica (routing), all of it in the audit log and in Prometheus metrics."""

# No `from __future__ import annotations`: FastAPI must see the dependency aliases defined inside the factory.
import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import redis
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fl_core.config import ConfigError
from fl_core.tracing import traced
from privacy.noisy_vote import NoisyVote
from privacy.secure_random import SecureRandom

from .audit import AuditEvent, AuditKeyError, AuditKeys, AuditLog
from .audit_writer import AuditWriter
from .auth import AuthError, Principal, TokenVerifier, bearer_token, valid_user
from .config import GatewayConfig, LimitsConfig, secret_from_env
from .limits import LimitStore, LimitStoreDown, RedisLimitStore, SQLiteLimitStore
from .metrics import ACCESS_LOGGER, GatewayMetrics
from .routing import Backend, NoBackendAvailable, Reply, Router, Stream
from .schemas import (
    DONE,
    BackendState,
    BudgetResponse,
    ChatCompletionResponse,
    ChatRequest,
    CircuitChange,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    DeploymentBudget,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    PrivacyInfo,
    Sampling,
    sse,
)

HOUR = 3600.0
SPEND = "spend:"  # a user's noisy-vote spend: the sum of each query's zCDP cost
DEPLOYMENT_SPEND = "deployment-spend:"  # a hospital model's spend over all users, the same sum
BACKEND_HEADER = "X-Backend"  # which replica answered (its index in routing.backends), for operators
AUDITED_PREFIXES = ("/v1/", "/admin/")
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 429, 503, 504)}
# The OpenAI-compatible routes answer errors as OpenAI does, so its clients raise the right exception with the
# message; bad input there is a 400 naming the parameter.
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError} for code in (400, 401, 404, 429, 503, 504)}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 429: "rate_limit_error"}
MAX_ERRORS = 20  # a refusal stays small whatever the request held
PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\[\]-]{0,63}")  # a field or type tag ("list[str]"), never text
NO_STORE = (b"cache-control", b"no-store")  # answers carry patient text: no proxy or browser keeps them
SEND_GRACE = 5.0  # seconds past a request's deadline its answer may take to be read by the client
AUDIT_LOCK_WAIT = 5.0  # seconds one attempt waits for another process's write lock on the audit log; then again

log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)
Routed = TypeVar("Routed")


@dataclass
class GatewayServices:
    """Everything a gateway process holds, built from config and the environment before it listens."""

    cfg: GatewayConfig
    jwt_secret: str
    audit: AuditLog
    audit_writer: AuditWriter
    limits: LimitStore
    metrics: GatewayMetrics
    vote: NoisyVote
    rho_total_cap: float  # the largest spend per hospital model within privacy.epsilon_total
    rng: SecureRandom


def same_key(a: str, b: str) -> bool:
    """Whether two secrets are one key: equal once stripped, or decoding to the same bytes the way Fernet reads a
    key (base64 that skips what is not in its alphabet, so "K" and "K!" are one Fernet key)."""
    if hmac.compare_digest(a.strip().encode(), b.strip().encode()):
        return True
    try:
        return hmac.compare_digest(base64.urlsafe_b64decode(a.strip()), base64.urlsafe_b64decode(b.strip()))
    except (ValueError, binascii.Error):
        return False


def open_limit_store(lim: LimitsConfig) -> LimitStore:
    """SQLite for one gateway; Redis for several, with the password from the environment (and TLS on rediss://).
    A Redis that refuses the password or cannot be reached is a one-line error at start."""
    if lim.store != "redis" or lim.redis_url is None:
        return SQLiteLimitStore(Path(lim.sqlite_path))
    password = (secret_from_env(lim.redis_password_env, "limits.redis_password_env")
                if lim.redis_password_env is not None else None)
    try:
        return RedisLimitStore(lim.redis_url, password, lim.redis_ca)
    except (redis.AuthenticationError, redis.ResponseError) as err:
        raise ConfigError("limits.redis_password_env", f"redis refused the password ({type(err).__name__})") from None
    except redis.RedisError as err:
        raise ConfigError("limits.redis_url", f"redis cannot be reached ({type(err).__name__}: {err})") from None


def build_services(cfg: GatewayConfig) -> GatewayServices:
    secret = secret_from_env(cfg.auth.secret_env, "auth.secret_env")
    chain_key = secret_from_env(cfg.audit.chain_key_env, "audit.chain_key_env")
    text_key = secret_from_env(cfg.audit.text_key_env, "audit.text_key_env")
    if same_key(chain_key, text_key):  # (fl-audit still reads logs from before, written under one key)
        raise ConfigError("audit.text_key_env", f"must hold another key than {cfg.audit.chain_key_env}: whoever "
                                                "verifies the audit chain must not be able to read request text")
    try:
        keys = AuditKeys.from_secrets(chain_key, text_key)
    except AuditKeyError as err:
        raise ConfigError("audit.text_key_env", str(err)) from None
    limits = open_limit_store(cfg.limits)
    vote = NoisyVote(cfg.privacy.epsilon_per_query, cfg.privacy.epsilon_per_user, cfg.privacy.delta)
    _ = vote.rho_cap  # calibrate before listening, not on the first query
    rho_total_cap = vote.rho_within(cfg.privacy.epsilon_total)
    # Spend kept as query counts by earlier versions is carried over at today's price per query, once: the price
    # each was bought at was never stored, so the README says to upgrade before changing epsilon_per_query.
    migrated = limits.migrate_counts(SPEND, vote.rho_per_query)
    if migrated:
        log.warning("carried %d users' query counts over at epsilon_per_query %g each (the price they were bought "
                    "at is not recorded)", migrated, cfg.privacy.epsilon_per_query)
    audit = AuditLog(Path(cfg.audit.path), keys, Path(cfg.audit.head_path), lock_timeout=AUDIT_LOCK_WAIT)
    audit.open_for_writing()
    writer, metrics = AuditWriter(audit), GatewayMetrics()
    metrics.audit_sealed.set_function(lambda: writer.sealed)
    metrics.deployment_total.set(cfg.privacy.epsilon_total)
    return GatewayServices(cfg, secret, audit, writer, limits, metrics, vote, rho_total_cap, SecureRandom())


class RequestError(HTTPException):
    """A refusal that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, detail: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, detail)
        self.param, self.code = param, code


def error_response(path: str, status: int, message: str, headers: Mapping[str, str] | None = None,
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in the route's shape: OpenAI's on its compatible routes, `{"detail": ...}` elsewhere."""
    if path not in OPENAI_ROUTES:
        return JSONResponse({"detail": message}, status, headers)
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers)


def field_name(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as the request's field ("messages.1.role"), without the "body" root; each
    part as `encodable` shows it."""
    return ".".join(str(encodable(part)) for part in (loc[1:] if loc[:1] == ("body",) else loc)) or "body"


def encodable(part: int | str) -> int | str:
    """A location part as a refusal may show it: a parameter's name; a key that is not one (it could be anything
    the client typed, patient text included) is shown as <key>."""
    if isinstance(part, int):
        return part
    return part if PARAMETER_NAME.fullmatch(part) else "<key>"


def install_error_handlers(app: FastAPI) -> None:
    """Refusals in each route's shape. A validation error names the field and what it needs, never the value sent:
    echoing it would copy patient text (or text that cannot be encoded) into the answer."""

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, StarletteHTTPException)
        return error_response(request.url.path, err.status_code, str(err.detail), err.headers,
                              getattr(err, "param", None), getattr(err, "code", None))

    async def invalid(request: Request, err: Exception) -> Response:
        assert isinstance(err, RequestValidationError)
        errors = err.errors()
        if request.url.path in OPENAI_ROUTES:
            first = errors[0]
            name = field_name(tuple(first["loc"]))
            return error_response(request.url.path, 400, f"{name}: {first['msg']}", param=name)
        return JSONResponse({"detail": [{"loc": [encodable(part) for part in e["loc"]], "msg": e["msg"],
                                         "type": e["type"]} for e in errors[:MAX_ERRORS]]}, 422)

    async def store_down(request: Request, err: Exception) -> Response:
        log.error("%s", err)
        return error_response(request.url.path, 503, "limits and budgets cannot be checked now, retry shortly",
                              {"Retry-After": "5"})

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(LimitStoreDown, store_down)


class BoundedBody:
    """Reads at most `limit` bytes of a request body before the app sees any of it: a Content-Length past the
    limit is refused (413) unread, and a chunked body as soon as it passes it. The app reads the body from here."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # the unread rest of the body would be read as the next request: the connection closes after the refusal
        close = {"Connection": "close"}
        too_large = error_response(scope["path"], 413, f"request body over limits.max_body_bytes ({self.limit})",
                                   close)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await too_large(scope, receive, send)
            return
        # a body dripped in slowly holds its slot no longer than the request's time allows
        deadline = scope.get("state", {}).get("deadline", time.monotonic() + self.timeout)
        chunks, size = [], 0
        try:
            async with asyncio.timeout_at(deadline):  # only the reading: a refusal is sent outside it
                message = await receive()
                while message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.limit or not message.get("more_body"):
                        break
                    message = await receive()
        except TimeoutError:
            slow = error_response(scope["path"], 408, "request body not received within limits.request_timeout",
                                  close)
            await slow(scope, receive, send)
            return
        if size > self.limit:
            await too_large(scope, receive, send)
            return
        buffered: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}
                                   if message["type"] == "http.request" else message]

        async def replay() -> Message:
            return buffered.pop() if buffered else await receive()  # later: the disconnect streaming watches for

        await self.app(scope, replay, send)


def _route_path(scope: Scope) -> str:
    """The route template ("/v1/classify"), never the raw path: metric labels stay few whatever clients send."""
    route = scope.get("route")
    if route is None:  # refused before routing (capacity): match it here
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] == Match.FULL), None)
    return str(getattr(route, "path", "unmatched"))


class RelayedStream(StreamingResponse):
    """A replica's stream passed on: its connection is released however the response ends, even when the client
    leaves, or the answer's start cannot be sent, before the first event."""

    def __init__(self, stream: Stream, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close(ok=None)


class SlowReader(Exception):
    """The client did not take the answer within its request's time."""


class CapTimeAndAudit:
    """Outermost layer for /v1 and /admin: refuses past the concurrency cap (503) before any other work, times each
    request into the metrics, and holds each answer until its audit record is committed, whatever the outcome
    (pure ASGI)."""

    def __init__(self, app: ASGIApp, services: GatewayServices) -> None:
        self.app, self.services, self.in_flight = app, services, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUDITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        with traced(f"{scope['method']} {_route_path(scope)}", kind=SpanKind.SERVER) as span:
            await self._call(scope, receive, send)
            span.set_attribute("http.response.status_code", scope["state"].get("status", 0))

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        services, metrics = self.services, self.services.metrics
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["deadline"] = time.monotonic() + services.cfg.limits.request_timeout
        status, audited = 500, False

        async def audit() -> None:
            nonlocal audited
            audited = True
            state["status"] = status
            principal: Principal | None = state.get("principal")
            with traced("audit"):
                await services.audit_writer.record(AuditEvent(
                    user=principal.user if principal else "-", role=principal.role if principal else "-",
                    route=_route_path(scope), model=state.get("model", "-"), query_mode=state.get("query_mode", "-"),
                    epsilon=state.get("epsilon", 0.0), status=status, request_text=state.get("request_text", "")))

        async def send_after_audit(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), NO_STORE]
                await audit()  # the answer leaves only once its record is on disk
            # a client that stops reading holds a slot no longer than the request's time allows
            try:
                async with asyncio.timeout_at(state["deadline"] + SEND_GRACE):
                    await send(message)
            except TimeoutError:
                raise SlowReader from None

        try:
            if self.in_flight >= services.cfg.limits.max_concurrent:
                busy = error_response(scope["path"], 503, "gateway at capacity, retry shortly", {"Retry-After": "1"})
                await busy(scope, receive, send_after_audit)
                return
            self.in_flight += 1
            metrics.in_flight.inc()
            try:
                await self.app(scope, receive, send_after_audit)
            finally:
                self.in_flight -= 1
                metrics.in_flight.dec()
        except SlowReader:
            log.warning("%s: the client stopped reading; connection dropped", _route_path(scope))
        finally:
            route, seconds = _route_path(scope), time.perf_counter() - start
            metrics.request_duration.labels(route).observe(seconds)
            metrics.requests.labels(route, str(status)).inc()
            if access.isEnabledFor(logging.INFO):
                access.info("request", extra={"route": route, "status": status,
                                              "duration_ms": round(seconds * 1000, 1)})
            if not audited:  # no answer was sent (an error, or the client left first): recorded all the same
                await audit()


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(seconds + 0.999)))}


def create_gateway_app(services: GatewayServices) -> FastAPI:
    cfg, metrics = services.cfg, services.metrics
    state: dict[str, Any] = {}
    verify = TokenVerifier(services.jwt_secret, cfg.auth.issuer, cfg.auth.token_minutes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=cfg.limits.max_concurrent)
        async with aiohttp.ClientSession(connector=connector) as client:
            router = Router(cfg.routing, client)
            state["router"] = router
            await router.check_all()
            checker = asyncio.create_task(router.health_loop())
            try:
                yield
            finally:
                checker.cancel()
                services.audit_writer.close()
                services.audit.close()

    # Swagger UI's files come from the gateway itself: a hospital network often reaches no CDN (and should not be
    # asked to trust one with a page that holds a token)
    app = FastAPIOffline(title="federated-dp-llm gateway", version="1", lifespan=lifespan, static_url="/docs-static",
                         description="Serves the federated model to clinicians. Every answer carries the model's "
                                     "training privacy guarantee; every request is audited.")
    install_error_handlers(app)
    # inside the cap and audit: a 413 or 408 is audited
    app.add_middleware(BoundedBody, limit=cfg.limits.max_body_bytes, timeout=cfg.limits.request_timeout)
    app.add_middleware(CapTimeAndAudit, services=services)
    if cfg.cors_origins:  # added last, so outermost: preflight requests are answered before the cap and audit
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def router() -> Router:
        r: Router = state["router"]
        return r

    async def authenticate(request: Request) -> Principal:
        with traced("auth"):
            return await checked_token(request)

    async def checked_token(request: Request) -> Principal:
        try:
            principal = verify(bearer_token(request.headers.get("authorization")))
        except AuthError as err:
            # refusals are cheap but each is audited: limited per client address, so they cannot flood the log
            address = request.client.host if request.client else "-"
            take = await run_in_threadpool(services.limits.take_window, f"anon:{address}",
                                           cfg.limits.unauthenticated_per_hour, HOUR)
            if not take.allowed:
                raise HTTPException(429, f"{cfg.limits.unauthenticated_per_hour} requests per hour without a valid "
                                         f"token from one address", headers=retry_after(take.retry_after)) from None
            raise HTTPException(err.status, str(err), headers={"WWW-Authenticate": "Bearer"}) from None
        request.state.principal = principal
        return principal

    Authenticated = Annotated[Principal, Depends(authenticate)]

    async def rate_limited(principal: Authenticated) -> Principal:
        with traced("rate_limit"):
            take = await run_in_threadpool(services.limits.take_window, f"rate:{principal.user}",
                                           cfg.limits.requests_per_hour, HOUR)
        if not take.allowed:
            raise HTTPException(429, f"rate limit: {cfg.limits.requests_per_hour} requests per hour",
                                headers=retry_after(take.retry_after))
        return principal

    async def admin(principal: Authenticated) -> Principal:
        if principal.role != "admin":
            raise HTTPException(403, "admin role required")
        return principal

    Caller = Annotated[Principal, Depends(rate_limited)]
    Admin = Annotated[Principal, Depends(admin)]

    async def routed(call: Awaitable[tuple[Backend, Routed]]) -> tuple[Backend, Routed]:
        """A routed call's result, or the refusal a client understands: no replica (503), or none in time (504)."""
        try:
            with traced("routing"):
                return await call
        except NoBackendAvailable as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "5"}) from None
        except TimeoutError:
            raise HTTPException(504, f"no answer within {cfg.limits.request_timeout} s") from None

    async def forward(request: Request, tasks: tuple[str, ...], path: str, body: dict[str, Any],
                      model: str | None = None) -> tuple[Backend, dict[str, Any]]:
        backend, response = await routed(router().call(tasks, path, body, request.state.deadline, model))
        request.state.model = str(backend.info.get("model", backend.url))
        if response.status != 200:
            raise replica_refusal(response)
        return backend, response.body

    def replica_refusal(reply: Reply) -> HTTPException:
        """A replica's 4xx: the request's fault (a prompt past the context, a route its model does not serve),
        with the field it names."""
        detail = reply.body.get("detail")
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            param = detail.get("param")
            return RequestError(reply.status, detail["message"], param=param if isinstance(param, str) else None)
        return RequestError(reply.status, detail if isinstance(detail, str) else "the model replica refused the "
                                                                                 "request")

    def served(model: str | None, tasks: tuple[str, ...]) -> str | None:
        """The model asked for, if a replica serves it for one of the route's tasks; none asked: any replica of
        those tasks."""
        if model is None:
            return None
        info = router().models().get(model)
        if info is None:
            raise RequestError(404, "no such model is served here: GET /v1/models lists the models",
                               param="model", code="model_not_found")
        if info.get("task") not in tasks:
            raise RequestError(400, f"this model is a {info.get('task')} model, which this route does not serve",
                               param="model")
        return model

    def standard_privacy(backend: Backend) -> PrivacyInfo:
        return PrivacyInfo(provenance=backend.info.get("provenance", {}), query_mode="standard",
                           epsilon_charged=0.0, budget_remaining=None)

    def hospitals() -> list[str]:
        return sorted({b.hospital for b in router().backends if b.hospital})

    async def deployment_budget() -> list[DeploymentBudget]:
        vote, spent, total = services.vote, services.limits.spent, cfg.privacy.epsilon_total
        names = hospitals()
        rhos = [await run_in_threadpool(spent, f"{DEPLOYMENT_SPEND}{h}") for h in names]
        return [DeploymentBudget(hospital=h, epsilon_spent=vote.epsilon_of(rho), epsilon_total=total,
                                 epsilon_remaining=total - vote.epsilon_of(rho),
                                 queries_left=vote.queries_left(rho, services.rho_total_cap))
                for h, rho in zip(names, rhos, strict=True)]

    async def budget(user: str) -> BudgetResponse:
        """A user's spend; `queries_left` counts the hospital models' totals too (a vote needs room in both), which
        says no more about other users' queries than a refusal would."""
        vote = services.vote
        rho = await run_in_threadpool(services.limits.spent, f"{SPEND}{user}")
        spent = vote.epsilon_of(rho)
        left = min([vote.queries_left(rho), *(d.queries_left for d in await deployment_budget())])
        return BudgetResponse(user=user, epsilon_spent=spent, epsilon_remaining=cfg.privacy.epsilon_per_user - spent,
                              epsilon_per_user=cfg.privacy.epsilon_per_user, queries_left=left)

    async def charge(principal: Principal, voters: list[Backend]) -> tuple[float, float]:
        """Charge one query to its user and to each voting hospital model, all or none: the epsilon it cost the
        user and what the user has left. Refused (403) when either budget would be exceeded."""
        vote, cost = services.vote, services.vote.rho_per_query
        names = [b.hospital for b in voters if b.hospital]
        keys = [f"{SPEND}{principal.user}", *(f"{DEPLOYMENT_SPEND}{h}" for h in names)]
        caps = [vote.rho_cap, *[services.rho_total_cap] * len(names)]
        with traced("budget"):
            take = await run_in_threadpool(services.limits.take_spends, keys, cost, caps)
        user_total, *hospital_totals = take.totals
        for hospital, total in zip(names, hospital_totals, strict=True):  # refused or not: the gauges stay current
            metrics.deployment_spent.labels(hospital).set(vote.epsilon_of(total))
        if not take.allowed:
            if user_total + cost > vote.rho_cap:
                metrics.budget_exhausted.inc()
                raise HTTPException(403, f"privacy budget exhausted: epsilon {vote.epsilon_of(user_total):.4g} of "
                                         f"{cfg.privacy.epsilon_per_user} spent")
            metrics.deployment_exhausted.inc()
            spent = [h for h, total in zip(names, hospital_totals, strict=True)
                     if total + cost > services.rho_total_cap]
            raise HTTPException(403, f"deployment privacy budget exhausted for {', '.join(spent)}: the noisy vote "
                                     f"over their records has spent its epsilon {cfg.privacy.epsilon_total} across "
                                     "all users")
        metrics.budget_spent.observe(vote.epsilon_of(user_total) / cfg.privacy.epsilon_per_user)
        return (vote.epsilon_of(user_total) - vote.epsilon_of(user_total - cost),
                cfg.privacy.epsilon_per_user - vote.epsilon_of(user_total))

    async def noisy_vote(request: Request, principal: Principal, body: ClassifyRequest) -> ClassifyResponse:
        vote = services.vote
        voters = router().voters()
        if not voters:
            raise HTTPException(503, "no hospital model backends are available for a noisy vote")
        charged, remaining = await charge(principal, voters)
        request.state.epsilon = charged  # charged on the attempt: a failed vote is not refunded
        timeout = request.state.deadline - time.monotonic()
        answers = await asyncio.gather(*(router().call_one(b, "/v1/classify", {"text": body.text}, timeout)
                                         for b in voters),
                                       return_exceptions=True)
        replies = [a for a in answers if isinstance(a, Reply) and a.status == 200]
        if not replies:
            raise HTTPException(503, "no hospital model answered the vote")
        labels = list(replies[0].body["probabilities"])
        ballots = [r.body["label"] for r in replies if list(r.body["probabilities"]) == labels]
        winner = labels[vote.release([labels.index(b) for b in ballots], len(labels), services.rng)]
        request.state.model = "noisy-vote:" + ",".join(sorted(b.hospital or "" for b in voters))
        return ClassifyResponse(
            label=winner, probabilities=None, request_id=request.state.request_id, model=request.state.model,
            privacy=PrivacyInfo(provenance={
                "mechanism": "Gaussian noisy vote (PATE GNMax) over the hospitals' own models",
                "unit_of_privacy": "one training record of one hospital", "hospitals": len(ballots),
                "noise_std": vote.vote_sigma, "delta": cfg.privacy.delta, "accountant": "rdp"},
                query_mode="noisy-vote", epsilon_charged=charged, budget_remaining=remaining))

    @app.get("/health", tags=["operations"], response_model=dict[str, str])
    async def health() -> JSONResponse:
        """The process is alive."""
        return JSONResponse({"status": "alive"})

    @app.get("/ready", tags=["operations"], responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        """A model is loaded on at least one healthy backend."""
        healthy = [b.url for b in router().available() if not b.hospital]
        if not healthy:
            return JSONResponse({"detail": "no healthy replica of the federated model"}, status_code=503)
        return JSONResponse({"status": "ready", "backends": healthy})

    @app.get("/metrics", tags=["operations"])
    async def metrics_endpoint() -> Response:
        refresh_backend_gauges()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def refresh_backend_gauges() -> None:
        now = time.monotonic()
        for b in router().backends:
            metrics.node_health.labels(b.url, b.hospital or "").set(1.0 if b.healthy else 0.0)
            metrics.circuit_open.labels(b.url).set(
                1.0 if b.circuit(cfg.routing.circuit_cooldown, now) in ("open", "forced-open") else 0.0)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS, tags=["inference"])
    async def classify(request: Request, response: Response, body: ClassifyRequest,
                       principal: Caller) -> ClassifyResponse:
        """Label a clinical text with the federated classifier."""
        request.state.request_id = uuid.uuid4().hex
        request.state.request_text = body.text
        request.state.query_mode = body.privacy
        if body.privacy == "noisy-vote":
            return await noisy_vote(request, principal, body)
        backend, answer = await forward(request, ("classification",), "/v1/classify", {"text": body.text})
        response.headers[BACKEND_HEADER] = str(backend.index)
        return ClassifyResponse(
            label=answer["label"], probabilities=answer["probabilities"], request_id=request.state.request_id,
            model=request.state.model, privacy=standard_privacy(backend))

    async def generate(request: Request, response: Response, tasks: tuple[str, ...], path: str, body: Sampling,
                       answer: type[CompletionResponse | ChatCompletionResponse],
                       ) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
        """An OpenAI-style answer from a replica of the federated model, whole or streamed, with its provenance."""
        request.state.request_id = uuid.uuid4().hex
        request.state.query_mode = "standard"
        model = served(body.model, tasks)
        payload = body.model_dump(exclude={"user"})  # the caller is the token's subject, whatever `user` says
        if body.stream:
            return await streamed(request, tasks, path, payload, model)
        backend, reply = await forward(request, tasks, path, payload, model)
        response.headers[BACKEND_HEADER] = str(backend.index)
        return answer(**reply, request_id=request.state.request_id, privacy=standard_privacy(backend))

    async def streamed(request: Request, tasks: tuple[str, ...], path: str, payload: dict[str, Any],
                       model: str | None) -> StreamingResponse:
        """The replica's server-sent events passed on as they come; the first carries the request id and the
        privacy provenance. A replica that fails mid-answer ends the stream with an error event."""
        backend, opened = await routed(router().open_stream(tasks, path, payload, request.state.deadline, model))
        request.state.model = str(backend.info.get("model", backend.url))
        if isinstance(opened, Reply):
            raise replica_refusal(opened)
        first = {"request_id": request.state.request_id, "privacy": standard_privacy(backend).model_dump()}

        async def events() -> AsyncIterator[bytes]:
            try:
                async for line in opened.response.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.strip() == DONE.strip():
                        opened.close(ok=True)
                        yield DONE
                        return
                    chunk = json.loads(line[len(b"data: "):])
                    yield sse({**chunk, **first})
                    first.clear()
                raise ValueError("the stream ended without [DONE]")
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                log.warning("%s stopped mid-answer: %s", backend.url, type(err).__name__)
                opened.close(ok=False)
                yield sse({"error": {"message": "the model replica stopped mid-answer", "type": "server_error",
                                     "param": None, "code": None}})

        return RelayedStream(opened, events(), media_type="text/event-stream",
                             headers={BACKEND_HEADER: str(backend.index)})

    @app.post("/v1/completions", response_model=CompletionResponse, responses=OPENAI_ERRORS, tags=["inference"])
    async def completions(request: Request, response: Response, body: CompletionRequest,
                          _: Caller) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
        """OpenAI-compatible text completion with the federated causal-LM or chat adapter (`stream`: server-sent
        events, the first carrying `request_id` and `privacy`)."""
        request.state.request_text = body.prompt
        return await generate(request, response, ("causal-lm", "chat"), "/v1/completions", body, CompletionResponse)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=OPENAI_ERRORS,
              tags=["inference"])
    async def chat_completions(request: Request, response: Response, body: ChatRequest,
                               _: Caller) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
        """OpenAI-compatible chat with the federated chat adapter: the assistant's next turn (`stream`: server-sent
        events, the first carrying `request_id` and `privacy`)."""
        request.state.request_text = "\n".join(f"{m.role}: {m.content}" for m in body.messages)
        return await generate(request, response, ("chat",), "/v1/chat/completions", body, ChatCompletionResponse)

    @app.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS, tags=["inference"])
    async def models(_: Caller) -> ModelList:
        """The models the replicas serve, each with its task and training guarantee."""
        return ModelList(data=[
            ModelCard(id=name, created=int(info.get("created", 0)), owned_by="federated-dp-llm",
                      task=str(info.get("task")), provenance=info.get("provenance", {}))
            for name, info in sorted(router().models().items())])

    @app.get("/v1/privacy/budget", response_model=BudgetResponse, responses=ERRORS, tags=["privacy"])
    async def my_budget(principal: Caller) -> BudgetResponse:
        """Your epsilon budget for noisy-vote queries."""
        return await budget(principal.user)

    @app.get("/admin/privacy/budget/{user}", response_model=BudgetResponse,
             responses={**ERRORS, 404: {"model": ErrorResponse}}, tags=["admin"])
    async def user_budget(user: str, _: Admin) -> BudgetResponse:
        """A user's epsilon budget, for operators (metrics carry no user names)."""
        if not valid_user(user):
            raise HTTPException(404, "not a user name")
        return await budget(user)

    @app.get("/admin/privacy/deployment", response_model=list[DeploymentBudget], responses=ERRORS, tags=["admin"])
    async def deployment_budgets(_: Admin) -> list[DeploymentBudget]:
        """Each hospital model's epsilon spent by the noisy vote over all users, against `privacy.epsilon_total`."""
        return await deployment_budget()

    def backend_state(b: Backend) -> BackendState:
        return BackendState(index=b.index, url=b.url, healthy=b.healthy,
                            circuit=b.circuit(cfg.routing.circuit_cooldown, time.monotonic()),
                            response_time_ms=1000 * b.response_time, hospital=b.hospital)

    @app.get("/admin/backends", response_model=list[BackendState], responses=ERRORS, tags=["admin"])
    async def list_backends(_: Admin) -> list[BackendState]:
        return [backend_state(b) for b in router().backends]

    @app.post("/admin/backends/{index}/circuit", response_model=BackendState,
              responses={**ERRORS, 404: {"model": ErrorResponse}}, tags=["admin"])
    async def set_circuit(index: int, change: CircuitChange, _: Admin) -> BackendState:
        """Open a backend's circuit (drain it) or close it (back in rotation, failures forgotten)."""
        backends = router().backends
        if not 0 <= index < len(backends):
            raise HTTPException(404, f"no backend {index}; there are {len(backends)}")
        b = backends[index]
        b.forced_open = change.state == "open"
        if change.state == "closed":
            b.failures, b.opened_at = 0, None
        return backend_state(b)

    app.state.operations = {"/health": health, "/ready": ready, "/metrics": metrics_endpoint}
    return app


def create_operations_app(gateway: FastAPI) -> Starlette:
    """/health, /ready and /metrics in plain HTTP on their own port, for kubelet probes and Prometheus: the API
    port may require client certificates that neither has."""
    routes = []
    for path, handler in gateway.state.operations.items():
        async def endpoint(_: Request, handler: Callable[[], Awaitable[Response]] = handler) -> Response:
            return await handler()

        routes.append(Route(path, endpoint))
    return Starlette(routes=routes)
