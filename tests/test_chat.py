"""The chat task on a Llama: targets on the answer alone, the cached frozen prefix computing the whole model's loss
and gradients at the answer positions only, and greedy answers scored by exact match."""

import collections
from pathlib import Path

import pytest
import torch

from fl_core.chat import ChatDataset, answer_of, generate_answers, prompt_ids
from fl_core.config import ConfigError
from fl_core.data import DataError, icd10_examples, load_splits
from fl_core.decoder import PrefixedLlama
from fl_core.device import computes_bf16_natively
from fl_core.model import build_model, load_tokenizer, packaged_smollm2_tokenizer
from fl_core.training import (
    Collator,
    FrozenPrefixes,
    _aligned_scores,
    evaluate,
    make_criterion,
    pad_id_of,
    tokenized,
    train_local,
    training_view,
)
from privacy.accountant import AccountantState
from privacy.calibration import sampling_plan
from privacy.loss import IGNORE_INDEX, TokenLoss
from privacy.secure_random import SecureRandom
from tests.conftest import gradient_alone, per_sample_gradients, randomise_trainable, tiny_config

CPU = torch.device("cpu")


def _chat(*overrides: str):  # type: ignore[no-untyped-def]
    cfg = tiny_config("task=chat", "model.num_layers=3", *overrides)
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model)
    return cfg, splits, tok, build_model(cfg, tok, len(splits.train.label_names), CPU)


def test_targets_are_the_answer_tokens_alone() -> None:
    cfg, splits, tok, _ = _chat()
    data = ChatDataset(splits.train, tok, cfg.train.max_seq_len, cfg.task.answer)
    for i in range(20):
        ids, labels = data[i]
        prompt = data.prompt_lengths[i]
        assert (labels[:prompt] == IGNORE_INDEX).all() and torch.equal(labels[prompt:], ids[prompt:])
        answer = tok.decode(ids[prompt:], skip_special_tokens=True).strip()
        assert answer == answer_of(splits.train.label_names[splits.train.labels[i]], "title").lower()  # uncased
        assert int(ids[-1]) == tok.sep_token_id  # the end the answer stops at is a target too
    assert answer_of("Neoplasms (C00-D49)", "title") == "Neoplasms"
    assert answer_of("Cardiology", "title") == "Cardiology"


def test_a_code_range_answer_is_the_chapters_range() -> None:
    cfg, splits, tok, _ = _chat("task.answer=code_range")
    data = tokenized(cfg, splits.train, tok)
    assert isinstance(data, ChatDataset)
    for i in range(20):
        ids, labels = data[i]
        answer = tok.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True).replace(" ", "")
        name = splits.train.label_names[splits.train.labels[i]]
        assert name.endswith(f"({answer.upper()})")
    assert answer_of("Neoplasms (C00-D49)", "code_range") == "C00-D49"
    with pytest.raises(DataError, match=r"task\.answer"):
        answer_of("Cardiology", "code_range")


def test_smollm2s_first_answer_token_names_the_chapter() -> None:
    """Why demo-llm answers code ranges (README "A chat model"): with SmolLM2's tokenizer a range's first token is
    its chapter's alone (the second, for the two H chapters), where ten titles share their first four."""
    tok = packaged_smollm2_tokenizer()
    names = icd10_examples().label_names
    ranges = [tok(answer_of(n, "code_range"), add_special_tokens=False)["input_ids"] for n in names]
    assert len(names) == 22 and all(6 <= len(ids) <= 7 for ids in ranges)
    assert len({tuple(ids[:1]) for ids in ranges}) == 21 and len({tuple(ids[:2]) for ids in ranges}) == 22
    titles = [tok(answer_of(n, "title"), add_special_tokens=False)["input_ids"] for n in names]
    assert max(collections.Counter(tuple(ids[:4]) for ids in titles).values()) == 10
    assert (min(map(len, titles)), max(map(len, titles))) == (3, 17)


