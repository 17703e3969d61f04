"""DP-SGD on a LoRA model: equivalence with plain training, what changes, FedProx's pull to the global model,
empty batches in every clipping mode, and plan and sampler agreeing for every dataset size."""

import pytest
import torch
from torch.utils.data import TensorDataset, default_collate

from fl_core.data import load_splits
from fl_core.model import adapter_state, adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.training import evaluate, train_epochs, train_local
from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan, sampling_plan
from privacy.dp_sgd import PoissonBatches
from privacy.secure_random import SecureRandom
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def _setup(*overrides: str):
    cfg = tiny_config(*overrides)
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model)
    return cfg, splits, tok, build_model(cfg, tok, len(splits.train.label_names), CPU)


def _plan(cfg, splits) -> SamplingPlan:  # type: ignore[no-untyped-def]
    return sampling_plan(len(splits.train), cfg.train.batch_size, cfg.train.local_epochs, cfg.federation.num_rounds)


def _rng(seed: int) -> SecureRandom:
    return SecureRandom(bytes([seed]) * 32)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_dp_without_noise_or_clipping_matches_plain_training(task: str) -> None:
    """Guards opacus #820 and any wiring error: sigma 0 and an unreachable clip must be plain SGD exactly.

    With the batch as large as the dataset, Poisson sampling takes every example each step (rate 1), so both runs
    see the same full batches, and the DP mean over the expected batch size is the plain mean."""
    overrides = ("train.optimizer=sgd", "train.lr=0.5", "data.max_train_examples=32", "train.batch_size=32",
                 "train.local_epochs=4", "privacy.max_grad_norm=1e6", f"task={task}")
    cfg, splits, tok, plain = _setup(*overrides)
    _, _, _, private = _setup(*overrides)
    plan = _plan(cfg, splits)
    assert plan.sample_rate == 1.0 and plan.steps_per_round == 4
    start = adapter_to_arrays(plain)
    train_local(cfg, plain, tok, splits.train, CPU, plan=plan, noise_multiplier=None, accountant=None)
    train_local(cfg, private, tok, splits.train, CPU, plan=plan, noise_multiplier=0.0, accountant=AccountantState())
    moved = 0
    for a0, a, b in zip(start, adapter_to_arrays(plain), adapter_to_arrays(private), strict=True):
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-4)
        moved += int(not torch.allclose(torch.from_numpy(a0), torch.from_numpy(a)))
    assert moved > len(start) // 2  # the adapter did train


def test_only_adapter_and_head_parameters_change() -> None:
    cfg, splits, tok, model = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(cfg, model, tok, splits.train, CPU, plan=_plan(cfg, splits), noise_multiplier=1.0,
                accountant=AccountantState(), rng=_rng(0))
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
        train_local(cfg, model, tok, splits.train, CPU, plan=_plan(cfg, splits), noise_multiplier=0.5,
                    accountant=AccountantState(), proximal_mu=mu, rng=_rng(3))
        end = [torch.from_numpy(a) for a in adapter_to_arrays(model)]
        return float(sum(((e - s) ** 2).sum() for s, e in zip(start, end, strict=True)) ** 0.5)

    assert drift(1.0) < 0.7 * drift(0.0)


