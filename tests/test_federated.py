"""Real Flower simulations (Ray on loopback) of hospitals training the tiny model under DP-SGD and SecAgg+."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fl_core.data import load_splits
from fl_core.model import adapter_to_arrays, build_model, load_tokenizer
from fl_server.checkpoint import load_checkpoint
from fl_server.privacy_report import hospital_level_epsilon
from gateway.config import ReplicaConfig
from gateway.schemas import GenerationParams
from gateway.served_model import ServedModel
from privacy.ledger import Ledger
from tests.conftest import tiny_config
from tests.servers import free_port

pytestmark = pytest.mark.slow

BASE = ["model=tiny", "data.max_train_examples=900", "data.max_test_examples=150", "train.batch_size=32",
        "train.lr=0.01", "train.device=cpu"]


def fl_simulate(run_dir: Path, *overrides: str, timeout: int = 420, flags: tuple[str, ...] = (),
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """fl-simulate as a user runs it (Hydra's `flags` first); the hospitals keep their ledgers (and policies) in
    `nodes/` beside the run."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FEDERATED_DP_LLM_NODE_HOME": str(run_dir.parent / "nodes"), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fl_server.simulate", *flags, *BASE, f"hydra.run.dir={run_dir}",
         f"tracking.mlflow_uri=sqlite:///{run_dir.parent / 'mlflow.db'}", *overrides],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=run_dir.parent)


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def ledger_of(tmp_path: Path, hospital: str) -> Ledger:
    return Ledger(tmp_path / "nodes" / hospital / "ledger.sqlite")


