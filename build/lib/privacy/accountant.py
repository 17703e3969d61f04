"""Privacy accounting for the replace-one neighbouring relation, in a form that survives process restarts.

Unit of privacy: one record of one hospital's dataset, replaced by any other record. A hospital's dataset size is
public (its sampling rate q = 1 / ceil(N / B) gives N away, and the FedAvg weight is N), so neighbouring datasets
have the same size: add/remove-one, which assumes N is hidden, is not the relation the releases satisfy.

A history is the list of Gaussian releases a hospital's records took part in: (noise multiplier, sample rate,
steps), the noise multiplier relative to what one record contributes (its clipping norm), the sample rate that of
Poisson sampling (1: no sampling). Two accountants turn it into epsilon:

- `pld` (default): Google's dp-accounting, privacy loss distributions for the REPLACE_ONE relation: for each step
  the pair q N(-C, s^2) + (1-q) N(0, s^2) against q N(C, s^2) + (1-q) N(0, s^2), the dominating pair of Poisson
  subsampling under substitution, discretised pessimistically (Doroshenko et al. 2022, "Connect the Dots") and
  composed exactly by FFT. Tight: at epsilon 8 it needs about the noise add/remove accounting needed.
- `rdp`: Renyi DP. Replacing record x by x' is two zero-out steps (x -> a record that contributes nothing -> x';
  zero-out is Kairouz et al. 2021, Def. 1.1, and Opacus's add/remove analysis is exact for it), and the weak
  triangle inequality of Renyi divergence (Mironov 2017, Prop. 11, p = q = 2),
      D_a(P || R) <= (a - 1/2) / (a - 1) * D_2a(P || Q) + D_(2a-1)(Q || R),
  bounds the pair over the whole composed transcript. Closed-form and simple to check, but looser (about 1.4x the
  noise of `pld` at epsilon 8).

Both hold under adaptive composition, across rounds and runs; the conversion from Renyi DP is Balle et al. (2020).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# dp-accounting and Opacus (which imports torch) load on first use: a node's ClientApp starts a process per message,
# and most of those (SecAgg+'s key exchange, admission) never compute an epsilon.

NEIGHBOURING_RELATION = "replace-one: one record of one hospital's dataset replaced by any other; dataset sizes public"
ACCOUNTANTS = ("pld", "rdp")
DESCRIPTIONS = {"pld": "privacy loss distributions for replace-one (dp-accounting, pessimistic discretisation)",
                "rdp": "Renyi DP, replace-one by the weak triangle inequality over zero-out (Opacus's analysis)"}
# Privacy loss grid: pessimistic, so a coarser one only raises epsilon. 1e-3 is within 0.1% at epsilon 1 to 100;
# below epsilon 1 (where the rounding of many composed steps shows) the result is recomputed ten times finer.
PLD_DISCRETISATION = 1e-3
FINE_BELOW_EPSILON = 1.0
# Renyi orders a of the replace-one curve, which needs the zero-out curve at 2a and 2a - 1: half-integers keep those
# integers (fast and exact in Opacus's analysis), large orders serve small epsilons. Against a grid four times as
# fine, this one is at most 1.5% looser at epsilon 1 to 10 and 8% at epsilon 0.03.
ORDERS = np.array([1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.75, 1.875, 2, 2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8, 9,
                   10, 11, 12, 14, 16, 18, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512,
                   768, 1024])

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def zero_out_rdp(history: Sequence[Step], orders: np.ndarray) -> np.ndarray:
    """Renyi DP of the composed history at `orders` for the zero-out (equivalently add/remove) relation."""
    from opacus.accountants.analysis.rdp import compute_rdp

    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        if sigma <= 0:
            return np.full(len(orders), math.inf)
        total = total + compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return total


@lru_cache(maxsize=4096)
def _replace_one_rdp_per_step(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    a = np.array(orders)
    zero_out = zero_out_rdp(((sigma, q, 1),), np.concatenate((2 * a, 2 * a - 1)))
    return (a - 0.5) / (a - 1) * zero_out[: len(a)] + zero_out[len(a):]


def replace_one_rdp(history: Sequence[Step], orders: np.ndarray = ORDERS) -> np.ndarray:
    """Renyi DP at `orders` for the replace-one relation: the weak triangle inequality over two zero-out steps.

    Renyi DP composes by addition and the triangle bound is linear in the two zero-out curves, so it is computed
    per release and summed: the same as applying it once to the composed transcript.
    """
    key = tuple(float(a) for a in orders)
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total = total + steps * _replace_one_rdp_per_step(float(sigma), float(q), key)
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """The smallest epsilon at `delta` that the Renyi curve `rdp` at `orders` implies, by the conversion of Balle et
    al. (2020, Theorem 21), as Opacus's `get_privacy_spent` computes it (a test holds the two equal). Written out in
    numpy so that the gateway's noisy vote is accounted without loading Opacus and torch."""
    orders, rdp = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    if len(orders) != len(rdp):
        raise ValueError(f"rdp_to_epsilon: {len(rdp)} Renyi values for {len(orders)} orders")
    with np.errstate(invalid="ignore"):
        epsilons = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    if not np.isfinite(rdp).any() or np.isnan(epsilons).all():
        return math.inf
    return float(np.nanmin(epsilons))


