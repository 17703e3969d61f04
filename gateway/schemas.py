"""Request and response bodies of the public API (the gateway) and of the model replicas behind it.

Bounds on every field keep a malformed or hostile request a 422 before it costs model time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 8000


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TEXT, description="Clinical text to classify.")
    privacy: Literal["standard", "noisy-vote"] = Field(
        "standard", description="standard: the federated DP model (no further epsilon spent). noisy-vote: a "
                                "Gaussian-noised vote of the hospitals' own models, charged to your budget.")


class CompletionRequest(BaseModel):
    """OpenAI-compatible subset: one prompt, one choice."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    model: str | None = Field(None, max_length=200, description="Ignored: the gateway serves one model.")
    max_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ReplicaCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class PrivacyInfo(BaseModel):
    """What the answer cost and what guarantee the model behind it carries."""

    provenance: dict[str, Any] = Field(description="Training guarantee: run id, epsilon, delta, unit of privacy.")
    query_mode: str
    epsilon_charged: float = Field(description="epsilon this query spent from your budget (0 for standard).")
    budget_remaining: float | None = Field(description="Your remaining epsilon for queries that spend it.")


class ClassifyResponse(BaseModel):
    label: str
    probabilities: dict[str, float] | None = Field(description="Per-label probabilities; none for noisy-vote, "
                                                               "which releases only the noised winner.")
    request_id: str
    model: str
    privacy: PrivacyInfo


class CompletionResponse(ReplicaCompletion):
    request_id: str
    privacy: PrivacyInfo


class ReplicaHealth(BaseModel):
    status: Literal["ok"]
    model: str
    task: str
    hospital: str | None
    provenance: dict[str, Any]


class BudgetResponse(BaseModel):
    user: str
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_per_user: float
    queries_left: int


class BackendState(BaseModel):
    index: int
    url: str
    healthy: bool
    circuit: Literal["closed", "open", "half-open", "forced-open"]
    response_time_ms: float
    hospital: str | None


class CircuitChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: Literal["open", "closed"]


class ErrorResponse(BaseModel):
    detail: str
