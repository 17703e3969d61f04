"""A run's plan for one hospital, from the run's config and the sizes of the hospital's own data.

The node computes it, admits it and rechecks it on every message: sigma is calibrated here once for everything the
plan releases (every round's DP-SGD steps and, with federated evaluation, every noised evaluation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os

from fl_core.cache import cache_root
from fl_core.config import AppConfig, secagg_count_or_fraction, validate_delta
from privacy.accountant import AccountantState
from privacy.calibration import CALIBRATION_REL_TOLERANCE, SamplingPlan, calibrate_noise, sampling_plan
from privacy.evaluation_release import evaluation_noise_multiplier
from privacy.run_plan import RunPlan


def evaluation_rounds(cfg: AppConfig) -> int:
    return cfg.federation.num_rounds if cfg.strategy.federated_evaluation else 0


def evaluation_releases(cfg: AppConfig) -> AccountantState:
    """The plan's noised evaluations, which sigma is calibrated around."""
    noise = evaluation_noise_multiplier(cfg.privacy.evaluation_noise, cfg.task.name == "classification")
    return AccountantState(((noise, 1.0, 1),) * evaluation_rounds(cfg), cfg.privacy.accountant)


def privacy_plan(cfg: AppConfig, num_examples: int) -> tuple[SamplingPlan, float | None]:
    """Poisson sampling over every planned round, and sigma calibrated once for all of it (None without DP)."""
    plan = sampling_plan(num_examples, cfg.train.batch_size, cfg.train.local_epochs, cfg.federation.num_rounds)
    if not cfg.privacy.enabled:
        return plan, None
    validate_delta(cfg.privacy.delta, num_examples)
    if cfg.privacy.noise_multiplier is not None:
        return plan, cfg.privacy.noise_multiplier
    return plan, calibrated_sigma(cfg.privacy.target_epsilon, cfg.privacy.delta, plan, evaluation_releases(cfg))


def calibrated_sigma(target_epsilon: float, delta: float, plan: SamplingPlan, also: AccountantState) -> float:
    """sigma for the plan, calibrated once per machine: a deployed node plans in every message's fresh process
    (admission, each round) and a simulation plans before Ray starts too, so the result is kept in the cache, keyed
    by every input. A kept sigma is used only after the accountant confirms that it is what a calibration would
    accept, within the target and no more than the tolerance below it (one evaluation against a calibration's
    several): a damaged, altered or stale file is calibrated again, never trusted."""
    inputs = {"target_epsilon": target_epsilon, "delta": delta, "sample_rate": plan.sample_rate,
              "steps": plan.total_steps, "also": [list(step) for step in also.history], "accountant": also.kind}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    kept = cache_root() / "calibrations" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(kept.read_text())
        sigma = float(record["noise_multiplier"])
        spent = also.then(sigma, plan.sample_rate, plan.total_steps).epsilon(delta) if sigma > 0 else math.inf
        if record["inputs"] == inputs and target_epsilon * (1 - CALIBRATION_REL_TOLERANCE) <= spent <= target_epsilon:
            return sigma
    sigma = calibrate_noise(target_epsilon, delta, plan.sample_rate, plan.total_steps, also=also, kind=also.kind)
    with contextlib.suppress(OSError):  # best effort: a failure costs a calibration next time, never the plan
        kept.parent.mkdir(parents=True, exist_ok=True)
        staged = kept.with_name(f".{key}.{os.getpid()}")
        staged.write_text(json.dumps({"inputs": inputs, "noise_multiplier": sigma}))
        staged.replace(kept)
    return sigma


def secure_aggregation_parameters(cfg: AppConfig) -> dict[str, float]:
    """SecAgg+ as the server must set it up; under hospital-level DP every hospital sends weight 1."""
    sa = cfg.strategy.secagg
    shares = secagg_count_or_fraction(sa.num_shares)
    # Flower rounds a fraction of the sampled hospitals and takes them all below 3; the plan's fewest sampled bounds it
    fewest = shares if isinstance(shares, int) else min(max(round(shares * cfg.federation.min_participants), 3),
                                                        cfg.federation.min_participants)
    return {"num_shares": shares, "fewest_shares": fewest,
            "reconstruction_threshold": secagg_count_or_fraction(sa.reconstruction_threshold),
            "clipping_range": sa.clipping_range, "quantization_range": sa.quantization_range,
            "modulus_range": sa.modulus_range,
            "max_weight": 1.0 if cfg.privacy.client_level.enabled else sa.max_weight}


def run_plan(cfg: AppConfig, sampling: SamplingPlan, sigma: float | None, num_test_examples: int) -> RunPlan:
    p, c = cfg.privacy, cfg.privacy.client_level
    return RunPlan(
        model=cfg.model.name, task=cfg.task.name, dataset=cfg.data.name, private=sigma is not None,
        noise_multiplier=sigma or 0.0, sample_rate=sampling.sample_rate, steps_per_round=sampling.steps_per_round,
        rounds=cfg.federation.num_rounds, num_examples=sampling.num_examples, num_test_examples=num_test_examples,
        delta=p.delta, max_grad_norm=p.max_grad_norm,
        target_epsilon=p.target_epsilon if p.enabled and p.noise_multiplier is None else None,
        secure_aggregation=cfg.strategy.secagg.enabled,
        secure_aggregation_parameters=json.dumps(secure_aggregation_parameters(cfg), sort_keys=True)
        if cfg.strategy.secagg.enabled else "",
        hospital_level_dp=c.enabled, hospital_level_clipping_norm=c.clipping_norm if c.enabled else 0.0,
        evaluation_rounds=evaluation_rounds(cfg),
        evaluation_noise_multiplier=evaluation_releases(cfg).history[0][0] if evaluation_rounds(cfg) else 0.0,
        proximal_mu=cfg.strategy.proximal_mu, accountant=p.accountant,
    )
