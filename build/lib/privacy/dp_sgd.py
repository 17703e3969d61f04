"""DP-SGD for a LoRA model: Opacus's per-sample clipping, with our Poisson sampler and our noise.

Opacus computes per-sample gradients (hooks, functorch or ghost clipping) and clips them. Two parts are ours:
- **Sampling**: `PoissonBatches` draws every step's batch from `SecureRandom`, and takes exactly the plan's steps
  at exactly the plan's rate. Opacus's loader takes `int(1/(1/k))` steps per epoch, which is k - 1 for some k, so
  plan and loader disagreed for some dataset sizes.
- **Noise**: `SecureNoise` optimizers draw it from `SecureRandom` (ChaCha20, 256-bit key), not from a torch
  generator that keeps 32 bits of its seed. Opacus's `secure_mode` would do this through torchcsprng, which has no
  build for torch 2.
A step whose Poisson batch is empty still adds noise and counts, as the analysis assumes, in every clipping mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators.module_validator import ModuleValidator
from torch import nn

from .secure_random import SecureRandom

StepHook = Callable[[], None]


class PoissonBatches:
    """`steps` batches, each holding every example independently with probability `sample_rate`."""

    def __init__(self, num_examples: int, sample_rate: float, steps: int, rng: SecureRandom) -> None:
        self.num_examples, self.sample_rate, self.steps, self.rng = num_examples, sample_rate, steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.rng.bernoulli_indices(self.num_examples, self.sample_rate).tolist()


class ShuffledBatches:
    """Training without DP: `epochs` passes over a fresh permutation in batches of `batch_size`."""

    def __init__(self, num_examples: int, batch_size: int, epochs: int, rng: SecureRandom) -> None:
        self.num_examples, self.batch_size, self.epochs, self.rng = num_examples, batch_size, epochs, rng

    def __len__(self) -> int:
        return self.epochs * math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.epochs):
            order = np.argsort(self.rng.uniform(self.num_examples)).tolist()
            for start in range(0, self.num_examples, self.batch_size):
                yield order[start:start + self.batch_size]


class SecureNoise:
    """Mixed into Opacus's DP optimizers: Gaussian noise from `SecureRandom`, and a step on an empty batch."""

    noise_multiplier: float
    max_grad_norm: float
    params: list[nn.Parameter]
    step_hook: Callable[[Any], None] | None
    original_optimizer: torch.optim.Optimizer
    expected_batch_size: int

    def __init__(self, *args: Any, secure_random: SecureRandom, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secure_random = secure_random

    def add_noise(self) -> None:
        """One draw for all parameters of a device (a LoRA model has hundreds of small tensors), then split."""
        std = self.noise_multiplier * self.max_grad_norm
        summed: list[torch.Tensor] = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]
        for s in summed:
            _check_processed_flag(s)
        noise: dict[tuple[torch.device, torch.dtype], Iterator[torch.Tensor]] = {}
        if std > 0:
            for key in {(s.device, s.dtype) for s in summed}:
                sizes = [s.numel() for s in summed if (s.device, s.dtype) == key]
                flat = self.secure_random.normal((sum(sizes),), std, dtype=key[1], device=key[0])
                noise[key] = iter(flat.split(sizes))
        for p, s in zip(self.params, summed, strict=True):
            p.grad = (s + next(noise[s.device, s.dtype]).view_as(s)).view_as(p) if std > 0 else s.clone().view_as(p)
            _mark_as_processed(s)

    def step_without_data(self) -> None:
        """Poisson sampling drew no example: the step is noise alone, scaled, hooked and applied like any other."""
        for p in self.params:
            p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
        self.add_noise()
        for p in self.params:  # Opacus's scale_grad for a mean loss, which needs per-sample gradients to count
            assert p.grad is not None
            p.grad /= self.expected_batch_size
        if self.step_hook is not None:
            self.step_hook(self)
        self.original_optimizer.step()