def test_dp_training_learns_a_learnable_task() -> None:
    cfg, splits, tok, model = _setup("data.max_train_examples=512", "train.batch_size=32", "train.local_epochs=4",
                                     "train.lr=0.01")
    before = evaluate(cfg, model, tok, splits.test, CPU)
    result = train_local(cfg, model, tok, splits.train, CPU, plan=_plan(cfg, splits), noise_multiplier=0.5,
                         accountant=AccountantState(), rng=_rng(0))
    after = evaluate(cfg, model, tok, splits.test, CPU)
    assert after["loss"] < before["loss"]
    assert set(after) == {"loss", "accuracy", "macro_f1"}
    assert result.epsilon > 0 and result.steps == 4 * 16


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_empty_poisson_batches_still_add_noise_and_count_in_every_clipping_mode(mode: str) -> None:
    cfg, splits, tok, model = _setup(f"privacy.grad_sample_mode={mode}")
    start = adapter_to_arrays(model)
    nobody = SamplingPlan(num_examples=len(splits.train), sample_rate=1e-12, steps_per_round=5, total_steps=5)
    result = train_local(cfg, model, tok, splits.train, CPU, plan=nobody, noise_multiplier=1.0,
                         accountant=AccountantState())
    assert result.steps == 5 and result.accountant is not None
    assert result.accountant.history == ((1.0, 1e-12, 5),)
    assert all((a != b).any() for a, b in zip(start, adapter_to_arrays(model), strict=True))  # noise alone moved it


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_sample_whose_gradient_overflows_counts_as_zero_instead_of_poisoning_the_sum(mode: str) -> None:
    """Weights a server chose can overflow on one record alone; a NaN in the sum would tell it that record is there.
    Such a sample must contribute what a sample with zero gradient does, in hooks and ghost clipping alike."""
    cfg = tiny_config(f"privacy.grad_sample_mode={mode}", "train.optimizer=sgd", "train.lr=0.5",
                      "privacy.max_grad_norm=1e6")
    good = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0], [-0.7, 0.4, 2.0], [1.5, 1.5, -0.5]])
    plan = SamplingPlan(num_examples=5, sample_rate=1.0, steps_per_round=3, total_steps=3)

    def trained(last_row: list[float]) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
        data = TensorDataset(torch.cat([good, torch.tensor([last_row])]), torch.tensor([0, 1, 0, 1, 1]))
        train_epochs(cfg, model, data, default_collate, lambda m, batch, device: (m(batch[0]), batch[1]), CPU,
                     plan=plan, noise_multiplier=0.0, accountant=AccountantState(), proximal_mu=0.0)
        return model[0].weight.detach().clone()

    poisoned, zero = trained([float("inf"), 1.0, 1.0]), trained([0.0, 0.0, 0.0])  # x = 0: no weight gradient
    assert torch.isfinite(poisoned).all()
    assert torch.allclose(poisoned, zero, atol=1e-6)


def test_the_sampler_takes_exactly_the_planned_steps_at_the_planned_rate_for_every_size() -> None:
    """Opacus's loader takes int(1/(1/k)) steps per epoch, k - 1 for some k (N 5889-5952 at batch 64)."""
    head = torch.nn.Linear(4, 3)
    cfg = tiny_config("train.batch_size=64", "train.local_epochs=2", "train.optimizer=sgd")
    for n in [*range(1, 200, 3), *range(5889, 5953, 16), 10_007]:
        plan = sampling_plan(n, 64, 2, 3)
        data = TensorDataset(torch.randn(n, 4), torch.randint(0, 3, (n,)))
        result = train_epochs(cfg, head, data, default_collate, lambda m, b, d: (m(b[0]), b[1]), CPU, plan=plan,
                              noise_multiplier=1.0, accountant=AccountantState(), proximal_mu=0.0)
        assert result.steps == plan.steps_per_round, n
        assert result.accountant is not None and result.accountant.history == ((1.0, plan.sample_rate,
                                                                                plan.steps_per_round),)
    # and each batch holds every example with probability sample_rate: the mean batch size is N * q
    plan = sampling_plan(5900, 64, 1, 1)
    sizes = [len(b) for b in PoissonBatches(5900, plan.sample_rate, 400, SecureRandom())]
    assert abs(sum(sizes) / len(sizes) - 5900 * plan.sample_rate) < 4 * (5900 * plan.sample_rate) ** 0.5 / 20


def test_causal_lm_evaluation_reports_perplexity() -> None:
    cfg, splits, tok, model = _setup("task=causal-lm")
    metrics = evaluate(cfg, model, tok, splits.test, CPU)
    assert set(metrics) == {"loss", "perplexity"} and metrics["perplexity"] > 1
