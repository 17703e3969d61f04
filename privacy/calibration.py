"""Noise calibration: sigma from a target epsilon over all planned steps, computed once before training.

Calibrating per round (calling `make_private_with_epsilon` each round) spends the whole target every round;
we calibrate once for the total number of local steps across every planned round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier

from .accountant import new_accountant

CALIBRATION_REL_TOLERANCE = 0.005


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling as Opacus runs it: rate 1/ceil(n/B), ceil(n/B) steps per local epoch."""

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


def epsilon_for(noise_multiplier: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """epsilon that `steps` Poisson-subsampled Gaussian steps at `noise_multiplier` spend."""
    if noise_multiplier <= 0:
        return math.inf
    acc = new_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest sigma (to within 0.5% of the target epsilon) whose epsilon never exceeds the target."""
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError("calibrate_noise: need epsilon > 0, 0 < delta < 1, 0 < sample_rate <= 1, steps >= 1")
    return float(get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
        accountant=accountant, epsilon_tolerance=CALIBRATION_REL_TOLERANCE * target_epsilon,
    ))
