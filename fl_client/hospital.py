"""One hospital's part in a run: a Flower NumPyClient over the node's governance (`privacy.governance`).

Every message recomputes the run's plan from the config it arrives with and the hospital's own data sizes; the
governance admits the plan, charges each release before the work that makes it, and closes the run. The client
trains and evaluates only when the governance allows, and what it returns is checked against the declared release
list (`privacy.release`): no plaintext training loss, dataset sizes only as the plan's public figures, evaluation
only as a noised release, and no adapter outside an admitted round.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fl_core.config import AppConfig, ConfigError, config_as_dict, to_app_config
from fl_core.data import DataError, DataSplits, hospital_share, local_examples
from fl_core.device import resolve_device
from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.protocol import ADMIT, LEDGER_ACTION, RUN_ID
from fl_core.training import (
    TrainingView,
    classification_logits,
    language_model_scores,
    remove_prefix_cache,
    train_local,
    training_view,
)
from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan
from privacy.evaluation_release import noisy_classification_scores, noisy_language_model_scores
from privacy.governance import Governance, Refused
from privacy.ledger import ABORTED, COMMITTED, Balance
from privacy.release import EVALUATE, FIT, PROPERTIES, released
from privacy.run_plan import RunPlan
from privacy.secure_random import SecureRandom

from .node import NodeSettings
from .optimizer_state import load_optimizer_state, remove_optimizer_state, save_optimizer_state, state_path
from .plan import privacy_plan, run_plan

log = logging.getLogger(__name__)
PREFIX_CACHE = "prefix-cache"  # in the node's state folder: derived from its records, never sent


@dataclass
class HospitalResources:
    """What a hospital loads once per process and reuses across rounds."""

    tokenizer: PreTrainedTokenizerBase
    model: PeftModel
    device: torch.device


@dataclass(frozen=True)
class HospitalPlan:
    data: DataSplits
    sampling: SamplingPlan
    noise_multiplier: float | None
    plan: RunPlan


def hospital_data(cfg: AppConfig, node: NodeSettings) -> DataSplits:
    """The hospital's own files when its node names a `data-dir`, else its share of the packaged data."""
    if node.data_dir is not None:
        return local_examples(node.data_dir, cfg.data)
    return hospital_share(cfg.data, cfg.federation, node.partition)


def _config(config_json: str) -> AppConfig:
    return to_app_config(OmegaConf.create(json.loads(config_json)))


@lru_cache(maxsize=4)  # a simulation actor may serve several hospitals in turn
def _plan(config_json: str, node: NodeSettings) -> HospitalPlan:
    cfg = _config(config_json)
    data = hospital_data(cfg, node)
    sampling, sigma = privacy_plan(cfg, len(data.train))
    return HospitalPlan(data, sampling, sigma, run_plan(cfg, sampling, sigma, len(data.test)))


@lru_cache(maxsize=4)
def _resources(config_json: str, node: NodeSettings) -> HospitalResources:
    cfg = _config(config_json)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, len(_plan(config_json, node).data.train.label_names), device)
    return HospitalResources(tokenizer, model, device)


@lru_cache(maxsize=4)
def _view(config_json: str, node: NodeSettings) -> TrainingView:
    """The hospital's training examples as the model reads them; frozen prefixes (MiniLM, SmolLM2) are computed once
    per dataset and kept in the node's state folder, for every later round and process (the frozen layers never
    change)."""
    res = _resources(config_json, node)
    return training_view(_config(config_json), res.model, res.tokenizer, _plan(config_json, node).data.train,
                         res.device, cache_dir=node.state_dir / PREFIX_CACHE)


def _key(cfg: AppConfig) -> str:
    return json.dumps(config_as_dict(cfg), sort_keys=True)


def hospital_plan(cfg: AppConfig, node: NodeSettings) -> HospitalPlan:
    return _plan(_key(cfg), node)


def hospital_resources(cfg: AppConfig, node: NodeSettings) -> HospitalResources:
    return _resources(_key(cfg), node)


