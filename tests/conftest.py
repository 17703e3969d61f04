"""Shared fixtures: the tiny random-initialised Llama and small real ICD-10-CM slices."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

import pytest
import torch

from fl_core.config import AppConfig, compose_config, to_app_config
from fl_core.entry import quiet_libraries

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # any Ray a test starts listens on loopback only
# Simulated hospitals keep their ledgers here; never in the user's own node home.
os.environ["FEDERATED_DP_LLM_NODE_HOME"] = tempfile.mkdtemp(prefix="fdpl-nodes-")
quiet_libraries()
torch.set_num_threads(1)


def tiny_config(*overrides: str) -> AppConfig:
    base = ["model=tiny", "data.max_train_examples=256", "data.max_test_examples=64", "train.batch_size=16",
            "train.device=cpu"]
    return to_app_config(compose_config([*base, *overrides]))


@pytest.fixture
def tiny_cfg() -> AppConfig:
    return tiny_config()


def randomise_trainable(model: torch.nn.Module) -> None:
    """LoRA's B and a head start at zero, where a wrong path could still give the right loss or hide A's gradients."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def per_sample_gradients(model: torch.nn.Module, view: object, rows: Sequence[int],
                         criterion: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    """Opacus's per-sample gradients of the trainable parameters over one batch of `view`'s `rows` (a
    `fl_core.training.TrainingView`; `criterion` sums over examples), as DP-SGD's hooks compute them."""
    from opacus import GradSampleModule

    sampled = GradSampleModule(model, loss_reduction="sum")
    criterion(*view.forward(sampled, view.collate([view.dataset[i] for i in rows]),  # type: ignore[attr-defined]
                            torch.device("cpu"))).backward()
    grads = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    sampled._close()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None  # type: ignore[attr-defined]
    return grads


def gradient_alone(model: torch.nn.Module, view: object, row: int,
                   criterion: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients of one example of `view` run alone, in a batch of its own."""
    model.zero_grad(set_to_none=True)
    criterion(*view.forward(model, view.collate([view.dataset[row]]), torch.device("cpu"))).backward()  # type: ignore[attr-defined]
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