@pytest.mark.parametrize(("overrides", "message"), [
    (("task.answer=chapter",), r"task\.answer"),
    (("task.answer=code_range", "data=drugreview"), r"task\.answer: 'code_range' needs ICD-10-CM labels"),
])
def test_an_answer_that_cannot_be_given_is_refused_at_start(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config("task=chat", *overrides)


def test_a_long_diagnosis_is_cut_and_its_answer_never_is() -> None:
    _, splits, tok, _ = _chat("train.max_seq_len=4")
    long = splits.train.subset([0])
    long = type(long)(("word " * 50,), long.labels, long.label_names)
    ids, labels = ChatDataset(long, tok, 4, "title")[0]
    answer = answer_of(long.label_names[long.labels[0]], "title")
    assert len(ids) == len(prompt_ids(tok, "word word word word")) + (labels != IGNORE_INDEX).sum()
    assert tok.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True).strip() == answer.lower()


MLP_TOO = "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
NO_DP = {"fp32": (), "bf16": ("privacy.enabled=false",)}  # bf16 is refused for DP runs: its tests measure why


@pytest.mark.parametrize(("task", "targets"), [("chat", ()), ("causal-lm", ()), ("chat", (MLP_TOO,))])
def test_cached_prefix_gives_the_full_models_loss_and_gradients(task: str, targets: tuple[str, ...]) -> None:
    """Adapters on the top layer: the two lower layers read from the cache, its feed-forward block runs on the
    batch's real tokens only, and the output layer at the target positions only; loss and every adapter gradient
    must equal transformers' own forward over the whole text, with adapters in the packed block too."""
    cfg, splits, tok, model = _chat(f"task={task}", "lora.layers=1", *targets)
    base = model.get_base_model()
    assert isinstance(base, PrefixedLlama) and base.frozen_layers == 2
    randomise_trainable(model)
    view = training_view(cfg, model, tok, splits.train, CPU)
    assert isinstance(view.dataset, FrozenPrefixes)
    examples = tokenized(cfg, splits.train, tok)
    rows = list(range(12))
    results = []
    for path in ("full", "cached"):
        model.zero_grad(set_to_none=True)
        if path == "full":  # causal LM: the targets are the ids themselves; chat: the answer's
            batch = Collator(pad_id_of(tok), causal_lm=task == "causal-lm")([examples[i] for i in rows])
            loss = make_criterion(cfg)(model(input_ids=batch[0], attention_mask=batch[1]).logits, batch[2])
        else:
            loss = view.criterion(*view.forward(model, view.collate([view.dataset[i] for i in rows]), CPU))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (full_loss, full_grads), (cached_loss, cached_grads) = results
    assert torch.allclose(full_loss, cached_loss, atol=1e-5)
    assert full_grads.keys() == cached_grads.keys() and len(full_grads) == 8 + 6 * bool(targets)  # A and B
    assert all(".layers.2." in name for name in full_grads)
    for name, grad in full_grads.items():
        assert torch.allclose(grad, cached_grads[name], atol=1e-5), name


def test_a_trainable_weight_below_the_top_layers_is_refused() -> None:
    _, _, _, model = _chat("lora.layers=1")
    base = model.get_base_model()
    base.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="below the top layers are trainable"):
        base.settle_prefix()


def test_a_trainable_weight_in_a_packed_feed_forward_block_is_refused() -> None:
    """The adapted layers' feed-forward blocks run on packed tokens, where only LoRA's A and B see one row per
    example: any other trainable weight there would get per-token gradients, and clipping would bound the wrong
    thing."""
    _, _, _, model = _chat("lora.layers=1", MLP_TOO)
    base = model.get_base_model()
    base.model.layers[2].mlp.down_proj.base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj\.base_layer\.weight trains in a block "
                                         "that runs on packed tokens"):
        base.settle_prefix()


def test_bf16_runs_the_frozen_weights_in_bf16_and_trains_in_fp32() -> None:
    """`train.precision=bf16`: the frozen weights and cached prefixes in bfloat16, what trains (and so Opacus's
    per-sample gradients, clipping and noise) in fp32; the cached path is still the whole model's at bf16's
    precision, and DP training still lowers the answer loss."""
    cfg, splits, tok, model = _chat("lora.layers=2", "train.lr=0.05", "data.max_test_examples=32",
                                    "train.local_epochs=4", "train.precision=bf16", "privacy.enabled=false", MLP_TOO)
    dtypes = {(p.dtype, p.requires_grad) for p in model.parameters()}
    assert dtypes == {(torch.bfloat16, False), (torch.float32, True)}
    test_view = training_view(cfg, model, tok, splits.test, CPU)
    assert all(states.dtype == torch.bfloat16 for states, _ in test_view.dataset)  # type: ignore[attr-defined]
    before = evaluate(cfg, model, tok, splits.test, CPU, test_view)
    assert evaluate(cfg, model, tok, splits.test, CPU)["loss"] == pytest.approx(before["loss"], rel=2e-2)
    plan = sampling_plan(len(splits.train), cfg.train.batch_size, cfg.train.local_epochs, 1)
    result = train_local(cfg, model, tok, splits.train, CPU, plan=plan, noise_multiplier=0.5,
                         accountant=AccountantState(), rng=SecureRandom(bytes(32)))
    after = evaluate(cfg, model, tok, splits.test, CPU, test_view)
    assert result.steps == plan.steps_per_round and after["loss"] < before["loss"] - 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 1e-2)])
