"""FedProx for DP adapters under SecAgg+, on Flower's legacy strategy API (the only one SecAgg+ runs on).

It adds what the stock strategy lacks for auditable runs: a record of which rounds really aggregated (a halted
SecAgg+ round leaves the old weights in place silently, so the server loop checks this record), each hospital's
plaintext fit metrics (its epsilon spent), float32 aggregates (SecAgg+ dequantises to float64), the run's id in
every fit config (hospitals charge their ledgers against it), and sampling restricted to the hospitals that
admitted the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    MetricsAggregationFn,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedProx

from fl_core.protocol import RUN_ID

from .participation import AdmittedClients

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


@dataclass
class RoundRecord:
    """What one aggregated round produced, kept for tracking and the final report."""

    server_round: int
    num_examples: int
    client_metrics: dict[str, dict[str, Scalar]] = field(default_factory=dict)
    hospital_noise_std: float | None = None  # hospital-level DP: the std of the noise added to this aggregate


def weighted_average(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of every numeric metric, over the hospitals that report it."""
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    averaged: dict[str, Scalar] = {}
    for k in sorted(keys):
        reporting = [(n, float(m[k])) for n, m in metrics if k in m]
        total = sum(n for n, _ in reporting)
        if total:
            averaged[k] = sum(n * v for n, v in reporting) / total
    return averaged


class RecordingFedProx(FedProx):
    """Flower's FedProx plus an auditable record of each aggregated round."""

    def __init__(self, *, proximal_mu: float, min_participants: int, initial_arrays: NDArrays, run_id: str = "",
                 evaluate_fn: EvaluateFn | None = None, federated_evaluation: bool = True,
                 rejoin_timeout: float = 0.0,
                 evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = weighted_average) -> None:
        def round_config(server_round: int) -> dict[str, Scalar]:
            return {"server_round": server_round, RUN_ID: run_id}  # hospitals work only for runs they admitted

        super().__init__(
            proximal_mu=proximal_mu, fraction_fit=1.0,
            fraction_evaluate=1.0 if federated_evaluation else 0.0, min_fit_clients=min_participants,
            min_evaluate_clients=min_participants, min_available_clients=min_participants,
            evaluate_fn=evaluate_fn, initial_parameters=ndarrays_to_parameters(initial_arrays),
            accept_failures=True, fit_metrics_aggregation_fn=weighted_average,
            evaluate_metrics_aggregation_fn=evaluate_metrics_aggregation_fn,
            on_fit_config_fn=round_config, on_evaluate_config_fn=round_config,
        )
        self.min_participants = min_participants
        self.rejoin_timeout = rejoin_timeout
        self.rounds: dict[int, RoundRecord] = {}
        self.admitted: set[str] | None = None  # node ids; None: every connected hospital

    def eligible(self, client_manager: ClientManager, rejoin_timeout: float = 0.0) -> ClientManager:
        """The admitted hospitals, once those that are offline have had `rejoin_timeout` seconds to come back."""
        if self.admitted is None:
            return client_manager
        admitted = AdmittedClients(client_manager, self.admitted)
        admitted.await_admitted(rejoin_timeout)
        return admitted

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return super().configure_fit(server_round, parameters, self.eligible(client_manager, self.rejoin_timeout))

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Evaluation asks whoever is connected: waiting for a hospital is worth it for training rounds only."""
        return super().configure_evaluate(server_round, parameters, self.eligible(client_manager))

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) < self.min_participants:
            return None, {}
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, {}
        arrays = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(parameters)]
        self.rounds[server_round] = RoundRecord(
            server_round, sum(r.num_examples for _, r in results),
            {str(r.metrics.get("hospital", proxy.node_id)): dict(r.metrics) for proxy, r in results},
        )
        return ndarrays_to_parameters(arrays), metrics
