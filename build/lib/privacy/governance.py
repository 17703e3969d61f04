"""A hospital node's decisions about a run: admission, every release, closing. No Flower in here.

The node's ClientApp only calls this; what the node enforces is decided here and in the ledger:
- **Admission** checks the run's plan against the hospital's policy and ledger, reserves the whole plan and binds it
  to the Flower run that asked (Flower's run id, which the SuperLink assigns: a server cannot choose it). A refusal
  is recorded in the hospital's own ledger with its reasons.
- **Every release** (a round of DP-SGD, a noised evaluation) recomputes the plan from the config it arrives with:
  it must come from the bound run, be the admitted plan, stay within what was reserved, within the run's cap
  (the policy's `max_epsilon_per_run` and the run's own target) and within every lifetime cap, and still meet the
  policy as it reads now. Otherwise it is refused before any work, and nothing leaves the node.
- **Reservations expire** when their run has not talked to the node for `reservation_timeout` seconds, keeping what
  they spent, so made-up admissions cannot lock a hospital's budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .accountant import Step
from .ledger import Balance, Entry, Ledger, LedgerError, SpendRequest
from .policy import HospitalPolicy, PolicyError, load_policy, violations
from .run_plan import RunPlan


class Refused(RuntimeError):
    """The node will not do what was asked; the message is the reason, for the server, the node's log and ledger.
    `recorded`: already in the hospital's ledger (the node's release guard records any other)."""

    def __init__(self, reason: str, recorded: bool = False) -> None:
        super().__init__(reason)
        self.recorded = recorded


@dataclass(frozen=True)
class NodeRules:
    """What the node's own settings say; nothing here comes from the run."""

    hospital: str
    ledger_path: Path
    policy_file: Path | None
    reservation_timeout: float


@dataclass(frozen=True)
class Admission:
    entry: Entry
    policy: HospitalPolicy
    balance: Balance


class Governance:
    """One hospital's governance of its runs on one dataset."""

    def __init__(self, rules: NodeRules, dataset: str) -> None:
        self.rules = rules
        self.hospital = rules.hospital
        self.dataset = dataset
        self.ledger = Ledger(rules.ledger_path)

    def refuse(self, run_id: str, flower_run: int | None, reason: str) -> Refused:
        """Record the refusal in the hospital's ledger; returns the exception to raise."""
        self.ledger.record_refusal(self.hospital, self.dataset, run_id, flower_run, reason)
        return Refused(f"{self.hospital}: {reason}", recorded=True)

    def policy(self, run_id: str, flower_run: int | None) -> HospitalPolicy:
        try:
            return load_policy(self.rules.policy_file)
        except PolicyError as err:
            raise self.refuse(run_id, flower_run, f"policy file: {err}") from None

    def _request(self, run_id: str, flower_run: int | None, plan: RunPlan) -> SpendRequest:
        return SpendRequest(run_id, self.hospital, self.dataset, flower_run, plan.to_json(), plan.releases(),
                            plan.delta, plan.noise_multiplier, plan.sample_rate)

    def _rules_broken(self, policy: HospitalPolicy, plan: RunPlan, planned_epsilon: float) -> list[str]:
        reasons = violations(policy, plan, planned_epsilon)
        if plan.target_epsilon is not None and planned_epsilon > plan.target_epsilon:
            reasons.append(f"planned epsilon {planned_epsilon:.4f} (what the run spent here before, and its plan) "
                           f"exceeds the run's target {plan.target_epsilon:g}")
        return reasons

    def admit(self, run_id: str, flower_run: int | None, plan: RunPlan) -> Admission:
        """Check the plan against the policy and the ledger, then reserve it for this Flower run."""
        policy = self.policy(run_id, flower_run)
        request = self._request(run_id, flower_run, plan)
        planned = self.ledger.plan(request)
        reasons = self._rules_broken(policy, plan, planned.planned_epsilon)
        if reasons:
            raise self.refuse(run_id, flower_run, "policy: " + "; ".join(reasons))
        try:
            entry = self.ledger.reserve(request, policy.lifetime_cap, stale_after=self.rules.reservation_timeout,
                                        max_open=policy.max_open_reservations)
        except LedgerError as err:
            raise self.refuse(run_id, flower_run, str(err)) from None
        return Admission(entry, policy, self.ledger.balance(self.hospital, self.dataset, policy.lifetime_cap))

    def _release(self, run_id: str, flower_run: int | None, plan: RunPlan, release: Step) -> Entry:
        policy = self.policy(run_id, flower_run)
        admitted = self.ledger.entry(run_id, self.hospital, self.dataset)
        if admitted is not None and admitted.plan is not None and admitted.plan != plan.to_json():
            changed = RunPlan.from_json(admitted.plan).differences(plan)
            raise self.refuse(run_id, flower_run, f"run {run_id} asks for another plan than the one admitted: "
                                                  + "; ".join(changed))
        reasons = self._rules_broken(policy, plan, admitted.planned_epsilon) if admitted is not None else []
        if reasons:
            raise self.refuse(run_id, flower_run, "policy: " + "; ".join(reasons))
        caps = [c for c in (policy.max_epsilon_per_run, plan.target_epsilon) if c is not None]
        try:
            return self.ledger.charge(run_id, self.hospital, self.dataset, flower_run=flower_run,
                                      plan=plan.to_json(), release=release, policy_cap=policy.lifetime_cap,
                                      run_cap=min(caps) if caps else None,
                                      stale_after=self.rules.reservation_timeout)
        except LedgerError as err:
            raise self.refuse(run_id, flower_run, str(err)) from None

    def begin_round(self, run_id: str, flower_run: int | None, plan: RunPlan) -> Entry:
        """Charge one round of DP-SGD before it is trained; the entry's `spent` includes it."""
        return self._release(run_id, flower_run, plan, plan.round_release)

    def begin_evaluation(self, run_id: str, flower_run: int | None, plan: RunPlan) -> Entry:
        """Charge one noised evaluation of the held-out records before it is computed."""
        if plan.evaluation_rounds == 0:
            raise self.refuse(run_id, flower_run, f"run {run_id}: federated evaluation is not part of the plan "
                                                  "this hospital admitted")
        return self._release(run_id, flower_run, plan, plan.evaluation_release)

    def close(self, run_id: str, flower_run: int | None, status: str) -> tuple[Entry, Balance]:
        """Commit or abort the run's entry, if this Flower run is the one it is bound to."""
        try:
            entry = self.ledger.close(run_id, self.hospital, self.dataset, status, flower_run=flower_run,
                                      check_run=True)
        except LedgerError as err:
            raise self.refuse(run_id, flower_run, str(err)) from None
        policy = self.policy(run_id, flower_run)
        return entry, self.ledger.balance(self.hospital, self.dataset, policy.lifetime_cap)
