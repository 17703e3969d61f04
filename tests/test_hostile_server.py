"""A hostile server against real nodes: Flower simulations whose ServerApp sends what an attacker would.

The nodes run the product's own ClientApp (Ray actors, one per hospital). The ServerApp speaks Flower's Message API
directly, so nothing of our server code keeps it honest. Two Flower runs share the hospitals' ledgers:

1. a compliant config (SecAgg+, sigma calibrated): it asks for the adapter before and after admission, sends
   plaintext fits to a SecAgg+ run, evaluates without federated evaluation, and locks a budget with made-up
   admissions, which the node's reservation timeout then frees;
2. a config that breaks hospital-0's policy (no SecAgg+, sigma fixed and small): it reuses run 1's admission, tries
   to close another run's, trains before admission, sends a NaN adapter as a probe, trains hospital-1 past its one
   admitted round, and asks for another proximal term.

After each attack the test checks what came back: not one reply to a non-compliant request carries anything but
a refusal, and every compliant reply carries only declared fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.common import (
    EvaluateIns,
    FitIns,
    GetParametersIns,
    GetPropertiesIns,
    Message,
    MessageType,
    ndarrays_to_parameters,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fl_client.client_app import build_client_app
from fl_client.mods import check_reply
from fl_core.model import adapter_to_arrays, build_model, load_tokenizer
from fl_core.protocol import ADMIT, LEDGER_ACTION, RUN_ID
from privacy.ledger import ABORTED, Ledger
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

BASE = ["model=tiny", "data.max_train_examples=200", "data.max_test_examples=40", "train.batch_size=32",
        "train.device=cpu", "train.num_threads=1", "federation.num_clients=2", "federation.min_participants=2"]
COMPLIANT = [*BASE, "federation.num_rounds=2"]
HOSTILE = [*BASE, "federation.num_rounds=1", "strategy.secagg.enabled=false", "privacy.noise_multiplier=0.3"]
TIMEOUT = 10.0  # each node's reservation-timeout, seconds


class Attacker:
    """Sends one legacy message to one node and keeps the reply."""

    def __init__(self, grid: Grid, overrides: list[str]) -> None:
        self.grid = grid
        deadline = time.monotonic() + 60
        while len(grid.get_node_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        self.nodes = sorted(grid.get_node_ids())
        cfg = tiny_config(*overrides)
        self.arrays = adapter_to_arrays(build_model(cfg, load_tokenizer(cfg.model), 22, torch.device("cpu")))
        self.mu = cfg.strategy.proximal_mu
        self.hospital: dict[str, int] = {}

    def send(self, node: int, message_type: str, content: Any) -> Message:
        (reply,) = self.grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type)],
                                              timeout=120)
        return reply

    def properties(self, node: int, config: dict[str, Any]) -> Message:
        return self.send(node, MessageTypeLegacy.GET_PROPERTIES,
                         compat.getpropertiesins_to_recorddict(GetPropertiesIns(config)))

    def ask(self, node: int, action: str, run_id: str) -> dict[str, Any]:
        reply = self.properties(node, {LEDGER_ACTION: action, RUN_ID: run_id})
        answer = dict(compat.recorddict_to_getpropertiesres(reply.content).properties)
        self.hospital[str(answer["hospital"])] = node
        return answer

    def admit(self, node: int, run_id: str) -> dict[str, Any]:
        return self.ask(node, ADMIT, run_id)

    def identify(self) -> None:
        """Which node is which hospital: a request every node refuses, naming itself."""
        for node in self.nodes:
            self.ask(node, "who-are-you", "")

    def fit(self, node: int, run_id: str, mu: float | None = None, arrays: list[Any] | None = None) -> Message:
        config = {RUN_ID: run_id, "proximal_mu": self.mu if mu is None else mu}
        return self.send(node, MessageType.TRAIN, compat.fitins_to_recorddict(
            FitIns(ndarrays_to_parameters(self.arrays if arrays is None else arrays), config), keep_input=True))

    def evaluate(self, node: int, run_id: str) -> Message:
        return self.send(node, MessageType.EVALUATE, compat.evaluateins_to_recorddict(
            EvaluateIns(ndarrays_to_parameters(self.arrays), {RUN_ID: run_id}), keep_input=True))

    def parameters(self, node: int, run_id: str) -> Message:
        return self.send(node, MessageTypeLegacy.GET_PARAMETERS,
                         compat.getparametersins_to_recorddict(GetParametersIns({RUN_ID: run_id})))


def refused(reply: Message, why: str) -> bool:
    """A refusal carries nothing: no records at all, only Flower's error with the node's reason."""
    content_empty = not reply.has_content() or not (
        reply.content.array_records or reply.content.metric_records or reply.content.config_records)
    return reply.has_error() and content_empty and why in reply.error.reason


def simulate(overrides: list[str], attack: Callable[[Attacker], None]) -> None:
    app = ServerApp()
    failures: list[BaseException] = []

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        try:
            attack(Attacker(grid, overrides))
        except BaseException as err:  # the assertion inside the ServerApp thread, surfaced to the test
            failures.append(err)

    run_simulation(server_app=app, client_app=build_client_app(overrides), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    if failures:
        raise failures[0]


def test_a_hostile_server_gets_nothing_the_nodes_did_not_admit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    home = tmp_path / "nodes"
    for hospital in ("hospital-0", "hospital-1"):
        (home / hospital).mkdir(parents=True)
        (home / hospital / "node.toml").write_text(f"reservation-timeout = {TIMEOUT}\n")
    (home / "hospital-0" / "policy.yaml").write_text("require_secure_aggregation: true\nmin_noise_multiplier: 0.5\n")
    monkeypatch.setenv("FEDERATED_DP_LLM_NODE_HOME", str(home))
    ledger0, ledger1 = (Ledger(home / h / "ledger.sqlite") for h in ("hospital-0", "hospital-1"))

    def compliant_run(attacker: Attacker) -> None:
        attacker.identify()
        node0, node1 = attacker.hospital["hospital-0"], attacker.hospital["hospital-1"]
        assert refused(attacker.parameters(node0, "L"), "only as the result of an admitted round")
        assert refused(attacker.fit(node0, "L"), "a plaintext training request is refused")  # SecAgg+ or nothing
        assert refused(attacker.evaluate(node0, "L"), "federated evaluation is not part of the plan")
        assert attacker.admit(node0, "L")["admitted"] is True
        assert refused(attacker.fit(node0, "L"), "a plaintext training request is refused")  # a SecAgg+ run
        assert refused(attacker.parameters(node0, "L"), "only as the result of an admitted round")
        assert refused(attacker.evaluate(node0, "L"), "federated evaluation is not part of the plan")
        # Made-up admissions hold a budget only until the node's reservation timeout.
        ledger1.set_budget("hospital-1", 1.05 * float(attacker.admit(node1, "fake-0")["lifetime_epsilon"]), 1e-5)
        assert attacker.admit(node1, "fake-1")["admitted"] is False  # fake-0 holds the whole budget
        assert attacker.admit(node1, "real")["admitted"] is False
        time.sleep(TIMEOUT + 1)
        assert attacker.admit(node1, "real")["admitted"] is True  # fake-0's run never spoke again: it expired

    simulate(COMPLIANT, compliant_run)
    fake = ledger1.entry("fake-0", "hospital-1", "icd10")
    assert fake is not None and fake.status == ABORTED and "expired" in str(fake.closed_reason)
    assert all(e.spent.steps == 0 for e in [*ledger0.entries(), *ledger1.entries()])  # nothing was trained
    # The mod's refusals (plaintext fits to a SecAgg+ run) are in hospital-0's own history too.
    assert any("plaintext training request" in str(r["reason"]) for r in ledger0.refusals())
    ledger1.set_budget("hospital-1", 1e9, 1e-5)

    def hostile_run(attacker: Attacker) -> None:
        attacker.identify()
        node0, node1 = attacker.hospital["hospital-0"], attacker.hospital["hospital-1"]
        # Reusing run 1's id under a config hospital-0's policy forbids: refused at admission, and at the fit.
        answer = attacker.admit(node0, "L")
        assert answer["admitted"] is False and "require_secure_aggregation" in str(answer["reason"])
        assert refused(attacker.fit(node0, "L"), "another plan than the one admitted: noise_multiplier")
        closing = attacker.ask(node1, "committed", "real")  # another run's admission cannot be closed from here
        assert closing["admitted"] is False and "is bound to Flower run" in str(closing["reason"])
        # Hospital-1 (no SecAgg+ required) trains nothing and sends no adapter before it admits a run ...
        assert refused(attacker.fit(node1, "M"), "no open reservation")
        assert refused(attacker.parameters(node1, "M"), "only as the result of an admitted round")
        # ... then admits one round at a fixed sigma; every fit past it is refused, untrained.
        assert attacker.admit(node1, "M")["admitted"] is True
        assert refused(attacker.fit(node1, "M", mu=0.5), "proximal_mu")
        probe = [a.copy() for a in attacker.arrays]
        probe[0].flat[0] = float("nan")  # weights that are no model, only a probe
        assert refused(attacker.fit(node1, "M", arrays=probe), "non-finite")
        first = attacker.fit(node1, "M")
        assert not first.has_error(), first.error
        check_reply(first, MessageType.TRAIN, allowed_outside=())  # only declared fields in what did leave
        for _ in range(3):
            assert refused(attacker.fit(node1, "M"), "beyond the plan")

    simulate(HOSTILE, hostile_run)
    entry = ledger1.entry("M", "hospital-1", "icd10")
    assert entry is not None and len(entry.spent.history) == 1  # one round charged: the one trained
    reasons = " ".join(str(r["reason"]) for r in ledger0.refusals())
    assert "require_secure_aggregation" in reasons and "another plan" in reasons  # in the hospital's own history
