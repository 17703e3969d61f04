"""`fl-train-local`: one hospital fine-tunes the adapter alone under DP-SGD (the federation's baseline).

Its output folder is a servable run, like the federation's: a hospital inference node serves it with
`fl-gateway replica --hospital NAME`, and the gateway's noisy vote asks such nodes.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import torch

from fl_core.artifacts import ADAPTER_DIR, CONFIG_FILE, PRIVACY_REPORT_FILE
from fl_core.config import AppConfig, ConfigError, compose_config, config_as_dict, to_app_config
from fl_core.data import hospital_datasets, load_splits
from fl_core.device import resolve_device
from fl_core.entry import exit_on_bad_input, quiet_libraries
from fl_core.model import build_model, load_tokenizer, save_adapter
from fl_core.training import evaluate, train_local
from fl_server.privacy_report import build_report
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
    save_adapter(model, out / ADAPTER_DIR)
    spend = {f"hospital-{hospital}": {"epsilon": result.epsilon, "noise_multiplier": sigma or 0.0,
                                      "sample_rate": plan.sample_rate, "steps": plan.total_steps}}
    report = build_report(cfg, f"local-hospital-{hospital}-{uuid.uuid4().hex[:8]}", spend,
                          cfg.federation.num_rounds, None, {})
    report["secure_aggregation"] = {"protocol": "none: trained by one hospital alone"}
    (out / PRIVACY_REPORT_FILE).write_text(json.dumps(report, indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(config_as_dict(cfg), indent=2))
    summary = {"hospital": hospital, "before": before, "after": after, "epsilon": result.epsilon,
               "delta": cfg.privacy.delta, "noise_multiplier": sigma, "steps": plan.total_steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    """`fl-train-local [--hospital N] [overrides...]`: hospital N's partition of the configured federation."""
    quiet_libraries()
    overrides = sys.argv[1:]
    hospital = 0
    if overrides[:1] == ["--hospital"]:
        if len(overrides) < 2 or not overrides[1].isdigit():
            print("fl-train-local: --hospital: must be a partition number 0..N-1", file=sys.stderr)
            raise SystemExit(2)
        hospital, overrides = int(overrides[1]), overrides[2:]

    def run() -> None:
        cfg = to_app_config(compose_config(overrides))
        if hospital >= cfg.federation.num_clients:
            raise ConfigError("--hospital", f"must be below federation.num_clients={cfg.federation.num_clients}")
        run_local(cfg, hospital)

    exit_on_bad_input("fl-train-local", run)


if __name__ == "__main__":
    main()
