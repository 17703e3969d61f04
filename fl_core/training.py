"""One hospital's local work: DP-SGD training of the adapter for one round of its plan, and evaluation.

Randomness: the config seed fixes model initialisation and data splits only. DP noise and Poisson sampling come
from a `SecureRandom` (ChaCha20, a fresh 256-bit key from the OS) unless a caller (a test) passes a keyed one:
replaying one stream every round would repeat the noise, and the accountant's composition assumes independent
noise per step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import PeftModel
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from privacy.accountant import AccountantState
from privacy.calibration import SamplingPlan
from privacy.dp_sgd import PoissonBatches, PrivateTraining, SecureNoise, ShuffledBatches, make_private
from privacy.loss import IGNORE_INDEX, PerSequenceLMLoss, SequenceClassificationLoss, TokenLoss
from privacy.secure_random import SecureRandom

from .allocator import keep_freed_buffers, release_freed_buffers
from .chat import ChatDataset
from .config import AppConfig
from .data import TextDataset
from .decoder import PrefixedLlama
from .encoder import MeanPooledClassifier
from .node_files import mark_used, save_owner_only

PrefixModel = MeanPooledClassifier | PrefixedLlama  # models that run in two halves over a cached frozen prefix

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
log = logging.getLogger(__name__)


class TokenizedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_len: int) -> None:
        encoded = tokenizer(list(data.texts), truncation=True, max_length=max_len)["input_ids"]
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
        self.labels = torch.tensor(data.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.labels[i]


class Collator:
    """Right-pads a batch to its longest sequence. Targets: for causal LM the tokens themselves; per-token labels
    (the chat task's) padded with IGNORE_INDEX; class labels stacked."""

    def __init__(self, pad_id: int, causal_lm: bool) -> None:
        self.pad_id = pad_id
        self.causal_lm = causal_lm

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        if self.causal_lm:
            return input_ids, mask, input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return input_ids, mask, stack_labels([label for _, label in items], width)


def stack_labels(labels: list[torch.Tensor], width: int) -> torch.Tensor:
    """Class labels as one tensor; per-token labels right-padded to `width` with IGNORE_INDEX."""
    if labels[0].dim() == 0:
        return torch.stack(labels)
    out = torch.full((len(labels), width), IGNORE_INDEX, dtype=torch.long, device=labels[0].device)
    for row, label in enumerate(labels):
        out[row, : len(label)] = label
    return out


def tokenized(cfg: AppConfig, data: TextDataset, tokenizer: PreTrainedTokenizerBase) -> TokenizedDataset | ChatDataset:
    """The examples as token ids, as the task reads them."""
    if cfg.task.name == "chat":
        return ChatDataset(data, tokenizer, cfg.train.max_seq_len, cfg.task.answer)
    return TokenizedDataset(data, tokenizer, cfg.train.max_seq_len)


@dataclass
class LocalTrainResult:
    num_examples: int
    train_loss: float  # for the hospital's own console; it never leaves the node unless its policy allows it
    steps: int
    accountant: AccountantState | None  # None when privacy is disabled
    epsilon: float  # spent so far by this hospital (inf without DP)
    # Adam's state after the round, with `train.keep_optimizer_state` (else None), for the hospital's next round
    optimizer_state: dict[str, Any] | None


def make_criterion(cfg: AppConfig) -> nn.Module:
    """The loss over a whole model's logits (a prefix view of a causal LM brings its own: `TokenLoss`)."""
    return SequenceClassificationLoss() if cfg.task.name == "classification" else PerSequenceLMLoss()


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def data_loader(cfg: AppConfig, dataset: TextDataset, tokenizer: PreTrainedTokenizerBase, *,
                batch_size: int) -> DataLoader:
    """Evaluation batches in order; training draws its own batches (`train_epochs`)."""
    return DataLoader(tokenized(cfg, dataset, tokenizer), batch_size=batch_size,
                      shuffle=False, collate_fn=Collator(pad_id_of(tokenizer), cfg.task.name == "causal-lm"))


def make_optimizer(cfg: AppConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The trainable parameters at `train.lr`, the classifier head (peft's `modules_to_save`) at `train.head_lr`:
    a zero-initialised head over unit-norm features needs a step size near 0.1 to learn in a DP budget of steps,
    which would throw the adapters off."""
    head, rest = head_and_rest(model)
    head_lr = cfg.train.head_lr if cfg.train.head_lr is not None else cfg.train.lr
    param_groups: list[dict[str, Any]] = [{"params": params, "lr": lr}
                                          for params, lr in ((rest, cfg.train.lr), (head, head_lr)) if params]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.train.lr)
    return torch.optim.Adam(param_groups, lr=cfg.train.lr)


ADAM_MOMENTS = {"step", "exp_avg", "exp_avg_sq"}  # what torch's Adam keeps per parameter (no amsgrad)


def check_optimizer_state(cfg: AppConfig, model: nn.Module, state: dict[str, Any]) -> None:
    """Raises ValueError unless `state` (an earlier round's `LocalTrainResult.optimizer_state`) is Adam's state for
    `model`'s trainable parameters in `make_optimizer`'s order, one Adam can step from: a step of at least 1, finite
    moments, a second moment >= 0 (anything else makes the step NaN or fail after the round is charged)."""
    params = [p for group in make_optimizer(cfg, model).param_groups for p in group["params"]]
    moments_of = state["state"]
    if not set(moments_of) <= set(range(len(params))):
        raise ValueError("another model's optimiser state")
    for i, moments in moments_of.items():
        if set(moments) != ADAM_MOMENTS:
            raise ValueError(f"parameter {i} has {sorted(moments)}, not Adam's {sorted(ADAM_MOMENTS)}")
        step, first, second = (moments[k] for k in ("step", "exp_avg", "exp_avg_sq"))
        if step.numel() != 1 or not step.dtype.is_floating_point or not float(step) >= 1 \
                or not math.isfinite(float(step)):
            raise ValueError(f"parameter {i}'s step count {step} is not a count of steps")
        if any(m.shape != params[i].shape or m.dtype != params[i].dtype for m in (first, second)):
            raise ValueError(f"parameter {i}'s moments do not fit its shape {tuple(params[i].shape)} and dtype")
        if not (bool(torch.isfinite(first).all()) and bool(torch.isfinite(second).all()) and
                bool((second >= 0).all())):
            raise ValueError(f"parameter {i}'s moments are not finite, or its second moment is negative")


def head_and_rest(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable classifier head (peft's `modules_to_save`) and every other trainable parameter."""
    head: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if "modules_to_save" in name else rest).append(p)
    return head, rest


def clip_groups(cfg: AppConfig, model: nn.Module) -> list[tuple[list[nn.Parameter], float]] | None:
    """`privacy.head_clip_share` of the clipping budget (squared) for the head, the rest for the adapters; flat
    clipping when it is unset or the model has no separate head."""
    share = cfg.privacy.head_clip_share
    head, rest = head_and_rest(model)
    if share is None or not head or not rest:
        return None
    return [(head, share), (rest, 1.0 - share)]


Forward = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.device], tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[list[Any]], tuple[torch.Tensor, ...]]


class FrozenPrefixes(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every example's hidden states after the model's frozen lower layers, computed once and reused by every step
    of every round: a step then runs only the adapted top layers.

    Derived from patient records, so it stays where they are: in the hospital's process and, with `folder`, in the
    node's own state folder (owner-only files), where every later process of the run (a deployed node starts one per
    message) finds it by a digest of the texts' token ids, the frozen weights and code. It is never sent, and the
    node removes the folder when a run closes (`remove_prefix_cache`)."""

    KEEP = 4  # cached datasets a node keeps at once; older ones are removed

    def __init__(self, model: PrefixModel, tokenized: TokenizedDataset | ChatDataset, device: torch.device,
                 folder: Path | None = None, batch_size: int = 256,
                 labels: list[torch.Tensor] | None = None) -> None:
        self.labels = tokenized.labels if labels is None else labels
        path = folder / f"{prefix_digest(model, tokenized)}.pt" if folder is not None else None
        dtype = model.prefix_dtype
        loaded = _load_prefixes(path, tokenized, model.config.hidden_size, dtype, device) if path is not None else None
        if loaded is not None:
            self.states = loaded
            return
        ids = tokenized.input_ids
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length order: batches with little padding
        self.states = [torch.empty(0)] * len(ids)
        collate = Collator(0, causal_lm=False)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, mask, _ = collate([(ids[i], ids[i]) for i in rows])
            hidden = model.frozen_prefix(input_ids.to(device), mask.to(device))
            for row, i in enumerate(rows):
                self.states[i] = hidden[row, : len(ids[i])].clone()
        if path is not None:
            self._save(path)

    def _save(self, path: Path) -> None:
        """Best effort: a cache that cannot be written (full disk, a run closing beside this one) costs a recompute
        in a later process, never the round."""
        try:
            save_owner_only(path, {"states": torch.cat(self.states).cpu(),
                                   "lengths": torch.tensor([len(s) for s in self.states])}, self.KEEP)
        except OSError as err:
            log.warning("prefix cache not written (%s): later processes will recompute it", type(err).__name__)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.states[i], self.labels[i]


def _load_prefixes(path: Path, tokenized: TokenizedDataset | ChatDataset, hidden_size: int, dtype: torch.dtype,
                   device: torch.device) -> list[torch.Tensor] | None:
    """A cached file's prefixes if it is whole and fits these texts; None (recompute) if it is missing or does not."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        states, lengths = saved["states"], saved["lengths"]
        expected = [len(ids) for ids in tokenized.input_ids]
        if (lengths.tolist() != expected or states.dim() != 2 or states.shape[1] != hidden_size
                or states.dtype != dtype or not bool(torch.isfinite(states).all())):
            raise ValueError("does not fit the texts")
    except Exception:  # whatever a damaged or foreign file raises, the answer is to recompute it
        path.unlink(missing_ok=True)
        return None
    mark_used(path)
    return list(states.split(expected))


def remove_prefix_cache(folder: Path) -> None:
    """What a node does when a run closes: no derivative of its records outlives the run."""
    shutil.rmtree(folder, ignore_errors=True)


PREFIX_CACHE_VERSION = 1  # bump when what a prefix holds changes


def prefix_digest(model: PrefixModel, tokenized: TokenizedDataset | ChatDataset) -> str:
    """Names a cache by everything its contents depend on: the token ids, and what the prefix runs (code and
    library versions, model config, attention implementation, dtype) with what weights."""
    digest = hashlib.sha256(f"v{PREFIX_CACHE_VERSION}:{torch.__version__}:{transformers.__version__}:"
                            f"{model.frozen_layers}:{model.attention_in_prefix}:"
                            f"{model.config._attn_implementation}:{model.config.to_json_string()}".encode())
    for ids in tokenized.input_ids:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(ids.numpy().tobytes())
    for module in model.prefix_modules():
        for tensor in (*module.parameters(), *module.buffers()):
            digest.update(str(tensor.dtype).encode())
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # bytes of any dtype, bf16 too
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:32]