def pld_epsilon(history: Sequence[Step], delta: float, discretisation: float = PLD_DISCRETISATION) -> float:
    """Replace-one epsilon of the history by dp-accounting's privacy loss distributions."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs through absl at INFO
    counts: Counter[tuple[float, float]] = Counter()
    for sigma, q, steps in history:
        counts[float(sigma), float(q)] += int(steps)
    if any(sigma <= 0 for sigma, _ in counts):
        return math.inf
    epsilon = math.inf
    for grid in (discretisation, discretisation / 10):
        accountant = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                                   value_discretization_interval=grid)
        for (sigma, q), steps in sorted(counts.items()):
            gaussian = dp_accounting.GaussianDpEvent(sigma)
            accountant.compose(gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian), steps)
        epsilon = min(epsilon, float(accountant.get_epsilon(delta)))  # both are upper bounds
        if epsilon >= FINE_BELOW_EPSILON:
            break
    return epsilon


@dataclass(frozen=True)
class AccountantState:
    """Serialisable accountant history: every Gaussian release a hospital's records took part in, in order."""

    history: tuple[Step, ...] = field(default_factory=tuple)
    kind: str = "pld"

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNTANTS:
            raise ValueError(f"accountant: unknown kind {self.kind!r}; choose one of {', '.join(ACCOUNTANTS)}")

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Replace-one epsilon at this delta; 0 before any release, infinite once a release took no noise."""
        if not self.history:
            return 0.0
        if self.kind == "pld":
            return pld_epsilon(self.history, delta)
        return rdp_to_epsilon(replace_one_rdp(self.history), delta)

    def then(self, noise_multiplier: float, sample_rate: float, steps: int) -> AccountantState:
        """This history followed by `steps` more releases: what a planned round would bring the total to."""
        if steps <= 0:
            return self
        step = (float(noise_multiplier), float(sample_rate), int(steps))
        return AccountantState((*self.history, step), self.kind)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        """Ledgers written before replace-one accounting said rdp or prv: their histories are accounted as rdp."""
        raw = json.loads(text)
        kind = raw.get("kind", "pld")
        return cls(tuple((float(s), float(q), int(n)) for s, q, n in raw["history"]),
                   kind if kind in ACCOUNTANTS else "rdp")


def compose(states: Sequence[AccountantState]) -> AccountantState:
    """Sequential composition of several runs on the same records: their histories concatenate. Accounted by
    `rdp` if any run was (the looser of the two bounds, so no run's own epsilon exceeds the composition's)."""
    kind = "rdp" if any(s.kind == "rdp" for s in states) else "pld"
    return AccountantState(tuple(step for s in states for step in s.history), kind)


def gaussian_epsilon(noise_multiplier: float, delta: float, releases: int, orders: np.ndarray = ORDERS) -> float:
    """epsilon of `releases` Gaussian mechanisms without sampling, the noise multiplier being the noise's std over
    the L2 sensitivity under the relation at hand (the Renyi curve a / (2 z^2) is exact)."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return rdp_to_epsilon(releases * orders / (2 * noise_multiplier**2), delta, orders)
