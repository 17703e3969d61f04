"""Routing over model replicas: weighted response time, active health checks, a circuit breaker per backend,
and failover within the request's time budget."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind

from fl_core.tracing import traced

from .config import RoutingConfig

EWMA_WEIGHT = 0.2  # weight of the newest response time in a backend's running average
INITIAL_RESPONSE_TIME = 0.05
HEALTH_TIMEOUT = 3.0  # seconds, at least
T = TypeVar("T")
CircuitState = Literal["closed", "open", "half-open", "forced-open"]


class NoBackendAvailable(Exception):
    """Every backend is unhealthy, has an open circuit, or failed this request."""


@dataclass
class Backend:
    index: int
    url: str
    response_time: float = INITIAL_RESPONSE_TIME  # seconds, exponentially weighted
    healthy: bool = False  # set by the active health checks
    failed_checks: int = 0  # consecutive
    info: dict[str, Any] = field(default_factory=dict)  # the replica's /health body
    failures: int = 0  # consecutive
    opened_at: float | None = None  # circuit opened by failures at this monotonic time
    forced_open: bool = False  # an admin opened the circuit
    trial_in_flight: bool = False

    def circuit(self, cooldown: float, now: float) -> CircuitState:
        if self.forced_open:
            return "forced-open"
        if self.opened_at is None:
            return "closed"
        return "half-open" if now - self.opened_at >= cooldown else "open"

    @property
    def hospital(self) -> str | None:
        value = self.info.get("hospital")
        return str(value) if value else None


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


@dataclass
class Stream:
    """A backend's answer arriving as server-sent events. It counts for the backend, with its whole duration, or
    against it only once it ends (`close`), as a whole answer would."""

    router: Router
    backend: Backend
    response: aiohttp.ClientResponse
    started: float
    closed: bool = False

    def close(self, ok: bool | None) -> None:
        """Release the connection; `ok`: the answer completed, failed midway, or (None) the client left."""
        if not self.closed:
            self.closed = True
            self.response.release()
            self.router.settle(self.backend, self.started, ok)


class BackendError(Exception):
    """A backend answered 5xx, timed out or could not be reached: count it against the backend and fail over."""


class Router:
    def __init__(self, cfg: RoutingConfig, client: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.client = client
        self.backends = [Backend(i, url.rstrip("/")) for i, url in enumerate(cfg.backends)]

    def available(self, now: float | None = None) -> list[Backend]:
        now = time.monotonic() if now is None else now
        out = []
        for b in self.backends:
            state = b.circuit(self.cfg.circuit_cooldown, now)
            if b.healthy and (state == "closed" or (state == "half-open" and not b.trial_in_flight)):
                out.append(b)
        return out

    def _pick(self, tasks: tuple[str, ...], exclude: set[int], model: str | None = None) -> Backend:
        """Weighted response time over the replicas of the federated model serving one of `tasks` (and `model`, if
        named; hospital nodes only vote): a backend twice as fast gets twice the share."""
        candidates = [b for b in self.available() if b.index not in exclude and not b.hospital
                      and b.info.get("task") in tasks and model in (None, b.info.get("model"))]
        what = f"model {model}" if model else f"a {' or '.join(tasks)} model"
        if not candidates:
            raise NoBackendAvailable(f"every healthy replica serving {what} failed this request" if exclude
                                     else f"no healthy replica serves {what}")
        weights = [1.0 / max(b.response_time, 1e-4) for b in candidates]
        return random.choices(candidates, weights=weights)[0]

    def models(self) -> dict[str, dict[str, Any]]:
        """Each model a replica of the federated model has reported serving, by id: its /health body."""
        return {str(b.info["model"]): b.info for b in self.backends if not b.hospital and "model" in b.info}

    def record_success(self, backend: Backend, seconds: float) -> None:
        backend.response_time = (1 - EWMA_WEIGHT) * backend.response_time + EWMA_WEIGHT * seconds
        backend.failures, backend.opened_at = 0, None

    def record_failure(self, backend: Backend) -> None:
        backend.failures += 1
        if backend.failures >= self.cfg.failure_threshold or backend.opened_at is not None:
            backend.opened_at = time.monotonic()  # open, or re-open after a failed half-open trial

    async def _open(self, backend: Backend, path: str, body: dict[str, Any],
                    timeout: float) -> tuple[aiohttp.ClientResponse, float]:
        """POST to one backend: its response, open, and when it was sent. No answer or a 5xx counts against the
        backend (BackendError, to fail over)."""
        backend.trial_in_flight = backend.circuit(self.cfg.circuit_cooldown, time.monotonic()) == "half-open"
        start = time.perf_counter()
        headers: dict[str, str] = {}
        try:
            with traced("backend_call", kind=SpanKind.CLIENT) as span:
                span.set_attribute("server.address", backend.url)
                inject(headers)  # W3C traceparent: the replica's spans join this trace
                response = await self.client.post(backend.url + path, json=body, headers=headers,
                                                  timeout=aiohttp.ClientTimeout(total=timeout))
                span.set_attribute("http.response.status_code", response.status)
        except (aiohttp.ClientError, TimeoutError) as err:
            self.settle(backend, start, ok=False)
            raise BackendError(f"{backend.url}: {type(err).__name__}") from err
        if response.status >= 500:
            response.release()
            self.settle(backend, start, ok=False)
            raise BackendError(f"{backend.url}: HTTP {response.status}")
        return response, start

    def settle(self, backend: Backend, start: float, ok: bool | None) -> None:
        """An answer has ended: it counts for (ok) or against the backend, or not at all (None: the client left)."""
        backend.trial_in_flight = False
        if ok:
            self.record_success(backend, time.perf_counter() - start)
        elif ok is not None:
            self.record_failure(backend)

    async def _reply(self, backend: Backend, response: aiohttp.ClientResponse, start: float) -> Reply:
        try:
            answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            self.settle(backend, start, ok=False)
            raise BackendError(f"{backend.url}: {type(err).__name__}") from err
        finally:
            response.release()
        self.settle(backend, start, ok=True)
        return Reply(response.status, answer)

    async def call_one(self, backend: Backend, path: str, body: dict[str, Any], timeout: float) -> Reply:
        """One backend, no failover. 4xx answers are the request's fault and are returned as they are."""
        return await self._reply(backend, *await self._open(backend, path, body, timeout))

    async def _stream_one(self, backend: Backend, path: str, body: dict[str, Any], timeout: float) -> Reply | Stream:
        response, start = await self._open(backend, path, body, timeout)
        if response.status != 200:
            return await self._reply(backend, response, start)
        return Stream(self, backend, response, start)

    async def _failover(self, tasks: tuple[str, ...], deadline: float, model: str | None,
                        attempt: Callable[[Backend, float], Awaitable[T]]) -> tuple[Backend, T]:
        """`attempt` on one backend serving one of `tasks` (and `model`), then on the others while it fails, until
        one answers or the deadline passes."""
        tried: set[int] = set()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            backend = self._pick(tasks, tried, model)
            tried.add(backend.index)
            try:
                return backend, await attempt(backend, remaining)
            except BackendError:
                continue

    async def call(self, tasks: tuple[str, ...], path: str, body: dict[str, Any], deadline: float,
                   model: str | None = None) -> tuple[Backend, Reply]:
        """POST to a backend serving one of `tasks`, with failover."""
        return await self._failover(tasks, deadline, model, lambda b, timeout: self.call_one(b, path, body, timeout))

    async def open_stream(self, tasks: tuple[str, ...], path: str, body: dict[str, Any], deadline: float,
                          model: str | None = None) -> tuple[Backend, Reply | Stream]:
        """As `call`, for an answer streamed as server-sent events: fails over until a backend starts answering,
        never after. A 4xx comes back as a Reply, a 200 as a Stream (the deadline bounds all of it)."""
        return await self._failover(tasks, deadline, model,
                                    lambda b, timeout: self._stream_one(b, path, body, timeout))

    def voters(self) -> list[Backend]:
        """One available classifier per hospital model, for the noisy vote."""
        by_hospital: dict[str, Backend] = {}
        for b in self.available():
            if b.hospital and b.hospital not in by_hospital and b.info.get("task") == "classification":
                by_hospital[b.hospital] = b
        return list(by_hospital.values())

    async def check(self, backend: Backend) -> None:
        """One health check. A backend is marked unhealthy after `failure_threshold` failed checks in a row, so
        one slow answer on a busy machine does not take it out of rotation."""
        ok = False
        try:
            timeout = aiohttp.ClientTimeout(total=max(HEALTH_TIMEOUT, self.cfg.health_interval))
            async with self.client.get(backend.url + "/health", timeout=timeout) as response:
                if response.status == 200:
                    backend.info, ok = await response.json(), True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        backend.failed_checks = 0 if ok else backend.failed_checks + 1
        backend.healthy = ok or (backend.healthy and backend.failed_checks < self.cfg.failure_threshold)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            await self.check_all()
