"""What the study runs: the settings (hospital count, data split, FedProx mu), epsilons, seeds and budgets, for the
linear head over frozen embeddings and for the product's own LoRA model."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fl_core.config import AppConfig, compose_config, to_app_config

INF = math.inf


@dataclass(frozen=True)
class Setting:
    """One federation: how many hospitals, how their data is split, FedProx's mu (0: FedAvg) and the server
    optimiser (`strategy.server_optimizer`: none, momentum, adam or yogi, with its learning rate and momentum)."""

    hospitals: int = 3
    partitioning: str = "dirichlet"
    alpha: float = 0.3
    mu: float = 0.001
    server: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9

    @property
    def split(self) -> Setting:
        """What decides each hospital's rows, and so all that training alone depends on (not mu, not the server)."""
        return Setting(hospitals=self.hospitals, partitioning=self.partitioning, alpha=self.alpha)

    @property
    def label(self) -> str:
        split = "IID" if self.partitioning == "iid" else f"Dirichlet a={self.alpha}"
        label = f"{self.hospitals} hospitals, {split}, {'FedAvg' if self.mu == 0 else f'FedProx mu={self.mu}'}"
        if self.server == "momentum" and self.server_momentum == 0:
            return f"{label}, server lr {self.server_lr}"
        if self.server == "momentum":
            return f"{label}, server lr {self.server_lr} momentum {self.server_momentum}"
        return label if self.server == "none" else f"{label}, server {self.server} lr {self.server_lr}"


@dataclass(frozen=True)
class LoraPlan:
    """The product's own model as the main job trains it (`conf/model/minilm.yaml`: LoRA on MiniLM's top
    feed-forward block over cached prefixes, a zero-initialised head clipped apart, its learning rates) and federates
    it (`setting`: the main job's strategy, FedProx's mu and the server's learning rate), for `rounds` rounds, at
    `epsilons`."""

    rounds: int
    epsilons: tuple[float, ...]
    setting: Setting

    LABEL = "LoRA adapters"

    def label(self, setting_label: str) -> str:
        """A LoRA arm's setting as the report names it (the head's arms carry the bare label)."""
        return f"{self.LABEL}, {setting_label}"


@dataclass(frozen=True)
class StudyPlan:
    train_examples: int
    test_examples: int
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    baseline: Setting
    ablations: tuple[Setting, ...]
    ablation_epsilons: tuple[float, ...]
    lora: LoraPlan
    delta: float = 1e-5

    @property
    def settings(self) -> tuple[Setting, ...]:
        return (self.baseline, *self.ablations)

    def config(self, epsilon: float, seed: int, setting: Setting, lora: bool = False) -> AppConfig:
        """The project config of one arm: the same schema and validation as a training run. A LoRA arm keeps the
        product's model and learning rates (`conf/model/minilm.yaml`) and the LoRA plan's rounds."""
        overrides = [
            "data=icd10", "task=classification", f"data.max_train_examples={self.train_examples}",
            f"data.max_test_examples={self.test_examples}", f"train.batch_size={self.batch_size}",
            "train.device=cpu", *([] if lora else [f"train.lr={self.lr}"]), f"train.local_epochs={self.local_epochs}",
            f"train.seed={seed}", "data.seed=0", f"federation.num_rounds={self.lora.rounds if lora else self.rounds}",
            f"federation.num_clients={setting.hospitals}", f"federation.min_participants={setting.hospitals}",
            f"federation.partitioning={setting.partitioning}", f"federation.dirichlet_alpha={setting.alpha}",
            f"strategy.proximal_mu={setting.mu}", f"privacy.delta={self.delta}",
            f"strategy.server_optimizer.name={setting.server}", f"strategy.server_optimizer.lr={setting.server_lr}",
            f"strategy.server_optimizer.momentum={setting.server_momentum}",
            f"strategy.secagg.max_weight={self.train_examples}",  # no share is larger: the finest quantisation
            *(["privacy.enabled=false"] if math.isinf(epsilon) else [f"privacy.target_epsilon={epsilon}"]),
        ]
        return to_app_config(compose_config(overrides))


# FedProx's mu (the product's) and the server's momentum were chosen on validation texts (`python -m
# scripts.study.tune`): plain averaging under-steps, and mu 0.01 held every federation back.
BASELINE = Setting(server="momentum", server_lr=1.5, server_momentum=0.7)
# The LoRA model's three rounds take the main job's strategy (`conf/model/minilm.yaml`, chosen on validation texts by
# `scripts/validation_sweep.py`): a server learning rate of 1.5 without momentum.
MAIN_JOB = Setting(server="momentum", server_lr=1.5, server_momentum=0.0)
FULL = StudyPlan(train_examples=20000, test_examples=4000, rounds=10, local_epochs=1, batch_size=256, lr=0.01,
                 epsilons=(1.0, 2.0, 4.0, 8.0, INF), seeds=(0, 1, 2), baseline=BASELINE,
                 ablations=(replace(BASELINE, server="none"), replace(BASELINE, partitioning="iid"),
                            replace(BASELINE, mu=0.0), replace(BASELINE, hospitals=10)),
                 ablation_epsilons=(1.0, 8.0, INF),
                 lora=LoraPlan(rounds=3, epsilons=(1.0, 8.0, INF), setting=MAIN_JOB))
# The smoke run CI does: every kind of arm on a few hundred texts; its numbers mean nothing. DP only in the IID
# baseline, whose equal shares need one calibration (seconds each at these sizes). The IID ablation differs from the
# baseline only in the server: it shares the baseline's alone arms.
QUICK = StudyPlan(train_examples=600, test_examples=200, rounds=2, local_epochs=1, batch_size=64, lr=0.01,
                  epsilons=(8.0, INF), seeds=(0,), baseline=replace(BASELINE, partitioning="iid"),
                  ablations=(Setting(), Setting(partitioning="iid")), ablation_epsilons=(INF,),
                  lora=LoraPlan(rounds=2, epsilons=(8.0,), setting=replace(MAIN_JOB, partitioning="iid")))
