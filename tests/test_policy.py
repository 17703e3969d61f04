"""A hospital's policy file, and its node admitting, checking and charging runs against the policy and the ledger."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fl_client.hospital import HospitalClient, hospital_plan, hospital_resources
from fl_client.node import NodeSettings, NodeSettingsError
from fl_client.optimizer_state import OPTIMIZER_STATE, load_optimizer_state, save_optimizer_state, state_path
from fl_core.model import adapter_to_arrays
from fl_core.protocol import ADMIT, LEDGER_ACTION, RUN_ID
from fl_core.training import make_optimizer
from privacy.governance import Refused
from privacy.ledger import ABORTED, COMMITTED, Ledger
from privacy.policy import HospitalPolicy, PolicyError, load_policy, violations
from privacy.run_plan import RunPlan
from tests.conftest import tiny_config

ALLOWED = RunPlan(model="tiny", task="classification", dataset="icd10", private=True, noise_multiplier=1.0,
                  sample_rate=0.1, steps_per_round=10, rounds=2, num_examples=100, num_test_examples=20, delta=1e-5,
                  max_grad_norm=1.0, target_epsilon=None, secure_aggregation=True, secure_aggregation_parameters="",
                  hospital_level_dp=False, hospital_level_clipping_norm=0.0, evaluation_rounds=0,
                  evaluation_noise_multiplier=0.0, proximal_mu=0.01, accountant="pld")


def write_policy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(text)
    return folder / "policy.yaml"


@pytest.mark.parametrize(("text", "field_name"), [
    ("max_epsilon_per_run: -1", "max_epsilon_per_run"),
    ("max_delta: 2", "max_delta"),
    ("allowed_models: tiny", "allowed_models"),  # a list is required
    ("unknown_rule: 1", "unknown_rule"),
    ("max_open_reservations: 0", "max_open_reservations"),
    ("release_outside_guarantee: [parameters]", "release_outside_guarantee"),  # DP-released, not an option
    ("release_outside_guarantee: [patient_names]", "release_outside_guarantee"),
])
def test_a_bad_policy_file_is_one_line_naming_the_field(tmp_path: Path, text: str, field_name: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(write_policy(tmp_path, text))
    assert field_name in str(err.value) and "\n" not in str(err.value)


def test_every_rule_can_refuse_a_run() -> None:
    policy = HospitalPolicy(max_epsilon_per_run=2.0, min_noise_multiplier=1.5, max_delta=1e-6,
                            allowed_models=["smollm2-135m"], allowed_tasks=["causal-lm"], allowed_datasets=["x"],
                            require_secure_aggregation=True)
    found = violations(policy, dataclasses.replace(ALLOWED, secure_aggregation=False), planned_epsilon=4.0)
    assert len(found) == 7
    for needle in ("allowed_models", "allowed_tasks", "allowed_datasets", "max_epsilon_per_run",
                   "min_noise_multiplier", "max_delta", "require_secure_aggregation"):
        assert any(needle in reason for reason in found), needle
    assert violations(HospitalPolicy(), ALLOWED, planned_epsilon=4.0) == []
    no_dp = dataclasses.replace(ALLOWED, private=False, noise_multiplier=0.0)
    assert violations(HospitalPolicy(max_epsilon_per_run=8.0), no_dp, float("inf"))  # no DP: no cap can hold
    # A node with no rules at all still refuses training without DP unless its policy says otherwise.
    assert [r for r in violations(HospitalPolicy(), no_dp, float("inf")) if "allow_training_without_dp" in r]
    assert violations(HospitalPolicy(allow_training_without_dp=True), no_dp, float("inf")) == []


def client_for(tmp_path: Path, *overrides: str, policy: str | None = None, flower_run: int = 1) -> HospitalClient:
    cfg = tiny_config("federation.num_rounds=2", *overrides)
    state = tmp_path / "node"
    if policy is not None:
        write_policy(state, policy)
    node = NodeSettings.from_node_config({"partition-id": 0, "state-dir": str(state)}, simulated=True)
    return HospitalClient(cfg, node, flower_run)


def admit(client: HospitalClient, run_id: str = "run-a") -> dict[str, object]:
    return client.get_properties({LEDGER_ACTION: ADMIT, RUN_ID: run_id})


def arrays_of(client: HospitalClient) -> list[np.ndarray]:
    return adapter_to_arrays(hospital_resources(client.cfg, client.node).model)


def round_config(client: HospitalClient, run_id: str = "run-a") -> dict[str, object]:
    return {RUN_ID: run_id, "proximal_mu": client.cfg.strategy.proximal_mu}


def test_the_policy_on_the_node_wins_over_the_run_config_and_the_refusal_is_recorded(tmp_path: Path) -> None:
    client = client_for(tmp_path, "model=tiny", policy="allowed_models: [smollm2-135m]\n")
    answer = admit(client)
    assert answer["admitted"] is False
    assert "model 'tiny' is not in allowed_models ['smollm2-135m']" in str(answer["reason"])
    ledger = Ledger(client.node.ledger_path)
    assert ledger.entries() == []  # nothing reserved, nothing charged
    assert "allowed_models" in str(ledger.refusals()[0]["reason"])  # but the hospital's history shows it
    with pytest.raises(Refused, match="no open reservation"):  # a server that samples it anyway gets nothing
        client.fit(arrays_of(client), round_config(client))
    with pytest.raises(Refused, match="federated evaluation is not part of the plan"):
        client.evaluate(arrays_of(client), round_config(client))


def test_an_admitted_run_is_charged_before_training_and_committed_at_the_end(tmp_path: Path) -> None:
    client = client_for(tmp_path, policy="max_epsilon_per_run: 10\nlifetime_epsilon: 20\n")
    answer = admit(client)
    assert answer["admitted"] is True, answer
    assert 7.5 < float(answer["planned_epsilon"]) <= 8.0  # the run's target epsilon 8 over both rounds
    assert float(answer["remaining_epsilon"]) == pytest.approx(20 - float(answer["lifetime_epsilon"]))
    assert answer["num_examples"] == hospital_plan(client.cfg, client.node).plan.num_examples  # public by the plan
    _, weight, metrics = client.fit(arrays_of(client), round_config(client))
    entry = Ledger(client.node.ledger_path).entry("run-a", "hospital-0", "icd10")
    assert entry is not None and entry.spent.steps == metrics["steps"] > 0
    assert entry.epsilon == pytest.approx(float(metrics["epsilon"]), rel=1e-12)
    assert weight == answer["num_examples"] and "train_loss" not in metrics  # the exact loss does not leave
    closed = client.get_properties({LEDGER_ACTION: COMMITTED, RUN_ID: "run-a"})
    assert closed["status"] == COMMITTED and float(closed["epsilon"]) == pytest.approx(entry.epsilon)


def test_the_training_loss_leaves_only_where_the_policy_releases_it_outside_the_guarantee(tmp_path: Path) -> None:
    client = client_for(tmp_path, policy="release_outside_guarantee: [train_loss]\n")
    answer = admit(client)
    assert answer["admitted"] is True and answer["outside_guarantee"] == "train_loss"
    _, _, metrics = client.fit(arrays_of(client), round_config(client))
    assert float(metrics["train_loss"]) > 0


def test_a_policy_file_that_does_not_parse_refuses_every_run(tmp_path: Path) -> None:
    client = client_for(tmp_path, policy="min_noise_multiplier: [1\n")
    answer = admit(client)
    assert answer["admitted"] is False and "policy" in str(answer["reason"])


def test_the_adapter_never_leaves_outside_an_admitted_round(tmp_path: Path) -> None:
    client = client_for(tmp_path)
    with pytest.raises(Refused, match="only as the result of an admitted round"):
        client.get_parameters({RUN_ID: "run-a"})
    assert admit(client)["admitted"] is True
    with pytest.raises(Refused, match="only as the result of an admitted round"):
        client.get_parameters({RUN_ID: "run-a"})


def test_a_non_finite_adapter_from_the_server_is_refused_before_anything_is_charged(tmp_path: Path) -> None:
    client = client_for(tmp_path, "strategy.federated_evaluation=true")
    assert admit(client)["admitted"] is True
    probe = arrays_of(client)
    probe[0] = probe[0].copy()
    probe[0].flat[0] = np.nan
    with pytest.raises(Refused, match="non-finite"):
        client.fit(probe, round_config(client))
    with pytest.raises(Refused, match="non-finite"):
        client.evaluate(probe, round_config(client))
    entry = Ledger(client.node.ledger_path).entry("run-a", "hospital-0", "icd10")
    assert entry is not None and entry.spent.steps == 0


def test_training_without_dp_is_refused_unless_the_policy_allows_it(tmp_path: Path) -> None:
    refused = admit(client_for(tmp_path / "a", "privacy.enabled=false"))
    assert refused["admitted"] is False and "allow_training_without_dp" in str(refused["reason"])
    allowed = client_for(tmp_path / "b", "privacy.enabled=false", policy="allow_training_without_dp: true\n")
    assert admit(allowed)["admitted"] is True


def test_a_fixed_sigma_run_is_held_to_the_per_run_cap_every_round(tmp_path: Path) -> None:
    """A cap of 5 and sigma fixed for 1 planned round: the second, third, ... fits are refused, untrained."""
    one_round = client_for(tmp_path, "federation.num_rounds=1", "privacy.noise_multiplier=0.9",
                           policy="max_epsilon_per_run: 20\n")
    planned = float(admit(one_round)["planned_epsilon"])
    assert planned < 20
    before = arrays_of(one_round)
    one_round.fit(before, round_config(one_round))
    for _ in range(5):
        with pytest.raises(Refused, match="beyond the plan"):
            one_round.fit(before, round_config(one_round))
    entry = Ledger(one_round.node.ledger_path).entry("run-a", "hospital-0", "icd10")
    assert entry is not None and entry.epsilon == pytest.approx(planned, rel=1e-9)  # one round, never more
    too_much = client_for(tmp_path / "other", "federation.num_rounds=3", "privacy.noise_multiplier=0.9",
                          policy=f"max_epsilon_per_run: {planned * 1.01}\n")
    assert "exceeds max_epsilon_per_run" in str(admit(too_much)["reason"])


def test_an_admission_belongs_to_the_flower_run_that_asked(tmp_path: Path) -> None:
    compliant = client_for(tmp_path, flower_run=1)
    assert admit(compliant)["admitted"] is True
    reused = client_for(tmp_path, "privacy.noise_multiplier=0.01", flower_run=2)  # another run, another config
    with pytest.raises(Refused, match="another plan than the one admitted: noise_multiplier"):
        reused.fit(arrays_of(reused), round_config(reused))
    same_plan = client_for(tmp_path, flower_run=3)
    with pytest.raises(Refused, match="admitted by Flower run 1, not by run 3"):
        same_plan.fit(arrays_of(same_plan), round_config(same_plan))
    assert Ledger(compliant.node.ledger_path).entry("run-a", "hospital-0", "icd10").spent.steps == 0  # type: ignore[union-attr]


def test_a_round_must_ask_for_the_admitted_proximal_term(tmp_path: Path) -> None:
    client = client_for(tmp_path)
    assert admit(client)["admitted"] is True
    with pytest.raises(Refused, match="proximal_mu"):
        client.fit(arrays_of(client), {RUN_ID: "run-a", "proximal_mu": 5.0})


def test_federated_evaluation_is_a_noised_release_charged_to_the_ledger(tmp_path: Path) -> None:
    client = client_for(tmp_path, "strategy.federated_evaluation=true")
    assert admit(client)["admitted"] is True
    loss, n, metrics = client.evaluate(arrays_of(client), round_config(client))
    assert n == hospital_plan(client.cfg, client.node).plan.num_test_examples
    assert set(metrics) == {"hospital", "accuracy"} and 0 <= float(metrics["accuracy"]) <= 1 and loss >= 0
    entry = Ledger(client.node.ledger_path).entry("run-a", "hospital-0", "icd10")
    assert entry is not None and entry.spent.history == (hospital_plan(client.cfg, client.node).plan
                                                         .evaluation_release,)
    client.evaluate(arrays_of(client), round_config(client))
    with pytest.raises(Refused, match="beyond the plan"):  # two rounds planned, two evaluations
        client.evaluate(arrays_of(client), round_config(client))


def local_job(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDERATED_DP_LLM_NODE_HOME": str(tmp_path / "nodes")}
    return subprocess.run([sys.executable, "-m", "fl_client.local_job", "--hospital", "1", "model=tiny",
                           "data.max_train_examples=200", "data.max_test_examples=40", "train.device=cpu",
                           "federation.num_rounds=2", f"output_dir={tmp_path / 'run'}", *overrides],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_a_hospital_training_alone_spends_in_its_ledger_too(tmp_path: Path) -> None:
    proc = local_job(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (entry,) = Ledger(tmp_path / "nodes" / "hospital-1" / "ledger.sqlite").entries()
    assert entry.run_id == summary["run_id"] and entry.status == COMMITTED and entry.flower_run is None
    assert len(entry.spent.history) == 2  # reserved, charged round by round, committed
    assert summary["epsilon"] == pytest.approx(entry.epsilon, rel=1e-12) and 7.5 < entry.epsilon <= 8.0
    write_policy(tmp_path / "nodes" / "hospital-1", "max_epsilon_per_run: 4\n")
    refused_job = local_job(tmp_path)
    assert refused_job.returncode == 3
    assert refused_job.stderr.strip().splitlines()[-1].startswith("fl-train-local: hospital-1: policy: planned "
                                                                 "epsilon")
    ledger = Ledger(tmp_path / "nodes" / "hospital-1" / "ledger.sqlite")
    assert len(ledger.entries()) == 1 and "max_epsilon_per_run" in str(ledger.refusals()[-1]["reason"])


def test_a_local_sweep_runs_each_job_in_its_own_folder_tracked_in_the_hospitals_mlflow(tmp_path: Path) -> None:
    env = {**os.environ, "FEDERATED_DP_LLM_NODE_HOME": str(tmp_path / "nodes")}
    proc = subprocess.run([sys.executable, "-m", "fl_client.local_job", "--hospital", "1", "-m", "model=tiny",
                           "data.max_train_examples=200", "data.max_test_examples=40", "train.device=cpu",
                           "federation.num_rounds=1", "privacy.target_epsilon=2,4", f"hydra.sweep.dir={tmp_path}/sw",
                           f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for job, target in ((0, 2.0), (1, 4.0)):
        summary = json.loads((tmp_path / "sw" / str(job) / "summary.json").read_text())
        assert target - 0.1 < summary["epsilon"] <= target
        assert "round 1/1" in (tmp_path / "sw" / str(job) / "fl-train-local.log").read_text()
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.run_name == f"tiny-classification-icd10-eps{target:g}-hospital-1-alone"
        assert run.info.status == "FINISHED" and run.data.tags["trained_by"] == "hospital-1"
        epsilons = client.get_metric_history(run.info.run_id, "epsilon/hospital-1")
        assert [(m.step, m.value) for m in epsilons] == [(1, pytest.approx(summary["epsilon"], rel=1e-9))]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")) == [0, 1]
        assert {"adapter", "privacy_report.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    helped = subprocess.run([sys.executable, "-m", "fl_client.local_job", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--hospital" in helped.stdout and "Configuration groups" in helped.stdout


def test_a_policy_the_node_would_not_read_stops_it_before_it_connects(tmp_path: Path) -> None:
    (tmp_path / "policy.yml").write_text("lifetime_epsilon: 5\n")  # a typo of policy.yaml: no rules would hold
    with pytest.raises(NodeSettingsError, match=r"policy-file: .* holds policy.yml, but the node reads policy.yaml"):
        NodeSettings.from_node_config({"state-dir": str(tmp_path), "approved-bundles": str(tmp_path / "a.txt")})
    with pytest.raises(NodeSettingsError, match="node setting state-dir: required"):
        NodeSettings.from_node_config({"hospital-id": "h0"})


def kept_steps(client: HospitalClient) -> set[int]:
    """The step counts in the node's one kept optimiser state."""
    (path,) = (client.node.state_dir / OPTIMIZER_STATE).glob("*.pt")
    return {int(m["step"]) for m in torch.load(path, weights_only=True)["state"].values()}


