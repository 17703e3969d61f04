"""The study's first model and its data: a DP-SGD linear head over frozen all-MiniLM-L6-v2 embeddings of ICD-10-CM
texts, and the interface both of the study's models share (`Learner`; the other is `lora.LoraData`).

A DP step of the product's LoRA model costs hundreds of times the head's, so only the head runs the whole grid of
settings (hundreds of arms): embedding every text once and training a classifier on top keeps the question (what
federation and DP do to a model trained on split hospital data). Training still goes through
`fl_core.training.train_epochs` (Opacus, the hospital's accountant carried across rounds, FedProx's proximal term
after the noise).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from fl_core.cache import cache_root
from fl_core.config import AppConfig
from fl_core.data import load_splits, partition_indices
from fl_core.model import build_linear_head, sentence_embeddings
from fl_core.training import LocalTrainResult, classification_scores, train_epochs
from privacy.accountant import AccountantState
from privacy.calibration import sampling_plan

from .plan import Setting, StudyPlan

CPU = torch.device("cpu")


@dataclass(frozen=True)
class StudyData:
    """Train and test embeddings with their chapter labels; row i of `train_x` is training text i."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    label_names: tuple[str, ...]

    @property
    def num_features(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def cached_embeddings(texts: tuple[str, ...], log_progress: bool = True) -> np.ndarray:
    """Embeddings of `texts`, computed once per machine (about 100 texts a second on one core)."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_root() / "study" / f"minilm-{key}.npy"
    if path.exists():
        return np.load(path)
    if log_progress:
        print(f"study: embedding {len(texts)} texts with all-MiniLM-L6-v2 (once per machine)", flush=True)
    embeddings = sentence_embeddings(texts, CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{secrets.token_hex(4)}.npy")
    np.save(staging, embeddings)
    staging.rename(path)
    return embeddings


def load_study_data(plan: StudyPlan) -> StudyData:
    cfg = plan.config(float("inf"), 0, plan.baseline)
    splits = load_splits(cfg.data)
    embeddings = cached_embeddings(splits.train.texts + splits.test.texts)
    n = len(splits.train)
    return StudyData(embeddings[:n], np.array(splits.train.labels, dtype=np.int64), embeddings[n:],
                     np.array(splits.test.labels, dtype=np.int64), splits.train.label_names)


def hospital_rows(plan: StudyPlan, setting: Setting, seed: int) -> list[list[int]]:
    """Each hospital's training rows, split as `fl_core.data` splits a federation's data."""
    cfg = plan.config(float("inf"), seed, setting)
    splits = load_splits(cfg.data)
    return partition_indices(splits.train, cfg.federation, seed)


def new_head(data: StudyData, seed: int) -> nn.Linear:
    return build_linear_head(data.num_features, data.num_labels, seed)


def head_to_arrays(head: nn.Module) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().astype(np.float32) for p in head.parameters()]


def load_head_arrays(head: nn.Module, arrays: list[np.ndarray]) -> None:
    with torch.no_grad():
        for p, a in zip(head.parameters(), arrays, strict=True):
            p.copy_(torch.as_tensor(np.asarray(a, dtype=np.float32)))


def _head_forward(module: nn.Module, batch: tuple[torch.Tensor, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = batch
    return module(features.to(device)), labels.to(device)


def train_head(cfg: AppConfig, head: nn.Module, data: StudyData, rows: list[int], *, sigma: float | None,
               accountant: AccountantState | None, proximal_mu: float) -> LocalTrainResult:
    """One round (`train.local_epochs` epochs) on `rows`, DP-SGD when `sigma` is set."""
    dataset = TensorDataset(torch.from_numpy(data.train_x[rows]), torch.from_numpy(data.train_y[rows]))
    plan = sampling_plan(len(rows), cfg.train.batch_size, cfg.train.local_epochs, cfg.federation.num_rounds)
    return train_epochs(cfg, head, dataset, default_collate, _head_forward, CPU, plan=plan, noise_multiplier=sigma,
                        accountant=accountant, proximal_mu=proximal_mu)


@torch.no_grad()
def evaluate_head(head: nn.Module, data: StudyData) -> dict[str, float]:
    head.eval()
    scores = classification_scores(head(torch.from_numpy(data.test_x)), torch.from_numpy(data.test_y))
    head.train()
    return scores


class Learner(Protocol):
    """What the study's arms do with either model (`HeadLearner`, `lora.LoraData`): a model at initialisation, one
    round of training on some rows, test scores, and the arrays that travel."""

    def new_model(self, cfg: AppConfig) -> nn.Module: ...

    def train(self, cfg: AppConfig, model: nn.Module, rows: list[int], *, sigma: float | None,
              accountant: AccountantState | None, proximal_mu: float) -> LocalTrainResult: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def to_arrays(self, model: nn.Module) -> list[np.ndarray]: ...

    def load_arrays(self, model: nn.Module, arrays: list[np.ndarray]) -> None: ...


class HeadLearner:
    """The linear head as a `Learner`."""

    def __init__(self, data: StudyData) -> None:
        self.data = data

    def new_model(self, cfg: AppConfig) -> nn.Linear:
        return new_head(self.data, cfg.train.seed)

    def train(self, cfg: AppConfig, model: nn.Module, rows: list[int], *, sigma: float | None,
              accountant: AccountantState | None, proximal_mu: float) -> LocalTrainResult:
        return train_head(cfg, model, self.data, rows, sigma=sigma, accountant=accountant, proximal_mu=proximal_mu)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_head(model, self.data)

    @staticmethod
    def to_arrays(model: nn.Module) -> list[np.ndarray]:
        return head_to_arrays(model)

    @staticmethod
    def load_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
        load_head_arrays(model, arrays)
