"""Every epsilon we report, checked against an independent implementation: Google's dp-accounting, and closed forms.

Our numbers come from Opacus's RDP and PRV accountants. They must be sound (never below dp-accounting's tight PLD
epsilon) and not looser than dp-accounting's RDP accountant over the same Renyi orders.
"""

from __future__ import annotations

import itertools
import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from fl_server.privacy_report import hospital_level_epsilon
from privacy.accountant import AccountantState
from privacy.calibration import calibrate_noise, epsilon_for
from privacy.ledger import COMMITTED, Ledger, SpendRequest
from tests.conftest import tiny_config

ORDERS = RDPAccountant.DEFAULT_ALPHAS
GRID = list(itertools.product((0.001, 0.01, 0.1, 1.0), (0.6, 1.0, 2.0), (1, 100, 1000), (1e-5, 1e-7)))
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs each fractional order it cannot evaluate


def event(q: float, sigma: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def independent_rdp(runs: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RdpAccountant(orders=ORDERS)
    for q, sigma, steps in runs:
        accountant.compose(event(q, sigma), steps)
    return float(accountant.get_epsilon(delta))


def independent_pld(runs: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for q, sigma, steps in runs:
        accountant.compose(event(q, sigma), steps)
    return float(accountant.get_epsilon(delta))


def gaussian_closed_form(sigma: float, steps: int, delta: float) -> float:
    """Without subsampling, RDP is alpha * steps / (2 sigma^2); the conversion is Balle et al. 2020, Prop. 12."""
    alphas = np.array(ORDERS)
    rdp = alphas * steps / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(max(0.0, eps.min()))


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID)
def test_reported_rdp_epsilon_is_sound_and_no_looser_than_dp_accounting(q: float, sigma: float, steps: int,
                                                                         delta: float) -> None:
    ours = epsilon_for(sigma, delta, q, steps, "rdp")
    assert ours <= independent_rdp([(q, sigma, steps)], delta) * (1 + 1e-9)
    if sigma >= 1.0 and q <= 0.01:  # the usual DP-SGD regime: both series converge, the numbers agree
        assert ours == pytest.approx(independent_rdp([(q, sigma, steps)], delta), rel=1e-6)
    if q == 1.0:
        assert ours == pytest.approx(gaussian_closed_form(sigma, steps, delta), rel=1e-9)


@pytest.mark.parametrize(("q", "sigma", "steps"), list(itertools.product((0.001, 0.01, 0.1), (0.6, 1.0, 2.0),
                                                                         (100, 1000))))
def test_reported_epsilon_is_never_below_the_tight_pld_epsilon(q: float, sigma: float, steps: int) -> None:
    tight = independent_pld([(q, sigma, steps)], 1e-5)
    assert epsilon_for(sigma, 1e-5, q, steps, "rdp") >= tight * (1 - 1e-3)
    # PRV is tight too, up to Opacus's default absolute error bound of 0.01 on epsilon
    assert epsilon_for(sigma, 1e-5, q, steps, "prv") == pytest.approx(tight, rel=0.03, abs=0.02)


def test_lifetime_composition_of_different_runs_matches_dp_accounting(tmp_path) -> None:
    runs = [(0.01, 1.0, 300), (0.005, 1.2, 500), (0.002, 1.5, 2000)]  # (q, sigma, steps) of three runs
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for i, (q, sigma, steps) in enumerate(runs):
        ledger.reserve(SpendRequest(f"run-{i}", "h0", "icd10", sigma, q, steps, 1e-5, "rdp"))
        ledger.charge(f"run-{i}", "h0", "icd10", AccountantState("rdp", [(sigma, q, steps)]))
        ledger.close(f"run-{i}", "h0", "icd10", COMMITTED)
    balance = ledger.balance("h0", "icd10")
    assert balance.rdp_epsilon == pytest.approx(independent_rdp(runs, 1e-5), rel=1e-6)
    assert balance.rdp_epsilon >= independent_pld(runs, 1e-5) * (1 - 1e-3)
    assert balance.summed_epsilon == pytest.approx(sum(independent_rdp([r], 1e-5) for r in runs), rel=1e-6)


def test_hospital_level_epsilon_is_the_gaussian_mechanism_over_rounds() -> None:
    cfg = tiny_config("privacy.client_level.enabled=true", "privacy.client_level.noise_multiplier=2.0",
                      "privacy.client_level.delta=1e-4")
    assert hospital_level_epsilon(cfg, 0) == 0.0
    for rounds in (1, 10, 50):
        assert hospital_level_epsilon(cfg, rounds) == pytest.approx(gaussian_closed_form(2.0, rounds, 1e-4), rel=1e-9)
        assert hospital_level_epsilon(cfg, rounds) == pytest.approx(independent_rdp([(1.0, 2.0, rounds)], 1e-4),
                                                                    rel=1e-9)


@pytest.mark.parametrize(("q", "sigma", "delta"), list(itertools.product((0.001, 0.05, 1.0), (0.7, 1.5), (1e-5, 1e-8))))
def test_epsilon_grows_with_every_step(q: float, sigma: float, delta: float) -> None:
    epsilons = [AccountantState("rdp", [(sigma, q, steps)]).epsilon(delta) for steps in (1, 2, 10, 100, 1000, 5000)]
    assert all(a < b for a, b in itertools.pairwise(epsilons))


@pytest.mark.parametrize(("target", "q", "steps"), list(itertools.product((0.5, 1.0, 4.0, 8.0), (0.001, 0.01, 0.1),
                                                                          (100, 1000))))
def test_calibrated_sigma_never_lets_the_run_end_above_its_target(target: float, q: float, steps: int) -> None:
    sigma = calibrate_noise(target, 1e-5, q, steps, "rdp")
    end_of_run = AccountantState("rdp", [(sigma, q, steps // 4)] * 4).epsilon(1e-5)  # four rounds, composed
    assert end_of_run <= target
    assert end_of_run >= 0.99 * target
    assert math.isfinite(sigma) and sigma > 0
