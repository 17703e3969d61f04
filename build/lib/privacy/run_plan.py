"""What a run asks of one hospital, as its node computes it from the run's config and its own data.

The node admits a plan, not a run id: every later fit and evaluate recomputes the plan from the config it arrives
with, and any difference from the admitted one is refused. The plan also lists every release the run would make,
which is what the ledger reserves and what each round's charge must stay within.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from .accountant import AccountantState, Step


@dataclass(frozen=True)
class RunPlan:
    model: str
    task: str
    dataset: str
    private: bool
    noise_multiplier: float  # 0 without DP
    sample_rate: float
    steps_per_round: int
    rounds: int
    num_examples: int  # public by the plan: the sampling rate and the FedAvg weight carry it
    num_test_examples: int
    delta: float
    max_grad_norm: float
    target_epsilon: float | None  # None with a fixed sigma or without DP
    secure_aggregation: bool
    secure_aggregation_parameters: str  # the SecAgg+ settings, as the node will check them at setup
    hospital_level_dp: bool
    hospital_level_clipping_norm: float
    evaluation_rounds: int  # 0 when federated evaluation is off
    evaluation_noise_multiplier: float  # of one evaluation release, relative to one record's contribution
    proximal_mu: float
    accountant: str  # pld or rdp (privacy/accountant.py)

    @property
    def round_release(self) -> Step:
        """One round of DP-SGD, as the accountant composes it."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def evaluation_release(self) -> Step:
        """One noised evaluation of the held-out records: a Gaussian release without sampling."""
        return (self.evaluation_noise_multiplier, 1.0, 1)

    def releases(self) -> AccountantState:
        """Every release of the whole run, one entry per round and per evaluation."""
        return AccountantState((self.round_release,) * self.rounds
                               + (self.evaluation_release,) * self.evaluation_rounds, self.accountant)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        return cls(**json.loads(text))

    def differences(self, other: RunPlan) -> list[str]:
        """Each field where `other` differs, as 'field admitted -> asked'."""
        return [f"{f.name} {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]
