"""The server optimisers take Flower's FedAvgM, FedAdam and FedYogi steps, from the model the hospitals were sent."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvgM, FedYogi, Strategy

from fl_core.config import ConfigError, ServerOptimizerConfig
from fl_server.server_app import strategy_for
from strategies.fedprox import RecordingFedProx
from strategies.hospital_dp import HospitalLevelDP
from strategies.server_optimized import ServerOptimized
from strategies.server_optimizer import ServerOptimizer
from tests.conftest import tiny_config

ROUNDS = 5


def aggregates(rng: np.random.Generator) -> list[list[np.ndarray]]:
    """What each round's average would be: a drifting target plus noise."""
    return [[rng.normal(0.1 * r, 1.0, (3, 4)), rng.normal(-0.05 * r, 0.5, (4,))] for r in range(1, ROUNDS + 1)]


def flower_trajectory(strategy: Strategy, rounds: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Flower's strategy fed one result per round whose weights are that round's average."""
    out = []
    for r, arrays in enumerate(rounds, start=1):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})
        parameters, _ = strategy.aggregate_fit(r, [(None, res)], [])  # type: ignore[list-item]
        assert parameters is not None
        out.append(parameters_to_ndarrays(parameters))
    return out


@pytest.mark.parametrize("name, flower", [
    ("momentum", lambda init: FedAvgM(initial_parameters=init, server_learning_rate=1.5, server_momentum=0.7)),
    ("adam", lambda init: FedAdam(initial_parameters=init, eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)),
    ("yogi", lambda init: FedYogi(initial_parameters=init, eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)),
])
def test_each_optimiser_takes_flowers_steps(name: str, flower) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    initial = [rng.normal(0, 1, (3, 4)), rng.normal(0, 1, (4,))]
    rounds = aggregates(rng)
    expected = flower_trajectory(flower(ndarrays_to_parameters(initial)), rounds)
    ours = ServerOptimizer(ServerOptimizerConfig(name, lr=1.5 if name == "momentum" else 0.05, momentum=0.7,
                                                 beta_1=0.8, beta_2=0.95, tau=1e-3))
    current = initial
    for aggregate, flowers in zip(rounds, expected, strict=True):
        current = ours.step(current, aggregate)
        for a, b in zip(current, flowers, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert ours.steps == ROUNDS


def test_a_restored_optimiser_continues_the_same_trajectory() -> None:
    rng = np.random.default_rng(1)
    rounds = aggregates(rng)
    settings = ServerOptimizerConfig("adam", lr=0.1)
    whole, first_half = ServerOptimizer(settings), ServerOptimizer(settings)
    current = resumed = [np.zeros((3, 4)), np.zeros(4)]
    for aggregate in rounds[:2]:
        current = whole.step(current, aggregate)
        resumed = first_half.step(resumed, aggregate)
    second_half = ServerOptimizer(settings)
    second_half.restore(first_half.steps, first_half.first_moment, first_half.second_moment)
    for aggregate in rounds[2:]:
        current, resumed = whole.step(current, aggregate), second_half.step(resumed, aggregate)
    for a, b in zip(current, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_none_takes_the_aggregate_and_keeps_no_state() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig())
    aggregate = [np.full((2, 2), 3.0)]
    assert np.array_equal(optimizer.step([np.zeros((2, 2))], aggregate)[0], aggregate[0])
    assert optimizer.first_moment == [] and optimizer.second_moment == []


@pytest.mark.parametrize("override, field", [
    ("strategy.server_optimizer.name=sgd", "strategy.server_optimizer.name"),
    ("strategy.server_optimizer.lr=0", "strategy.server_optimizer.lr"),
    ("strategy.server_optimizer.momentum=1.0", "strategy.server_optimizer.momentum"),
    ("strategy.server_optimizer.beta_2=-0.1", "strategy.server_optimizer.beta_2"),
])
def test_bad_server_optimiser_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        tiny_config(override)


def test_the_server_step_wraps_hospital_level_noise_so_it_only_post_processes_the_release() -> None:
    cfg = tiny_config("privacy.client_level.enabled=true", "strategy.server_optimizer.name=adam")
    recorder = RecordingFedProx(proximal_mu=0.0, min_participants=2, initial_arrays=[np.zeros(2)])
    strategy = strategy_for(cfg, recorder, ServerOptimizer(cfg.strategy.server_optimizer))
    assert isinstance(strategy, ServerOptimized) and isinstance(strategy.strategy, HospitalLevelDP)
    assert strategy.strategy.strategy is recorder
    plain = tiny_config()
    assert strategy_for(plain, recorder, ServerOptimizer(plain.strategy.server_optimizer)) is recorder
