"""Server-side pieces without a simulation: privacy cross-check, convergence stop, checkpoints."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fl_server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fl_server.server_app import hospital_privacy
from fl_server.workflow import ConvergenceMonitor, RoundResult
from privacy.accountant import AccountantState
from strategies.fedprox import RecordingFedProx, RoundRecord, weighted_average
from tests.conftest import tiny_config
from tests.servers import free_port


def _round_with(history: AccountantState, reported_epsilon: float) -> RoundResult:
    sigma, q, _ = history.history[-1]
    metrics = {"epsilon": reported_epsilon, "noise_multiplier": sigma, "sample_rate": q, "steps": history.steps,
               "accountant": history.to_json()}
    return RoundResult(2, RoundRecord(2, 100, {"hospital-0": metrics}), {}, {}, 1.0)


def test_privacy_cross_check_accepts_a_history_whose_sigma_changed_on_resume() -> None:
    history = AccountantState(((0.8, 0.02, 50), (0.9, 0.02, 50)))  # recalibrated after a resume
    spend = hospital_privacy(_round_with(history, history.epsilon(1e-5)), tiny_config())
    assert spend["hospital-0"]["epsilon"] == history.epsilon(1e-5) and spend["hospital-0"]["steps"] == 100


def test_privacy_cross_check_rejects_an_epsilon_its_history_does_not_give() -> None:
    history = AccountantState(((0.8, 0.02, 100),))
    with pytest.raises(RuntimeError, match="hospital-0"):
        hospital_privacy(_round_with(history, 0.9 * history.epsilon(1e-5)), tiny_config())


def test_convergence_needs_patience_rounds_of_small_relative_change() -> None:
    monitor = ConvergenceMonitor(threshold=0.01, patience=2)
    assert not monitor.update(2.0)
    assert not monitor.update(1.5)     # 25% change
    assert not monitor.update(1.499)   # small change, streak 1
    assert not monitor.update(1.2)     # large change resets the streak
    assert not monitor.update(1.1995)
    assert monitor.update(1.199)       # second small change in a row


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    moments = ([a + 1 for a in arrays], [a * 2 for a in arrays])
    save_checkpoint(tmp_path, arrays, Checkpoint(3, "round-0003.npz", "run-id", 1, 0.5, {"loss": 3.0}, 3), moments)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    checkpoint, restored, (first, second) = loaded
    assert (checkpoint.server_round, checkpoint.mlflow_run_id, checkpoint.last_loss) == (3, "run-id", 0.5)
    assert checkpoint.server_optimizer_steps == 3
    for saved, back in ((arrays, restored), (moments[0], first), (moments[1], second)):
        assert len(back) == 2 and all(np.array_equal(a, b) for a, b in zip(saved, back, strict=True))
    save_checkpoint(tmp_path, arrays, Checkpoint(4, "round-0004.npz"))  # plain averaging: no moments kept
    assert load_checkpoint(tmp_path)[2] == ([], [])  # type: ignore[index]
    assert load_checkpoint(tmp_path / "empty") is None


def test_weighted_average_weights_by_examples_and_skips_text() -> None:
    averaged = weighted_average([(100, {"loss": 1.0, "hospital": "a"}), (300, {"loss": 2.0, "hospital": "b"})])
    assert averaged == {"loss": pytest.approx(1.75)}


class _Hospital(ClientProxy):
    """A connected node as the client manager sees it; rounds here only sample it, never message it."""

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def sampled(stage: str, rejoin_timeout: float, rejoin_after: float) -> list[str]:
    """Hospitals a round's `stage` (fit or evaluate) asks when admitted hospital `c` reconnects after a while."""
    manager = SimpleClientManager()
    for cid in ("a", "b", "outsider"):
        manager.register(_Hospital(cid))
    strategy = RecordingFedProx(proximal_mu=0.0, min_participants=2, initial_arrays=[np.zeros(2, np.float32)],
                                rejoin_timeout=rejoin_timeout)
    strategy.admitted = {"a", "b", "c"}
    rejoin = threading.Timer(rejoin_after, lambda: manager.register(_Hospital("c")))
    rejoin.start()
    parameters = ndarrays_to_parameters([np.zeros(2, np.float32)])
    configure = strategy.configure_fit if stage == "fit" else strategy.configure_evaluate
    chosen = sorted(proxy.cid for proxy, _ in configure(1, parameters, manager))
    rejoin.cancel()
    return chosen


def test_a_training_round_waits_for_an_admitted_hospital_that_is_reconnecting() -> None:
    assert sampled("fit", rejoin_timeout=10.0, rejoin_after=1.0) == ["a", "b", "c"]


def test_a_round_goes_on_without_a_hospital_that_stays_away_past_the_rejoin_timeout() -> None:
    assert sampled("fit", rejoin_timeout=0.5, rejoin_after=3.0) == ["a", "b"]


def test_evaluation_asks_the_connected_hospitals_without_waiting() -> None:
    assert sampled("evaluate", rejoin_timeout=10.0, rejoin_after=3.0) == ["a", "b"]


def test_a_long_round_shows_its_progress_on_a_terminal_only() -> None:
    import io

    from fl_core.console import round_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    with round_progress(2, 3, expected_seconds=0.1, stream=terminal, interval=0.02):
        deadline = time.monotonic() + 30  # a loaded machine may tick late: wait for the full bar, not a fixed time
        while "#" * 20 not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    shown = terminal.getvalue()
    assert shown.startswith("\r[round 2/3] training on the hospitals' nodes, 0s [")
    assert "[" + "#" * 20 + "]" in shown and shown.endswith("\r\033[K")  # full after the expected length, then cleared
    with round_progress(2, 3, expected_seconds=0.1, stream=log, interval=0.02):
        time.sleep(0.05)
    assert log.getvalue() == ""  # a log or a pipe gets the round's own line only


def test_the_run_log_keeps_why_a_run_failed_and_a_metrics_port_is_free_after_its_run(tmp_path: Path) -> None:
    from fl_core.console import run_console
    from fl_server.training_metrics import TrainingMetrics

    with pytest.raises(ValueError, match="boom"), run_console(tmp_path, False, "fl-simulate"):
        print("[round 1/2] ...")
        raise ValueError("boom")
    log = (tmp_path / "fl-simulate.log").read_text()
    assert "[round 1/2]" in log and "ValueError: boom" in log
    port = free_port()
    for _ in range(2):  # two runs of a sweep in one process, one port
        metrics = TrainingMetrics("run", port, "127.0.0.1")
        assert metrics.server is not None
        metrics.close()
