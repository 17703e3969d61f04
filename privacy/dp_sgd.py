"""Opacus DP-SGD wiring for a LoRA model: Poisson sampling, per-sample clipping, Gaussian noise, accounting.

`PrivateTraining` owns one round's private optimisation and hands back the accountant's state, so a hospital
composes its spend across rounds (and restarts) instead of recalibrating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from .accountant import AccountantState

StepHook = Callable[[], None]


@dataclass
class PrivateTraining:
    """The wrapped module, optimizer, loader and criterion of one round of DP-SGD."""

    module: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    criterion: Callable[..., Any]
    engine: PrivacyEngine

    def accountant_state(self) -> AccountantState:
        return AccountantState.of(self.engine.accountant)

    def step_on_empty_batch(self) -> None:
        """Poisson sampling may draw no sample; the step still adds noise and counts, as the analysis assumes."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()

    def close(self) -> None:
        """Detach Opacus from the model so it can be evaluated or trained again in this process."""
        if isinstance(self.module, AbstractGradSampleModule):
            self.module._close()


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    criterion: nn.Module,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: AccountantState,
    grad_sample_mode: str = "hooks",
    poisson_sampling: bool = True,
    after_noise: StepHook | None = None,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD, resuming `accountant`'s history.

    `after_noise` runs after clipping and noising, before the parameter update: data-independent gradient
    terms (FedProx's proximal term) go there so they spend no clipping budget.
    """
    engine = PrivacyEngine(accountant=accountant.kind)
    engine.accountant.history = [(s, q, n) for s, q, n in accountant.history]
    wrapped = engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode, noise_generator=noise_generator,
    )
    if grad_sample_mode == "ghost":
        module, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        module, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    if after_noise is not None:
        account = dp_optimizer.step_hook

        def account_then_hook(opt: DPOptimizer) -> None:
            if account is not None:
                account(opt)
            after_noise()

        dp_optimizer.attach_step_hook(account_then_hook)
    return PrivateTraining(module, dp_optimizer, dp_loader, dp_criterion, engine)