def test_per_sample_gradients_on_the_packed_path_are_each_examples_own(precision: str, tolerance: float) -> None:
    """The adapted layers' feed-forward blocks run on the batch's real tokens only; Opacus's hooks must still see one
    row per example: each per-sample gradient equals that example's gradient computed alone (in bf16, up to its
    rounding, which depends on the batch's shape: the relative error stays within `tolerance`)."""
    cfg, splits, tok, model = _chat("lora.layers=1", MLP_TOO, f"train.precision={precision}", *NO_DP[precision])
    randomise_trainable(model)
    view = training_view(cfg, model, tok, splits.train, CPU)
    rows = sorted(range(len(view.dataset)), key=lambda i: len(view.dataset[i][0]))[::24]  # type: ignore[arg-type]
    assert len({len(view.dataset[i][0]) for i in rows}) >= 4  # a batch with padding, rows of many widths
    criterion = TokenLoss(reduction="sum")
    per_sample = per_sample_gradients(model, view, rows, criterion)
    assert len(per_sample) == 14 and all(g.shape[0] == len(rows) and g.dtype == torch.float32
                                         for g in per_sample.values())
    for k, i in enumerate(rows):
        alone = gradient_alone(model, view, i, criterion)
        assert alone.keys() == per_sample.keys()
        for name, grad in alone.items():
            assert float((per_sample[name][k] - grad).norm()) <= tolerance * float(grad.norm()), (name, k)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 1e-2)])
def test_replacing_one_example_barely_moves_the_others_per_sample_gradients(precision: str, tolerance: float) -> None:
    """DP-SGD's replace-one sensitivity assumes the other examples' gradients do not move when one record is
    replaced. On the packed path the batch's shape (its padding, its packed token count) changes with that record:
    in fp32 the others move at rounding level only; in bf16 by up to about 3e-3 of their norm (README, "What this
    does not protect"), why bf16 is opt-in."""
    cfg, splits, tok, model = _chat("lora.layers=1", MLP_TOO, f"train.precision={precision}", *NO_DP[precision])
    randomise_trainable(model)
    view = training_view(cfg, model, tok, splits.train, CPU)
    by_length = sorted(range(len(view.dataset)), key=lambda i: len(view.dataset[i][0]))  # type: ignore[arg-type]
    kept = by_length[10:190:12]
    for replacement in (by_length[0], by_length[-1]):  # the shortest and the longest text: the batch's shape moves
        grads = []
        for rows in ([*kept, by_length[100]], [*kept, replacement]):
            per_sample = per_sample_gradients(model, view, rows, TokenLoss(reduction="sum"))
            grads.append(torch.cat([g[: len(kept)].flatten(1) for g in per_sample.values()], dim=1))
        moved = (grads[0] - grads[1]).norm(dim=1) / grads[0].norm(dim=1)
        assert float(moved.max()) <= tolerance


