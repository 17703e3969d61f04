"""The server optimisers take Flower's FedAvgM, FedAdam and FedYogi steps, from the model the hospitals were sent."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvgM, FedYogi, Strategy

from fl_core.config import ConfigError, ServerOptimizerConfig
from fl_server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fl_server.server_app import server_optimizer_for, strategy_for
from strategies.fedprox import RecordingFedProx
from strategies.hospital_dp import HospitalLevelDP
from strategies.server_optimized import ServerOptimized
from strategies.server_optimizer import ServerOptimizer, ServerOptimizerError
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
    second_half.restore(asdict(settings), first_half.steps, first_half.first_moment, first_half.second_moment,
                        model=resumed)
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
    ("strategy.server_optimizer.beta_1=1", "strategy.server_optimizer.beta_1"),
    ("strategy.server_optimizer.beta_2=-0.1", "strategy.server_optimizer.beta_2"),
    ("strategy.server_optimizer.tau=0", "strategy.server_optimizer.tau"),
])
def test_bad_server_optimiser_settings_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        tiny_config(override)


def test_the_server_step_wraps_hospital_level_noise_so_it_only_post_processes_the_release() -> None:
    cfg = tiny_config("privacy.client_level.enabled=true", "strategy.server_optimizer.name=adam")
    recorder = RecordingFedProx(proximal_mu=0.0, min_participants=2, initial_arrays=[np.zeros(2)])
    strategy = strategy_for(cfg, recorder, server_optimizer_for(cfg))
    assert isinstance(strategy, ServerOptimized) and isinstance(strategy.strategy, HospitalLevelDP)
    assert strategy.strategy.strategy is recorder
    plain = tiny_config()
    assert strategy_for(plain, recorder, server_optimizer_for(plain)) is recorder


def model() -> list[np.ndarray]:
    return [np.zeros((3, 4), dtype=np.float32), np.zeros(4, dtype=np.float32)]


@pytest.mark.parametrize("saved, steps, first, second", [
    ({"name": "momentum"}, 2, [np.ones((3, 4)), np.ones(4)], []),  # other settings wrote it
    (None, 2, [], []),  # its moments file is gone
    (None, 2, [np.ones(4), np.ones((3, 4))], [np.ones(4), np.ones((3, 4))]),  # shapes of another model
    (None, 2, [np.full((3, 4), np.nan), np.ones(4)], [np.ones((3, 4)), np.ones(4)]),
])
def test_a_checkpoint_state_that_does_not_fit_is_refused(saved: dict[str, object] | None, steps: int,
                                                        first: list[np.ndarray], second: list[np.ndarray]) -> None:
    settings = ServerOptimizerConfig("adam", lr=0.1)
    optimizer = ServerOptimizer(settings)
    with pytest.raises(ServerOptimizerError, match=r"^strategy\.server_optimizer: "):
        optimizer.restore(asdict(settings) if saved is None else saved, steps, first, second, model=model())
    assert optimizer.steps == 0 and optimizer.first_moment == []


def test_a_plain_averaging_checkpoint_resumes_only_as_plain_averaging() -> None:
    """It took no server steps, yet a server step from its middle on would be another run's trajectory."""
    plain = asdict(ServerOptimizerConfig("none"))
    with pytest.raises(ServerOptimizerError, match=r"^strategy\.server_optimizer: the checkpoint was written with"):
        ServerOptimizer(ServerOptimizerConfig("momentum", lr=1.5, momentum=0.0)).restore(plain, 0, [], [], model())
    resumed = ServerOptimizer(ServerOptimizerConfig("none", lr=1.5, momentum=0.0))  # unused by `none`
    resumed.restore(plain, 0, [], [], model())
    assert resumed.steps == 0


def test_a_step_that_is_not_finite_changes_nothing_and_the_bound_holds_the_model() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig("momentum", lr=3.0, momentum=0.9), bound=1.0)
    first = optimizer.step(model(), [np.full((3, 4), 0.5), np.full(4, -0.2)])
    assert first[0].max() == 1.0 and np.allclose(first[1], -0.6)  # 3 * 0.5 clipped to the bound
    buffer = [m.copy() for m in optimizer.first_moment]
    with pytest.raises(ServerOptimizerError, match="not finite"):
        optimizer.step(first, [np.full((3, 4), np.inf), np.zeros(4)])
    assert optimizer.steps == 1 and all(np.array_equal(a, b) for a, b in zip(buffer, optimizer.first_moment,
                                                                              strict=True))


