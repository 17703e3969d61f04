"""The noisy vote's accounting, checked against Google's dp-accounting and the tight PLD bound."""

from __future__ import annotations

import logging
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from gateway.limits import SQLiteLimitStore
from privacy.noisy_vote import ORDERS, VOTE_SENSITIVITY, NoisyVote, calibrate_gaussian, gaussian_epsilon
from privacy.secure_random import SecureRandom

logging.getLogger("absl").setLevel(logging.ERROR)


def dp_accounting_rdp(noise_multiplier: float, releases: int, delta: float) -> float:
    accountant = RdpAccountant(orders=list(ORDERS))
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
    assert vote.epsilon_of(vote.rho_per_query) == pytest.approx(0.05, rel=0.005)
    allowed = vote.queries_left(0.0)
    assert vote.epsilon_of(allowed * vote.rho_per_query) <= 5.0 < vote.epsilon_of((allowed + 1) * vote.rho_per_query)
    assert allowed > 100  # RDP composes far better than adding 0.05 per query
    assert vote.epsilon_of(7 * vote.rho_per_query) == pytest.approx(gaussian_epsilon(vote.noise_multiplier, 1e-6, 7))
    assert vote.vote_sigma == pytest.approx(vote.noise_multiplier * VOTE_SENSITIVITY)


def test_a_configuration_change_never_reprices_past_queries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """5,349 queries at 0.05 spent 5.00; then epsilon_per_query drops to 0.01. The spend stays 5.00, and only the
    queries that 5.00 leaves room for at the new price are allowed (not 101,711)."""
    store = SQLiteLimitStore(tmp_path / "limits.sqlite")
    before = NoisyVote(epsilon_per_query=0.05, epsilon_per_user=7.5, delta=1e-6)
    for _ in range(before.queries_left(0.0) * 2 // 3):
        assert store.take_spends(["spend:u"], before.rho_per_query, [before.rho_cap]).allowed
    spent = before.epsilon_of(store.spent("spend:u"))
    after = NoisyVote(epsilon_per_query=0.01, epsilon_per_user=7.5, delta=1e-6)
    assert after.epsilon_of(store.spent("spend:u")) == pytest.approx(spent)  # the same spend at any price
    left = after.queries_left(store.spent("spend:u"))
    for _ in range(left):
        assert store.take_spends(["spend:u"], after.rho_per_query, [after.rho_cap]).allowed
    assert not store.take_spends(["spend:u"], after.rho_per_query, [after.rho_cap]).allowed
    assert after.epsilon_of(store.spent("spend:u")) <= 7.5


def test_spend_kept_as_query_counts_is_carried_over_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = SQLiteLimitStore(tmp_path / "limits.sqlite")
    with store._lock:
        store._db.execute("INSERT INTO counters (key, value) VALUES ('budget:old-user', 12)")
    assert store.migrate_counts("spend:", 0.5) == 1
    assert store.spent("spend:old-user") == 6.0
    assert store.migrate_counts("spend:", 0.5) == 0 and store.spent("spend:old-user") == 6.0


def test_the_release_is_the_argmax_of_noised_counts() -> None:
    quiet = NoisyVote(epsilon_per_query=1000.0, epsilon_per_user=2000.0, delta=1e-5)
    assert quiet.release([2, 2, 2, 0], 4, SecureRandom()) == 2
    loud = NoisyVote(epsilon_per_query=0.05, epsilon_per_user=5.0, delta=1e-6)
    rng = SecureRandom()
    winners = {loud.release([2, 2, 2, 0], 4, rng) for _ in range(200)}
    assert winners == {0, 1, 2, 3}  # at sigma ~100 votes, three hospitals' agreement barely shows


def test_the_gateway_accounts_and_draws_a_noisy_vote_without_loading_torch() -> None:
    """The gateway process is a proxy: Opacus and torch (about 400 MB and 5 s to load) stay out of it."""
    script = (
        "import sys, gateway.app, gateway.cli, gateway.audit_cli, privacy.ledger_cli\n"
        "from privacy.noisy_vote import NoisyVote\n"
        "from privacy.secure_random import SecureRandom\n"
        "vote = NoisyVote(0.05, 5.0, 1e-6)\n"
        "assert 0 < vote.epsilon_of(vote.rho_cap) <= 5.0 and vote.queries_left(0.0) > 0\n"
        "assert vote.release([1, 1, 2], 22, SecureRandom()) in range(22)\n"
        "print(sorted(m for m in ('torch', 'opacus', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
