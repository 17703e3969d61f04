"""Every epsilon we report, checked against independent computations: numerical integration of the replace-one pair,
closed forms, Google's dp-accounting used directly, and each of our two accountants against the other.

Record-level epsilons are replace-one. `pld` is dp-accounting's privacy loss distribution for the pair
q N(-1) + (1-q) N(0) against q N(1) + (1-q) N(0): its one-step privacy profile must be that of the pair, integrated
numerically, and pessimistic. `rdp` is Opacus's Renyi analysis under zero-out, combined by the weak triangle
inequality: the zero-out curve must be dp-accounting's own (REPLACE_SPECIAL) and the combination never below the
pair's exact Renyi divergence. Both must lie between the tight add/remove epsilon (a zero-out pair is a replace-one
pair) and, for `pld`, the rigorous but looser `rdp`.
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
from scipy import integrate, stats

from fl_server.privacy_report import hospital_level_epsilon
from privacy.accountant import ORDERS, AccountantState, Step, rdp_to_epsilon, replace_one_rdp, zero_out_rdp
from privacy.calibration import calibrate_noise, epsilon_for
from privacy.ledger import COMMITTED, Ledger, SpendRequest
from tests.conftest import tiny_config

GRID = [*itertools.product((0.001, 0.01, 0.1), (0.6, 1.0, 2.0), (1, 100, 1000), (1e-5,)),
        *itertools.product((1.0,), (1.0, 2.0), (1, 100), (1e-5,)),  # no sampling: the exact Gaussian is known
        *itertools.product((0.01,), (1.0,), (1, 1000), (1e-7,))]
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting logs each fractional order it cannot evaluate


def event(q: float, sigma: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def independent_zero_out_rdp(runs: list[tuple[float, float, int]], orders: np.ndarray) -> np.ndarray:
    """dp-accounting's own Renyi curve for the zero-out relation (a record replaced by a special null record)."""
    accountant = RdpAccountant(orders=list(orders),
                               neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for q, sigma, steps in runs:
        accountant.compose(event(q, sigma), steps)
    return np.asarray(accountant._rdp)


def independent_replace_one(runs: list[tuple[float, float, int]], delta: float) -> float:
    """The weak triangle inequality applied to dp-accounting's zero-out curves, converted as Opacus converts."""
    a = ORDERS
    rdp = (a - 0.5) / (a - 1) * independent_zero_out_rdp(runs, 2 * a) + independent_zero_out_rdp(runs, 2 * a - 1)
    return rdp_to_epsilon(rdp, delta)


def tight_add_remove(runs: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for q, sigma, steps in runs:
        accountant.compose(event(q, sigma), steps)
    return float(accountant.get_epsilon(delta))


def analytic_gaussian(noise_multiplier: float, steps: int, delta: float) -> float:
    """The exact epsilon of `steps` Gaussian mechanisms without sampling (Balle & Wang 2018): their composition is
    one Gaussian with mu = sqrt(steps) / noise_multiplier, and delta(epsilon) has a closed form."""
    mu = math.sqrt(steps) / noise_multiplier

    def delta_at(eps: float) -> float:
        return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)))

    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, 2 * high
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def _log_mixture(x: float, q: float, sigma: float, mean: float) -> float:
    return float(np.logaddexp(math.log1p(-q) + stats.norm.logpdf(x, 0, sigma),
                              math.log(q) + stats.norm.logpdf(x, mean, sigma)))


def replace_one_divergence(q: float, sigma: float, alpha: float) -> float:
    """D_alpha(P || Q) for one step of the worst replace-one pair, in one dimension: the replaced record's clipped
    gradient +1, its replacement's -1 (in units of the clipping norm), each present with probability q."""
    def integrand(x: float) -> float:
        return math.exp(alpha * _log_mixture(x, q, sigma, 1.0) + (1 - alpha) * _log_mixture(x, q, sigma, -1.0))

    value, _ = integrate.quad(integrand, -np.inf, np.inf, limit=500, epsabs=0, epsrel=1e-10)
    return math.log(value) / (alpha - 1)


