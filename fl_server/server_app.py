"""Flower ServerApp: FedProx over hospitals' DP adapters, SecAgg+ by default, tracked in MLflow.

Hospitals first admit the run against their own policy and ledger; refusals are logged and recorded, and the run
goes on only with at least `federation.min_participants` admitted hospitals.

Configuration is the Hydra tree under `conf/`, composed from the run's `overrides` (run-config key in deployment,
a list from `fl-simulate` in simulation), so simulation and deployment share one source of configuration.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from flwr.common import Context, NDArrays, Scalar
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fl_core.artifacts import (
    SUMMARY_FILE,
    run_folder,
)
from fl_core.config import AppConfig, compose_config, secagg_count_or_fraction, to_app_config
from fl_core.console import json_logs
from fl_core.data import load_splits
from fl_core.device import resolve_device
from fl_core.entry import quiet_libraries
from fl_core.logs import events, log_context
from fl_core.model import adapter_to_arrays, build_model, load_adapter_arrays, load_tokenizer
from fl_core.run_config import run_overrides
from fl_core.tracing import configure_tracing
from fl_core.training import TrainingView, evaluate, training_view
from privacy.accountant import AccountantState
from privacy.ledger import ABORTED, COMMITTED
from strategies.fedprox import RecordingFedProx
from strategies.hospital_dp import HospitalLevelDP
from strategies.server_optimized import ServerOptimized
from strategies.server_optimizer import ServerOptimizer

from .admission import Admission, AdmissionFailed, Answers, admit_run, close_run
from .checkpoint import Checkpoint, Resumed, load_checkpoint, save_checkpoint
from .privacy_report import build_report, hospital_level_epsilon
from .run_files import save_model, save_report
from .tracking import RunTracker
from .training_metrics import TrainingMetrics
from .workflow import ConvergenceMonitor, FederatedWorkflow, FitWorkflow, LoopOutcome, RoundResult, current_arrays


def fit_workflow_for(cfg: AppConfig) -> FitWorkflow:
    sa = cfg.strategy.secagg
    if not sa.enabled:
        return default_fit_workflow
    # Under hospital-level DP every hospital sends weight 1; a larger max_weight would only cost precision.
    max_weight = 1.0 if cfg.privacy.client_level.enabled else sa.max_weight
    return SecAggPlusWorkflow(
        num_shares=secagg_count_or_fraction(sa.num_shares),
        reconstruction_threshold=secagg_count_or_fraction(sa.reconstruction_threshold),
        max_weight=max_weight, clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
        modulus_range=sa.modulus_range, timeout=sa.timeout,
    )


def server_optimizer_for(cfg: AppConfig, resumed: Resumed | None = None) -> ServerOptimizer:
    """The run's server optimiser, keeping the model inside what SecAgg+ can carry when it is on; from a checkpoint
    (`load_checkpoint`'s answer) it continues the same trajectory, or refuses before any hospital is asked."""
    sa = cfg.strategy.secagg
    optimizer = ServerOptimizer(cfg.strategy.server_optimizer, sa.clipping_range if sa.enabled else None)
    if resumed is not None:
        checkpoint, model, (first, second) = resumed
        optimizer.restore(checkpoint.server_optimizer, checkpoint.server_optimizer_steps, first, second, model=model)
    return optimizer


def strategy_for(cfg: AppConfig, recorder: RecordingFedProx, optimizer: ServerOptimizer) -> Strategy:
    """FedProx, wrapped for hospital-level DP when asked (server noise on the mean of the clipped updates), then for
    the server optimiser, which steps from the noised aggregate."""
    c = cfg.privacy.client_level
    strategy: Strategy = HospitalLevelDP(recorder, c.noise_multiplier, c.clipping_norm) if c.enabled else recorder
    return strategy if optimizer.settings.name == "none" else ServerOptimized(strategy, optimizer)


def checked_epsilon(hospital: str, epsilon: float, accountant: str, delta: float) -> tuple[float, int]:
    """A hospital's reported epsilon, checked against a recomputation from its accountant history: (epsilon, steps)."""
    history = AccountantState.from_json(accountant)
    recomputed = history.epsilon(delta)
    if not math.isclose(recomputed, epsilon, rel_tol=1e-9):
        raise RuntimeError(f"{hospital}: reported epsilon {epsilon}, but its accountant history gives {recomputed}")
    return epsilon, history.steps


def hospital_privacy(result: RoundResult, cfg: AppConfig) -> dict[str, dict[str, float]]:
    """Each hospital's spend as it reported it, checked against a recomputation from its accountant history."""
    report: dict[str, dict[str, float]] = {}
    for hospital, m in result.record.client_metrics.items():
        sigma, q, steps = float(m.get("noise_multiplier", 0.0)), float(m.get("sample_rate", 0.0)), int(m["steps"])
        epsilon = float(m["epsilon"])
        if cfg.privacy.enabled:
            epsilon, counted = checked_epsilon(hospital, epsilon, str(m["accountant"]), cfg.privacy.delta)
            if counted != steps:
                raise RuntimeError(f"{hospital}: reported {steps} steps, its accountant history holds {counted}")
        report[hospital] = {"epsilon": epsilon, "noise_multiplier": sigma, "sample_rate": q, "steps": steps}
    return report


class FederatedRun:
    """Everything the server holds for one run: model for central evaluation, tracking, checkpoints."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.output_dir = run_folder(cfg.output_dir, cfg.resume_from)
        self.device = resolve_device(cfg.train.device)
        splits = load_splits(cfg.data)
        self.test = splits.test
        self.tokenizer = load_tokenizer(cfg.model)
        self.label_names = splits.train.label_names
        self.model = build_model(cfg, self.tokenizer, len(self.label_names), self.device)
        self.test_view: TrainingView | None = None  # a causal LM's test set over its cached frozen layers
        fresh_arrays = adapter_to_arrays(self.model)
        self.adapter_bytes = sum(a.nbytes for a in fresh_arrays)
        resumed = load_checkpoint(self.output_dir) if cfg.resume_from else None
        self.checkpoint: Checkpoint | None = resumed[0] if resumed else None
        self.initial_arrays: NDArrays = resumed[1] if resumed else fresh_arrays
        self.server_optimizer = server_optimizer_for(cfg, resumed)
        self.tracker = RunTracker(cfg, self.checkpoint.mlflow_run_id if self.checkpoint else None)
        t = cfg.tracking
        self.metrics = TrainingMetrics(self.tracker.run_id, t.metrics_port, t.metrics_host) if t.metrics_port else None
        self.spend: dict[str, dict[str, float]] = {}
        self.admission: Admission | None = None
        self.closing: Answers = {}
        self.recorder = RecordingFedProx(
            proximal_mu=cfg.strategy.proximal_mu, min_participants=cfg.federation.min_participants,
            initial_arrays=self.initial_arrays, run_id=self.tracker.run_id, evaluate_fn=self.evaluate_global,
            federated_evaluation=cfg.strategy.federated_evaluation, rejoin_timeout=cfg.federation.rejoin_timeout,
        )
        self.strategy = strategy_for(cfg, self.recorder, self.server_optimizer)

    def admit(self, context: LegacyContext) -> None:
        """Ask every hospital to admit the run; record refusals; stop here if too few admit."""
        f = self.cfg.federation
        admission = admit_run(context.client_manager, self.tracker.run_id, f.num_clients, f.join_timeout)
        self.admission = admission
        for hospital, reason in sorted(admission.refusals.items()):
            print(f"[admission] {hospital} refused the run: {reason}", flush=True)
        self.tracker.log_admission(admission.plans, admission.refusals)
        if len(admission.admitted) < f.min_participants:
            raise AdmissionFailed(
                f"{len(admission.admitted)} of {f.num_clients} hospitals admitted the run, fewer than "
                f"federation.min_participants={f.min_participants}; no training took place. Refusals: "
                + "; ".join(f"{h}: {r}" for h, r in sorted(admission.refusals.items())))
        self.recorder.admitted = set(admission.admitted)
        print(f"[admission] {len(admission.admitted)} hospitals admitted the run: "
              + ", ".join(f"{h} (planned epsilon {float(plan['planned_epsilon']):.3f})"
                          for h, plan in sorted(admission.plans.items())), flush=True)

    def close(self, succeeded: bool) -> None:
        """Commit (or abort) the run in every admitted hospital's ledger; keeps their balances for the report."""
        if self.admission is None:
            return
        self.closing = close_run(self.admission, COMMITTED if succeeded else ABORTED, self.cfg.federation.join_timeout)
        for hospital, closed in self.closing.items():  # the final spend, evaluations after the last fit included
            history = closed.pop("accountant", None)
            if history is not None and hospital in self.spend and self.cfg.privacy.enabled:
                epsilon, steps = checked_epsilon(hospital, float(closed["epsilon"]), str(history),
                                                 self.cfg.privacy.delta)
                self.spend[hospital].update(epsilon=epsilon, steps=steps)

    def evaluate_global(self, server_round: int, arrays: NDArrays,
                        config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        load_adapter_arrays(self.model, arrays)
        if self.test_view is None and self.cfg.task.name != "classification":  # the frozen layers run once per run
            self.test_view = training_view(self.cfg, self.model, self.tokenizer, self.test, self.device)
        metrics = evaluate(self.cfg, self.model, self.tokenizer, self.test, self.device, self.test_view)
        return metrics["loss"], {k: v for k, v in metrics.items() if k != "loss"}

    def on_round(self, result: RoundResult, context: LegacyContext) -> None:
        participants = len(result.record.client_metrics)
        if result.server_round == 1:  # the model before training, the baseline of every convergence chart
            self.tracker.log_metrics({f"eval_{k}": v for k, v in self.workflow.outcome.initial_metrics.items()},
                                     step=0)
        self.spend.update(hospital_privacy(result, self.cfg))
        metrics: dict[str, float] = {f"eval_{k}": v for k, v in result.central.items()}
        metrics.update({f"fed_eval_{k}": v for k, v in result.distributed.items()})
        for r, loss in context.history.metrics_distributed_fit.get("train_loss", []):
            if r == result.server_round:
                metrics["train_loss"] = float(loss)  # example-weighted over the hospitals
        for hospital, spend in self.spend.items():
            metrics[f"epsilon/{hospital}"] = spend["epsilon"]
            metrics[f"noise_multiplier/{hospital}"] = spend["noise_multiplier"]
        metrics["epsilon_max"] = max(s["epsilon"] for s in self.spend.values())
        if self.cfg.privacy.client_level.enabled:
            metrics["epsilon_hospital_level"] = hospital_level_epsilon(self.cfg, result.server_round)
            metrics["hospital_noise_std"] = float(result.record.hospital_noise_std or 0.0)
        metrics["hospitals_aggregated"] = participants
        metrics["bytes_sent"] = 2.0 * self.adapter_bytes * participants  # adapter down and up, per hospital
        metrics["round_seconds"] = result.seconds
        self.tracker.log_metrics(metrics, step=result.server_round)
        if self.metrics is not None:
            self.metrics.on_round(result.server_round, {h: s["epsilon"] for h, s in self.spend.items()},
                                  result.central, participants)
        save_checkpoint(self.output_dir, current_arrays(context), Checkpoint(
            server_round=result.server_round, arrays_file=f"round-{result.server_round:04d}.npz",
            mlflow_run_id=self.tracker.run_id, convergence_streak=self.monitor.streak,
            last_loss=self.monitor.last_loss,
            initial_metrics=self.workflow.outcome.initial_metrics,
            server_optimizer_steps=self.server_optimizer.steps,
            server_optimizer=asdict(self.server_optimizer.settings),
        ), (self.server_optimizer.first_moment, self.server_optimizer.second_moment))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.central.items()))
        print(f"[round {result.server_round}/{self.cfg.federation.num_rounds}] {shown}, "
              f"max epsilon {metrics['epsilon_max']:.3f}, {result.seconds:.1f}s", flush=True)
        events.info("round", extra={"round": result.server_round, "rounds": self.cfg.federation.num_rounds,
                                    "scores": {k: round(v, 4) for k, v in result.central.items()},  # server's test
                                    "epsilon_max": round(metrics["epsilon_max"], 4), "hospitals": participants,
                                    "seconds": round(result.seconds, 1)})

    def run(self, grid: Grid, context: Context) -> dict[str, Any]:
        cfg = self.cfg
        cp = self.checkpoint
        self.monitor = ConvergenceMonitor(cfg.strategy.convergence_threshold, cfg.strategy.patience,
                                          cp.convergence_streak if cp else 0, cp.last_loss if cp else None)
        first_round = cp.server_round + 1 if cp else 1
        self.workflow = FederatedWorkflow(fit_workflow_for(cfg), self.monitor, first_round, self.on_round,
                                          cp.initial_metrics if cp else None, recorder=self.recorder,
                                          before_rounds=self.admit, after_rounds=self.close)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.federation.num_rounds),
                               strategy=self.strategy)
        try:
            with log_context(run_id=self.tracker.run_id or "-"):
                outcome = self.workflow(grid, legacy)
        except BaseException:
            done = self.workflow.outcome.rounds
            self.write_privacy_report(done[-1].server_round if done else first_round - 1)
            self.tracker.end("FAILED")
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
        summary = self.finish(outcome, current_arrays(legacy), first_round)
        self.tracker.end("FINISHED")
        return summary

    def write_privacy_report(self, rounds: int) -> dict[str, Any]:
        """JSON and Markdown, in the output folder and in MLflow; also for a run that failed or was refused."""
        report = build_report(self.cfg, self.tracker.run_id, self.spend, rounds, self.admission, self.closing)
        save_report(self.output_dir, self.tracker, report)
        return report

    def finish(self, outcome: LoopOutcome, arrays: NDArrays, first_round: int) -> dict[str, Any]:
        load_adapter_arrays(self.model, arrays)
        last = outcome.rounds[-1] if outcome.rounds else None
        rounds = last.server_round if last else first_round - 1
        report = self.write_privacy_report(rounds)
        adapter_dir = save_model(self.output_dir, self.tracker, self.cfg, self.model, self.label_names)
        model_version = self.tracker.register_model(*self.version_tags(report, rounds), newest=self.cfg.privacy.enabled)
        summary = {
            "rounds_completed": rounds,
            "stopped_early": outcome.stopped_early,
            "initial_metrics": outcome.initial_metrics,
            "final_metrics": last.central if last else {},
            "federated_metrics": last.distributed if last else {},
            "epsilon_per_client": {h: s["epsilon"] for h, s in self.spend.items()},
            "noise_multiplier": {h: s["noise_multiplier"] for h, s in self.spend.items()},
            "delta": self.cfg.privacy.delta,
            "epsilon_hospital_level": report["guarantees"][1]["epsilon"] if len(report["guarantees"]) > 1 else None,
            "ledger": self.closing,
            "round_seconds": {str(r.server_round): r.seconds for r in outcome.rounds},
            "mlflow_run_id": self.tracker.run_id,
            "mlflow_model": model_version,
            "adapter_path": str(adapter_dir),
        }
        (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary


    def version_tags(self, report: dict[str, Any], rounds: int) -> tuple[dict[str, str], str]:
        """What a registry reader needs to choose a version: the guarantee per hospital as the accountant gave it,
        the data and the run; and a one-paragraph description."""
        cfg = self.cfg
        tags = {"run_id": self.tracker.run_id, "base_model": cfg.model.name, "task": cfg.task.name,
                "dataset": cfg.data.name, "rounds": str(rounds), "hospitals": str(len(self.spend)),
                "delta": f"{cfg.privacy.delta:g}", "accountant": cfg.privacy.accountant,
                "secure_aggregation": report["secure_aggregation"]["protocol"]}
        tags.update({f"epsilon.{hospital}": f"{spend['epsilon']:.4f}" for hospital, spend in self.spend.items()})
        weakest = max((s["epsilon"] for s in self.spend.values()), default=None)
        guarantee = (f"record-level epsilon at most {weakest:.3f} per hospital at delta {cfg.privacy.delta:g} "
                     f"({cfg.privacy.accountant} accountant)" if cfg.privacy.enabled and weakest is not None
                     else "no differential privacy")
        description = (f"LoRA adapters for {cfg.model.name} ({cfg.task.name}) trained federated on {cfg.data.name} "
                       f"by {len(self.spend)} hospitals over {rounds} rounds; {guarantee}. Load with "
                       f"mlflow.pyfunc.load_model or serve with fl-gateway replica.")
        return tags, description


def run_server(grid: Grid, context: Context, cfg: AppConfig) -> dict[str, Any]:
    quiet_libraries()
    configure_tracing("fl-serverapp")
    if cfg.log_format == "json" and not events.handlers:  # a deployed ServerApp: no fl-simulate console around it
        json_logs(sys.stderr, "fl-serverapp")
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    return FederatedRun(cfg).run(grid, context)


def build_server_app(overrides: Sequence[str] | None = None) -> ServerApp:
    """A ServerApp for these overrides; None reads them from the run config (deployment: fl_core.run_config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        chosen = overrides if overrides is not None else run_overrides(context.run_config)
        run_server(grid, context, to_app_config(compose_config(chosen)))

    return app


app = build_server_app()
