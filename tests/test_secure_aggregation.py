"""SecAgg+ through our server loop: the masked sum equals plain FedProx; a halted round fails the run; hospital-level
DP clips on the node, weighs hospitals equally, and scales its noise to the updates that actually arrived."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, NDArrays, Scalar
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fl_client.client_app import run_config
from fl_client.mods import make_hospital_level_clipping, make_secure_aggregation_as_admitted
from fl_server.server_app import fit_workflow_for, server_optimizer_for, strategy_for
from fl_server.workflow import ConvergenceMonitor, FederatedWorkflow, RoundNotAggregatedError, current_arrays
from strategies.fedprox import RecordingFedProx
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

EXAMPLES = (100, 300, 600)
SHAPES = ((64, 32), (32,))  # 2,080 coordinates: enough to measure the noise's standard deviation to about 2%


def hospital_update(partition: int) -> NDArrays:
    rng = np.random.default_rng(partition)
    return [rng.normal(0, 0.05, shape).astype(np.float32) for shape in SHAPES]


class FixedUpdateClient(NumPyClient):
    """A hospital whose update is known in advance, so the expected aggregate is exact; `drops` fails its fit."""

    def __init__(self, partition: int, weight: int | None = None, drops: bool = False) -> None:
        self.partition = partition
        self.weight = EXAMPLES[partition] if weight is None else weight
        self.drops = drops

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if self.drops:
            raise ConnectionError(f"h{self.partition} went offline mid-round")
        metrics: dict[str, Scalar] = {"hospital": f"h{self.partition}", "proximal_mu": config["proximal_mu"]}
        return hospital_update(self.partition), self.weight, metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, EXAMPLES[self.partition], {}


PROXIMAL_MU = 0.25


def aggregate_once(client_runs_secagg: bool, *overrides: str, dropout: int | None = None,
                   ) -> tuple[NDArrays, RecordingFedProx]:
    overrides = ("strategy.secagg.max_weight=1000", "federation.num_clients=3", *overrides)
    cfg = tiny_config(*overrides)
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        zeros = [np.zeros_like(a) for a in hospital_update(0)]
        recorder = RecordingFedProx(proximal_mu=PROXIMAL_MU, min_participants=2 if dropout is not None else 3,
                                    initial_arrays=zeros)
        result["strategy"] = recorder
        deadline = time.monotonic() + 120  # every node registered first: with 2 of 3 the sample would be 2
        while len(list(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1),
                               strategy=strategy_for(cfg, recorder, server_optimizer_for(cfg)))
        FederatedWorkflow(fit_workflow_for(cfg), ConvergenceMonitor(0.0, 1), 1, lambda *_: None,
                          recorder=recorder)(grid, legacy)
        result["aggregate"] = current_arrays(legacy)

    client_level = cfg.privacy.client_level.enabled

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        # As HospitalClient does: under hospital-level DP every hospital weighs 1.
        partition = int(context.node_config["partition-id"])
        return FixedUpdateClient(partition, 1 if client_level else None, drops=partition == dropout).to_client()

    mods = [secaggplus_mod] if client_runs_secagg else []
    if client_level:  # our ClientApp's own mods, in its order: SecAgg+ (as admitted) outside, clipping inside
        mods = [make_secure_aggregation_as_admitted(lambda c: run_config(c, overrides)),
                make_hospital_level_clipping(lambda c: run_config(c, overrides))]
    client = ClientApp(client_fn=client_fn, mods=mods)
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


def clipped_updates(clip: float, partitions: tuple[int, ...]) -> list[NDArrays]:
    clipped = []
    for p in partitions:
        update = hospital_update(p)
        norm = float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in update)))
        assert norm > clip  # every update is long enough to be clipped
        clipped.append([a * (clip / norm) for a in update])
    return clipped


def test_hospital_level_dp_clips_each_update_inside_secagg_and_weighs_hospitals_equally() -> None:
    """With a server learning rate of 2 on top: the model moves twice the mean update (from zeros here)."""
    clip = 0.2
    aggregate, strategy = aggregate_once(True, "privacy.client_level.enabled=true",
                                         f"privacy.client_level.clipping_norm={clip}",
                                         "privacy.client_level.noise_multiplier=0.0",
                                         "strategy.server_optimizer.name=momentum", "strategy.server_optimizer.lr=2",
                                         "strategy.server_optimizer.momentum=0")
    assert 1 in strategy.rounds  # the wrapped round aggregated
    clipped = clipped_updates(clip, (0, 1, 2))
    for i, got in enumerate(aggregate):
        expected = 2 * sum(c[i] for c in clipped) / 3  # uniform mean of clipped updates, not example-weighted
        assert float(np.abs(got - expected).max()) < 5e-5


def test_hospital_level_noise_is_scaled_to_the_hospitals_that_arrived_when_one_drops_out() -> None:
    """Hospital 2 fails mid-round; SecAgg+ aggregates the other two. The noise on their mean must have std
    sigma * C / 2, not sigma * C / 3 as a fixed roster would give (the audit's effective noise multiplier 0.674)."""
    clip, sigma = 0.2, 1.0
    aggregate, strategy = aggregate_once(True, "privacy.client_level.enabled=true",
                                         f"privacy.client_level.clipping_norm={clip}",
                                         f"privacy.client_level.noise_multiplier={sigma}",
                                         "federation.min_participants=2",
                                         "strategy.secagg.reconstruction_threshold=2", dropout=2)
    record = strategy.rounds[1]
    assert sorted(record.client_metrics) == ["h0", "h1"]
    assert record.hospital_noise_std == pytest.approx(sigma * clip / 2)
    clipped = clipped_updates(clip, (0, 1))
    noise = np.concatenate([(got - sum(c[i] for c in clipped) / 2).ravel() for i, got in enumerate(aggregate)])
    assert float(np.std(noise)) == pytest.approx(sigma * clip / 2, rel=0.06)  # 3 standard errors of 2,080 draws
    assert abs(float(np.mean(noise))) < 4 * sigma * clip / 2 / np.sqrt(noise.size)