def replace_one_delta(q: float, sigma: float, epsilon: float) -> float:
    """delta(epsilon) of one step of the same pair: the hockey-stick divergence, integrated numerically."""
    def integrand(x: float) -> float:
        p, r = _log_mixture(x, q, sigma, 1.0), _log_mixture(x, q, sigma, -1.0)
        return max(math.exp(p) - math.exp(epsilon + r), 0.0)

    value, _ = integrate.quad(integrand, -40 * sigma, 40 * sigma, limit=1000, points=[0.0], epsabs=1e-14)
    return value


def zero_out_divergence(q: float, sigma: float, alpha: float) -> float:
    """D_alpha((1-q) N(0) + q N(1) || N(0)), the zero-out pair of one step, integrated numerically."""
    def integrand(x: float) -> float:
        return math.exp(stats.norm.logpdf(x, 0, sigma)
                        + alpha * math.log1p(q * math.expm1((2 * x - 1) / (2 * sigma**2))))

    value, _ = integrate.quad(integrand, -40, 40, limit=1000, points=[0.0, 1.0, 2.0], epsabs=0, epsrel=1e-12)
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize(("q", "sigma"), list(itertools.product((0.001, 0.01, 0.1), (0.6, 1.0, 2.0))))
def test_the_zero_out_curve_is_exact_and_agrees_with_dp_accounting(q: float, sigma: float) -> None:
    ours = zero_out_rdp(((sigma, q, 1),), ORDERS)
    for i in (0, 4, 8, 12, 20):  # fractional and integer orders
        assert ours[i] == pytest.approx(zero_out_divergence(q, sigma, float(ORDERS[i])), rel=1e-5)
    theirs = independent_zero_out_rdp([(q, sigma, 1)], ORDERS)
    integer = np.array([float(a).is_integer() for a in ORDERS]) & np.isfinite(theirs)
    assert ours[integer] == pytest.approx(theirs[integer], rel=1e-6)
    finite = np.isfinite(theirs)  # at fractional orders dp-accounting has an upper bound, or gives up (inf)
    assert (ours[finite] <= theirs[finite] * (1 + 1e-9)).all()


@pytest.mark.parametrize(("q", "sigma", "alpha"), list(itertools.product((0.01, 0.1, 0.5), (0.8, 1.5, 3.0),
                                                                         (1.5, 2.0, 4.0, 8.0))))
def test_the_replace_one_bound_is_never_below_the_exact_divergence_of_the_worst_pair(q: float, sigma: float,
                                                                                    alpha: float) -> None:
    bound = float(replace_one_rdp(((sigma, q, 1),), np.array([alpha]))[0])
    assert bound >= replace_one_divergence(q, sigma, alpha) * (1 - 1e-6)


@pytest.mark.parametrize(("q", "sigma", "epsilon"), list(itertools.product((0.01, 0.1, 0.5), (0.8, 1.5),
                                                                           (0.1, 0.5, 1.0, 2.0))))
def test_the_pld_of_one_step_is_the_replace_one_pair_and_pessimistic(q: float, sigma: float, epsilon: float) -> None:
    pld = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                        value_discretization_interval=1e-4)
    pld.compose(event(q, sigma))
    exact = replace_one_delta(q, sigma, epsilon)
    assert pld.get_delta(epsilon) >= exact * (1 - 1e-6)
    assert pld.get_delta(epsilon) <= exact * 1.02 + 1e-9


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID)
def test_both_accountants_are_replace_one_and_pld_is_the_tighter(q: float, sigma: float, steps: int,
                                                                 delta: float) -> None:
    pld, rdp = epsilon_for(sigma, delta, q, steps, "pld"), epsilon_for(sigma, delta, q, steps, "rdp")
    assert rdp == pytest.approx(independent_replace_one([(q, sigma, steps)], delta), rel=1e-6) or \
        rdp <= independent_replace_one([(q, sigma, steps)], delta)  # dp-accounting skips some fractional orders
    assert pld <= rdp * (1 + 1e-3)  # two sound bounds from different principles: the tight one is the lower
    if q < 1.0:
        # a zero-out pair is a replace-one pair (the null record is a record): replace-one is never the smaller
        assert pld >= tight_add_remove([(q, sigma, steps)], delta) * (1 - 1e-3)
    else:
        exact = analytic_gaussian(sigma / 2, steps, delta)  # without sampling the pair is sensitivity 2: exact
        assert exact * (1 - 1e-3) <= pld <= exact * 1.01 + 0.01
        assert exact <= rdp
        assert exact > 50 or rdp <= exact * 1.6  # the orders stop at 1.1: looser only at epsilons nobody trains at


