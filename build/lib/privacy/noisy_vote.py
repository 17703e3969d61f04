"""The noisy vote: a query answered by the hospitals' own models, each casting one vote, released as the argmax of
the vote counts plus Gaussian noise (GNMax, as in PATE).

Unit of privacy: one training record of one hospital. Adding, removing or replacing it can change only that
hospital's vote, which moves one count down and another up: L2 sensitivity sqrt(2). Each query is then a Gaussian
mechanism with noise multiplier z (noise std z * sqrt(2) on each count), without subsampling. z is calibrated so
that one query costs `epsilon_per_query`.

A user's spend, and each hospital model's spend over all users (the deployment's total: what one of its records is
exposed to, whoever asks), is the sum of what each query cost in zero-concentrated DP, rho = 1 / (2 z^2): a Gaussian
mechanism's Renyi curve is alpha * rho, so summing rho composes them exactly, and the stored sum is each query's
own price: a later change of `epsilon_per_query` prices only the queries after it. The composed epsilon, at the
configured delta, must stay within `epsilon_per_user` and the deployment's total. The noise comes from
`SecureRandom`.

Answers to plain queries are post-processing of the DP-trained federated model and spend no epsilon at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import accountant
from .secure_random import SecureRandom

VOTE_SENSITIVITY = math.sqrt(2.0)
# Opacus's default orders (1.1 to 10.9 by tenths, then 12 to 63), which stop at 63, extended: a small per-query
# epsilon needs far larger ones (the best order grows with sigma). Written out: the gateway does not load Opacus.
ORDERS = np.array([*(1 + np.arange(1, 100) / 10), *range(12, 64), *np.geomspace(64, 1e6, 300)])
CALIBRATION_REL_TOLERANCE = 0.005


def gaussian_epsilon(noise_multiplier: float, delta: float, releases: int) -> float:
    """epsilon of `releases` Gaussian mechanisms at `noise_multiplier` (noise std over L2 sensitivity), by RDP."""
    return accountant.gaussian_epsilon(noise_multiplier, delta, releases, ORDERS)


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

    @property
    def rho_per_query(self) -> float:
        """What one query at this configuration costs, in zCDP."""
        return 1.0 / (2.0 * self.noise_multiplier**2)

    def epsilon_of(self, rho: float) -> float:
        """epsilon at `delta` of a composed spend `rho` (the Renyi curve alpha * rho)."""
        return accountant.rdp_to_epsilon(ORDERS * rho, self.delta, ORDERS) if rho > 0 else 0.0

    @cached_property
    def rho_cap(self) -> float:
        """The largest spend whose epsilon stays within `epsilon_per_user`."""
        return self.rho_within(self.epsilon_per_user)

    def rho_within(self, epsilon: float) -> float:
        """The largest spend whose epsilon at `delta` stays within `epsilon` (a user's budget, or the deployment's
        total per hospital model)."""
        low, high = 0.0, self.rho_per_query
        while self.epsilon_of(high) <= epsilon:
            low, high = high, 2 * high
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if self.epsilon_of(mid) <= epsilon else (low, mid)
        return low

    def queries_left(self, rho_spent: float, rho_cap: float | None = None) -> int:
        """Queries still within `rho_cap` (a user's, by default)."""
        cap = self.rho_cap if rho_cap is None else rho_cap
        return max(int((cap - rho_spent) / self.rho_per_query + 1e-9), 0)

    def release(self, votes: list[int], num_labels: int, rng: SecureRandom) -> int:
        """The label whose noised count is largest; `votes` holds one label index per hospital."""
        counts = np.bincount(np.asarray(votes, dtype=np.int64), minlength=num_labels).astype(np.float64)
        return int(np.argmax(counts + rng.normal_numpy((num_labels,), self.vote_sigma)))
