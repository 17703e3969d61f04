"""A model replica: one trained model behind the gateway (`fl-gateway replica`). It trusts the gateway in front of
it for auth and limits, so it listens on loopback or a cluster-internal address only."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from fl_core.tracing import traced

from .generation import Generation
from .schemas import (
    DONE,
    AssistantMessage,
    ChatChoice,
    ChatRequest,
    ClassifyRequest,
    CompletionChoice,
    CompletionRequest,
    Prediction,
    ReplicaChatCompletion,
    ReplicaCompletion,
    ReplicaHealth,
    Sampling,
    Usage,
    sse,
)
from .served_model import ServedModel

GENERATIVE = ("causal-lm", "chat")

def refusal(status: int, message: str, param: str | None = None) -> HTTPException:
    """A 4xx the gateway passes on: the message, and the request field at fault (OpenAI's `param`)."""
    return HTTPException(status, {"message": message, "param": param})


def usage(g: Generation) -> Usage:
    return Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                 total_tokens=g.prompt_tokens + g.completion_tokens)


class ContinuedTrace:
    """Each request's span continues the trace its W3C `traceparent` header names (the gateway's backend call), so
    one trace runs from the gateway into the replica (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with traced(f"replica {scope['method']} {scope['path']}", context=extract(carrier),
                                          kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


def create_replica_app(model: ServedModel, hospital: str | None = None) -> FastAPI:
    """`hospital`: this replica serves that hospital's own model, so it can vote in noisy-vote queries."""
    app = FastAPI(title="federated-dp-llm model replica", version="1")
    app.add_middleware(ContinuedTrace)
    generating: set[asyncio.Future[None]] = set()  # streamed answers' generations, held until they end

    @app.get("/health", response_model=ReplicaHealth)
    async def health() -> ReplicaHealth:  # on the loop: never queued behind generations in the thread pool
        return ReplicaHealth(status="ok", model=model.name, created=model.created, task=model.task, hospital=hospital,
                             provenance=model.provenance)

    @app.post("/v1/classify", response_model=Prediction)
    async def classify(body: ClassifyRequest) -> Prediction:
        if model.task != "classification":
            raise HTTPException(400, f"this model is a {model.task} model: use /v1/completions")
        with traced("classify"):
            result = await run_in_threadpool(model.classify, body.text)
        return Prediction(label=result.label, probabilities=result.probabilities)

    def fitted(prompt: list[int], body: Sampling, field: str) -> list[int]:
        """The prompt, if it leaves room in the model's context for the answer asked for."""
        limit = model.answer_limit(body.params())
        if len(prompt) + limit > model.context:
            raise refusal(400, f"{field}: {len(prompt)} prompt tokens and an answer of up to {limit} exceed the "
                               f"model's context of {model.context} tokens", field)
        return prompt

    async def streamed(prompt: list[int], body: Sampling, chunk: Callable[[str | None, str | None], dict[str, Any]],
                       ) -> StreamingResponse:
        """Server-sent events: a chunk per piece of visible text, then the finish reason and the usage."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[str | Generation | BaseException]()
        cancelled = threading.Event()

        def run() -> None:
            def put(item: str | Generation | BaseException) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            try:
                put(model.generate(prompt, body.params(), put, cancelled))
            except Exception as err:
                put(err)

        async def events() -> AsyncIterator[bytes]:
            # in the bounded thread pool, as whole answers are: a burst of streams queues, it does not fork threads
            worker = asyncio.ensure_future(run_in_threadpool(run))
            generating.add(worker)
            worker.add_done_callback(generating.discard)
            try:
                while not isinstance(item := await queue.get(), Generation):
                    if isinstance(item, BaseException):
                        raise item
                    yield sse(chunk(item, None))
                yield sse({**chunk(None, item.finish_reason), "usage": usage(item).model_dump()})
                yield DONE
            finally:
                cancelled.set()  # the client left, or the answer is complete: stop generating either way

        return StreamingResponse(events(), media_type="text/event-stream")

    def generative(task: str) -> None:
        if model.task != task and not (task == "causal-lm" and model.task in GENERATIVE):
            route = "/v1/classify" if model.task == "classification" else "/v1/completions"
            raise refusal(400, f"this model is a {model.task} model: use {route}", "model")

    @app.post("/v1/completions", response_model=ReplicaCompletion)
    async def completions(body: CompletionRequest) -> ReplicaCompletion | StreamingResponse:
        generative("causal-lm")
        prompt = fitted(await run_in_threadpool(model.completion_prompt, body.prompt), body, "prompt")
        answer_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"id": answer_id, "object": "text_completion", "created": created, "model": model.name,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}
            return await streamed(prompt, body, chunk)
        g = await run_in_threadpool(model.generate, prompt, body.params())
        return ReplicaCompletion(id=answer_id, created=created, model=model.name, usage=usage(g),
                                 choices=[CompletionChoice(index=0, text=g.text, finish_reason=g.finish_reason)])

    @app.post("/v1/chat/completions", response_model=ReplicaChatCompletion)
    async def chat_completions(body: ChatRequest) -> ReplicaChatCompletion | StreamingResponse:
        generative("chat")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in body.messages]
        prompt = fitted(await run_in_threadpool(model.chat_prompt, messages), body, "messages")
        answer_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            first = [True]

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta: dict[str, str] = {"role": "assistant"} if first[0] else {}
                first[0] = False
                return {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model.name,
                        "choices": [{"index": 0, "delta": {**delta, **({"content": text} if text else {})},
                                     "finish_reason": finish, "logprobs": None}]}
            return await streamed(prompt, body, chunk)
        g = await run_in_threadpool(model.generate, prompt, body.params())
        return ReplicaChatCompletion(id=answer_id, created=created, model=model.name, usage=usage(g), choices=[
            ChatChoice(index=0, message=AssistantMessage(content=g.text), finish_reason=g.finish_reason)])

    return app