def test_bf16_pays_only_where_the_hardware_computes_it(tmp_path: Path) -> None:
    """A CPU's bfloat16 arithmetic is in its flags; without them (or without /proc) bf16 is emulated."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert computes_bf16_natively(CPU, cpuinfo)
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_vnni\n")
    assert not computes_bf16_natively(CPU, cpuinfo)
    assert not computes_bf16_natively(CPU, tmp_path / "missing")


@pytest.mark.parametrize(("overrides", "message"), [
    (("train.precision=bf16", "privacy.enabled=false"), "bf16 is for a causal LM"),
    (("task=chat", "train.precision=bf16"), "bf16 is for runs without DP"),
    (("task=chat", "train.precision=bf16", "privacy.enabled=false", "strategy.federated_evaluation=true"),
     "bf16 is for runs without DP"),
])
def test_bf16_is_refused_for_a_classifier_and_for_dp(overrides: tuple[str, ...], message: str) -> None:
    """bf16's rounding depends on the batch's shape, so one record moves the others' gradients and scores: the
    measured tests above say by how much, and a DP run, whose accountant assumes they do not move, refuses it."""
    with pytest.raises(ConfigError, match=rf"^train\.precision: {message}"):
        tiny_config(*overrides)


def test_dp_training_lowers_the_answer_loss_and_the_cached_scores_are_the_whole_models() -> None:
    cfg, splits, tok, model = _chat("lora.layers=2", "train.lr=0.05", "data.max_test_examples=32",
                                    "train.local_epochs=4")
    test_view = training_view(cfg, model, tok, splits.test, CPU)  # how the server scores every round
    before = evaluate(cfg, model, tok, splits.test, CPU, test_view)
    plan = sampling_plan(len(splits.train), cfg.train.batch_size, cfg.train.local_epochs, 1)
    result = train_local(cfg, model, tok, splits.train, CPU, plan=plan, noise_multiplier=0.5,
                         accountant=AccountantState(), rng=SecureRandom(bytes(32)))
    after = evaluate(cfg, model, tok, splits.test, CPU, test_view)
    assert result.steps == plan.steps_per_round and 0 < result.epsilon < float("inf")
    assert set(after) == {"loss", "perplexity", "exact_match"} and after["loss"] < before["loss"] - 0.1
    assert evaluate(cfg, model, tok, splits.test, CPU) == pytest.approx(after, rel=1e-5)


def test_greedy_exact_match_is_every_target_being_the_teacher_forced_argmax() -> None:
    """Greedy decoding reproduces an answer iff each answer token is the argmax given the true tokens before it;
    the first generated token is, on the same context, the argmax at the answer's first position."""
    logits = torch.full((3, 2, 5), -1.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 1.0  # both right
    logits[1, 0, 1] = logits[1, 1, 3] = 1.0  # the second wrong
    logits[2, 0, 4] = 1.0  # one target only, wrong; its padding is not scored
    targets = torch.tensor([[1, 2], [1, 2], [1, IGNORE_INDEX]])
    assert _aligned_scores(logits, targets)[2].tolist() == [True, False, False]
    cfg, splits, tok, model = _chat("lora.layers=1", "data.max_test_examples=16")
    with torch.no_grad():
        model.get_base_model().lm_head.weight.mul_(25)  # a peaked output, so the argmax is not a near tie
    view = training_view(cfg, model, tok, splits.test, CPU)
    logits, _ = view.forward(model, view.collate([view.dataset[i] for i in range(16)]), CPU)
    first = generate_answers(model, tok, list(splits.test.texts), CPU, max_new_tokens=1,
                             max_text_tokens=cfg.train.max_seq_len)
    assert first == [tok.decode(int(token), skip_special_tokens=True).strip() for token in logits[:, 0].argmax(-1)]


def test_an_encoder_cannot_take_the_chat_task() -> None:
    with pytest.raises(ConfigError, match=r"task\.name"):
        tiny_config("model=minilm", "task=chat")


def test_ffa_lora_trains_b_alone_and_every_node_starts_from_the_same_a() -> None:
    """FFA-LoRA: with A frozen at its seeded initialisation, the hospitals' updates are linear in B, so the
    server's average of B is the average of their updates; A never moves and is the same on every node."""
    cfg, splits, tok, model = _chat("lora.layers=1", "lora.freeze_a=true", "data.max_train_examples=64")
    _, _, _, other_node = _chat("lora.layers=1", "lora.freeze_a=true", "data.max_train_examples=64")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert all(torch.equal(p, dict(other_node.named_parameters())[n]) for n, p in a_before.items())
    plan = sampling_plan(len(splits.train), cfg.train.batch_size, 1, 1)
    train_local(cfg, model, tok, splits.train, CPU, plan=plan, noise_multiplier=1.0, accountant=AccountantState(),
                rng=SecureRandom(bytes(32)))
    after = dict(model.named_parameters())
    assert all(torch.equal(a, after[n]) for n, a in a_before.items())
    assert any(float(after[n].abs().max()) > 0 for n in trainable)  # B moved from zero
