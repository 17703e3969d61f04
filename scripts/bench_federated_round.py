"""Federated round cost, measured in one invocation on one machine:

1. framework overhead: a simulated FedProx round (Flower, Ray actors, plaintext aggregation) against the same
   hospitals' local training and the central evaluation run back to back in one process without Flower;
2. SecAgg+ cost: the same round with SecAgg+ against the plaintext round.

Usage: `python scripts/bench_federated_round.py [--rounds 3]`. Writes docs/benchmarks.md between the markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_client.hospital import hospital_plan, hospital_resources  # noqa: E402
from fl_client.node import NodeSettings  # noqa: E402
from fl_core.config import compose_config, to_app_config  # noqa: E402
from fl_core.data import load_splits  # noqa: E402
from fl_core.entry import quiet_libraries  # noqa: E402
from fl_core.model import adapter_to_arrays, load_adapter_arrays  # noqa: E402
from fl_core.training import evaluate, train_local  # noqa: E402
from privacy.accountant import AccountantState  # noqa: E402
from scripts.bench_dp_step import write_section  # noqa: E402

WORKLOAD = ["model=tiny", "data.max_train_examples=3000", "data.max_test_examples=300", "train.batch_size=32",
            "train.device=cpu", "train.num_threads=1", "privacy.target_epsilon=8"]
BEGIN, END = "<!-- fed-round:begin -->", "<!-- fed-round:end -->"


def simulated_round_seconds(rounds: int, secagg: bool, workdir: Path) -> list[float]:
    run_dir = workdir / f"secagg-{secagg}"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "fl_server.simulate", *WORKLOAD, f"federation.num_rounds={rounds}",
         f"strategy.secagg.enabled={str(secagg).lower()}", "strategy.convergence_threshold=0",
         f"hydra.run.dir={run_dir}", f"tracking.mlflow_uri=sqlite:///{workdir / 'mlflow.db'}"],
        capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    seconds = json.loads((run_dir / "summary.json").read_text())["round_seconds"]
    return [seconds[k] for k in sorted(seconds, key=int)]


def local_round_seconds(rounds: int) -> list[float]:
    """The same work a round does, minus Flower: each hospital trains, then the central evaluation."""
    quiet_libraries()
    torch.set_num_threads(1)
    cfg = to_app_config(compose_config([*WORKLOAD, f"federation.num_rounds={rounds}"]))
    nodes = [NodeSettings.from_node_config({"partition-id": p}, simulated=True)
             for p in range(cfg.federation.num_clients)]
    hospitals = [hospital_resources(cfg, node) for node in nodes]
    plans = [hospital_plan(cfg, node) for node in nodes]
    central = hospitals[0]
    test = load_splits(cfg.data).test
    accountants = [AccountantState() for _ in hospitals]
    global_arrays = adapter_to_arrays(central.model)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        updates = []
        for i, (h, p) in enumerate(zip(hospitals, plans, strict=True)):
            load_adapter_arrays(h.model, global_arrays)
            result = train_local(cfg, h.model, h.tokenizer, p.data.train, h.device, plan=p.sampling,
                                 noise_multiplier=p.noise_multiplier, accountant=accountants[i],
                                 proximal_mu=cfg.strategy.proximal_mu)
            assert result.accountant is not None
            accountants[i] = result.accountant
            updates.append((adapter_to_arrays(h.model), result.num_examples))
        total = sum(n for _, n in updates)
        global_arrays = [np.sum([a[k] * n for a, n in updates], axis=0) / total for k in range(len(global_arrays))]
        load_adapter_arrays(central.model, global_arrays)
        evaluate(cfg, central.model, central.tokenizer, test, central.device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local = local_round_seconds(args.rounds)
        plain = simulated_round_seconds(args.rounds, secagg=False, workdir=Path(tmp))
        secure = simulated_round_seconds(args.rounds, secagg=True, workdir=Path(tmp))
    med = {name: statistics.median(v) for name, v in (("local", local), ("plain", plain), ("secagg", secure))}
    text = "\n".join([
        f"3 hospitals, tiny Llama + LoRA, ICD-10-CM (3000 training texts), batch 32, DP-SGD epsilon 8, one thread per "
        f"hospital; median of {args.rounds} rounds. Local = the same training, aggregation and evaluations in one "
        "process without Flower, hospitals one after another; simulated rounds run two Ray actors on 2 cores.", "",
        "| round | seconds | ratio |", "|---|---|---|",
        f"| local, no Flower | {med['local']:.2f} | 1.00x |",
        f"| Flower simulation, plaintext FedProx | {med['plain']:.2f} | {med['plain'] / med['local']:.2f}x vs local |",
        f"| Flower simulation, FedProx + SecAgg+ | {med['secagg']:.2f} | "
        f"{med['secagg'] / med['plain']:.2f}x vs plaintext |",
        "", f"Per-round seconds: local {[round(t, 2) for t in local]}, plaintext {[round(t, 2) for t in plain]}, "
        f"SecAgg+ {[round(t, 2) for t in secure]}. Ray's start (about 20 s) is outside the rounds.",
    ])
    print(text)
    write_section(text, BEGIN, END, "Federated round: framework overhead and SecAgg+")


if __name__ == "__main__":
    main()
