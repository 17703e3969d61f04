"""DP-SGD on a LoRA model: equivalence with plain training, what changes, FedProx's pull to the global model."""

import pytest
import torch

from fl_core.data import load_splits
from fl_core.model import adapter_state, adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.training import evaluate, train_local
from privacy.accountant import AccountantState
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def _setup(*overrides: str):
    cfg = tiny_config(*overrides)
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model)
    return cfg, splits, tok, build_model(cfg, tok, len(splits.train.label_names), CPU)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_dp_without_noise_or_clipping_matches_plain_training(task: str) -> None:
    """Guards opacus #820 and any wiring error: sigma 0 and an unreachable clip must be plain SGD exactly."""
    overrides = ("train.optimizer=sgd", "train.lr=0.5", "data.max_train_examples=64", "train.batch_size=16",
                 "privacy.max_grad_norm=1e6", f"task={task}")
    cfg, splits, tok, plain = _setup(*overrides)
    _, _, _, private = _setup(*overrides)
    start = adapter_to_arrays(plain)
    train_local(cfg, plain, tok, splits.train, CPU, noise_multiplier=None, accountant=None, rng_seed=7)
    train_local(cfg, private, tok, splits.train, CPU, noise_multiplier=0.0, accountant=AccountantState("rdp"),
                poisson_sampling=False, rng_seed=7)
    moved = 0
    for a0, a, b in zip(start, adapter_to_arrays(plain), adapter_to_arrays(private), strict=True):
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-4)
        moved += int(not torch.allclose(torch.from_numpy(a0), torch.from_numpy(a)))
    assert moved > len(start) // 2  # the adapter did train


def test_only_adapter_and_head_parameters_change() -> None:
    cfg, splits, tok, model = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(cfg, model, tok, splits.train, CPU, noise_multiplier=1.0, accountant=AccountantState("rdp"),
                rng_seed=0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed
    assert all("lora_" in n or "modules_to_save" in n for n in changed), changed
    assert all(p.requires_grad == ("lora_" in n or "modules_to_save" in n) for n, p in model.named_parameters())


def test_adapter_round_trips_through_arrays() -> None:
    _, _, _, model = _setup()
    _, _, _, other = _setup("train.seed=1")
    load_adapter_arrays(other, adapter_to_arrays(model))
    for (k, a), (_, b) in zip(adapter_state(model).items(), adapter_state(other).items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="tensors"):
        load_adapter_arrays(other, adapter_to_arrays(model)[:-1])


def test_large_proximal_mu_keeps_the_adapter_near_the_global_one() -> None:
    def drift(mu: float) -> float:
        cfg, splits, tok, model = _setup("train.optimizer=sgd", "train.lr=0.5", "train.local_epochs=3")
        start = [torch.from_numpy(a) for a in adapter_to_arrays(model)]
        train_local(cfg, model, tok, splits.train, CPU, noise_multiplier=0.5, accountant=AccountantState("rdp"),
                    proximal_mu=mu, rng_seed=3)
        end = [torch.from_numpy(a) for a in adapter_to_arrays(model)]
        return float(sum(((e - s) ** 2).sum() for s, e in zip(start, end, strict=True)) ** 0.5)

    assert drift(1.0) < 0.7 * drift(0.0)


def test_dp_training_learns_a_learnable_task() -> None:
    cfg, splits, tok, model = _setup("data.max_train_examples=512", "train.batch_size=32", "train.local_epochs=4",
                                     "train.lr=0.01")
    before = evaluate(cfg, model, tok, splits.test, CPU)
    result = train_local(cfg, model, tok, splits.train, CPU, noise_multiplier=0.5,
                         accountant=AccountantState("rdp"), rng_seed=0)
    after = evaluate(cfg, model, tok, splits.test, CPU)
    assert after["loss"] < before["loss"]
    assert set(after) == {"loss", "accuracy", "macro_f1"}
    assert result.epsilon > 0 and result.steps == 4 * 16


def test_empty_poisson_batch_still_adds_noise_and_counts() -> None:
    cfg, splits, tok, model = _setup("data.max_train_examples=2", "train.batch_size=1", "train.local_epochs=20")
    start = adapter_to_arrays(model)
    result = train_local(cfg, model, tok, splits.train, CPU, noise_multiplier=1.0,
                         accountant=AccountantState("rdp"), rng_seed=1)
    assert result.steps == 40 and result.accountant is not None and result.accountant.steps == 40
    assert any((a != b).any() for a, b in zip(start, adapter_to_arrays(model), strict=True))


def test_causal_lm_evaluation_reports_perplexity() -> None:
    cfg, splits, tok, model = _setup("task=causal-lm")
    metrics = evaluate(cfg, model, tok, splits.test, CPU)
    assert set(metrics) == {"loss", "perplexity"} and metrics["perplexity"] > 1