def test_lifetime_composition_of_different_runs_matches_the_independent_one(tmp_path) -> None:
    runs = [(0.01, 1.0, 300), (0.005, 1.2, 500), (0.002, 1.5, 2000)]  # (q, sigma, steps) of three runs
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for i, (q, sigma, steps) in enumerate(runs):
        release: Step = (sigma, q, steps)
        ledger.reserve(SpendRequest(f"run-{i}", "h0", "icd10", None, "plan", AccountantState((release,)), 1e-5,
                                    sigma, q))
        ledger.charge(f"run-{i}", "h0", "icd10", flower_run=None, plan="plan", release=release)
        ledger.close(f"run-{i}", "h0", "icd10", COMMITTED)
    balance = ledger.balance("h0", "icd10")
    direct = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                           value_discretization_interval=1e-4)
    for q, sigma, steps in runs:
        direct.compose(event(q, sigma), steps)
    assert balance.rdp_epsilon == pytest.approx(direct.get_epsilon(1e-5), rel=2e-3)
    assert balance.rdp_epsilon >= direct.get_epsilon(1e-5)  # our coarser grid is pessimistic
    assert balance.summed_epsilon == pytest.approx(sum(epsilon_for(s, 1e-5, q, n) for q, s, n in runs), rel=1e-9)


def test_hospital_level_epsilon_is_the_gaussian_mechanism_at_twice_the_sensitivity() -> None:
    cfg = tiny_config("privacy.client_level.enabled=true", "privacy.client_level.noise_multiplier=2.0",
                      "privacy.client_level.delta=1e-4")
    assert hospital_level_epsilon(cfg, 0) == 0.0
    for rounds in (1, 10, 50):
        accountant = RdpAccountant(orders=list(ORDERS))
        accountant.compose(dp_accounting.GaussianDpEvent(2.0 / 2), rounds)  # noise std sigma*C/n, sensitivity 2C/n
        assert hospital_level_epsilon(cfg, rounds) == pytest.approx(float(accountant.get_epsilon(1e-4)), rel=1e-6)
        assert hospital_level_epsilon(cfg, rounds) >= analytic_gaussian(2.0 / 2, rounds, 1e-4)


@pytest.mark.parametrize(("kind", "q", "sigma"), list(itertools.product(("pld", "rdp"), (0.01, 0.05, 1.0), (0.7, 1.5))))
def test_epsilon_grows_with_every_step(kind: str, q: float, sigma: float) -> None:
    steps = (1, 2, 10, 100) if q == 1.0 else (1, 2, 10, 100, 1000)  # no sampling: epsilon in the hundreds by 100
    epsilons = [AccountantState(((sigma, q, n),), kind).epsilon(1e-5) for n in steps]
    assert all(a < b for a, b in itertools.pairwise(epsilons))


@pytest.mark.parametrize(("kind", "target", "q", "steps"),
                         list(itertools.product(("pld", "rdp"), (0.5, 1.0, 8.0), (0.001, 0.01, 0.1), (1000,))))
def test_calibrated_sigma_never_lets_the_run_end_above_its_target(kind: str, target: float, q: float,
                                                                  steps: int) -> None:
    sigma = calibrate_noise(target, 1e-5, q, steps, kind=kind)
    end_of_run = AccountantState(((sigma, q, steps // 4),) * 4, kind).epsilon(1e-5)  # four rounds, composed
    assert end_of_run <= target
    assert end_of_run >= 0.99 * target
    assert math.isfinite(sigma) and sigma > 0
