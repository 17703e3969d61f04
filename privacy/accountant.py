"""Privacy accounting that survives process restarts.

An accountant's whole state is its history of (noise multiplier, sample rate, steps); we keep that as JSON so a
hospital's node can resume it after a restart, and composing round by round equals one run over all steps.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

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
        """epsilon spent so far at this delta; 0 before any step."""
        if not self.history:
            return 0.0
        return float(self.to_accountant().get_epsilon(delta=delta))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        raw = json.loads(text)
        return cls(raw["kind"], [(float(s), float(q), int(n)) for s, q, n in raw["history"]])

    def save(self, path: Path) -> None:
        """Write atomically: a crash mid-write must never lose what a hospital has already spent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, kind: str) -> AccountantState:
        if not path.exists():
            return cls(kind)
        state = cls.from_json(path.read_text())
        if state.kind != kind:
            raise ValueError(f"privacy.accountant: {path} holds a {state.kind!r} history, the run asks {kind!r}")
        return state
