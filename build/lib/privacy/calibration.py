"""Noise calibration: sigma from a target epsilon over all planned steps, computed once before training.

Calibrating per round (calling `make_private_with_epsilon` each round) spends the whole target every round;
we calibrate once for the total number of local steps across every planned round, and for whatever else the plan
releases (noised federated evaluation), so that the whole plan ends within the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .accountant import AccountantState, Step

CALIBRATION_REL_TOLERANCE = 0.005
MAX_NOISE_MULTIPLIER = 1e4


class UnreachableTarget(ValueError):
    """No noise multiplier up to MAX_NOISE_MULTIPLIER keeps the plan within the target epsilon."""


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling of a round: rate 1/ceil(n/B), ceil(n/B) steps per local epoch, every one taken."""

    num_examples: int
    sample_rate: float
    steps_per_round: int
    total_steps: int


def sampling_plan(num_examples: int, batch_size: int, local_epochs: int, num_rounds: int) -> SamplingPlan:
    if num_examples < 1 or batch_size < 1 or local_epochs < 1 or num_rounds < 1:
        raise ValueError("sampling_plan: num_examples, batch_size, local_epochs and num_rounds must be >= 1")
    batches = math.ceil(num_examples / batch_size)
    steps_per_round = local_epochs * batches
    return SamplingPlan(num_examples, 1.0 / batches, steps_per_round, steps_per_round * num_rounds)


def epsilon_for(noise_multiplier: float, delta: float, sample_rate: float, steps: int, kind: str = "pld") -> float:
    """Replace-one epsilon that `steps` Poisson-subsampled Gaussian steps at `noise_multiplier` spend."""
    return AccountantState(((noise_multiplier, sample_rate, steps),), kind).epsilon(delta)


NOTHING_ELSE: tuple[Step, ...] = ()


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    also: AccountantState | None = None, kind: str = "pld") -> float:
    """Smallest sigma (to within 0.5% of the target epsilon) whose epsilon, composed with the releases `also`,
    never exceeds the target, by accountant `kind`."""
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError("calibrate_noise: need epsilon > 0, 0 < delta < 1, 0 < sample_rate <= 1, steps >= 1")
    also = AccountantState(also.history if also is not None else NOTHING_ELSE, kind)

    def epsilon(sigma: float) -> float:
        return also.then(sigma, sample_rate, steps).epsilon(delta)

    # A bracket [low, high] with epsilon(low) > target >= epsilon(high), narrowed by the Illinois variant of regula
    # falsi on log epsilon against log sigma (nearly linear), so a calibration takes a handful of evaluations.
    low, high = 0.5, 1.0
    eps_low, eps_high = epsilon(low), epsilon(high)
    while eps_high > target_epsilon:
        low, eps_low, high = high, eps_high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise UnreachableTarget(
                f"epsilon {target_epsilon:g} at delta {delta:g} is out of reach: even sigma {MAX_NOISE_MULTIPLIER:g} "
                f"over {steps} steps at sampling rate {sample_rate:.4g} spends {epsilon(MAX_NOISE_MULTIPLIER):.4g}"
                + (f" with the plan's other releases ({also.epsilon(delta):.4g} alone)" if also.history else ""))
        eps_high = epsilon(high)
    while eps_low <= target_epsilon:
        high, eps_high, low = low, eps_low, low / 2
        eps_low = epsilon(low)
    f_low, f_high = math.log(eps_low / target_epsilon), _log_ratio(eps_high, target_epsilon)
    side = 0
    while eps_high < target_epsilon * (1 - CALIBRATION_REL_TOLERANCE) and high - low > 1e-9 * high:
        x_low, x_high = math.log(low), math.log(high)
        x = x_high - f_high * (x_high - x_low) / (f_high - f_low) if math.isfinite(f_high) else (x_low + x_high) / 2
        if not x_low < x < x_high:
            x = (x_low + x_high) / 2
        sigma = math.exp(x)
        eps = epsilon(sigma)
        if eps > target_epsilon:
            low, eps_low, f_low = sigma, eps, math.log(eps / target_epsilon)
            f_high, side = (f_high / 2, -1) if side == -1 else (f_high, -1)
        else:
            high, eps_high, f_high = sigma, eps, _log_ratio(eps, target_epsilon)
            f_low, side = (f_low / 2, 1) if side == 1 else (f_low, 1)
    return high


def _log_ratio(epsilon: float, target: float) -> float:
    return math.log(epsilon / target) if epsilon > 0 else -math.inf