@pytest.mark.parametrize("close", [COMMITTED, ABORTED])
def test_a_hospitals_optimiser_state_is_kept_on_its_node_between_rounds_and_removed_with_the_run(
        tmp_path: Path, close: str) -> None:
    """A deployed node starts a process per message: Adam's moments go through its state folder, owner-only, and
    go when the run closes, however it closes."""
    client = client_for(tmp_path, "train.keep_optimizer_state=true")
    assert admit(client)["admitted"] is True
    folder = client.node.state_dir / OPTIMIZER_STATE
    steps = hospital_plan(client.cfg, client.node).plan.steps_per_round
    for done in (1, 2):
        client.fit(arrays_of(client), round_config(client))
        assert kept_steps(client) == {done * steps}  # the second round went on from the first's moments
    (saved,) = folder.glob("*.pt")
    assert folder.stat().st_mode & 0o777 == 0o700 and saved.stat().st_mode & 0o077 == 0
    assert "run-a" not in saved.name  # a digest: the run id is the server's choice
    client.get_properties({LEDGER_ACTION: close, RUN_ID: "run-a"})
    assert not folder.exists()


def test_a_kept_optimiser_state_that_cannot_be_used_costs_a_fresh_adam_not_the_round(tmp_path: Path) -> None:
    client = client_for(tmp_path, "train.keep_optimizer_state=true")
    assert admit(client)["admitted"] is True
    steps = hospital_plan(client.cfg, client.node).plan.steps_per_round
    client.fit(arrays_of(client), round_config(client))
    (path,) = (client.node.state_dir / OPTIMIZER_STATE).glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])
    client.fit(arrays_of(client), round_config(client))  # trained, from a fresh optimiser
    assert kept_steps(client) == {steps}


