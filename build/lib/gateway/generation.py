"""Text generation as OpenAI clients expect it: stop sequences cut the answer (and end generation as soon as one
appears), and a streamed answer sends only text no later token can take back."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

INCOMPLETE = "\ufffd"  # what decoding shows for a character whose bytes are split across tokens


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length"


def visible(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The part of `text` that can be shown now, and whether a stop sequence ended it. A stop sequence is cut with
    everything after it; a tail that could still grow into one is held back, as is a half-decoded character."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        return text[:min(cuts)], True
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    shown = text[:len(text) - held]
    return shown.rstrip(INCOMPLETE), False


class TextWatch(StoppingCriteria):
    """Called by `generate` after every token: decodes the new tokens, stops at a stop sequence or when the
    client has gone (`cancelled`), and hands each newly visible piece of text to `on_text`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stops: Sequence[str],
                 on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None) -> None:
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, tuple(stops)
        self.on_text, self.cancelled = on_text, cancelled
        self.shown, self.stopped = "", False

    def text_of(self, ids: torch.Tensor) -> str:
        # no clean-up of spaces: it rewrites earlier text as later tokens arrive, which a stream cannot take back
        return str(self.tokenizer.decode(ids[self.prompt_length:], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        shown, self.stopped = visible(self.text_of(input_ids[0]), self.stops)
        self.emit(shown)
        done = self.stopped or (self.cancelled is not None and self.cancelled.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)  # type: ignore[return-value]

    def emit(self, shown: str) -> None:
        if len(shown) > len(self.shown) and shown.startswith(self.shown):
            if self.on_text is not None:
                self.on_text(shown[len(self.shown):])
            self.shown = shown
