"""Request and response bodies of the public API (the gateway) and of the model replicas behind it.

Bounds on every field keep a malformed or hostile request a 422 before it costs model time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TEXT = 8000
MAX_MESSAGES = 64
DONE = b"data: [DONE]\n\n"  # the last server-sent event of a streamed answer, as OpenAI ends its streams


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event of a streamed answer."""
    return f"data: {json.dumps(event)}\n\n".encode()


@dataclass(frozen=True)
class GenerationParams:
    """What a replica needs of a completion request to generate its answer."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TEXT, description="Clinical text to classify.")
    privacy: Literal["standard", "noisy-vote"] = Field(
        "standard", description="standard: the federated DP model (no further epsilon spent). noisy-vote: a "
                                "Gaussian-noised vote of the hospitals' own models, charged to your budget.")


MAX_STOPS, MAX_STOP_LENGTH = 4, 64
MIN_SAMPLING_TEMPERATURE = 0.01  # below it sampling is greedy decoding in all but overflow: decoded greedily


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """The generation parameters common OpenAI clients send; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=200, description="A model id from /v1/models; none: any replica.")
    max_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description=f"0 (or under {MIN_SAMPLING_TEMPERATURE}): greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling, when sampling.")
    n: int = Field(1, ge=1, le=1, description="Answers per request: one.")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOPS} sequences of 1-{MAX_STOP_LENGTH} characters that end the answer; "
                          "they are not part of it.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Accepted at 0 only (clients send it).")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Accepted at 0 only (clients send it).")
    stream: bool = Field(False, description="Send the answer as server-sent events, as it is generated.")
    stream_options: StreamOptions | None = Field(None, description="Accepted; the last event always has usage.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility and not used: the "
                                                               "caller is the token's subject.")

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if isinstance(stop, list) and not 1 <= len(stop) <= MAX_STOPS:
            raise ValueError(f"give 1-{MAX_STOPS} stop sequences")
        if any(not 1 <= len(s) <= MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"a stop sequence has 1-{MAX_STOP_LENGTH} characters")
        return stop

    def params(self) -> GenerationParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0
        return GenerationParams(self.max_tokens, temperature, self.top_p, stop, self.seed)


class CompletionRequest(Sampling):
    """OpenAI's /v1/completions: one prompt, one choice."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str = Field(min_length=1, max_length=MAX_TEXT)


class ChatRequest(Sampling):
    """OpenAI's /v1/chat/completions: a conversation, answered by the assistant's next turn."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class ReplicaChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class PrivacyInfo(BaseModel):
    """What the answer cost and what guarantee the model behind it carries."""

    provenance: dict[str, Any] = Field(description="Training guarantee: run id, epsilon, delta, unit of privacy; "
                                                   "what the model was trained as (task, answer format, precision).")
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


class ChatCompletionResponse(ReplicaChatCompletion):
    request_id: str
    privacy: PrivacyInfo


class ModelCard(BaseModel):
    """One served model, as OpenAI's /v1/models lists it, with what it was trained for and under which guarantee."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    task: str
    provenance: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReplicaHealth(BaseModel):
    status: Literal["ok"]
    model: str
    created: int = Field(description="Unix time the run wrote its privacy report.")
    task: str
    hospital: str | None
    provenance: dict[str, Any]


class BudgetResponse(BaseModel):
    user: str
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_per_user: float
    queries_left: int = Field(description="Noisy votes you may still make: within your budget and within what "
                                          "the hospital models have left over all users (privacy.epsilon_total).")


class DeploymentBudget(BaseModel):
    """One hospital model's spend over all users: what one of its training records is exposed to."""

    hospital: str
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_total: float
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


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """Errors of the OpenAI-compatible routes, in the shape OpenAI's clients read."""

    error: OpenAIErrorBody
