"""A hospital's federated evaluation as a DP release: the Gaussian mechanism, charged to its ledger like a round.

What is released is one vector over the held-out records: the number classified correctly (classification only)
and the sum of their losses, each loss clipped to [0, loss_bound] and divided by it. Each record adds a value in
[0, 1] to each coordinate, so replacing it by any other moves each coordinate by at most 1: the L2 sensitivity is
sqrt(2) for classification and 1 for a causal LM's loss alone. Gaussian noise of standard deviation `noise` goes on
each coordinate. The accountant's replace-one step is a sum of contributions of norm at most 1, which a replacement
moves by 2 (`accountant.py`), so its noise multiplier is 2 * noise / sensitivity. Accuracy, mean loss and
perplexity are post-processing of the noised vector with the public held-out size N_test; per-class scores such as
macro-F1 are not released (at a hospital's test size their noise would swamp them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the model, not with the plan that only needs the noise multiplier
    import torch

    from .secure_random import SecureRandom


def evaluation_noise_multiplier(noise: float, classification: bool) -> float:
    """The accountant's noise multiplier of one evaluation release (its replace-one sensitivity is 2)."""
    return 2.0 * noise / (math.sqrt(2.0) if classification else 1.0)


def _bounded(losses: torch.Tensor, loss_bound: float) -> torch.Tensor:
    """Each loss in [0, loss_bound], a NaN or infinite one included: weights a server chose could overflow on one
    record only, and a NaN through the sum would tell it that such a record is there."""
    import torch

    return torch.nan_to_num(losses, nan=loss_bound, posinf=loss_bound, neginf=0.0).clamp(0.0, loss_bound)


def _noised(values: list[float], noise: float, rng: SecureRandom) -> list[float]:
    import torch

    released = torch.tensor(values, dtype=torch.float64) + rng.normal((len(values),), noise, dtype=torch.float64)
    return [float(v) for v in released.tolist()]


def noisy_classification_scores(logits: torch.Tensor, labels: torch.Tensor, *, noise: float, loss_bound: float,
                                rng: SecureRandom) -> dict[str, float]:
    """Accuracy and mean loss of the held-out records from one noised release of (correct, clipped loss sum)."""
    from torch.nn.functional import cross_entropy

    n = len(labels)
    correct = float((logits.argmax(dim=-1) == labels).sum())
    losses = _bounded(cross_entropy(logits.float(), labels, reduction="none"), loss_bound)
    noisy_correct, noisy_loss = _noised([correct, float(losses.sum()) / loss_bound], noise, rng)
    return {"accuracy": min(max(noisy_correct / n, 0.0), 1.0), "loss": max(noisy_loss * loss_bound / n, 0.0)}


def noisy_language_model_scores(sequence_losses: torch.Tensor, *, noise: float, loss_bound: float,
                                rng: SecureRandom) -> dict[str, float]:
    """Mean per-sequence loss and its perplexity from one noised release of the clipped loss sum."""
    clipped = _bounded(sequence_losses.float(), loss_bound)
    (noisy_loss,) = _noised([float(clipped.sum()) / loss_bound], noise, rng)
    loss = max(noisy_loss * loss_bound / len(sequence_losses), 0.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
