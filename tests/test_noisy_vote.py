"""The noisy vote's accounting, checked against Google's dp-accounting and the tight PLD bound."""

from __future__ import annotations

import logging

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privacy.noisy_vote import ORDERS, VOTE_SENSITIVITY, NoisyVote, calibrate_gaussian, gaussian_epsilon

logging.getLogger("absl").setLevel(logging.ERROR)


def dp_accounting_rdp(noise_multiplier: float, releases: int, delta: float) -> float:
    accountant = RdpAccountant(orders=ORDERS)
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


def tight_pld(noise_multiplier: float, releases: int, delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("noise_multiplier", "releases", "delta"),
                         [(4.0, 1, 1e-5), (4.0, 10, 1e-5), (76.0, 1, 1e-6), (76.0, 5000, 1e-6), (1.0, 3, 1e-5)])
def test_composed_epsilon_matches_dp_accounting_and_is_never_below_the_tight_bound(
        noise_multiplier: float, releases: int, delta: float) -> None:
    ours = gaussian_epsilon(noise_multiplier, delta, releases)
    assert ours == pytest.approx(dp_accounting_rdp(noise_multiplier, releases, delta), rel=1e-3)
    assert ours >= tight_pld(noise_multiplier, releases, delta) * (1 - 1e-3)


@pytest.mark.parametrize(("epsilon", "delta"), [(0.05, 1e-6), (1.0, 1e-5), (8.0, 1e-5)])
def test_calibration_spends_at_most_the_target_and_no_less_than_half_a_percent_under(epsilon: float,
                                                                                      delta: float) -> None:
    sigma = calibrate_gaussian(epsilon, delta)
    assert epsilon * 0.995 <= gaussian_epsilon(sigma, delta, 1) <= epsilon


def test_the_reference_deployment_budget_allows_the_queries_rdp_composition_allows() -> None:
    vote = NoisyVote(epsilon_per_query=0.05, epsilon_per_user=5.0, delta=1e-6)
    assert vote.epsilon_after(1) == pytest.approx(0.05, rel=0.005)
    assert vote.epsilon_after(vote.max_queries) <= 5.0 < vote.epsilon_after(vote.max_queries + 1)
    assert vote.max_queries > 100  # RDP composes far better than adding 0.05 per query
    assert vote.vote_sigma == pytest.approx(vote.noise_multiplier * VOTE_SENSITIVITY)


def test_the_release_is_the_argmax_of_noised_counts() -> None:
    quiet = NoisyVote(epsilon_per_query=1000.0, epsilon_per_user=2000.0, delta=1e-5)
    assert quiet.release([2, 2, 2, 0], 4, np.random.default_rng(0)) == 2
    loud = NoisyVote(epsilon_per_query=0.05, epsilon_per_user=5.0, delta=1e-6)
    winners = {loud.release([2, 2, 2, 0], 4, np.random.default_rng(seed)) for seed in range(200)}
    assert winners == {0, 1, 2, 3}  # at sigma ~100 votes, three hospitals' agreement barely shows