def hospital_view(cfg: AppConfig, node: NodeSettings) -> TrainingView:
    return _view(_key(cfg), node)


def balance_properties(balance: Balance) -> dict[str, Scalar]:
    props: dict[str, Scalar] = {"lifetime_epsilon": balance.rdp_epsilon, "lifetime_delta": balance.delta,
                                "summed_epsilon": balance.summed_epsilon}
    if balance.cap is not None and balance.remaining is not None:
        props.update(budget_epsilon=balance.cap.epsilon, remaining_epsilon=balance.remaining)
    return props


class HospitalClient(NumPyClient):
    def __init__(self, cfg: AppConfig, node: NodeSettings, flower_run: int | None) -> None:
        self.cfg = cfg
        self.node = node
        self.hospital = node.hospital
        self.flower_run = flower_run
        self.governance = Governance(node.rules, cfg.data.name)

    def plan(self, run_id: str) -> HospitalPlan:
        """The run's plan for this hospital; a plan that cannot be made is a refusal that names no record."""
        try:
            return hospital_plan(self.cfg, self.node)
        except DataError as err:
            log.error("%s: data for run %s: %s", self.hospital, run_id, err)  # details stay on the node
            raise self.governance.refuse(run_id, self.flower_run, f"its data cannot be used for dataset "
                                         f"{self.cfg.data.name!r} (the node's log says why)") from None
        except ConfigError as err:
            raise self.governance.refuse(run_id, self.flower_run, f"the run's plan: {err}") from None
        except (ValueError, OSError) as err:  # from reading the hospital's files: the text may quote them
            log.error("%s: plan for run %s: %s", self.hospital, run_id, err)
            raise self.governance.refuse(run_id, self.flower_run, "the run's plan cannot be made on this node's data "
                                         "(the node's log says why)") from None

    def training_view(self, run_id: str) -> TrainingView:
        """Model and cached prefixes, made before the round is charged; a failure is a refusal naming no record."""
        try:
            return hospital_view(self.cfg, self.node)
        except (OSError, ValueError, RuntimeError) as err:
            log.error("%s: model or prefix cache for run %s: %s", self.hospital, run_id, err)
            raise self.governance.refuse(run_id, self.flower_run, "the model cannot be prepared on this node "
                                         "(the node's log says why)") from None

    def check_global(self, run_id: str, parameters: NDArrays) -> None:
        """The server's adapter, refused before anything is charged if not finite: such weights are no model, only
        a probe (per-record overflow from finite weights is handled where gradients and losses are bounded)."""
        if not all(np.issubdtype(a.dtype, np.number) and np.isfinite(a).all() for a in parameters):
            raise self.governance.refuse(run_id, self.flower_run, "the server's adapter has non-finite or non-numeric "
                                         "values")

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Admission (`admit`) and closing (`committed`, `aborted`) of a run, asked by the server in plaintext."""
        action, run_id = str(config.get(LEDGER_ACTION, "")), str(config.get(RUN_ID, ""))
        try:
            if action == ADMIT:
                planned = self.plan(run_id).plan
                admission = self.governance.admit(run_id, self.flower_run, planned)
                props: dict[str, Scalar] = {
                    "hospital": self.hospital, "admitted": True, "planned_epsilon": admission.entry.planned_epsilon,
                    "num_examples": planned.num_examples, "num_test_examples": planned.num_test_examples,
                    "outside_guarantee": ",".join(admission.policy.release_outside_guarantee),
                    **balance_properties(admission.balance)}
            elif action in (COMMITTED, ABORTED):
                entry, balance = self.governance.close(run_id, self.flower_run, action)
                remove_prefix_cache(self.node.state_dir / PREFIX_CACHE)
                remove_optimizer_state(self.node.state_dir)
                props = {"hospital": self.hospital, "status": entry.status, "epsilon": entry.epsilon,
                         "accountant": entry.spent.to_json(), **balance_properties(balance)}
            else:
                raise self.governance.refuse(run_id, self.flower_run, f"unknown request {action!r}")
        except Refused as err:
            props = {"hospital": self.hospital, "admitted": False, "reason": str(err)}
        return released(PROPERTIES, props, ())

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        raise self.governance.refuse(str(config.get(RUN_ID, "")), self.flower_run,
                                     "a hospital sends its adapter only as the result of an admitted round")

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        run_id = str(config.get(RUN_ID, ""))
        planned = self.plan(run_id)
        plan = planned.plan
        asked_mu = float(config.get("proximal_mu", 0.0))
        if asked_mu != plan.proximal_mu:
            raise self.governance.refuse(run_id, self.flower_run, f"the round asks for proximal_mu {asked_mu:g}; "
                                                                  f"the admitted plan has {plan.proximal_mu:g}")
        self.check_global(run_id, parameters)
        view = self.training_view(run_id)
        res = hospital_resources(self.cfg, self.node)
        # the node's own files are read before the round is charged: a bad one costs a fresh optimiser, not a round
        kept_state = state_path(self.node.state_dir, f"{run_id}\0{self.hospital}\0{self.cfg.data.name}\0"
                                                     f"{plan.to_json()}")
        optimizer_state = load_optimizer_state(self.cfg, res.model, kept_state) \
            if self.cfg.train.keep_optimizer_state else None
        load_adapter_arrays(res.model, parameters)  # an adapter that does not fit is refused before the charge too
        entry = self.governance.begin_round(run_id, self.flower_run, plan)  # charged before training
        policy = self.governance.policy(run_id, self.flower_run)
        before = AccountantState(entry.spent.history[:-1], entry.spent.kind) if plan.private else None
        result = train_local(self.cfg, res.model, res.tokenizer, planned.data.train, res.device,
                             plan=planned.sampling, noise_multiplier=planned.noise_multiplier, accountant=before,
                             proximal_mu=plan.proximal_mu, view=view, optimizer_state=optimizer_state)
        if result.optimizer_state is not None:
            save_optimizer_state(kept_state, result.optimizer_state)
        if result.steps != plan.steps_per_round:
            raise self.governance.refuse(run_id, self.flower_run, f"training took {result.steps} steps, the plan "
                                         f"{plan.steps_per_round}; the update does not leave the hospital")
        values: dict[str, Scalar] = {
            "hospital": self.hospital, "epsilon": entry.epsilon, "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": entry.spent.steps,
            # the whole history, so the server can recompute epsilon even if sigma changed on a resume
            "accountant": entry.spent.to_json(),
        }
        if "train_loss" in policy.release_outside_guarantee:
            values["train_loss"] = result.train_loss
        metrics = released(FIT, values, policy.release_outside_guarantee)
        # Hospital-level DP bounds one hospital's influence only if every hospital weighs the same in the average.
        return adapter_to_arrays(res.model), 1 if plan.hospital_level_dp else plan.num_examples, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        run_id = str(config.get(RUN_ID, ""))
        planned = self.plan(run_id)
        self.check_global(run_id, parameters)
        self.governance.begin_evaluation(run_id, self.flower_run, planned.plan)  # charged before it is computed
        res = hospital_resources(self.cfg, self.node)
        load_adapter_arrays(res.model, parameters)
        p, rng, test = self.cfg.privacy, SecureRandom(), planned.data.test
        if self.cfg.task.name == "classification":
            logits, labels = classification_logits(self.cfg, res.model, res.tokenizer, test, res.device)
            scores = noisy_classification_scores(logits, labels, noise=p.evaluation_noise,
                                                 loss_bound=p.evaluation_loss_bound, rng=rng)
        else:
            losses = language_model_scores(self.cfg, res.model, res.tokenizer, test, res.device).losses
            scores = noisy_language_model_scores(losses, noise=p.evaluation_noise, loss_bound=p.evaluation_loss_bound,
                                                 rng=rng)
        loss = scores.pop("loss")
        metrics = released(EVALUATE, {"hospital": self.hospital, **scores}, ())
        return loss, planned.plan.num_test_examples, metrics