def pad_prefixes(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """A batch of cached prefixes, right-padded with zeros (masked out) to the longest."""
    width = max(len(states) for states, _ in items)
    first = items[0][0]
    batch = torch.zeros((len(items), width, first.shape[-1]), dtype=first.dtype, device=first.device)
    mask = torch.zeros((len(items), width), dtype=torch.long, device=first.device)
    for row, (states, _) in enumerate(items):
        batch[row, : len(states)] = states
        mask[row, : len(states)] = 1
    return batch, mask, stack_labels([label for _, label in items], width)


def prefix_forward(module: nn.Module, batch: tuple[torch.Tensor, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a batch of cached prefixes: only the top layers and the head run."""
    states, mask, labels = batch
    return module(prefix=states.to(device), attention_mask=mask.to(device)).logits, labels.to(device)


def prefix_lm_forward(module: nn.Module, batch: tuple[torch.Tensor, ...],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a target token, and those targets ([batch, k] each, k the most
    targets in a row, IGNORE_INDEX beyond a row's own): the output layer runs on nothing else."""
    states, mask, labels = batch
    targets = labels[:, 1:].to(device)  # position t predicts token t + 1
    valid = targets != IGNORE_INDEX
    width = max(1, int(valid.sum(dim=1).max()))
    positions = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # each row's targets first
    kept = targets.gather(1, positions).masked_fill(~valid.gather(1, positions), IGNORE_INDEX)
    logits = module(prefix=states.to(device), attention_mask=mask.to(device), positions=positions).logits
    return logits, kept


@dataclass(frozen=True)
class TrainingView:
    """What one step reads: the examples as the model trains on them, how to batch them, how to run a batch, and
    the loss over what a batch's run returns."""

    dataset: Dataset[Any]
    collate: Collate
    forward: Forward
    criterion: nn.Module


def training_view(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset,
                  device: torch.device, cache_dir: Path | None = None) -> TrainingView:
    """Cached frozen prefixes when the model has them (MiniLM; a causal LM, whose output layer then runs at the
    target positions only), else token ids.
    Build it once per hospital and pass it to every round's `train_local`; with `cache_dir` (a folder on the
    node) the prefixes are computed once per dataset, not once per process."""
    examples = tokenized(cfg, dataset, tokenizer)
    base = model.get_base_model()
    if isinstance(base, MeanPooledClassifier):
        return TrainingView(FrozenPrefixes(base, examples, device, cache_dir), pad_prefixes, prefix_forward,
                            make_criterion(cfg))
    if isinstance(base, PrefixedLlama) and base.frozen_layers > 0:  # else the "prefix" would be token embeddings
        targets = list(examples.input_ids) if cfg.task.name == "causal-lm" else None  # there every token is one
        prefixes = FrozenPrefixes(base, examples, device, cache_dir, labels=targets)
        return TrainingView(prefixes, pad_prefixes, prefix_lm_forward, TokenLoss())
    return TrainingView(examples, Collator(pad_id_of(tokenizer), cfg.task.name == "causal-lm"), text_forward,
                        make_criterion(cfg))


def text_forward(module: nn.Module, batch: tuple[torch.Tensor, ...],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a tokenised batch (input ids, attention mask, labels)."""
    input_ids, mask, labels = batch
    return module(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits, labels.to(device)


def train_local(
    cfg: AppConfig,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: TextDataset,
    device: torch.device,
    *,
    plan: SamplingPlan,
    noise_multiplier: float | None,
    accountant: AccountantState | None,
    proximal_mu: float = 0.0,
    rng: SecureRandom | None = None,
    view: TrainingView | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> LocalTrainResult:
    """Train `model`'s adapter in place for one round of `plan` from its current (global) state, reading the
    examples through `view` (built from `dataset` when not given)."""
    if view is None:
        view = training_view(cfg, model, tokenizer, dataset, device)
    return train_epochs(cfg, model, view.dataset, view.collate, view.forward, device, plan=plan,
                        noise_multiplier=noise_multiplier, accountant=accountant, proximal_mu=proximal_mu, rng=rng,
                        criterion=view.criterion, optimizer_state=optimizer_state)


def train_epochs(
    cfg: AppConfig,
    model: nn.Module,
    dataset: Dataset[Any],
    collate: Collate,
    forward: Forward,
    device: torch.device,
    *,
    plan: SamplingPlan,
    noise_multiplier: float | None,
    accountant: AccountantState | None,
    proximal_mu: float,
    rng: SecureRandom | None = None,
    criterion: nn.Module | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> LocalTrainResult:
    """One round of `plan` over `dataset`, training the model's trainable parameters in place.

    With `noise_multiplier` set, runs DP-SGD on Poisson batches at the plan's rate for exactly the plan's steps,
    resuming `accountant`; FedProx's proximal gradient mu * (w - w_global) is added after clipping and noise, since
    it does not depend on patient data. Without it, `train.local_epochs` shuffled passes of the same step count.
    The local optimiser starts from `optimizer_state` (an earlier round's `LocalTrainResult.optimizer_state`, checked
    by `check_optimizer_state`; this round updates its tensors in place) when given, else afresh.
    """
    private = noise_multiplier is not None
    if private and accountant is None:
        raise ValueError("train_epochs: a private run needs the hospital's accountant state")
    keep_freed_buffers()  # each step's large activations reused, not mapped and zeroed afresh
    num_examples = len(dataset)  # type: ignore[arg-type]
    if num_examples != plan.num_examples:
        raise ValueError(f"train_epochs: the plan is for {plan.num_examples} examples, the dataset has {num_examples}")
    rng = rng or SecureRandom()
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trainable]

    def add_proximal_gradient() -> None:
        if proximal_mu == 0:
            return
        for p, w_global in zip(trainable, anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - w_global, alpha=proximal_mu)

    model.train()
    base_optimizer = make_optimizer(cfg, model)
    if optimizer_state is not None:  # the moments carry over; learning rates and betas are this round's config
        base_optimizer.load_state_dict({"state": optimizer_state["state"],
                                        "param_groups": base_optimizer.state_dict()["param_groups"]})
    optimizer: torch.optim.Optimizer | SecureNoise = base_optimizer
    loss_module = criterion if criterion is not None else make_criterion(cfg)
    loss_fn: Callable[..., torch.Tensor] = loss_module
    session: PrivateTraining | None = None
    module: nn.Module = model
    batches: PoissonBatches | ShuffledBatches
    if private:
        assert noise_multiplier is not None
        session = make_private(
            model, base_optimizer, loss_module, noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            expected_batch_size=max(1, int(plan.num_examples * plan.sample_rate)),
            grad_sample_mode=cfg.privacy.grad_sample_mode, secure_random=rng, after_noise=add_proximal_gradient,
            clip_groups=clip_groups(cfg, model))
        module, optimizer, loss_fn = session.module, session.optimizer, session.criterion
        batches = PoissonBatches(num_examples, plan.sample_rate, plan.steps_per_round, rng)
    else:
        batches = ShuffledBatches(num_examples, cfg.train.batch_size, cfg.train.local_epochs, rng)

    losses: list[float] = []
    steps = 0
    try:
        for indices in batches:
            steps += 1
            while indices:
                optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                logits, labels = forward(module, collate([dataset[i] for i in indices]), device)
                loss = loss_fn(logits, labels)
                loss.backward()
                dropped = set(session.non_finite_samples()) if session is not None else set()
                if not dropped:
                    break
                indices = [i for k, i in enumerate(indices) if k not in dropped]  # a zero contribution, as clipping
            if not indices:  # Poisson sampling drew nobody, or ghost clipping dropped everyone
                assert session is not None
                optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                session.optimizer.step_without_data()
                continue
            if session is None:
                add_proximal_gradient()
            optimizer.step()  # type: ignore[union-attr]
            losses.append(float(loss.item()))
    finally:
        if session is not None:
            session.close()
        release_freed_buffers()
    state = accountant.then(noise_multiplier, plan.sample_rate, steps) \
        if accountant is not None and noise_multiplier is not None else None
    epsilon = state.epsilon(cfg.privacy.delta) if state is not None else math.inf
    return LocalTrainResult(num_examples, float(np.mean(losses)) if losses else math.nan, steps, state, epsilon,
                            base_optimizer.state_dict() if cfg.train.keep_optimizer_state else None)


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of a whole evaluation set's logits."""
    predictions = logits.argmax(dim=-1).cpu().numpy()
    truth = labels.cpu().numpy()
    return {
        "loss": float(nn.functional.cross_entropy(logits.float(), labels)),
        "accuracy": float(np.mean(predictions == truth)),
        "macro_f1": float(f1_score(truth, predictions, average="macro", zero_division=0)),
    }


@torch.no_grad()
def classification_logits(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                          dataset: TextDataset, device: torch.device,
                          batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every example, in order."""
    model.eval()
    logits, truth = [], []
    for input_ids, mask, labels in data_loader(cfg, dataset, tokenizer, batch_size=batch_size):
        logits.append(model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu())
        truth.append(labels)
    model.train()
    return torch.cat(logits), torch.cat(truth)


@dataclass(frozen=True)
class SequenceScores:
    """Per sequence of an evaluation set, in order: mean next-token loss over its targets, its number of targets,
    and whether greedy decoding from its prompt reproduces its targets exactly."""

    losses: torch.Tensor
    tokens: torch.Tensor
    greedy_exact: torch.Tensor


def _aligned_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scores of logits aligned with their targets ([batch, k, vocab], [batch, k]). Greedy decoding reproduces a
    row's targets iff every target is the argmax given the true tokens before it (teacher forcing): decoding picks
    the argmax and, while it agrees, conditions on the same tokens. So one forward pass gives the exact match of
    greedy answers, ended by the end-of-turn token, without generating them."""
    valid = targets != IGNORE_INDEX
    nll = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="none").view(targets.shape)
    tokens = valid.sum(dim=1)
    agrees = (logits.argmax(dim=-1) == targets) | ~valid
    return (nll * valid).sum(dim=1) / tokens.clamp(min=1), tokens, agrees.all(dim=1) & (tokens > 0)


@torch.no_grad()
def language_model_scores(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                          dataset: TextDataset, device: torch.device, view: TrainingView | None = None,
                          batch_size: int = 64) -> SequenceScores:
    """`SequenceScores` of every example, through `view` (a causal LM's cached prefixes: only the top layers and
    the target positions run, so an evaluation every round is cheap) or, without it, the whole model."""
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    if view is not None:
        for start in range(0, len(view.dataset), batch_size):  # type: ignore[arg-type]
            batch = view.collate([view.dataset[i] for i in range(start, min(start + batch_size,
                                                                              len(view.dataset)))])  # type: ignore[arg-type]
            parts.append(_aligned_scores(*view.forward(model, batch, device)))
    else:
        for input_ids, mask, labels in data_loader(cfg, dataset, tokenizer, batch_size=batch_size):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            parts.append(_aligned_scores(logits[:, :-1], labels[:, 1:].to(device)))
    model.train()
    losses, tokens, exact = (torch.cat([part[k].cpu() for part in parts]) for k in range(3))
    return SequenceScores(losses, tokens, exact)


def evaluate(cfg: AppConfig, model: PeftModel, tokenizer: PreTrainedTokenizerBase, dataset: TextDataset,
             device: torch.device, view: TrainingView | None = None) -> dict[str, float]:
    """Exact scores on a test set the server holds. Classification: loss, accuracy, macro-F1; causal LM: per-token
    loss and perplexity (chat: of the true answers), and for chat the exact match of greedy answers. A causal LM's
    `view` of the same dataset (`training_view`) spares the frozen layers."""
    if cfg.task.name == "classification":
        return classification_scores(*classification_logits(cfg, model, tokenizer, dataset, device))
    scored = language_model_scores(cfg, model, tokenizer, dataset, device, view)
    loss = float((scored.losses * scored.tokens).sum() / scored.tokens.sum().clamp(min=1))
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if cfg.task.name == "chat":
        scores["exact_match"] = float(scored.greedy_exact.float().mean())
    return scores
