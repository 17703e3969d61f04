"""A model replica: one trained model behind the gateway (`fl-gateway replica`). It trusts the gateway in front of
it for auth and limits, so it listens on loopback or a cluster-internal address only."""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, HTTPException
from starlette.concurrency import run_in_threadpool

from .schemas import (
    ClassifyRequest,
    CompletionChoice,
    CompletionRequest,
    Prediction,
    ReplicaCompletion,
    ReplicaHealth,
    Usage,
)
from .served_model import ServedModel


def create_replica_app(model: ServedModel, hospital: str | None = None) -> FastAPI:
    """`hospital`: this replica serves that hospital's own model, so it can vote in noisy-vote queries."""
    app = FastAPI(title="federated-dp-llm model replica", version="1")

    @app.get("/health", response_model=ReplicaHealth)
    def health() -> ReplicaHealth:
        return ReplicaHealth(status="ok", model=model.name, task=model.task, hospital=hospital,
                             provenance=model.provenance)

    @app.post("/v1/classify", response_model=Prediction)
    async def classify(body: ClassifyRequest) -> Prediction:
        if model.task != "classification":
            raise HTTPException(400, f"this model is a {model.task} model: use /v1/completions")
        result = await run_in_threadpool(model.classify, body.text)
        return Prediction(label=result.label, probabilities=result.probabilities)

    @app.post("/v1/completions", response_model=ReplicaCompletion)
    async def completions(body: CompletionRequest) -> ReplicaCompletion:
        if model.task != "causal-lm":
            raise HTTPException(400, f"this model is a {model.task} model: use /v1/classify")
        text, prompt_tokens, new_tokens = await run_in_threadpool(
            model.complete, body.prompt, body.max_tokens, body.temperature, body.seed)
        finish = "length" if new_tokens >= min(body.max_tokens, model.max_new_tokens) else "stop"
        return ReplicaCompletion(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.name,
            choices=[CompletionChoice(index=0, text=text, finish_reason=finish)],
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=new_tokens,
                        total_tokens=prompt_tokens + new_tokens))

    return app
