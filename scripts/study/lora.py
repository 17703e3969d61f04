"""The study's second model: the product's own, LoRA adapters on all-MiniLM-L6-v2 trained as the main job trains them.

The main job's layout (`conf/model/minilm.yaml`) makes this affordable: the adapters sit on the top layer's
feed-forward block, so everything below it is a fixed public function of each text, run once per machine
(`fl_core.training.FrozenPrefixes`, kept under the cache folder: these are the packaged public texts, not a
hospital's) and read by every arm. A step is then `fl_core.training.train_epochs` over those prefixes, as on a
hospital's node: Opacus, the head clipped apart from the adapters, the accountant carried across rounds, FedProx's
proximal term after the noise.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import Subset

from fl_core.cache import cache_root
from fl_core.config import AppConfig
from fl_core.data import load_splits
from fl_core.encoder import MeanPooledClassifier
from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.training import (
    FrozenPrefixes,
    LocalTrainResult,
    TokenizedDataset,
    classification_scores,
    pad_prefixes,
    prefix_forward,
    train_epochs,
)
from privacy.accountant import AccountantState
from privacy.calibration import sampling_plan

from .features import CPU
from .plan import INF, StudyPlan


class LoraData:
    """The study's training and test texts as the product's model reads them (each text's frozen prefix), and that
    model as a `features.Learner`."""

    def __init__(self, plan: StudyPlan) -> None:
        cfg = plan.config(INF, 0, plan.lora.setting, lora=True)
        splits = load_splits(cfg.data)
        self.tokenizer = load_tokenizer(cfg.model)
        self.num_labels = len(splits.train.label_names)
        base = self.new_model(cfg).get_base_model()
        assert isinstance(base, MeanPooledClassifier)
        folder = cache_root() / "study" / "prefixes"
        self.train_prefixes, self.test_prefixes = (
            FrozenPrefixes(base, TokenizedDataset(split, self.tokenizer, cfg.train.max_seq_len), CPU, folder)
            for split in (splits.train, splits.test))

    def new_model(self, cfg: AppConfig) -> PeftModel:
        """The main job's model at initialisation (LoRA's A drawn from `train.seed`, B and the head zero)."""
        return build_model(cfg, self.tokenizer, self.num_labels, CPU)

    def train(self, cfg: AppConfig, model: nn.Module, rows: list[int], *, sigma: float | None,
              accountant: AccountantState | None, proximal_mu: float) -> LocalTrainResult:
        """One round on `rows`, DP-SGD when `sigma` is set."""
        plan = sampling_plan(len(rows), cfg.train.batch_size, cfg.train.local_epochs, cfg.federation.num_rounds)
        return train_epochs(cfg, model, Subset(self.train_prefixes, rows), pad_prefixes, prefix_forward, CPU, plan=plan,
                            noise_multiplier=sigma, accountant=accountant, proximal_mu=proximal_mu)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1024) -> dict[str, float]:
        model.eval()
        logits, labels = [], []
        test = self.test_prefixes
        for start in range(0, len(test), batch_size):
            batch = pad_prefixes([test[i] for i in range(start, min(start + batch_size, len(test)))])
            out, truth = prefix_forward(model, batch, CPU)
            logits.append(out)
            labels.append(truth)
        model.train()
        return classification_scores(torch.cat(logits), torch.cat(labels))

    @staticmethod
    def to_arrays(model: nn.Module) -> list[np.ndarray]:
        assert isinstance(model, PeftModel)
        return adapter_to_arrays(model)

    @staticmethod
    def load_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
        assert isinstance(model, PeftModel)
        load_adapter_arrays(model, arrays)


@lru_cache(maxsize=1)
def lora_data(plan: StudyPlan) -> LoraData:
    """One per process: the study's driver and each simulated hospital's worker read the same cached prefixes."""
    return LoraData(plan)
