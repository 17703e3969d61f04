"""Per-sequence losses: each sample's loss depends on that sample alone.

A token-mean over a padded batch divides by the batch's total token count, coupling every sample's gradient to
the others' lengths, which breaks per-sample clipping's sensitivity bound. These losses average tokens within a
sequence, then sequences. Both honour `reduction` ("none" gives one loss per sample) as Opacus's ghost
clipping criterion wrapper requires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class SequenceClassificationLoss(nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
        return per_sample if self.reduction == "none" else _reduce(per_sample, self.reduction)


class TokenLoss(nn.Module):
    """Loss of logits already aligned with their targets ([batch, k, vocab] and [batch, k]): mean over each
    sequence's own targets, then over sequences."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="none").view(targets.shape)  # flat: no transposed copy of the logits
        mask = (targets != IGNORE_INDEX).to(token_loss.dtype)
        per_sample = (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_sample if self.reduction == "none" else _reduce(per_sample, self.reduction)


class PerSequenceLMLoss(TokenLoss):
    """Next-token loss over a whole sequence's logits: position t predicts token t + 1."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits[:, :-1, :], labels[:, 1:])


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction: unknown {reduction!r}")
