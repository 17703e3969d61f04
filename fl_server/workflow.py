"""The server's round loop on Flower's legacy workflow API (the one SecAgg+ runs on).

Flower's DefaultWorkflow runs a fixed number of rounds and lets a halted SecAgg+ round pass silently with the old
weights. This loop runs the same stages, then fails the run when a round aggregated nothing, stops early on
convergence, and checkpoints and tracks every round. Hooks before the first and after the last round let the
hospitals admit the run and close it in their ledgers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord
from flwr.common import NDArrays, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid

from fl_core.console import round_progress
from fl_core.tracing import traced, tracer
from strategies.fedprox import RecordingFedProx, RoundRecord

FitWorkflow = Callable[[Grid, LegacyContext], None]


class RoundNotAggregatedError(RuntimeError):
    """A round produced no new global adapter; continuing would silently train on stale weights."""


@dataclass
class ConvergenceMonitor:
    """Stop when the relative change of the evaluation loss stays under `threshold` for `patience` rounds."""

    threshold: float
    patience: int
    streak: int = 0
    last_loss: float | None = None

    def update(self, loss: float) -> bool:
        if self.last_loss is not None:
            change = abs(loss - self.last_loss) / max(abs(self.last_loss), 1e-12)
            self.streak = self.streak + 1 if change < self.threshold else 0
        self.last_loss = loss
        return self.streak >= self.patience


@dataclass
class RoundResult:
    server_round: int
    record: RoundRecord
    central: dict[str, float]
    distributed: dict[str, float]
    seconds: float


@dataclass
class LoopOutcome:
    rounds: list[RoundResult] = field(default_factory=list)
    initial_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


def _round_metrics(metrics: dict[str, list[tuple[int, Any]]], losses: list[tuple[int, float]],
                   server_round: int) -> dict[str, float]:
    found = {k: float(v) for k, values in metrics.items()
             for r, v in values if r == server_round and isinstance(v, int | float)}
    found.update((("loss", loss) for r, loss in losses if r == server_round))
    return found


def _centralized(context: LegacyContext, server_round: int) -> dict[str, float]:
    return _round_metrics(context.history.metrics_centralized, context.history.losses_centralized, server_round)


def _distributed(context: LegacyContext, server_round: int) -> dict[str, float]:
    return _round_metrics(context.history.metrics_distributed, context.history.losses_distributed, server_round)


class FederatedWorkflow:
    """Init (or resume), then per round: fit (SecAgg+), check, evaluate centrally and federated, report."""

    def __init__(self, fit_workflow: FitWorkflow, monitor: ConvergenceMonitor, first_round: int,
                 on_round: Callable[[RoundResult, LegacyContext], None],
                 initial_metrics: dict[str, float] | None = None, *, recorder: RecordingFedProx | None = None,
                 before_rounds: Callable[[LegacyContext], None] = lambda _: None,
                 after_rounds: Callable[[bool], None] = lambda _: None) -> None:
        self.fit_workflow = fit_workflow
        self.monitor = monitor
        self.first_round = first_round
        self.on_round = on_round
        self.outcome = LoopOutcome(initial_metrics=dict(initial_metrics or {}))
        self.recorder = recorder  # the recording strategy, when context.strategy wraps it (client-level DP)
        self.before_rounds = before_rounds
        self.after_rounds = after_rounds

    def __call__(self, grid: Grid, context: LegacyContext) -> LoopOutcome:
        strategy = self.recorder or context.strategy
        assert isinstance(strategy, RecordingFedProx)
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        registered.wait()
        succeeded = False
        try:
            self.before_rounds(context)
            default_init_params_workflow(grid, context)
            if self.first_round == 1:
                self.outcome.initial_metrics = _centralized(context, 0)
            round_config = ConfigRecord({Key.START_TIME: time.perf_counter()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = round_config
            for server_round in range(self.first_round, context.config.num_rounds + 1):
                started = time.perf_counter()
                round_config[Key.CURRENT_ROUND] = server_round
                expected = self.outcome.rounds[-1].seconds if self.outcome.rounds else None
                with traced(f"round {server_round}") as span:  # the round's checkpoint and report in it too
                    with round_progress(server_round, context.config.num_rounds, expected):
                        with traced("fit"):
                            self.fit_workflow(grid, context)
                        record = strategy.rounds.get(server_round)
                        if record is None:
                            raise RoundNotAggregatedError(
                                f"round {server_round}: no aggregate (secure aggregation halted or fewer than "
                                f"{strategy.min_participants} hospitals returned an update); the run stops rather "
                                "than keep the previous global adapter")
                        for hospital in sorted(record.client_metrics):  # who replied; no value of what they sent
                            tracer.start_span("reply", attributes={"fl.hospital": hospital}).end()
                        span.set_attribute("fl.hospitals_aggregated", len(record.client_metrics))
                        with traced("evaluate"):
                            default_centralized_evaluation_workflow(grid, context)
                            default_evaluate_workflow(grid, context)
                            central = _centralized(context, server_round)
                    result = RoundResult(server_round, record, central, _distributed(context, server_round),
                                         time.perf_counter() - started)
                    self.outcome.rounds.append(result)
                    converged = "loss" in central and self.monitor.update(central["loss"])
                    self.on_round(result, context)  # after the monitor update, so checkpoints carry its state
                if converged:
                    self.outcome.stopped_early = server_round < context.config.num_rounds
                    break
            succeeded = True
        finally:
            self.after_rounds(succeeded)
            stop.set()
            thread.join()
        return self.outcome


def current_arrays(context: LegacyContext) -> NDArrays:
    """The global adapter as the workflow holds it now."""
    parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return parameters_to_ndarrays(parameters)
