"""One hospital's participation: admitting a run against its policy and ledger, then fit and evaluate.

The hospital's privacy ledger is its accountant: each round is charged to the ledger before training starts, so a
crash or node restart can over-count spend but never forget it, and a resumed run continues its own history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fl_core.config import AppConfig, ConfigError, config_as_dict, to_app_config, validate_delta
from fl_core.data import DataError, DataSplits, TextDataset, hospital_share, local_examples
from fl_core.device import resolve_device
from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.protocol import ADMIT, LEDGER_ACTION, RUN_ID
from fl_core.training import evaluate, train_local
from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan, calibrate_noise, sampling_plan
from privacy.ledger import ABORTED, COMMITTED, RESERVED, Entry, Ledger, LedgerError, SpendRequest
from privacy.policy import HospitalPolicy, PolicyError, RunRequest, load_policy, violations

from .node import NodeSettings


class PrivacyBudgetExceeded(RuntimeError):
    """Training this round would take a hospital past the steps its epsilon was calibrated for."""


class RunRefused(RuntimeError):
    """This hospital will not work for this run; the message is the reason, for the server's log and MLflow."""


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


def hospital_data(cfg: AppConfig, node: NodeSettings) -> DataSplits:
    """The hospital's own files when its node names a `data-dir`, else its share of the packaged data."""
    if node.data_dir is not None:
        return local_examples(node.data_dir, cfg.data)
    return hospital_share(cfg.data, cfg.federation, node.partition)


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
def _resources(config_json: str, node: NodeSettings) -> HospitalResources:
    cfg = to_app_config(OmegaConf.create(json.loads(config_json)))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    data = hospital_data(cfg, node)
    plan, sigma = privacy_plan(cfg, len(data.train))
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, len(data.train.label_names), device)
    return HospitalResources(tokenizer, model, device, data.train, data.test, plan, sigma)


def hospital_resources(cfg: AppConfig, node: NodeSettings) -> HospitalResources:
    return _resources(json.dumps(config_as_dict(cfg), sort_keys=True), node)


