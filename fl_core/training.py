"""One hospital's local work: DP-SGD training of the adapter for k epochs, and evaluation.

Randomness: the config seed fixes model initialisation and data splits only. DP noise and Poisson sampling draw
fresh OS entropy unless a caller (a test) passes `rng_seed`: replaying one seed every round would repeat the
noise, and the accountant's composition assumes independent noise per step.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from privacy.accountant import AccountantState
from privacy.dp_sgd import PrivateTraining, make_private
from privacy.loss import IGNORE_INDEX, PerSequenceLMLoss, SequenceClassificationLoss

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
    train_loss: float
    steps: int
    accountant: AccountantState | None  # None when privacy is disabled
    epsilon: float  # spent so far by this hospital (inf without DP)


def make_criterion(cfg: AppConfig) -> nn.Module:
    return SequenceClassificationLoss() if cfg.task.name == "classification" else PerSequenceLMLoss()


def data_loader(cfg: AppConfig, dataset: TextDataset, tokenizer: PreTrainedTokenizerBase, *,
                shuffle: bool, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return DataLoader(TokenizedDataset(dataset, tokenizer, cfg.train.max_seq_len), batch_size=batch_size,
                      shuffle=shuffle, collate_fn=Collator(pad_id, cfg.task.name == "causal-lm"),
                      generator=generator)


def make_optimizer(cfg: AppConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr)
    return torch.optim.Adam(params, lr=cfg.train.lr)


Forward = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.device], tuple[torch.Tensor, torch.Tensor]]


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
    noise_multiplier: float | None,
    accountant: AccountantState | None,
    proximal_mu: float = 0.0,
    poisson_sampling: bool = True,
    rng_seed: int | None = None,
) -> LocalTrainResult:
    """Train `model`'s adapter in place for `train.local_epochs` epochs from its current (global) state."""
    seed = rng_seed if rng_seed is not None else secrets.randbits(62)
    loader = data_loader(cfg, dataset, tokenizer, shuffle=True, batch_size=cfg.train.batch_size,
                         generator=torch.Generator().manual_seed(seed))
    return train_epochs(cfg, model, loader, text_forward, device, noise_multiplier=noise_multiplier,
                        accountant=accountant, proximal_mu=proximal_mu, poisson_sampling=poisson_sampling,
                        seed=seed)


def train_epochs(
    cfg: AppConfig,
    model: nn.Module,
    loader: DataLoader,
    forward: Forward,
    device: torch.device,
    *,
    noise_multiplier: float | None,
    accountant: AccountantState | None,
    proximal_mu: float,
    poisson_sampling: bool,
    seed: int,
) -> LocalTrainResult:
    """`train.local_epochs` epochs over `loader` of the model's trainable parameters, in place.

    With `noise_multiplier` set, runs DP-SGD resuming `accountant`; FedProx's proximal gradient
    mu * (w - w_global) is added after clipping and noise, since it does not depend on patient data.
    """
    private = noise_multiplier is not None
    if private and accountant is None:
        raise ValueError("train_epochs: a private run needs the hospital's accountant state")
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trainable]

    def add_proximal_gradient() -> None:
        if proximal_mu == 0:
            return
        for p, w_global in zip(trainable, anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - w_global, alpha=proximal_mu)

    model.train()
    num_examples = len(loader.dataset)  # type: ignore[arg-type]
    optimizer = make_optimizer(cfg, trainable)
    loss_module = make_criterion(cfg)
    criterion: Callable[..., torch.Tensor] = loss_module
    session: PrivateTraining | None = None
    module: nn.Module = model
    if private:
        assert noise_multiplier is not None and accountant is not None
        session = make_private(
            model, optimizer, loader, loss_module, noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm, accountant=accountant,
            grad_sample_mode=cfg.privacy.grad_sample_mode, poisson_sampling=poisson_sampling,
            after_noise=add_proximal_gradient,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
        module, optimizer, loader, criterion = session.module, session.optimizer, session.data_loader, \
            session.criterion

    losses: list[float] = []
    steps = 0
    try:
        for _ in range(cfg.train.local_epochs):
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if batch[0].shape[0] == 0:
                    assert session is not None
                    session.step_on_empty_batch()
                    continue
                logits, labels = forward(module, batch, device)
                loss = criterion(logits, labels)
                loss.backward()
                if session is None:
                    add_proximal_gradient()
                optimizer.step()
                losses.append(float(loss.item()))
        state = session.accountant_state() if session is not None else None
    finally:
        if session is not None:
            session.close()
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
def evaluate(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset,
             device: torch.device, batch_size: int = 128) -> dict[str, float]:
    """Classification: loss, accuracy, macro-F1. Causal LM: per-token loss and perplexity."""
    model.eval()
    loader = data_loader(cfg, dataset, tokenizer, shuffle=False, batch_size=batch_size)
    if cfg.task.name == "classification":
        logits, truth = [], []
        for input_ids, mask, labels in loader:
            logits.append(model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu())
            truth.append(labels)
        model.train()
        return classification_scores(torch.cat(logits), torch.cat(truth))
    nll, tokens = 0.0, 0
    for input_ids, mask, labels in loader:
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        nll += float(nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                 ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((targets != IGNORE_INDEX).sum())
    model.train()
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
