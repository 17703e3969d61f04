"""Privacy governance in real Flower simulations: hospital policies, lifetime budgets, refusals, crashes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from privacy.ledger import ABORTED, COMMITTED, RESERVED, Ledger
from privacy.ledger_cli import main as fl_ledger
from tests.test_federated import BASE, fl_simulate, summary_of

pytestmark = pytest.mark.slow

FORBIDS_TINY = "allowed_models: [smollm2-135m]\n"


def ledger(tmp_path: Path, hospital: str) -> Ledger:
    return Ledger(tmp_path / "nodes" / hospital / "ledger.sqlite")


def test_budget_admits_one_run_refuses_the_next_and_policy_beats_run_config(tmp_path: Path) -> None:
    (tmp_path / "nodes" / "hospital-2").mkdir(parents=True)
    (tmp_path / "nodes" / "hospital-2" / "policy.yaml").write_text(FORBIDS_TINY)
    for hospital in ("hospital-0", "hospital-1"):
        ledger(tmp_path, hospital).set_budget(hospital, 9.0, 1e-5)  # one run at epsilon 8; two compose to about 9.8
    overrides = ("federation.num_rounds=1", "federation.min_participants=2", "privacy.target_epsilon=8")

    first = fl_simulate(tmp_path / "run-1", *overrides)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    # The run asked for model=tiny; hospital-2's own policy forbids it: refused with the reason, run goes on.
    assert ("[admission] hospital-2 refused the run: hospital-2: policy: model 'tiny' is not in allowed_models "
            "['smollm2-135m']") in out
    summary = summary_of(tmp_path / "run-1")
    assert set(summary["epsilon_per_client"]) == {"hospital-0", "hospital-1"}
    assert ledger(tmp_path, "hospital-2").entries() == []
    assert "allowed_models" in str(ledger(tmp_path, "hospital-2").refusals()[0]["reason"])  # in its own history
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert "allowed_models" in run.data.tags["refused.hospital-2"]
    assert run.data.metrics["hospitals_admitted"] == 2
    spent_after_first = {h: ledger(tmp_path, h).balance(h, "icd10").rdp_epsilon for h in ("hospital-0", "hospital-1")}
    assert all(7.5 < eps <= 8.0 for eps in spent_after_first.values())

    second = fl_simulate(tmp_path / "run-2", *overrides)
    out = second.stdout + second.stderr
    assert second.returncode == 3, out[-3000:]
    assert "[round" not in out  # refused before any training
    assert "above the ledger budget 9" in out
    assert second.stderr.strip().splitlines()[-1].startswith("fl-simulate: run refused: 0 of 3 hospitals admitted")
    for hospital, before in spent_after_first.items():  # nothing charged
        assert [e.status for e in ledger(tmp_path, hospital).entries()] == [COMMITTED]
        assert ledger(tmp_path, hospital).balance(hospital, "icd10").rdp_epsilon == before
    refused_run = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert refused_run.info.status == "FAILED"
    assert "above the ledger budget" in refused_run.data.tags["refused.hospital-0"]
    report = json.loads((tmp_path / "run-2" / "privacy_report.json").read_text())
    assert set(report["admission"]["refused"]) == {"hospital-0", "hospital-1", "hospital-2"}


def test_a_run_killed_mid_way_leaves_the_ledger_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FEDERATED_DP_LLM_NODE_HOME": str(tmp_path / "nodes")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_server.simulate", *BASE, "federation.num_rounds=3", "strategy.secagg.enabled=false",
         f"hydra.run.dir={run_dir}", f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 400
    for line in proc.stdout:
        if line.startswith("[round 1/3]") or time.monotonic() > deadline:
            break
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its hospitals die mid-run, with no chance to clean up
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)

    run_id = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["mlflow_run_id"]
    for hospital in ("hospital-0", "hospital-1", "hospital-2"):
        entries = ledger(tmp_path, hospital).entries()
        assert [(e.run_id, e.status) for e in entries] == [(run_id, RESERVED)]
        entry = entries[0]
        per_round = entry.planned.steps // 3
        assert entry.spent.steps in (per_round, 2 * per_round)  # round 1 done; round 2 charged if it had started
        # An open reservation counts in full: the crash lost no spend.
        assert ledger(tmp_path, hospital).balance(hospital, "icd10").rdp_epsilon == pytest.approx(
            entry.planned_epsilon, rel=1e-12)

    monkeypatch.setenv("FEDERATED_DP_LLM_NODE_HOME", str(tmp_path / "nodes"))
    fl_ledger(["abort", run_id])  # the privacy officer closes the dead run: the spent part stays, the rest is freed
    assert capsys.readouterr().out.count("aborted") == 3
    for hospital in ("hospital-0", "hospital-1", "hospital-2"):
        entry = ledger(tmp_path, hospital).entries()[0]
        assert entry.status == ABORTED
        assert ledger(tmp_path, hospital).balance(hospital, "icd10").rdp_epsilon == pytest.approx(entry.epsilon,
                                                                                                  rel=1e-12)
