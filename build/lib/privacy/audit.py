"""The statistics of a one-run privacy audit (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023): an empirical lower bound on epsilon from guesses about canaries.

m canaries are each put in the training data independently with probability 1/2. After training, an auditor who
sees what the mechanism released guesses "in" or "out" for r of them and abstains on the rest. If the mechanism is
(epsilon, delta)-DP, the number v of correct guesses is stochastically dominated by Binomial(r, e^eps / (1 + e^eps))
plus a delta term (their Theorem 3.1 and Proposition 5.9). The audit reports the largest epsilon that this rejects
at the chosen confidence: a lower bound that holds whatever the auditor's scores were, provided the guesses were
fixed by a rule chosen before looking (here: the top and bottom k scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class AuditError(ValueError):
    """Bad audit parameters; the message names the argument."""


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of v or more correct guesses out of r, over m canaries, if the mechanism is (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski (2023), Algorithm 2 (`p_value_DP_audit` in their appendix)."""
    import numpy as np
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise AuditError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    q = 1 / (1 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomised response
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    i = np.arange(1, v + 1)
    below = np.cumsum(binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i], for each i
    alpha = float((below / i).max()) if v else 0.0
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon the observed guesses reject at `confidence`: the mechanism is not (epsilon, delta)-DP."""
    if not 0 < confidence < 1:
        raise AuditError(f"--confidence: must be strictly between 0 and 1, got {confidence}")
    if not 0 <= delta < 1:
        raise AuditError(f"delta: must be in [0, 1), got {delta}")
    significance = 1 - confidence
    if p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= significance:
        low, high = high, 2 * high
        if high > 1e3:
            return low
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) <= significance else (low, mid)
    return low


@dataclass(frozen=True)
class Guesses:
    canaries: int
    guesses: int
    correct: int


def guess(scores: list[float], included: list[bool], per_side: int) -> Guesses:
    """Guess "in" for the `per_side` highest scores and "out" for the `per_side` lowest; abstain on the rest."""
    if len(scores) != len(included) or not 0 < 2 * per_side <= len(scores):
        raise AuditError(f"guesses: need 0 < 2 x {per_side} <= {len(scores)} canaries, one score each")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    correct = sum(included[i] for i in order[-per_side:]) + sum(not included[i] for i in order[:per_side])
    return Guesses(len(scores), 2 * per_side, correct)
