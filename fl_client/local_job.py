"""`fl-train-local`: one hospital fine-tunes the adapter alone under DP-SGD (the federation's baseline)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fl_core.config import AppConfig, compose_config, to_app_config
from fl_core.data import hospital_datasets, load_splits
from fl_core.device import resolve_device
from fl_core.entry import exit_on_bad_input, quiet_libraries
from fl_core.model import build_model, load_tokenizer, save_adapter
from fl_core.training import evaluate, train_local
from privacy.accountant import AccountantState

from .hospital import privacy_plan


def run_local(cfg: AppConfig, hospital: int = 0) -> dict[str, object]:
    """Train hospital `hospital`'s partition for `federation.num_rounds` rounds of local epochs."""
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    splits = load_splits(cfg.data)
    data = hospital_datasets(splits.train, cfg.federation, cfg.data.seed)[hospital]
    plan, sigma = privacy_plan(cfg, len(data))
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, len(splits.train.label_names), device)
    before = evaluate(cfg, model, tokenizer, splits.test, device)
    print(f"hospital {hospital}: {len(data)} examples, sigma={sigma}, {plan.total_steps} steps; before: {before}")
    accountant = AccountantState(cfg.privacy.accountant) if sigma is not None else None
    for epoch_round in range(1, cfg.federation.num_rounds + 1):
        start = time.perf_counter()
        result = train_local(cfg, model, tokenizer, data, device, noise_multiplier=sigma, accountant=accountant)
        accountant = result.accountant
        print(f"round {epoch_round}/{cfg.federation.num_rounds}: loss {result.train_loss:.4f}, "
              f"epsilon {result.epsilon:.3f}, {time.perf_counter() - start:.1f}s", flush=True)
    after = evaluate(cfg, model, tokenizer, splits.test, device)
    out = Path(cfg.output_dir)
    save_adapter(model, out / "adapter")
    summary = {"hospital": hospital, "before": before, "after": after, "epsilon": result.epsilon,
               "delta": cfg.privacy.delta, "noise_multiplier": sigma, "steps": plan.total_steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    quiet_libraries()
    overrides = sys.argv[1:]
    exit_on_bad_input("fl-train-local", lambda: run_local(to_app_config(compose_config(overrides))))


if __name__ == "__main__":
    main()
