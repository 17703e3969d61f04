"""Choose the main job's training settings on a validation split, never on the test texts.

The validation texts are ICD-10-CM training-split texts the main job never trains on (positions 40,000-41,999 of
the shuffled training split; the main job trains on the first `data.max_train_examples` = 30,000) and are disjoint
from the test texts. Each candidate runs the main job's federation in one process: the same three hospital shares,
the product's model, cached prefixes and DP-SGD loop, each hospital's sigma calibrated for the whole plan, and the
server's example-weighted average of the adapters every round (what FedProx aggregates; SecAgg+ changes it by its
quantisation step only), then the server optimiser's step. Every round is scored on the validation texts. Public
data only: no hospital's records are looked at outside its DP training.

    .venv/bin/python scripts/validation_sweep.py                          # the grid below, ~12 minutes a candidate
    .venv/bin/python scripts/validation_sweep.py strategy.proximal_mu=0   # one candidate (Hydra overrides)
    .venv/bin/python scripts/validation_sweep.py +experiment=llm train.lr=0.02  # a candidate for demo-llm

A chat candidate is scored on the first 200 validation texts (exact match of greedy answers and the answers'
perplexity, through their cached prefixes); every candidate's prefixes are kept in the cache folder's
validation-sweep/ and reused by the next, so only the first pays for the frozen layers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_client.plan import privacy_plan  # noqa: E402
from fl_core.cache import cache_root  # noqa: E402
from fl_core.config import compose_config, require, to_app_config  # noqa: E402
from fl_core.data import hospital_share, load_splits  # noqa: E402
from fl_core.entry import quiet_libraries  # noqa: E402
from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer  # noqa: E402
from fl_core.training import evaluate, train_local, training_view  # noqa: E402
from fl_server.server_app import server_optimizer_for  # noqa: E402
from privacy.accountant import AccountantState  # noqa: E402

VALIDATION = range(40_000, 42_000)
CHAT_VALIDATION_TEXTS = 200  # a chat model is scored through cached prefixes, each text a forward of the whole model
CPU = torch.device("cpu")
SCORED = {"classification": ("accuracy", "macro_f1"), "chat": ("exact_match", "perplexity"),
          "causal-lm": ("perplexity",)}
GRID = (
    (),  # the main job's settings (conf/): a server learning rate of 1.5
    ("strategy.server_optimizer.name=none",),  # plain FedProx averaging
    ("strategy.server_optimizer.lr=2",),
    ("strategy.server_optimizer.lr=1.5", "strategy.server_optimizer.momentum=0.7"),  # the study's head
    ("privacy.head_clip_share=null",),  # one flat clipping bound
    ("privacy.head_clip_share=0.5",),
    ("privacy.head_clip_share=null", "train.lr=0.003"),
    ("strategy.proximal_mu=0.01",),
    ("strategy.proximal_mu=0",),
)


def score(overrides: tuple[str, ...]) -> dict[str, object]:
    cfg = to_app_config(compose_config(["train.device=cpu", *overrides]))
    require(cfg.data.max_train_examples is not None and cfg.data.max_train_examples <= VALIDATION.start,
            "data.max_train_examples", f"must be at most {VALIDATION.start}: the validation texts come after")
    held_out = VALIDATION if cfg.task.name == "classification" else VALIDATION[:CHAT_VALIDATION_TEXTS]
    validation = load_splits(replace(cfg.data, max_train_examples=None)).train.subset(list(held_out))
    shares = [hospital_share(cfg.data, cfg.federation, k).train for k in range(cfg.federation.num_clients)]
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, len(validation.label_names), CPU)
    start = time.perf_counter()
    cache = cache_root() / "validation-sweep"
    views = [training_view(cfg, model, tokenizer, share, CPU, cache) for share in shares]  # frozen part shared
    validation_view = None if cfg.task.name == "classification" else \
        training_view(cfg, model, tokenizer, validation, CPU, cache)
    plans = [privacy_plan(cfg, len(share)) for share in shares]
    accountants: list[AccountantState | None] = [AccountantState((), cfg.privacy.accountant) for _ in shares]
    optimizer_states: list[dict[str, Any] | None] = [None for _ in shares]  # as each node keeps it, if it does
    rounds, epsilon = [], 0.0
    server = server_optimizer_for(cfg)
    for _ in range(cfg.federation.num_rounds):
        global_adapter = adapter_to_arrays(model)
        summed = [np.zeros_like(a, dtype=np.float64) for a in global_adapter]
        for k, (share, view, (sampling, sigma)) in enumerate(zip(shares, views, plans, strict=True)):
            load_adapter_arrays(model, global_adapter)
            result = train_local(cfg, model, tokenizer, share, CPU, plan=sampling, noise_multiplier=sigma,
                                 accountant=accountants[k] if sigma is not None else None,
                                 proximal_mu=cfg.strategy.proximal_mu, view=view,
                                 optimizer_state=optimizer_states[k])
            accountants[k], epsilon = result.accountant, max(epsilon, result.epsilon)
            optimizer_states[k] = result.optimizer_state
            for total, array in zip(summed, adapter_to_arrays(model), strict=True):
                total += len(share) * array
        aggregate = [(total / sum(map(len, shares))).astype(np.float32) for total in summed]
        load_adapter_arrays(model, server.step(global_adapter, aggregate))
        scores = evaluate(cfg, model, tokenizer, validation, CPU, validation_view)
        rounds.append({k: round(scores[k], 4) for k in SCORED[cfg.task.name]})
        print(json.dumps({"overrides": list(overrides), "round": len(rounds), **rounds[-1]}), flush=True)
    return {"overrides": list(overrides), "max_epsilon": round(epsilon, 3), "hospitals": [len(s) for s in shares],
            "seconds": round(time.perf_counter() - start, 1), "validation_by_round": rounds}


def main() -> None:
    quiet_libraries()
    torch.set_num_threads(1)
    grid = (tuple(sys.argv[1:]),) if len(sys.argv) > 1 else GRID
    for overrides in grid:
        print(json.dumps(score(overrides)), flush=True)


if __name__ == "__main__":
    main()
