"""Privacy accounting that survives process restarts.

An accountant's whole state is its history of (noise multiplier, sample rate, steps); we keep that as JSON in the
hospital's ledger so its node can resume it after a restart, and composing round by round equals one run over all
steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

ACCOUNTANT_TYPES: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def new_accountant(kind: str) -> IAccountant:
    try:
        return ACCOUNTANT_TYPES[kind]()
    except KeyError:
        raise ValueError(f"accountant: unknown kind {kind!r}; choose one of {', '.join(ACCOUNTANT_TYPES)}") from None


@dataclass
class AccountantState:
    """Serialisable accountant history: the composition of every DP-SGD step taken so far."""

    kind: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def of(cls, accountant: IAccountant) -> AccountantState:
        kind = next(k for k, t in ACCOUNTANT_TYPES.items() if isinstance(accountant, t))
        return cls(kind, [(float(s), float(q), int(n)) for s, q, n in accountant.history])

    def to_accountant(self) -> IAccountant:
        accountant = new_accountant(self.kind)
        accountant.history = [(s, q, n) for s, q, n in self.history]
        return accountant

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """epsilon spent so far at this delta; 0 before any step, infinite once a step took no noise."""
        if not self.history:
            return 0.0
        if any(sigma <= 0 for sigma, _, _ in self.history):
            return math.inf
        return float(self.to_accountant().get_epsilon(delta=delta))

    def then(self, noise_multiplier: float, sample_rate: float, steps: int) -> AccountantState:
        """This history followed by `steps` more steps: what a planned round would bring the total to."""
        if steps <= 0:
            return AccountantState(self.kind, list(self.history))
        return AccountantState(self.kind, [*self.history, (float(noise_multiplier), float(sample_rate), int(steps))])

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        raw = json.loads(text)
        return cls(raw["kind"], [(float(s), float(q), int(n)) for s, q, n in raw["history"]])


def compose(histories: list[AccountantState]) -> AccountantState:
    """Sequential composition of several runs on the same records, as one RDP history.

    RDP composes by adding the curves, which is what concatenating histories does; it is valid whichever
    accountant each run used, and is usually far tighter than summing the runs' epsilons.
    """
    return AccountantState("rdp", [step for h in histories for step in h.history])
