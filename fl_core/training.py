"""One hospital's local work: DP-SGD training of the adapter for one round of its plan, and evaluation.

Randomness: the config seed fixes model initialisation and data splits only. DP noise and Poisson sampling come
from a `SecureRandom` (ChaCha20, a fresh 256-bit key from the OS) unless a caller (a test) passes a keyed one:
replaying one stream every round would repeat the noise, and the accountant's composition assumes independent
noise per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan
from privacy.dp_sgd import PoissonBatches, PrivateTraining, SecureNoise, ShuffledBatches, make_private
from privacy.loss import IGNORE_INDEX, PerSequenceLMLoss, SequenceClassificationLoss
from privacy.secure_random import SecureRandom

from .config import AppConfig
from .data import TextDataset

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TokenizedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        encoded = tokenizer(list(data.texts), truncation=True, max_length=max_len)["input_ids"]
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        self.labels = torch.tensor(data.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.labels[i]


class Collator:
    """Right-pads a batch to its longest sequence; for causal LM the targets are the tokens themselves."""

    def __init__(self, pad_id: int, causal_lm: bool) -> None:
        self.pad_id = pad_id
        self.causal_lm = causal_lm

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        if self.causal_lm:
            return input_ids, mask, input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return input_ids, mask, torch.stack([label for _, label in items])


@dataclass
class LocalTrainResult:
    num_examples: int
    train_loss: float  # for the hospital's own console; it never leaves the node unless its policy allows it
    steps: int
    accountant: AccountantState | None  # None when privacy is disabled
    epsilon: float  # spent so far by this hospital (inf without DP)


def make_criterion(cfg: AppConfig) -> nn.Module:
    return SequenceClassificationLoss() if cfg.task.name == "classification" else PerSequenceLMLoss()


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def data_loader(cfg: AppConfig, dataset: TextDataset, tokenizer: PreTrainedTokenizerBase, *,
                batch_size: int) -> DataLoader:
    """Evaluation batches in order; training draws its own batches (`train_epochs`)."""
    return DataLoader(TokenizedDataset(dataset, tokenizer, cfg.train.max_seq_len), batch_size=batch_size,
                      shuffle=False, collate_fn=Collator(pad_id_of(tokenizer), cfg.task.name == "causal-lm"))


def make_optimizer(cfg: AppConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr)
    return torch.optim.Adam(params, lr=cfg.train.lr)


Forward = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.device], tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[list[Any]], tuple[torch.Tensor, ...]]


def text_forward(module: nn.Module, batch: tuple[torch.Tensor, ...],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a tokenised batch (input ids, attention mask, labels)."""
    input_ids, mask, labels = batch
    return module(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits, labels.to(device)


def train_local(
    cfg: AppConfig,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    device: torch.device,
    *,
    plan: SamplingPlan,
    noise_multiplier: float | None,
    accountant: AccountantState | None,
    proximal_mu: float = 0.0,
    rng: SecureRandom | None = None,
) -> LocalTrainResult:
    """Train `model`'s adapter in place for one round of `plan` from its current (global) state."""
    tokenized = TokenizedDataset(dataset, tokenizer, cfg.train.max_seq_len)
    return train_epochs(cfg, model, tokenized, Collator(pad_id_of(tokenizer), cfg.task.name == "causal-lm"),
                        text_forward, device, plan=plan, noise_multiplier=noise_multiplier, accountant=accountant,
                        proximal_mu=proximal_mu, rng=rng)


def train_epochs(
    cfg: AppConfig,
    model: nn.Module,
    dataset: Dataset[Any],
    collate: Collate,
    forward: Forward,
    device: torch.device,
    *,
    plan: SamplingPlan,
    noise_multiplier: float | None,
    accountant: AccountantState | None,
    proximal_mu: float,
    rng: SecureRandom | None = None,
) -> LocalTrainResult:
    """One round of `plan` over `dataset`, training the model's trainable parameters in place.

    With `noise_multiplier` set, runs DP-SGD on Poisson batches at the plan's rate for exactly the plan's steps,
    resuming `accountant`; FedProx's proximal gradient mu * (w - w_global) is added after clipping and noise, since
    it does not depend on patient data. Without it, `train.local_epochs` shuffled passes of the same step count.
    """
    private = noise_multiplier is not None
    if private and accountant is None:
        raise ValueError("train_epochs: a private run needs the hospital's accountant state")
    num_examples = len(dataset)  # type: ignore[arg-type]
    if num_examples != plan.num_examples:
        raise ValueError(f"train_epochs: the plan is for {plan.num_examples} examples, the dataset has {num_examples}")
    rng = rng or SecureRandom()
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trainable]

    def add_proximal_gradient() -> None:
        if proximal_mu == 0:
            return
        for p, w_global in zip(trainable, anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - w_global, alpha=proximal_mu)

    model.train()
    base_optimizer = make_optimizer(cfg, trainable)
    optimizer: torch.optim.Optimizer | SecureNoise = base_optimizer
    loss_module = make_criterion(cfg)
    criterion: Callable[..., torch.Tensor] = loss_module
    session: PrivateTraining | None = None
    module: nn.Module = model
    batches: PoissonBatches | ShuffledBatches
    if private:
        assert noise_multiplier is not None
        session = make_private(
            model, base_optimizer, loss_module, noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            expected_batch_size=max(1, int(plan.num_examples * plan.sample_rate)),
            grad_sample_mode=cfg.privacy.grad_sample_mode, secure_random=rng, after_noise=add_proximal_gradient)
        module, optimizer, criterion = session.module, session.optimizer, session.criterion
        batches = PoissonBatches(num_examples, plan.sample_rate, plan.steps_per_round, rng)
    else:
        batches = ShuffledBatches(num_examples, cfg.train.batch_size, cfg.train.local_epochs, rng)

    losses: list[float] = []
    steps = 0
    try:
        for indices in batches:
            steps += 1
            while indices:
                optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                logits, labels = forward(module, collate([dataset[i] for i in indices]), device)
                loss = criterion(logits, labels)
                loss.backward()
                dropped = set(session.non_finite_samples()) if session is not None else set()
                if not dropped:
                    break
                indices = [i for k, i in enumerate(indices) if k not in dropped]  # a zero contribution, as clipping
            if not indices:  # Poisson sampling drew nobody, or ghost clipping dropped everyone
                assert session is not None
                optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                session.optimizer.step_without_data()
                continue
            if session is None:
                add_proximal_gradient()
            optimizer.step()  # type: ignore[union-attr]
            losses.append(float(loss.item()))
    finally:
        if session is not None:
            session.close()
    state = accountant.then(noise_multiplier, plan.sample_rate, steps) \
        if accountant is not None and noise_multiplier is not None else None
    epsilon = state.epsilon(cfg.privacy.delta) if state is not None else math.inf
    return LocalTrainResult(num_examples, float(np.mean(losses)) if losses else math.nan, steps, state, epsilon)


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of a whole evaluation set's logits."""
    predictions = logits.argmax(dim=-1).cpu().numpy()
    truth = labels.cpu().numpy()
    return {
        "loss": float(nn.functional.cross_entropy(logits.float(), labels)),
        "accuracy": float(np.mean(predictions == truth)),
        "macro_f1": float(f1_score(truth, predictions, average="macro", zero_division=0)),
    }


