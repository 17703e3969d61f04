"""The DP-SGD step with adapters on the top layers over cached frozen prefixes, against adapters on every layer:
MiniLM's classifier (the main job) and SmolLM2's chat model (`make demo-llm`).

Each variant is one DP-SGD step (Opacus hooks, ChaCha20 noise) of the product's own model and training view on real
ICD-10-CM texts, at its job's batch size, with one thread. Variants run interleaved in `--repeat` rounds so a
swing of the machine's load falls on all alike; the figure is the median step over all rounds, and the ratio is
against LoRA on all layers measured in the same run. Writes docs/benchmarks.md between the model's markers.

    .venv/bin/python scripts/bench_frozen_prefix.py [--model minilm|smollm2] [--batch N] [--steps 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core.allocator import keep_freed_buffers  # noqa: E402
from fl_core.config import compose_config, to_app_config  # noqa: E402
from fl_core.data import load_splits  # noqa: E402
from fl_core.entry import quiet_libraries  # noqa: E402
from fl_core.model import build_model, load_tokenizer  # noqa: E402
from fl_core.training import (  # noqa: E402
    Collator,
    TrainingView,
    make_criterion,
    make_optimizer,
    pad_id_of,
    text_forward,
    tokenized,
    training_view,
)
from privacy.dp_sgd import PrivateTraining, make_private  # noqa: E402
from privacy.secure_random import SecureRandom  # noqa: E402
from scripts.bench_dp_step import write_section  # noqa: E402

CPU = torch.device("cpu")
FFN = ("lora.target_modules=[intermediate.dense,output.dense]", "lora.exclude_modules=[attention.output.dense]")
ALL_TARGETS = ("lora.target_modules=null", "lora.exclude_modules=null")
# (label, overrides of the job's config, read cached prefixes)
MINILM = (
    ("LoRA on all 6 layers (query, key, value, dense)", ("lora.layers=6", *ALL_TARGETS), False),
    ("the same on the top layer, lower 5 recomputed each step", ("lora.layers=1", *ALL_TARGETS), False),
    ("the same on the top layer over cached prefixes", ("lora.layers=1", *ALL_TARGETS), True),
    ("the same on the top 2 layers over cached prefixes", ("lora.layers=2", *ALL_TARGETS), True),
    ("top layer's feed-forward block only, its attention cached too (main job)", ("lora.layers=1", *FFN), True),
)
LLM_FP32 = ("+experiment=llm", "train.precision=fp32")
SMOLLM2 = (
    ("LoRA on all 30 layers (q, k, v, o), logits at every position", (*LLM_FP32, "lora.layers=null"), False),
    ("the top 2 layers over cached prefixes", (*LLM_FP32, "lora.layers=2"), True),
    ("the top 4 layers over cached prefixes (demo-llm)", (*LLM_FP32, "lora.layers=4"), True),
    ("the top 8 layers over cached prefixes", (*LLM_FP32, "lora.layers=8"), True),
    ("the top 4 layers, frozen weights and prefixes in bf16 (`train.precision=bf16`)",
     ("+experiment=llm", "lora.layers=4", "train.precision=bf16", "privacy.enabled=false"), True),  # the same step
)
# model: (variants, default batch, markers in docs/benchmarks.md, section title, what the table measures)
JOBS = {
    "minilm": (MINILM, 256, "frozen-prefix", "MiniLM: adapters on the top layers over cached prefixes",
               "MiniLM classification, batch {batch} real ICD-10-CM texts (padded to the batch's longest, at most 32 "
               "tokens; the main job's feed-forward block runs on the real tokens alone), LoRA r=8"),
    "smollm2": (SMOLLM2, 16, "frozen-prefix-llm", "SmolLM2 chat: adapters on the top layers over cached prefixes",
                "SmolLM2-135M-Instruct chat task, batch {batch} real ICD-10-CM texts in its chat template (about 33 "
                "tokens, 7 or 8 of them the answer), LoRA r=8 on q, k, v, o"),
}


class Variant:
    def __init__(self, overrides: tuple[str, ...], cached: bool, batch: int, examples: int) -> None:
        self.cfg = to_app_config(compose_config([*overrides, f"data.max_train_examples={examples}",
                                                 "train.device=cpu"]))
        data = load_splits(self.cfg.data).train
        tokenizer = load_tokenizer(self.cfg.model)
        self.model = build_model(self.cfg, tokenizer, len(data.label_names), CPU)
        # cached: the product's view; else the same examples as token ids, every layer run each step
        self.view = training_view(self.cfg, self.model, tokenizer, data, CPU) if cached else TrainingView(
            tokenized(self.cfg, data, tokenizer), Collator(pad_id_of(tokenizer), causal_lm=False), text_forward,
            make_criterion(self.cfg))
        self.batch = batch
        self.model.train()
        self.session: PrivateTraining = make_private(
            self.model, make_optimizer(self.cfg, self.model), self.view.criterion, noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=batch, grad_sample_mode="hooks", secure_random=SecureRandom())

    def step(self, rows: list[int]) -> float:
        start = time.perf_counter()
        self.session.optimizer.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        logits, labels = self.view.forward(self.session.module, self.view.collate([self.view.dataset[i] for i in rows]),
                                           CPU)
        self.session.criterion(logits, labels).backward()
        self.session.optimizer.step()  # type: ignore[attr-defined]
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(JOBS), default="minilm")
    parser.add_argument("--batch", type=int, default=None, help="default: the job's batch size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    keep_freed_buffers()  # as every training step does (fl_core.training.train_epochs)
    job, default_batch, marker, title, what = JOBS[args.model]
    batch = args.batch or default_batch
    examples = batch * 8
    variants = [Variant(overrides, cached, batch, examples) for _, overrides, cached in job]
    picks = random.Random(0)
    times: list[list[float]] = [[] for _ in job]
    for variant in variants:  # warm-up: allocators and hooks
        variant.step(picks.sample(range(examples), batch))
    for _ in range(args.repeat):
        for _ in range(args.steps):
            rows = picks.sample(range(examples), batch)  # the same batch for every variant
            for k, variant in enumerate(variants):
                times[k].append(variant.step(rows))
    baseline = statistics.median(times[0])
    lines = [f"{what.format(batch=batch)}, Opacus hooks with ChaCha20 noise, one thread; "
             f"median of {args.steps * args.repeat} steps per variant, interleaved; "
             f"`python scripts/bench_frozen_prefix.py --model {args.model}`.", "",
             "| variant | DP step (s) | vs all layers |", "|---|---|---|"]
    for (label, _, _), steps in zip(job, times, strict=True):
        step = statistics.median(steps)
        lines.append(f"| {label} | {step:.3f} | {step / baseline:.2f}x |")
    markdown = "\n".join(lines)
    print(markdown)
    print(f"wrote {write_section(markdown, f'<!-- {marker}:begin -->', f'<!-- {marker}:end -->', title)}")


if __name__ == "__main__":
    main()
