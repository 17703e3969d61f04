"""A party that trains on its own (all data pooled, or one hospital alone), run in a worker process: the study runs
two at a time, one per core, where the federated arms use both cores through the simulation's hospitals."""

from __future__ import annotations

import math
import time
from functools import lru_cache

import torch

from fl_core.config import AppConfig
from fl_core.entry import quiet_libraries
from privacy.accountant import AccountantState

from .features import HeadLearner, Learner, load_study_data
from .lora import lora_data
from .plan import StudyPlan


def start_worker() -> None:
    """One thread per worker: two single-threaded workers fill the two cores without contending."""
    quiet_libraries()
    torch.set_num_threads(1)


@lru_cache(maxsize=1)
def head_learner(plan: StudyPlan) -> HeadLearner:
    return HeadLearner(load_study_data(plan))


def learner(plan: StudyPlan, lora: bool) -> Learner:
    """The model's data, loaded once per process."""
    return lora_data(plan) if lora else head_learner(plan)


def train_party(plan: StudyPlan, cfg: AppConfig, rows: list[int], sigma: float | None,
                lora: bool) -> tuple[dict[str, float], float, float]:
    """Train one party for every planned round under one calibration: (test scores, epsilon spent, seconds)."""
    start = time.perf_counter()
    model_data = learner(plan, lora)
    model = model_data.new_model(cfg)
    accountant = AccountantState() if sigma is not None else None
    spent = math.inf
    for _ in range(cfg.federation.num_rounds):
        result = model_data.train(cfg, model, rows, sigma=sigma, accountant=accountant, proximal_mu=0.0)
        accountant, spent = result.accountant, result.epsilon
    return model_data.evaluate(model), spent, time.perf_counter() - start
