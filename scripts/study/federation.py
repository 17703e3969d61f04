"""The study's federated arm on Flower: FedProx with SecAgg+ over simulated hospitals, on the server loop of
`fl_server` (which fails a round that aggregated nothing instead of keeping the old weights).

One simulation per hospital count runs all federated arms of that count in turn, so Ray starts once (~20 s). Each
arm is a fresh `RecordingFedProx` whose fit config carries the arm's key as the run id; each hospital trains the
arm's model (the head, or the product's LoRA adapters) on its own rows with DP-SGD and keeps its accountant in the
work folder across rounds. A mod outside SecAgg+ counts the bytes of every message a hospital receives and sends,
all protocol stages included; the server reads the count after each arm (the hospitals are idle between arms).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_core.config import AppConfig
from fl_core.protocol import RUN_ID

from .parties import learner as model_data
from .plan import Setting, StudyPlan

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FederatedArm:
    key: str
    cfg: AppConfig
    epsilon: float
    seed: int
    setting: Setting
    rows: tuple[tuple[int, ...], ...]  # each hospital's training rows
    sigmas: tuple[float | None, ...]  # each hospital's noise, calibrated once for all rounds
    lora: bool = False  # the product's LoRA model, else the linear head


def _quiet_flower() -> None:
    """Hundreds of SecAgg+ rounds log every stage at INFO and DEBUG; the study prints one line per arm."""
    logging.getLogger("flwr").setLevel(logging.WARNING)


def build_client_app(arms: Sequence[FederatedArm], plan: StudyPlan, work: Path) -> Any:
    from flwr.client import Client, ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.common import Context, Message, NDArrays, Scalar
    from flwr.common.serde import message_to_proto

    from privacy.accountant import AccountantState

    by_key = {arm.key: arm for arm in arms}

    class StudyHospital(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
            arm = by_key[str(config[RUN_ID])]
            learner = model_data(plan, arm.lora)
            model = learner.new_model(arm.cfg)
            learner.load_arrays(model, parameters)
            sigma = arm.sigmas[self.partition]
            saved = work / "accountants" / f"{arm.key}-{self.partition}.json"
            accountant = (AccountantState.from_json(saved.read_text()) if saved.exists() else
                          AccountantState() if sigma is not None else None)
            rows = list(arm.rows[self.partition])
            result = learner.train(arm.cfg, model, rows, sigma=sigma, accountant=accountant,
                                   proximal_mu=float(config.get("proximal_mu", 0.0)))
            if result.accountant is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(result.accountant.to_json())
            return learner.to_arrays(model), len(rows), {"hospital": f"hospital-{self.partition}",
                                                      "epsilon": result.epsilon}

    def client_fn(context: Context) -> Client:
        import torch

        torch.set_num_threads(1)
        return StudyHospital(int(context.node_config["partition-id"])).to_client()

    def count_bytes(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        _quiet_flower()
        reply = call_next(msg, context)
        down, up = message_to_proto(msg).ByteSize(), message_to_proto(reply).ByteSize()
        with open(work / f"bytes-{context.node_config['partition-id']}.txt", "a") as log:
            log.write(f"{down} {up}\n")
        return reply

    return ClientApp(client_fn=client_fn, mods=[count_bytes, secaggplus_mod])


def _traffic(work: Path, rounds: int, count: int) -> tuple[float, float]:
    """Bytes a hospital received and sent per round over the arm that just ended, averaged over hospitals and
    rounds; the counts are cleared for the next arm."""
    totals = np.zeros(2)
    for log in work.glob("bytes-*.txt"):
        totals += np.array([[int(v) for v in line.split()] for line in log.read_text().splitlines()]).sum(axis=0)
        log.unlink()
    per_round = totals / (rounds * count)
    return float(per_round[0]), float(per_round[1])


def build_server_app(arms: Sequence[FederatedArm], plan: StudyPlan, work: Path) -> Any:
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.serverapp import Grid

    from fl_server.server_app import fit_workflow_for, server_optimizer_for, strategy_for
    from fl_server.workflow import ConvergenceMonitor, FederatedWorkflow, current_arrays
    from strategies.fedprox import RecordingFedProx

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        _quiet_flower()
        outcomes = {}
        for arm in arms:
            started = time.perf_counter()
            learner = model_data(plan, arm.lora)
            strategy = RecordingFedProx(proximal_mu=arm.setting.mu, min_participants=arm.setting.hospitals,
                                        initial_arrays=learner.to_arrays(learner.new_model(arm.cfg)),
                                        run_id=arm.key, federated_evaluation=False)
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=arm.cfg.federation.num_rounds),
                                   strategy=strategy_for(arm.cfg, strategy,
                                                         server_optimizer_for(arm.cfg)))
            workflow = FederatedWorkflow(fit_workflow_for(arm.cfg), ConvergenceMonitor(0.0, 1), 1,
                                         on_round=lambda *_: None, recorder=strategy)
            outcome = workflow(grid, legacy)
            model = learner.new_model(arm.cfg)
            arrays = current_arrays(legacy)
            learner.load_arrays(model, arrays)
            last = outcome.rounds[-1].record.client_metrics
            down, up = _traffic(work, len(outcome.rounds), arm.setting.hospitals)
            outcomes[arm.key] = {**learner.evaluate(model), "rounds": len(outcome.rounds),
                                 "epsilon_spent": max(float(m["epsilon"]) for m in last.values()),
                                 "max_abs_weight": float(max(np.abs(a).max() for a in arrays)),
                                 "bytes_down": down, "bytes_up": up, "seconds": time.perf_counter() - started}
            print(f"study: federated {arm.key} ({arm.setting.label}, eps {arm.epsilon}, seed {arm.seed}): accuracy "
                  f"{outcomes[arm.key]['accuracy']:.3f}, largest weight {outcomes[arm.key]['max_abs_weight']:.2f} "
                  f"(SecAgg+ clips at {arm.cfg.strategy.secagg.clipping_range})", flush=True)
        (work / "federated.json").write_text(json.dumps(outcomes))

    return app


def run_federated_arms(arms: Sequence[FederatedArm], plan: StudyPlan, work: Path) -> dict[str, dict[str, float]]:
    """Every arm (all with one hospital count) in one Flower simulation; returns each arm's scores and spend,
    plus `bytes_down`/`bytes_up`: a hospital's traffic per round, averaged over the arm's hospitals and rounds."""
    from flwr.simulation import run_simulation

    from fl_server.simulate import backend_config

    hospitals = {arm.setting.hospitals for arm in arms}
    if len(hospitals) != 1:
        raise ValueError(f"one simulation runs one hospital count, got {sorted(hospitals)}")
    count = hospitals.pop()
    work.mkdir(parents=True, exist_ok=True)
    _quiet_flower()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray listens on loopback only
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    run_simulation(server_app=build_server_app(arms, plan, work),
                   client_app=build_client_app(arms, plan, work), num_supernodes=count,
                   backend_config=backend_config(arms[0].cfg))
    done = work / "federated.json"
    if not done.exists():
        raise RuntimeError(f"the {count}-hospital simulation ended without results (see the log above)")
    outcomes: dict[str, dict[str, float]] = json.loads(done.read_text())
    return outcomes
