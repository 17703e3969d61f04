"""One hospital's participation: its data, its calibrated noise, its accountant on disk, fit and evaluate.

The accountant is written to the node's state folder before an update leaves the hospital, so a crash or node
restart can over-count spend but never forget it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fl_core.config import AppConfig, config_as_dict, to_app_config, validate_delta
from fl_core.data import TextDataset, hospital_datasets, load_splits
from fl_core.device import resolve_device
from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.training import evaluate, train_local
from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan, calibrate_noise, sampling_plan

ACCOUNTANT_FILE = "accountant.json"


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would take a hospital past the steps its epsilon was calibrated for."""


@dataclass
class HospitalResources:
    """What a hospital loads once per process and reuses across rounds."""

    tokenizer: PreTrainedTokenizerBase
    model: PeftModel
    device: torch.device
    train: TextDataset
    test: TextDataset
    plan: SamplingPlan
    noise_multiplier: float | None


def hospital_data(cfg: AppConfig, partition: int) -> tuple[TextDataset, TextDataset]:
    """This hospital's share of the training set, and its local share of the test set."""
    splits = load_splits(cfg.data)
    train = hospital_datasets(splits.train, cfg.federation, cfg.data.seed)[partition]
    test = hospital_datasets(splits.test, cfg.federation, cfg.data.seed + 1)[partition]
    return train, test


def privacy_plan(cfg: AppConfig, num_examples: int) -> tuple[SamplingPlan, float | None]:
    """Poisson sampling over every planned round, and sigma calibrated once for all of it (None without DP)."""
    plan = sampling_plan(num_examples, cfg.train.batch_size, cfg.train.local_epochs, cfg.federation.num_rounds)
    if not cfg.privacy.enabled:
        return plan, None
    validate_delta(cfg.privacy.delta, num_examples)
    if cfg.privacy.noise_multiplier is not None:
        return plan, cfg.privacy.noise_multiplier
    return plan, calibrate_noise(cfg.privacy.target_epsilon, cfg.privacy.delta, plan.sample_rate,
                                 plan.total_steps, cfg.privacy.accountant)


@lru_cache(maxsize=4)  # a simulation actor may serve several hospitals in turn
def _resources(config_json: str, partition: int) -> HospitalResources:
    cfg = to_app_config(OmegaConf.create(json.loads(config_json)))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    train, test = hospital_data(cfg, partition)
    plan, sigma = privacy_plan(cfg, len(train))
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, len(train.label_names), device)
    return HospitalResources(tokenizer, model, device, train, test, plan, sigma)


def hospital_resources(cfg: AppConfig, partition: int) -> HospitalResources:
    return _resources(json.dumps(config_as_dict(cfg), sort_keys=True), partition)


class HospitalClient(NumPyClient):
    def __init__(self, cfg: AppConfig, hospital: str, partition: int, state_dir: Path) -> None:
        self.cfg = cfg
        self.hospital = hospital
        self.partition = partition
        self.accountant_path = state_dir / ACCOUNTANT_FILE

    def check_budget(self, accountant: AccountantState, res: HospitalResources) -> None:
        """Refuse a round whose spend would take this hospital past the run's target epsilon."""
        if self.cfg.privacy.noise_multiplier is not None:
            return  # a fixed sigma sets no epsilon target; lifetime caps belong to the hospital's ledger
        assert res.noise_multiplier is not None
        projected = AccountantState(accountant.kind, [
            *accountant.history, (res.noise_multiplier, res.plan.sample_rate, res.plan.steps_per_round)])
        epsilon = projected.epsilon(self.cfg.privacy.delta)
        if epsilon > self.cfg.privacy.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"{self.hospital}: another round would spend epsilon {epsilon:.4f} in total, above the target "
                f"{self.cfg.privacy.target_epsilon} ({accountant.steps} DP-SGD steps already taken)")

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return adapter_to_arrays(hospital_resources(self.cfg, self.partition).model)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        res = hospital_resources(self.cfg, self.partition)
        load_adapter_arrays(res.model, parameters)
        accountant = AccountantState.load(self.accountant_path, self.cfg.privacy.accountant)
        if res.noise_multiplier is not None:
            self.check_budget(accountant, res)
        result = train_local(
            self.cfg, res.model, res.tokenizer, res.train, res.device, noise_multiplier=res.noise_multiplier,
            accountant=accountant if res.noise_multiplier is not None else None,
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        if result.accountant is not None:
            result.accountant.save(self.accountant_path)
        metrics: dict[str, Scalar] = {
            "hospital": self.hospital, "train_loss": result.train_loss, "epsilon": result.epsilon,
            "delta": self.cfg.privacy.delta, "noise_multiplier": res.noise_multiplier or 0.0,
            "sample_rate": res.plan.sample_rate, "steps": result.accountant.steps if result.accountant else 0,
            # the whole history, so the server can recompute epsilon even if sigma changed on a resume
            "accountant": result.accountant.to_json() if result.accountant else "",
        }
        return adapter_to_arrays(res.model), result.num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        res = hospital_resources(self.cfg, self.partition)
        load_adapter_arrays(res.model, parameters)
        metrics = evaluate(self.cfg, res.model, res.tokenizer, res.test, res.device)
        return float(metrics["loss"]), len(res.test), {k: float(v) for k, v in metrics.items() if k != "loss"}