class SecureDPOptimizer(SecureNoise, DPOptimizer):
    """Per-sample gradients clipped by Opacus (hooks, functorch), noise from `SecureRandom`; optionally clipped by
    groups of parameters, each to its own bound (`group_bounds`)."""

    # Clipping by groups: each parameter's group (in `self.params` order) and each group's bound; None: flat.
    clip_group_of: list[int] | None = None
    clip_bounds: tuple[float, ...] = ()

    def clip_and_accumulate(self) -> None:
        """A sample whose gradient is not finite counts as zero, which clipping allows any sample; Opacus's clipping
        would spread its NaN over the whole sum (weights a server chose can overflow on one record alone)."""
        grads = self.grad_samples
        if grads and len(grads[0]):
            device = grads[0].device
            finite = torch.stack([torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(device) for g in grads]).all(0)
            if not bool(finite.all()):
                for p, g in zip(self.params, grads, strict=True):
                    mask = finite.to(g.device).view(-1, *([1] * (g.dim() - 1)))
                    p.grad_sample = torch.where(mask, g, torch.zeros_like(g))  # type: ignore[attr-defined]
        if self.clip_group_of is None or not grads or not len(grads[0]):
            super().clip_and_accumulate()
            return
        self._clip_by_group(self.clip_group_of)

    def _clip_by_group(self, group_of: list[int]) -> None:
        """Each sample's gradient clipped group by group: group g to norm c_g, so the whole stays within
        sqrt(sum of c_g^2) = max_grad_norm, the sensitivity the noise is scaled to (accounting unchanged). A head
        then keeps its share of the budget however large the adapters' gradients are."""
        device = self.grad_samples[0].device
        norms: list[list[torch.Tensor]] = [[] for _ in self.clip_bounds]  # per-parameter norms: no overflow of squares
        for group, p in zip(group_of, self.params, strict=True):
            g = self._get_flat_grad_sample(p)
            norms[group].append(g.reshape(len(g), -1).norm(2, dim=-1).to(device))
        factors = [(bound / (torch.stack(group, dim=1).norm(2, dim=1) + 1e-6)).clamp(max=1.0)
                   for bound, group in zip(self.clip_bounds, norms, strict=True)]
        for group, p in zip(group_of, self.params, strict=True):
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
            g = self._get_flat_grad_sample(p).to(p.dtype)
            clipped = torch.einsum("i,i...", factors[group].to(g.device, p.dtype), g)
            p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]


class SecureGhostClippingOptimizer(SecureNoise, DPOptimizerFastGradientClipping):
    """Ghost clipping's optimizer (gradients already clipped in the double backward), noise from `SecureRandom`."""


OPTIMIZERS: dict[str, type[SecureNoise]] = {"hooks": SecureDPOptimizer, "functorch": SecureDPOptimizer,
                                             "ghost": SecureGhostClippingOptimizer}


@dataclass
class PrivateTraining:
    """The wrapped module, optimizer and criterion of one round of DP-SGD."""

    module: nn.Module
    optimizer: SecureNoise
    criterion: Callable[..., Any]

    def non_finite_samples(self) -> list[int]:
        """Ghost clipping: the positions in the batch whose gradient norm is not finite. Its second backward sums
        the batch at once, so their NaN cannot be zeroed afterwards: the batch is redone without them."""
        norms = getattr(self.module, "_per_sample_gradient_norms", None)
        if not isinstance(norms, torch.Tensor):
            return []
        return [int(i) for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist()]

    def close(self) -> None:
        """Detach Opacus from the model so it can be evaluated or trained again in this process."""
        self.module._close()  # type: ignore[operator]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    grad_sample_mode: str,
    secure_random: SecureRandom,
    after_noise: StepHook | None = None,
    clip_groups: list[tuple[list[nn.Parameter], float]] | None = None,
) -> PrivateTraining:
    """Wrap model and optimizer for DP-SGD (mean loss over the expected batch size).

    Clipping is flat unless `clip_groups` gives (parameters, share of max_grad_norm squared) pairs that cover every
    trainable parameter; shares sum to 1, so the sensitivity stays max_grad_norm. `after_noise` runs after
    clipping and noising, before the parameter update: data-independent gradient terms (FedProx's proximal term) go
    there so they spend no clipping budget.
    """
    ModuleValidator.validate(model, strict=True)  # what PrivacyEngine checks first: train mode, supported layers
    extra = {"max_grad_norm": max_grad_norm} if grad_sample_mode == "ghost" else {}
    module = prepare_module(model, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean",
                            **extra)
    module.forbid_grad_accumulation()
    dp_optimizer = OPTIMIZERS[grad_sample_mode](
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, loss_reduction="mean", secure_random=secure_random)
    if clip_groups is not None:
        if grad_sample_mode == "ghost":
            raise ValueError("make_private: clipping by groups needs per-sample gradients (hooks or functorch)")
        group_of = {id(p): k for k, (params, _) in enumerate(clip_groups) for p in params}
        covered = sum(len(params) for params, _ in clip_groups) == len(dp_optimizer.params) == len(group_of)
        if not covered or set(group_of) != {id(p) for p in dp_optimizer.params} \
                or not math.isclose(sum(share for _, share in clip_groups), 1.0):
            raise ValueError("make_private: clip groups must cover every trained parameter once, shares summing to 1")
        dp_optimizer.clip_group_of = [group_of[id(p)] for p in dp_optimizer.params]  # type: ignore[attr-defined]
        dp_optimizer.clip_bounds = tuple(max_grad_norm * math.sqrt(share)  # type: ignore[attr-defined]
                                         for _, share in clip_groups)
    if after_noise is not None:
        dp_optimizer.attach_step_hook(lambda _: after_noise())  # type: ignore[attr-defined]
    dp_criterion = (DPLossFastGradientClipping(module, dp_optimizer, criterion, "mean")
                    if grad_sample_mode == "ghost" else criterion)
    return PrivateTraining(module, dp_optimizer, dp_criterion)