class TwoRounds(Strategy):
    """An inner strategy whose aggregate is fixed per round (None in round 3: nothing aggregated)."""

    def __init__(self) -> None:
        self.aggregates = {1: [np.full(2, 1.0)], 2: [np.full(2, 3.0)], 3: None, 4: [np.full(2, 9.0)]}

    def aggregate_fit(self, server_round, results, failures):
        arrays = self.aggregates[server_round]
        return (None if arrays is None else ndarrays_to_parameters(arrays)), {}

    def configure_fit(self, server_round, parameters, client_manager):
        return []

    initialize_parameters = configure_evaluate = aggregate_evaluate = evaluate = None  # type: ignore[assignment]


def test_the_wrapper_steps_from_the_model_each_round_was_sent_and_keeps_state_on_a_failed_round() -> None:
    wrapped = ServerOptimized(TwoRounds(), ServerOptimizer(ServerOptimizerConfig("momentum", lr=1.0, momentum=0.5)))
    wrapped.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), None)  # type: ignore[arg-type]
    one, _ = wrapped.aggregate_fit(1, [], [])
    assert one is not None and np.allclose(parameters_to_ndarrays(one)[0], 1.0)
    # round 2 is sent 2.0 (say, a resumed or evaluated model), not round 1's output: the step starts there
    wrapped.configure_fit(2, ndarrays_to_parameters([np.full(2, 2.0)]), None)  # type: ignore[arg-type]
    two, _ = wrapped.aggregate_fit(2, [], [])
    assert two is not None and np.allclose(parameters_to_ndarrays(two)[0], 2.0 + 0.5 * 1.0 + (3.0 - 2.0))
    wrapped.configure_fit(3, ndarrays_to_parameters([np.full(2, 3.5)]), None)  # type: ignore[arg-type]
    assert wrapped.aggregate_fit(3, [], []) == (None, {})
    assert wrapped.optimizer.steps == 2 and np.allclose(wrapped.optimizer.first_moment[0], 1.5)
    with pytest.raises(ServerOptimizerError, match="never configured"):  # fails the run: no step from a guess
        wrapped.aggregate_fit(4, [], [])
    wrapped.strategy.aggregates[5] = [np.full(2, np.nan)]  # type: ignore[attr-defined]
    wrapped.configure_fit(5, ndarrays_to_parameters([np.full(2, 3.5)]), None)  # type: ignore[arg-type]
    with pytest.raises(ServerOptimizerError, match="not finite"):
        wrapped.aggregate_fit(5, [], [])
    assert wrapped.optimizer.steps == 2


def test_a_resumed_run_continues_the_checkpointed_buffer_or_refuses_before_any_hospital(tmp_path: Path) -> None:
    cfg = tiny_config("strategy.server_optimizer.name=momentum", "strategy.server_optimizer.momentum=0.5")
    arrays = model()
    buffer = [np.full((3, 4), 0.25), np.full(4, -0.5)]
    settings = asdict(cfg.strategy.server_optimizer)
    save_checkpoint(tmp_path, arrays, Checkpoint(2, "round-0002.npz", server_optimizer_steps=2,
                                                 server_optimizer=settings), (buffer, []))
    resumed = server_optimizer_for(cfg, load_checkpoint(tmp_path))
    assert resumed.steps == 2
    assert all(np.array_equal(a, b) for a, b in zip(resumed.first_moment, buffer, strict=True))
    other = tiny_config("strategy.server_optimizer.name=momentum", "strategy.server_optimizer.momentum=0.9")
    with pytest.raises(ServerOptimizerError, match="written with"):
        server_optimizer_for(other, load_checkpoint(tmp_path))
    save_checkpoint(tmp_path, arrays, Checkpoint(3, "round-0003.npz", server_optimizer_steps=3), (buffer, []))
    with pytest.raises(ServerOptimizerError, match="does not record the settings"):
        server_optimizer_for(cfg, load_checkpoint(tmp_path))
