"""SecAgg+ through our server loop: the masked sum equals plain FedProx; a halted round fails the run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, NDArrays, Scalar
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fl_server.server_app import fit_workflow_for
from fl_server.workflow import ConvergenceMonitor, FederatedWorkflow, RoundNotAggregatedError, current_arrays
from strategies.fedprox import RecordingFedProx
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

EXAMPLES = (100, 300, 600)


def hospital_update(partition: int) -> NDArrays:
    rng = np.random.default_rng(partition)
    return [rng.normal(0, 0.05, (16, 8)).astype(np.float32), rng.normal(0, 0.05, (8,)).astype(np.float32)]


class FixedUpdateClient(NumPyClient):
    """A hospital whose update is known in advance, so the expected aggregate is exact."""

    def __init__(self, partition: int) -> None:
        self.partition = partition

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        metrics: dict[str, Scalar] = {"hospital": f"h{self.partition}", "proximal_mu": config["proximal_mu"]}
        return hospital_update(self.partition), EXAMPLES[self.partition], metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, EXAMPLES[self.partition], {}


PROXIMAL_MU = 0.25


def aggregate_once(client_runs_secagg: bool) -> tuple[NDArrays, RecordingFedProx]:
    cfg = tiny_config("strategy.secagg.max_weight=1000", "federation.num_clients=3")
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        zeros = [np.zeros_like(a) for a in hospital_update(0)]
        strategy = RecordingFedProx(proximal_mu=PROXIMAL_MU, min_participants=3, initial_arrays=zeros)
        result["strategy"] = strategy
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        FederatedWorkflow(fit_workflow_for(cfg), ConvergenceMonitor(0.0, 1), 1, lambda *_: None)(grid, legacy)
        result["aggregate"] = current_arrays(legacy)

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return FixedUpdateClient(int(context.node_config["partition-id"])).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if client_runs_secagg else [])
    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
    return result["aggregate"], result["strategy"]


def test_secagg_aggregate_equals_plain_fedprox_within_quantisation() -> None:
    aggregate, strategy = aggregate_once(client_runs_secagg=True)
    # FedProx's mu reached every hospital through Flower's fit config.
    assert {m["proximal_mu"] for m in strategy.rounds[1].client_metrics.values()} == {PROXIMAL_MU}
    weights = np.array(EXAMPLES, dtype=np.float64) / sum(EXAMPLES)
    for i, got in enumerate(aggregate):
        expected = sum(w * hospital_update(p)[i] for p, w in enumerate(weights))
        assert got.dtype == np.float32  # SecAgg+ dequantises to float64; we send float32 on
        error = float(np.abs(got - expected).max())
        # quantisation step 2 * clipping_range / quantization_range, times the summed weight ratios
        assert error < 5e-5
        assert error > 0  # exact equality would mean the masked path was not taken


def test_halted_secure_aggregation_fails_the_run() -> None:
    """Hospitals without the SecAgg+ mod cannot answer the protocol: the run must fail, not keep old weights."""
    with pytest.raises(RoundNotAggregatedError, match="round 1"):
        aggregate_once(client_runs_secagg=False)
