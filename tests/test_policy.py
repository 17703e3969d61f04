"""A hospital's policy file, and its node admitting or refusing runs against the policy and the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_client.hospital import HospitalClient, RunRefused, hospital_resources
from fl_client.node import NodeSettings
from fl_core.model import adapter_to_arrays
from fl_core.protocol import ADMIT, LEDGER_ACTION, RUN_ID
from privacy.ledger import COMMITTED, Ledger
from privacy.policy import HospitalPolicy, PolicyError, RunRequest, load_policy, violations
from tests.conftest import tiny_config

ALLOWED = RunRequest(model="tiny", task="classification", dataset="icd10", private=True, planned_epsilon=4.0,
                     delta=1e-5, noise_multiplier=1.0, secure_aggregation=True)


def write_policy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(text)
    return folder / "policy.yaml"


@pytest.mark.parametrize(("text", "field_name"), [
    ("max_epsilon_per_run: -1", "max_epsilon_per_run"),
    ("max_delta: 2", "max_delta"),
    ("allowed_models: tiny", "allowed_models"),  # a list is required
    ("unknown_rule: 1", "unknown_rule"),
])
def test_a_bad_policy_file_is_one_line_naming_the_field(tmp_path: Path, text: str, field_name: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(write_policy(tmp_path, text))
    assert field_name in str(err.value) and "\n" not in str(err.value)


def test_every_rule_can_refuse_a_run() -> None:
    policy = HospitalPolicy(max_epsilon_per_run=2.0, min_noise_multiplier=1.5, max_delta=1e-6,
                            allowed_models=["smollm2-135m"], allowed_tasks=["causal-lm"], allowed_datasets=["x"],
                            require_secure_aggregation=True)
    found = violations(policy, RunRequest(**{**ALLOWED.__dict__, "secure_aggregation": False}))
    assert len(found) == 7
    for needle in ("allowed_models", "allowed_tasks", "allowed_datasets", "max_epsilon_per_run",
                   "min_noise_multiplier", "max_delta", "require_secure_aggregation"):
        assert any(needle in reason for reason in found), needle
    assert violations(HospitalPolicy(), ALLOWED) == []
    no_dp = RunRequest(**{**ALLOWED.__dict__, "private": False, "planned_epsilon": float("inf"),
                          "noise_multiplier": None})
    assert violations(HospitalPolicy(max_epsilon_per_run=8.0), no_dp)  # no DP: no epsilon cap can hold


def client_for(tmp_path: Path, *overrides: str, policy: str | None = None) -> HospitalClient:
    cfg = tiny_config("federation.num_rounds=2", *overrides)
    state = tmp_path / "node"
    if policy is not None:
        write_policy(state, policy)
    return HospitalClient(cfg, NodeSettings.from_node_config({"partition-id": 0, "state-dir": str(state)}))


def test_the_policy_on_the_node_wins_over_the_run_config(tmp_path: Path) -> None:
    client = client_for(tmp_path, "model=tiny", policy="allowed_models: [smollm2-135m]\n")
    answer = client.get_properties({LEDGER_ACTION: ADMIT, RUN_ID: "run-a"})
    assert answer["admitted"] is False
    assert "model 'tiny' is not in allowed_models ['smollm2-135m']" in str(answer["reason"])
    assert Ledger(client.node.ledger_path).entries() == []  # nothing reserved, nothing charged
    arrays = adapter_to_arrays(hospital_resources(client.cfg, client.node).model)
    with pytest.raises(RunRefused, match="was not admitted"):  # a server that samples it anyway gets nothing
        client.fit(arrays, {RUN_ID: "run-a"})
    with pytest.raises(RunRefused, match="was not admitted"):
        client.evaluate(arrays, {RUN_ID: "run-a"})


def test_an_admitted_run_is_charged_before_training_and_committed_at_the_end(tmp_path: Path) -> None:
    client = client_for(tmp_path, policy="max_epsilon_per_run: 10\nlifetime_epsilon: 20\n")
    answer = client.get_properties({LEDGER_ACTION: ADMIT, RUN_ID: "run-a"})
    assert answer["admitted"] is True, answer
    assert 7.5 < float(answer["planned_epsilon"]) <= 8.0  # the run's target epsilon 8 over both rounds
    assert float(answer["remaining_epsilon"]) == pytest.approx(20 - float(answer["lifetime_epsilon"]))
    arrays = adapter_to_arrays(hospital_resources(client.cfg, client.node).model)
    _, _, metrics = client.fit(arrays, {RUN_ID: "run-a"})
    entry = Ledger(client.node.ledger_path).entry("run-a", "hospital-0", "icd10")
    assert entry is not None and entry.spent.steps == metrics["steps"] > 0
    assert entry.epsilon == pytest.approx(float(metrics["epsilon"]), rel=1e-12)
    closed = client.get_properties({LEDGER_ACTION: COMMITTED, RUN_ID: "run-a"})
    assert closed["status"] == COMMITTED and float(closed["epsilon"]) == pytest.approx(entry.epsilon)


def test_a_policy_file_that_does_not_parse_refuses_every_run(tmp_path: Path) -> None:
    client = client_for(tmp_path, policy="min_noise_multiplier: [1\n")
    answer = client.get_properties({LEDGER_ACTION: ADMIT, RUN_ID: "run-a"})
    assert answer["admitted"] is False and "policy" in str(answer["reason"])