@torch.no_grad()
def classification_logits(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                          dataset: TextDataset, device: torch.device,
                          batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every example, in order."""
    model.eval()
    logits, truth = [], []
    for input_ids, mask, labels in data_loader(cfg, dataset, tokenizer, batch_size=batch_size):
        logits.append(model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu())
        truth.append(labels)
    model.train()
    return torch.cat(logits), torch.cat(truth)


@torch.no_grad()
def language_model_losses(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                          dataset: TextDataset, device: torch.device,
                          batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's mean next-token loss and its number of target tokens, in order."""
    model.eval()
    losses, counts = [], []
    for input_ids, mask, labels in data_loader(cfg, dataset, tokenizer, batch_size=batch_size):
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        token_nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                reduction="none")
        tokens = (targets != IGNORE_INDEX).sum(dim=1)
        losses.append((token_nll.sum(dim=1) / tokens.clamp(min=1)).cpu())
        counts.append(tokens.cpu())
    model.train()
    return torch.cat(losses), torch.cat(counts)


def evaluate(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset,
             device: torch.device) -> dict[str, float]:
    """Exact scores on a test set the server holds. Classification: loss, accuracy, macro-F1; causal LM: per-token
    loss and perplexity."""
    if cfg.task.name == "classification":
        return classification_scores(*classification_logits(cfg, model, tokenizer, dataset, device))
    losses, tokens = language_model_losses(cfg, model, tokenizer, dataset, device)
    loss = float((losses * tokens).sum() / tokens.sum().clamp(min=1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