@pytest.mark.parametrize("damage", ["foreign shape", "negative second moment", "step 0", "boolean step",
                                    "no moments", "another model", "float64 moment"])
def test_an_optimiser_state_that_does_not_fit_is_removed(tmp_path: Path, damage: str) -> None:
    client = client_for(tmp_path, "train.keep_optimizer_state=true")
    model = hospital_resources(client.cfg, client.node).model
    trainable = [p for group in make_optimizer(client.cfg, model).param_groups for p in group["params"]]
    state = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p),
                           "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(trainable)},
             "param_groups": [{"params": list(range(len(trainable))), "lr": 0.1}]}
    path = state_path(client.node.state_dir, "run-a")
    save_optimizer_state(path, state)
    assert load_optimizer_state(client.cfg, model, path) is not None
    moments = state["state"][0]
    if damage == "no moments":
        state["state"][0] = {"step": torch.tensor(3.0)}
    elif damage == "another model":
        state["state"][len(trainable)] = moments
    else:
        name, value = {"foreign shape": ("exp_avg", torch.zeros(3, 3)), "step 0": ("step", torch.tensor(0.0)),
                       "boolean step": ("step", torch.tensor(True)),
                       "float64 moment": ("exp_avg", torch.full_like(moments["exp_avg"], 1e300, dtype=torch.float64)),
                       "negative second moment": ("exp_avg_sq", -torch.ones_like(moments["exp_avg_sq"]))}[damage]
        moments[name] = value
    save_optimizer_state(path, state)
    assert load_optimizer_state(client.cfg, model, path) is None
    assert not path.exists()