class HospitalClient(NumPyClient):
    def __init__(self, cfg: AppConfig, node: NodeSettings) -> None:
        self.cfg = cfg
        self.node = node
        self.hospital = node.hospital
        self.dataset = cfg.data.name

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.node.ledger_path)

    def spend_request(self, run_id: str, plan: SamplingPlan, sigma: float | None) -> SpendRequest:
        return SpendRequest(run_id, self.hospital, self.dataset, sigma or 0.0, plan.sample_rate, plan.total_steps,
                            self.cfg.privacy.delta, self.cfg.privacy.accountant)

    def admit(self, run_id: str) -> tuple[Entry, HospitalPolicy]:
        """Check the run against this hospital's policy, then reserve its whole planned spend in the ledger.

        Only the data is loaded (for the plan), never the model: a forbidden model is refused, not loaded.
        """
        policy = load_policy(self.node.policy_file)
        train = hospital_data(self.cfg, self.node).train
        plan, sigma = privacy_plan(self.cfg, len(train))
        request = self.spend_request(run_id, plan, sigma)
        planned = self.ledger.plan(request)
        c = self.cfg
        reasons = violations(policy, RunRequest(
            model=c.model.name, task=c.task.name, dataset=c.data.name, private=c.privacy.enabled,
            planned_epsilon=planned.planned_epsilon, delta=c.privacy.delta, noise_multiplier=sigma,
            secure_aggregation=c.strategy.secagg.enabled))
        if reasons:
            raise RunRefused(f"{self.hospital} policy: " + "; ".join(reasons))
        return self.ledger.reserve(request, policy.lifetime_cap), policy

    def balance_properties(self, policy: HospitalPolicy) -> dict[str, Scalar]:
        balance = self.ledger.balance(self.hospital, self.dataset, policy.lifetime_cap)
        props: dict[str, Scalar] = {"lifetime_epsilon": balance.rdp_epsilon, "lifetime_delta": balance.delta,
                                    "summed_epsilon": balance.summed_epsilon}
        if balance.cap is not None and balance.remaining is not None:
            props.update(budget_epsilon=balance.cap.epsilon, remaining_epsilon=balance.remaining)
        return props

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Admission (`admit`) and closing (`committed`, `aborted`) of a run, asked by the server in plaintext."""
        action, run_id = str(config.get(LEDGER_ACTION, "")), str(config.get(RUN_ID, ""))
        if action == ADMIT:
            try:
                entry, policy = self.admit(run_id)
            except (RunRefused, LedgerError, PolicyError, ConfigError, DataError) as err:
                return {"hospital": self.hospital, "admitted": False, "reason": str(err)}
            return {"hospital": self.hospital, "admitted": True, "planned_epsilon": entry.planned_epsilon,
                    **self.balance_properties(policy)}
        if action in (COMMITTED, ABORTED):
            entry = self.ledger.close(run_id, self.hospital, self.dataset, action)
            return {"hospital": self.hospital, "status": entry.status, "epsilon": entry.epsilon,
                    **self.balance_properties(load_policy(self.node.policy_file))}
        return {"hospital": self.hospital}

    def check_budget(self, projected: AccountantState, res: HospitalResources) -> None:
        """Refuse a round whose spend would take this hospital past the run's target epsilon."""
        if self.cfg.privacy.noise_multiplier is not None or res.noise_multiplier is None:
            return  # a fixed sigma sets no epsilon target; lifetime caps are the ledger's
        epsilon = projected.epsilon(self.cfg.privacy.delta)
        if epsilon > self.cfg.privacy.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"{self.hospital}: another round would spend epsilon {epsilon:.4f} in total, above the target "
                f"{self.cfg.privacy.target_epsilon} ({projected.steps - res.plan.steps_per_round} DP-SGD steps "
                "already taken)")

    def admitted_entry(self, run_id: str) -> Entry:
        """This run's open ledger entry; a run the hospital did not admit gets no work from it at all."""
        entry = self.ledger.entry(run_id, self.hospital, self.dataset)
        if entry is None or entry.status != RESERVED:
            raise RunRefused(f"{self.hospital}: run {run_id or '(unnamed)'} was not admitted by this hospital")
        return entry

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return adapter_to_arrays(hospital_resources(self.cfg, self.node).model)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        run_id = str(config.get(RUN_ID, ""))
        entry = self.admitted_entry(run_id)
        policy = load_policy(self.node.policy_file)
        res = hospital_resources(self.cfg, self.node)
        private = res.noise_multiplier is not None
        projected = entry.spent.then(res.noise_multiplier or 0.0, res.plan.sample_rate, res.plan.steps_per_round)
        self.check_budget(projected, res)
        self.ledger.charge(run_id, self.hospital, self.dataset, projected, policy.lifetime_cap)  # before training
        load_adapter_arrays(res.model, parameters)
        result = train_local(
            self.cfg, res.model, res.tokenizer, res.train, res.device, noise_multiplier=res.noise_multiplier,
            accountant=entry.spent if private else None, proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        if result.accountant is not None and result.accountant.steps != projected.steps:
            raise RunRefused(f"{self.hospital}: training took {result.accountant.steps} DP-SGD steps in total, "
                             f"the ledger holds {projected.steps}; the update does not leave the hospital")
        spent = projected  # what the ledger already holds, charged before training
        metrics: dict[str, Scalar] = {
            "hospital": self.hospital, "train_loss": result.train_loss,
            "epsilon": spent.epsilon(self.cfg.privacy.delta), "delta": self.cfg.privacy.delta,
            "noise_multiplier": res.noise_multiplier or 0.0, "sample_rate": res.plan.sample_rate,
            "steps": spent.steps, "examples": result.num_examples,
            # the whole history, so the server can recompute epsilon even if sigma changed on a resume
            "accountant": spent.to_json() if private else "",
        }
        # Hospital-level DP bounds one hospital's influence only if every hospital weighs the same in the average.
        weight = 1 if self.cfg.privacy.client_level.enabled else result.num_examples
        return adapter_to_arrays(res.model), weight, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        self.admitted_entry(str(config.get(RUN_ID, "")))
        res = hospital_resources(self.cfg, self.node)
        load_adapter_arrays(res.model, parameters)
        metrics = evaluate(self.cfg, res.model, res.tokenizer, res.test, res.device)
        return float(metrics["loss"]), len(res.test), {k: float(v) for k, v in metrics.items() if k != "loss"}
