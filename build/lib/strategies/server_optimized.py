"""The server optimiser on Flower's legacy strategy API: the outermost wrapper, so it steps from the aggregate *after*
hospital-level noise (post-processing: no privacy cost) and from the model the hospitals were really sent."""

from __future__ import annotations

from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from .delegating import DelegatingStrategy
from .server_optimizer import Arrays, ServerOptimizer, ServerOptimizerError


class ServerOptimized(DelegatingStrategy):
    """Delegates everything to `strategy`; a round's aggregate becomes `optimizer.step(sent, aggregate)`."""

    def __init__(self, strategy: Strategy, optimizer: ServerOptimizer) -> None:
        super().__init__(strategy)
        self.optimizer = optimizer
        self.sent: tuple[int, Arrays] | None = None  # (round, the model its hospitals started from)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.sent = (server_round, parameters_to_ndarrays(parameters))
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The stepped aggregate; None when the inner strategy aggregated nothing. A step that cannot be taken (a
        round never configured, a model that would not be finite) raises ServerOptimizerError and fails the run: the
        inner recorder has already counted the round, so returning None would go on with the old weights."""
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        sent, self.sent = self.sent, None
        if parameters is None:
            return None, {}
        if sent is None or sent[0] != server_round:
            raise ServerOptimizerError(f"server step for round {server_round}: the round was never configured")
        return ndarrays_to_parameters(self.optimizer.step(sent[1], parameters_to_ndarrays(parameters))), metrics