def test_three_hospitals_two_rounds_secagg_dp(tmp_path: Path) -> None:
    """The main job's path, with federated evaluation on and hospital-1's policy releasing its training loss."""
    run_dir = tmp_path / "run"
    (tmp_path / "nodes" / "hospital-1").mkdir(parents=True)
    (tmp_path / "nodes" / "hospital-1" / "policy.yaml").write_text("release_outside_guarantee: [train_loss]\n")
    proc = fl_simulate(run_dir, "federation.num_rounds=2", "privacy.target_epsilon=8",
                       "strategy.federated_evaluation=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The console has the start line, admission, one line per round and the table; Flower's log is in the run folder
    assert "Secure aggregation completed" in (run_dir / "fl-simulate.log").read_text()
    assert [line.split(" ")[0] for line in proc.stdout.splitlines()[:4]] == [
        "fl-simulate:", "[admission]", "[round", "[round"]
    assert "INFO" not in proc.stdout + proc.stderr and "DEBUG" not in proc.stdout + proc.stderr
    assert len(proc.stdout.splitlines()) < 20 and proc.stderr == "", proc.stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["rounds_completed"] == 2 and not summary["stopped_early"]
    assert summary["final_metrics"]["loss"] < summary["initial_metrics"]["loss"]  # learnable task, loss falls

    # The global adapter moved away from the server's initial adapter.
    cfg = tiny_config(*BASE)
    initial = adapter_to_arrays(build_model(cfg, load_tokenizer(cfg.model), 22, __import__("torch").device("cpu")))
    checkpoint, final, _ = load_checkpoint(run_dir)  # type: ignore[misc]
    assert checkpoint.server_round == 2
    assert max(float(np.abs(a - b).max()) for a, b in zip(initial, final, strict=True)) > 1e-4

    # Reported epsilon equals each hospital's own ledger entry, committed, and never exceeds the target; the entry
    # holds two rounds of DP-SGD and two noised evaluations, all inside the one calibrated target.
    assert set(summary["epsilon_per_client"]) == {"hospital-0", "hospital-1", "hospital-2"}
    for hospital, epsilon in summary["epsilon_per_client"].items():
        entry = ledger_of(tmp_path, hospital).entry(summary["mlflow_run_id"], hospital, "icd10")
        assert entry is not None and entry.status == "committed"
        assert [q for _, q, _ in entry.spent.history].count(1.0) == 2  # the evaluations: Gaussian, no sampling
        assert len(entry.spent.history) == 4
        assert epsilon == pytest.approx(entry.epsilon, rel=1e-12)  # the final spend, last evaluation included
        assert 7.5 < epsilon <= 8.0
        assert summary["ledger"][hospital]["lifetime_epsilon"] == pytest.approx(entry.epsilon, rel=1e-9)

    # MLflow holds the config, per-round convergence and privacy metrics, and the artifacts.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["privacy.target_epsilon"] == "8.0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epsilon_max")] == [1, 2]
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss"))
    assert [step for step, _ in losses] == [0, 1, 2]  # the untrained baseline, then each round
    assert losses[0][1] == pytest.approx(summary["initial_metrics"]["loss"])
    assert run.info.run_name == "tiny-classification-icd10-eps8-3h"
    for name in ("eval_loss", "eval_accuracy", "eval_macro_f1", "train_loss", "fed_eval_loss", "fed_eval_accuracy",
                 "epsilon/hospital-1", "noise_multiplier/hospital-2", "bytes_sent"):
        assert name in run.data.metrics, name
    assert "fed_eval_macro_f1" not in run.data.metrics  # per-class scores are not released
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.json", "privacy_report.json", "privacy_report.md", "admission.json"} <= artifacts
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["secure_aggregation"]["protocol"] == "SecAgg+"
    assert report["guarantees"][0]["neighbouring_relation"].startswith("replace-one")
    assert report["guarantees"][0]["dataset_sizes"]["hospital-0"]["num_examples"] > 0
    released = {(r["message"], r["field"]): r for r in report["releases"]}
    assert released["fit", "train_loss"]["released_by"] == ["hospital-1"]
    assert released["evaluate", "accuracy"]["status"].startswith("DP mechanism")
    assert report["admission"] == {"admitted": ["hospital-0", "hospital-1", "hospital-2"], "refused": {}}
    assert "| hospital-1 | committed |" in (run_dir / "privacy_report.md").read_text()
    adapter_config = json.loads((Path(summary["adapter_path"]) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "federated-dp-llm:tiny"  # not this machine's path
    assert len(json.loads((run_dir / "labels.json").read_text())) == 22 and "labels.json" in artifacts

    # The run is a version of the registered model, from which a gateway replica loads the very same model.
    assert summary["mlflow_model"].startswith("models:/federated-dp-llm/")
    from_registry = ServedModel(ReplicaConfig(source=summary["mlflow_model"], device="cpu",
                                              mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    from_folder = ServedModel(ReplicaConfig(source=str(run_dir), device="cpu"))
    assert from_registry.provenance["run_id"] == summary["mlflow_run_id"]
    assert from_registry.provenance["guarantees"][0]["epsilon"] == max(summary["epsilon_per_client"].values())
    text = "Type 2 diabetes mellitus with hyperglycemia"
    assert from_registry.classify(text).probabilities == pytest.approx(from_folder.classify(text).probabilities)
    renamed = tmp_path / "renamed"  # a replica names classes from the run's own labels.json, not the dataset
    shutil.copytree(run_dir, renamed)
    (renamed / "labels.json").write_text(json.dumps([f"class-{i}" for i in range(22)]))
    assert ServedModel(ReplicaConfig(source=str(renamed), device="cpu")).classify(text).label.startswith("class-")

    # The version is an MLflow Model that MLflow's own loader rebuilds, found by its alias, described by its tags.
    name, number = summary["mlflow_model"].removeprefix("models:/").split("/")
    version = client.get_model_version(name, number)
    assert str(client.get_model_version_by_alias(name, "newest").version) == number
    assert {k: version.tags[k] for k in ("run_id", "dataset", "accountant", "delta", "hospitals")} == {
        "run_id": summary["mlflow_run_id"], "dataset": "icd10", "accountant": "pld", "delta": "1e-05", "hospitals": "3"}
    for hospital, epsilon in summary["epsilon_per_client"].items():
        assert float(version.tags[f"epsilon.{hospital}"]) == pytest.approx(epsilon, abs=1e-4)
    assert f"at most {max(summary['epsilon_per_client'].values()):.3f} per hospital" in (version.description or "")
    answers = mlflow.pyfunc.load_model(f"models:/{name}@newest").predict([text, "Fracture of the left femur"])
    assert list(answers.columns) == ["label", "probabilities"] and len(answers) == 2
    assert answers["probabilities"][0] == pytest.approx(from_folder.classify(text).probabilities)
    assert answers["label"][0] == from_folder.classify(text).label


def test_resume_continues_the_round_count_and_stops_on_convergence(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Fixed sigma, plaintext aggregation, and hospital-level DP (small noise: this test is about the round count),
    # with server momentum, whose steps continue across the restart (its buffer's round trip: test_server_optimizer).
    fixed_sigma = ("privacy.noise_multiplier=1.0", "strategy.secagg.enabled=false",
                   "privacy.client_level.enabled=true", "privacy.client_level.noise_multiplier=0.05",
                   "privacy.client_level.clipping_norm=10", "strategy.server_optimizer.name=momentum")
    first = fl_simulate(run_dir, "federation.num_rounds=1", *fixed_sigma)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_id = summary_of(run_dir)["mlflow_run_id"]
    steps_after_one = ledger_of(tmp_path, "hospital-0").entry(run_id, "hospital-0", "icd10").spent.steps  # type: ignore[union-attr]
    _, after_one, _ = load_checkpoint(run_dir)  # type: ignore[misc]

    resumed = fl_simulate(tmp_path / "ignored", f"resume_from={run_dir}", "federation.num_rounds=6",
                          "strategy.convergence_threshold=1.0", "strategy.patience=1", *fixed_sigma)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = summary_of(run_dir)
    assert summary["rounds_completed"] == 2  # round 2 of the same run, not round 1 of a new one
    assert summary["stopped_early"]
    checkpoint, after_two, (buffer_after_two, _) = load_checkpoint(run_dir)  # type: ignore[misc]
    assert checkpoint.server_optimizer_steps == 2  # restored with its buffer (a fresh optimiser would count 1)
    for a, b, m_two in zip(after_one, after_two, buffer_after_two, strict=True):
        np.testing.assert_allclose(b - a, m_two, rtol=1e-4, atol=1e-6)  # FedAvgM at lr 1: the model moved by it
    entries = ledger_of(tmp_path, "hospital-0").entries()
    assert [e.run_id for e in entries] == [run_id]  # the resumed run continued its own entry
    assert entries[0].spent.steps == 2 * steps_after_one  # the hospital's spend kept composing across the restart
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(summary["mlflow_run_id"], "eval_loss")
    assert [m.step for m in history] == [0, 1, 2]  # the untrained model's baseline once
    # Hospital-level epsilon composes over both rounds, across the restart, reported beside the record-level one.
    hospital_level = hospital_level_epsilon(tiny_config(*fixed_sigma), 2)
    assert summary["epsilon_hospital_level"] == pytest.approx(hospital_level, rel=1e-12)
    assert [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "epsilon_hospital_level")][-1] \
        == pytest.approx(hospital_level, rel=1e-9)
    guarantees = json.loads((run_dir / "privacy_report.json").read_text())["guarantees"]
    assert [g["unit_of_privacy"] for g in guarantees][1] == "one hospital's whole dataset"


def test_a_chat_model_federates_and_reports_its_exact_match_every_round(tmp_path: Path) -> None:
    """`make demo-llm`'s path on the tiny Llama: the chat task over cached prefixes, SecAgg+ and DP-SGD; the
    server's exact match and answer perplexity in the round lines, MLflow and the summary, before and after."""
    run_dir = tmp_path / "run"
    proc = fl_simulate(run_dir, "task=chat", "task.answer=code_range", "lora.layers=1", "federation.num_rounds=2",
                       "train.lr=0.05")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Secure aggregation completed" in (run_dir / "fl-simulate.log").read_text()
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("[round ")]
    assert len(rounds) == 2 and all("exact_match" in line and "perplexity" in line for line in rounds)
    summary = summary_of(run_dir)
    for scores in (summary["initial_metrics"], summary["final_metrics"]):
        assert set(scores) == {"loss", "perplexity", "exact_match"}
    assert summary["final_metrics"]["loss"] < summary["initial_metrics"]["loss"]
    assert all(7.5 < epsilon <= 8.0 for epsilon in summary["epsilon_per_client"].values())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(summary["mlflow_run_id"], "eval_exact_match")
    assert sorted(m.step for m in history) == [0, 1, 2]
    # MLflow's own loader answers as a replica of the same run does: its greedy chat answer, within max_tokens
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    answers = mlflow.pyfunc.load_model(summary["mlflow_model"]).predict(["Acute bronchitis"], params={"max_tokens": 6})
    served = ServedModel(ReplicaConfig(source=str(run_dir), device="cpu"))
    greedy = GenerationParams(max_tokens=6, temperature=0.0, top_p=1.0, stop=(), seed=None)
    expected = served.generate(served.chat_prompt([{"role": "user", "content": "Acute bronchitis"}]), greedy)
    assert answers == [expected.text] and expected.completion_tokens > 0
    for hospital in ("hospital-0", "hospital-1", "hospital-2"):  # the node keeps its prefixes until the run closes
        assert not list((tmp_path / "nodes" / hospital).rglob("*.pt"))


def test_bad_config_fails_before_the_simulation_engine_starts(tmp_path: Path) -> None:
    proc = fl_simulate(tmp_path / "run", "privacy.delta=0.01", timeout=120)  # delta >= 1/n for every hospital
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fl-simulate: config error: privacy.delta:")
    assert "Traceback" not in proc.stderr and "ray" not in (proc.stdout + proc.stderr).lower()
    # in a sweep, the second job's bad value stops the sweep before its first job starts
    sweep = fl_simulate(tmp_path / "run", "privacy.target_epsilon=4,-1", timeout=120, flags=("-m",))
    assert sweep.returncode == 2 and not (tmp_path / "multirun").exists()
    assert sweep.stderr.strip() == "fl-simulate: config error: privacy.target_epsilon: must be > 0 (got -1.0)"
    printed = fl_simulate(tmp_path / "run", "privacy.target_epsilon=3", timeout=120, flags=("--cfg", "job"))
    assert printed.returncode == 0 and "target_epsilon: 3.0" in printed.stdout
    helped = fl_simulate(tmp_path / "run", timeout=120, flags=("--help",))
    assert helped.returncode == 0 and "model: minilm, smollm2-135m, tiny" in helped.stdout
    info = fl_simulate(tmp_path / "run", timeout=120, flags=("--info", "defaults"))
    assert info.returncode == 0 and "model/tiny" in info.stdout
    untraced = fl_simulate(tmp_path / "run", timeout=120, extra_env={"OTEL_TRACES_EXPORTER": "zipkin"})
    assert untraced.returncode == 2 and untraced.stderr.strip() == (
        "fl-simulate: config error: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'; choose one of otlp, console, none")


def test_a_sweep_runs_each_job_in_its_own_folder_with_its_log(tmp_path: Path) -> None:
    proc = fl_simulate(tmp_path / "run", f"hydra.sweep.dir={tmp_path / 'sweep'}", "federation.num_rounds=1",
                       "strategy.secagg.enabled=false", "data.max_train_examples=300", "privacy.target_epsilon=2,6",
                       flags=("-m",))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job, target in ((0, 2.0), (1, 6.0)):
        folder = tmp_path / "sweep" / str(job)
        assert all(target - 0.1 < e <= target for e in summary_of(folder)["epsilon_per_client"].values())
        assert "[round 1/1]" in (folder / "fl-simulate.log").read_text()
        assert "privacy.target_epsilon" in (folder / ".hydra" / "overrides.yaml").read_text()


def test_a_running_federation_exports_epsilon_for_grafana_and_a_trace_per_round(tmp_path: Path) -> None:
    """The chart sets FL_TRAINING_METRICS_PORT in the ServerApp runner; Prometheus scrapes the run while it trains.
    With OTEL_TRACES_EXPORTER set, each round is a trace: fit, a span per hospital's reply, evaluation."""
    run_dir, port = tmp_path / "run", free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "FL_TRAINING_METRICS_PORT": str(port),
           "FEDERATED_DP_LLM_NODE_HOME": str(tmp_path / "nodes"), "OTEL_TRACES_EXPORTER": "console"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_server.simulate", *BASE, f"hydra.run.dir={run_dir}", "federation.num_rounds=2",
         "strategy.secagg.enabled=false", f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
         "log_format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    scraped, printed = "", []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("[round 1/2]"):  # printed after the round's metrics are set
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            break
    printed.append(proc.stdout.read())
    assert proc.wait(timeout=420) == 0, "".join(printed)[-3000:]
    run_id = summary_of(run_dir)["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for hospital in ("hospital-0", "hospital-1", "hospital-2"):
        (logged,) = [m.value for m in client.get_metric_history(run_id, f"epsilon/{hospital}") if m.step == 1]
        exported = re.search(rf'training_epsilon{{hospital="{hospital}",run="{run_id}"}} (\S+)', scraped)
        assert exported is not None and float(exported.group(1)) == pytest.approx(logged, rel=1e-9)
    assert f'training_round{{run="{run_id}"}} 1.0' in scraped
    with pytest.raises(httpx.ConnectError):  # the run is over: its metrics went with it
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    spans = [json.loads(line) for line in "".join(printed).splitlines() if line.startswith('{"name"')]
    for server_round in (1, 2):
        (root,) = [s for s in spans if s["name"] == f"round {server_round}"]
        children = [s for s in spans if s["parent_id"] == root["context"]["span_id"]]
        assert sorted(s["name"] for s in children) == ["evaluate", "fit", "reply", "reply", "reply"]
        assert sorted(s["attributes"]["fl.hospital"] for s in children if s["name"] == "reply") == [
            "hospital-0", "hospital-1", "hospital-2"]
        assert root["attributes"] == {"fl.hospitals_aggregated": 3}
        assert all(s["context"]["trace_id"] == root["context"]["trace_id"] for s in children)
    # Spans name hospitals and count them; they carry no score, loss or epsilon.
    assert {key for s in spans for key in s["attributes"]} <= {"fl.hospital", "fl.hospitals_aggregated"}
    # log_format=json: the run's log records as JSON lines too, each round an event of the run; no record's text.
    lines = [json.loads(line) for line in (run_dir / "fl-simulate.jsonl").read_text().splitlines()]
    assert all({"time", "level", "component", "logger", "event", "trace_id"} <= line.keys() for line in lines)
    rounds = [line for line in lines if line["event"] == "round"]
    assert [(r["round"], r["run_id"], r["hospitals"]) for r in rounds] == [(1, run_id, 3), (2, run_id, 3)]
    assert rounds[1]["trace_id"] == next(s["context"]["trace_id"] for s in spans if s["name"] == "round 2")[2:]
    written = (run_dir / "fl-simulate.jsonl").read_text() + (run_dir / "fl-simulate.log").read_text()
    texts = load_splits(tiny_config(*BASE).data).train.texts
    assert not [text for text in texts[:300] if len(text) > 20 and text in written]
