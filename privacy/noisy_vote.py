"""The noisy vote: a query answered by the hospitals' own models, each casting one vote, released as the argmax of
the vote counts plus Gaussian noise (GNMax, as in PATE).

Unit of privacy: one training record of one hospital. Changing it can change only that hospital's vote, which moves
one count down and another up: L2 sensitivity sqrt(2). Each query is then a Gaussian mechanism with noise multiplier
z (noise std z * sqrt(2) on each count), without subsampling; a user's queries compose in RDP (Opacus's analysis,
with orders extended for small epsilon). z is calibrated once so that the first query costs `epsilon_per_query`; a
user may make as many queries as keep the composed epsilon within `epsilon_per_user`.

Answers to plain queries are post-processing of the DP-trained federated model and spend no epsilon at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

VOTE_SENSITIVITY = math.sqrt(2.0)
# Opacus's orders stop at 63; a small per-query epsilon needs far larger ones (the best order grows with sigma).
ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *np.geomspace(64, 1e6, 300).tolist()]
CALIBRATION_REL_TOLERANCE = 0.005


def gaussian_epsilon(noise_multiplier: float, delta: float, releases: int) -> float:
    """epsilon of `releases` Gaussian mechanisms at `noise_multiplier` (noise std over L2 sensitivity), by RDP."""
    if releases == 0:
        return 0.0
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=ORDERS)
    epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


def calibrate_gaussian(target_epsilon: float, delta: float) -> float:
    """Smallest noise multiplier (to within 0.5% of the target) whose one release stays within `target_epsilon`."""
    if not (target_epsilon > 0 and 0 < delta < 1):
        raise ValueError("calibrate_gaussian: need epsilon > 0 and 0 < delta < 1")
    low, high = 0.0, 1.0
    while gaussian_epsilon(high, delta, 1) > target_epsilon:
        low, high = high, 2 * high
    while gaussian_epsilon(high, delta, 1) < target_epsilon * (1 - CALIBRATION_REL_TOLERANCE):
        mid = (low + high) / 2
        low, high = (mid, high) if gaussian_epsilon(mid, delta, 1) > target_epsilon else (low, mid)
    return high


@dataclass(frozen=True)
class NoisyVote:
    epsilon_per_query: float
    epsilon_per_user: float
    delta: float

    @cached_property
    def noise_multiplier(self) -> float:
        """sigma in units of the sensitivity; the noise added to each count has std `vote_sigma`."""
        return calibrate_gaussian(self.epsilon_per_query, self.delta)

    @property
    def vote_sigma(self) -> float:
        return self.noise_multiplier * VOTE_SENSITIVITY

    def epsilon_after(self, queries: int) -> float:
        """epsilon a user's `queries` noisy votes have spent (RDP composition)."""
        return gaussian_epsilon(self.noise_multiplier, self.delta, queries)

    @cached_property
    def max_queries(self) -> int:
        """The most queries whose composed epsilon stays within `epsilon_per_user`."""
        low, high = 0, 1
        while self.epsilon_after(high) <= self.epsilon_per_user:
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.epsilon_after(mid) <= self.epsilon_per_user else (low, mid)
        return low

    def release(self, votes: list[int], num_labels: int, rng: np.random.Generator) -> int:
        """The label whose noised count is largest; `votes` holds one label index per hospital."""
        counts = np.bincount(np.asarray(votes, dtype=np.int64), minlength=num_labels).astype(np.float64)
        return int(np.argmax(counts + rng.normal(0.0, self.vote_sigma, size=num_labels)))
