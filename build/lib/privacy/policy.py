"""A hospital's own privacy policy, read from a file on its node, never from a researcher's run config.

The node checks every incoming run against it and refuses, with the reason, a run that breaks any rule; nothing is
silently downgraded to fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .ledger import Budget
from .release import OUTSIDE_GUARANTEE
from .run_plan import RunPlan


class PolicyError(ValueError):
    """The policy file itself is invalid; the node then refuses all work until it is fixed."""


@dataclass
class HospitalPolicy:
    """Rules a run must meet; None means the hospital sets no rule on that point."""

    max_epsilon_per_run: float | None = None
    lifetime_epsilon: float | None = None
    lifetime_delta: float = 1e-5
    min_noise_multiplier: float | None = None
    max_delta: float | None = None
    allowed_models: list[str] | None = None
    allowed_tasks: list[str] | None = None
    allowed_datasets: list[str] | None = None
    require_secure_aggregation: bool = False
    # Training without DP-SGD (privacy.enabled=false) sends an adapter with no guarantee: refused unless allowed.
    allow_training_without_dp: bool = False
    # Runs holding a reservation at once on one dataset: admissions never used cannot lock more of the budget.
    max_open_reservations: int = 4
    # Fields the hospital lets leave outside its DP guarantee (privacy.release.OUTSIDE_GUARANTEE); none by default.
    release_outside_guarantee: list[str] = field(default_factory=list)

    @property
    def lifetime_cap(self) -> Budget | None:
        if self.lifetime_epsilon is None:
            return None
        return Budget(self.lifetime_epsilon, self.lifetime_delta, source="policy")


def _check(ok: bool, field_name: str, problem: str) -> None:
    if not ok:
        raise PolicyError(f"{field_name}: {problem}")


def load_policy(path: Path | None) -> HospitalPolicy:
    """The policy at `path`; no file configured means no rules beyond the ledger's budget."""
    if path is None:
        return HospitalPolicy()
    if not path.is_file():
        raise PolicyError(f"policy file {path} does not exist")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(HospitalPolicy), OmegaConf.load(path))
    except yaml.YAMLError as err:
        raise PolicyError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise PolicyError(f"{path}: {getattr(err, 'full_key', None) or 'policy'}: "
                          f"{str(err).splitlines()[0]}") from None
    policy = OmegaConf.to_object(merged)
    assert isinstance(policy, HospitalPolicy)
    for name in ("max_epsilon_per_run", "lifetime_epsilon", "min_noise_multiplier"):
        value = getattr(policy, name)
        _check(value is None or (math.isfinite(value) and value > 0), name, f"must be > 0 or null (got {value})")
    _check(policy.max_open_reservations >= 1, "max_open_reservations",
           f"must be at least 1 (got {policy.max_open_reservations})")
    _check(0 < policy.lifetime_delta < 1, "lifetime_delta", f"must be in (0, 1) (got {policy.lifetime_delta})")
    _check(policy.max_delta is None or 0 < policy.max_delta < 1, "max_delta",
           f"must be in (0, 1) or null (got {policy.max_delta})")
    for name in policy.release_outside_guarantee:
        _check(name in OUTSIDE_GUARANTEE, "release_outside_guarantee",
               f"{name!r} is not a field a hospital can release outside its guarantee "
               f"(one of: {', '.join(OUTSIDE_GUARANTEE)})")
    return policy


def violations(policy: HospitalPolicy, run: RunPlan, planned_epsilon: float) -> list[str]:
    """Every rule the run breaks, each as a reason a privacy officer can read."""
    found: list[str] = []
    for allowed, value, what in ((policy.allowed_models, run.model, "model"),
                                 (policy.allowed_tasks, run.task, "task"),
                                 (policy.allowed_datasets, run.dataset, "dataset")):
        if allowed is not None and value not in allowed:
            found.append(f"{what} {value!r} is not in allowed_{what}s {list(allowed)}")
    if policy.max_epsilon_per_run is not None and not planned_epsilon <= policy.max_epsilon_per_run:
        found.append(f"planned epsilon {planned_epsilon:.4f} exceeds max_epsilon_per_run "
                     f"{policy.max_epsilon_per_run:g}")
    if not run.private and not policy.allow_training_without_dp:
        found.append("the run trains without DP-SGD (privacy.enabled=false), which needs allow_training_without_dp")
    if policy.min_noise_multiplier is not None and not (
            run.private and run.noise_multiplier >= policy.min_noise_multiplier):
        found.append(f"noise multiplier {run.noise_multiplier if run.private else 'none (DP off)'} is below "
                     f"min_noise_multiplier {policy.min_noise_multiplier:g}")
    if policy.max_delta is not None and run.delta > policy.max_delta:
        found.append(f"delta {run.delta:g} exceeds max_delta {policy.max_delta:g}")
    if policy.require_secure_aggregation and not run.secure_aggregation:
        found.append("the run does not use secure aggregation, which require_secure_aggregation demands")
    return found
