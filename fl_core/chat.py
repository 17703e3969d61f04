"""The chat task: a diagnosis text as the user's turn, its label as the assistant's, in the tokenizer's own chat
template. Training's targets are the answer tokens alone, and the model is scored as a clinician would use it: the
exact match of its greedy answer, and the perplexity of the true answer.

The answer (`task.answer`) is the label's ICD-10-CM code range ("S00-T88"), or its name without that range
("title": "Neoplasms"; SmolLM2's tokenizer splits digits, so name and range together would double the answer).
A range's first token names its chapter (the second for the two H chapters); ten of the 22 titles begin "Diseases
of the", and greedy decoding, which takes the likeliest first token, answers that prefix for other chapters' texts.

The system turn is empty (the template would otherwise put in its default one): every token of a fixed prompt would
be paid for on every DP-SGD step, and fine-tuning, not an instruction, teaches the task. A tokenizer without a chat
template (the tests' tiny models read MiniLM's) gets a plain "Diagnosis: ... Chapter:" layout, so the same code runs
on every model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from privacy.loss import IGNORE_INDEX

from .data import DataError, TextDataset

SYSTEM_PROMPT = ""
PLAIN_LAYOUT = {"system": "{}", "user": "Diagnosis: {}", "assistant": "Chapter: {}"}
CODE_RANGE = re.compile(r"\s*\(([A-Z0-9-]+)\)$")


def answer_of(label_name: str, answer: str) -> str:
    """What the assistant says for a label: its name without a trailing code range ("title"), or that range alone
    ("code_range": "S00-T88", whose first token names the chapter)."""
    if answer == "code_range":
        found = CODE_RANGE.search(label_name)
        if found is None:
            raise DataError(f"task.answer: label {label_name!r} has no code range")
        return found.group(1)
    return CODE_RANGE.sub("", label_name)


def _ids(encoded: object) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns a BatchEncoding in transformers 5, a list before."""
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded  # type: ignore[index]
    return [int(i) for i in ids]


def _with_system(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Training's empty system turn first, unless the conversation brings its own."""
    turns = [dict(m) for m in messages]
    if not turns or turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return turns


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The conversation up to the assistant's turn: what the model answers."""
    return conversation_ids(tokenizer, [{"role": "user", "content": text}])


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """A conversation up to the assistant's next turn, laid out as training laid out its examples, so a served
    model sees what it learnt from: the template with an empty system turn unless the conversation brings one;
    without a template, each user turn as a diagnosis and each assistant turn as its chapter."""
    if tokenizer.chat_template:
        return _ids(tokenizer.apply_chat_template(_with_system(messages), add_generation_prompt=True, tokenize=True))
    lines = [PLAIN_LAYOUT[m["role"]].format(m["content"]) for m in messages]
    return [int(i) for i in tokenizer("\n".join([*lines, "Chapter:"]))["input_ids"]]


def answer_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[int], text: str, answer: str) -> list[int]:
    """The assistant's turn as the template closes it, up to and including the end-of-turn token generation stops
    at (the template's newline after it is not a target)."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if tokenizer.chat_template:
        turns = _with_system([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
        full = _ids(tokenizer.apply_chat_template(turns, tokenize=True))
        if full[: len(prompt)] != prompt:
            raise ValueError("chat template: the answer does not extend the prompt")
        ids = full[len(prompt):]
        return ids[: ids.index(end) + 1] if end in ids else ids
    ids = [int(i) for i in tokenizer(" " + answer, add_special_tokens=False)["input_ids"]]
    return ids + ([int(end)] if end is not None else [])


class ChatDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Token ids of prompt and answer, and per-token labels: the answer's ids, IGNORE_INDEX on the prompt. The
    diagnosis text is cut to `max_text_tokens`; the answer never is."""

    def __init__(self, data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_text_tokens: int,
                 answer: str) -> None:
        self.input_ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.prompt_lengths: list[int] = []
        answers = [answer_of(name, answer) for name in data.label_names]
        for text, label in zip(data.texts, data.labels, strict=True):
            text = clipped(tokenizer, text, max_text_tokens)
            prompt = prompt_ids(tokenizer, text)
            target = answer_ids(tokenizer, prompt, text, answers[label])
            ids = torch.tensor(prompt + target, dtype=torch.long)
            self.input_ids.append(ids)
            self.labels.append(ids.masked_fill(torch.arange(len(ids)) < len(prompt), IGNORE_INDEX))
            self.prompt_lengths.append(len(prompt))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.labels[i]


def clipped(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else str(tokenizer.decode(ids[:max_tokens]))


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], device: torch.device,
                     max_new_tokens: int, max_text_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy answers to each text's prompt, decoded without special tokens. Prompts are left-padded, as
    generation needs; texts go through in length order to keep padding short."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [prompt_ids(tokenizer, clipped(tokenizer, text, max_text_tokens)) for text in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(texts)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),  # type: ignore[operator]
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(rows):
            answers[i] = str(tokenizer.decode(output[row, width:], skip_special_tokens=True)).strip()
    model.train()
    return answers
