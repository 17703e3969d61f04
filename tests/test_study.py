"""The privacy-utility study: its features do not depend on how texts are batched, and its smoke run completes
through a real Flower SecAgg+ simulation and writes its report, figures and raw results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_core.config import compose_config, to_app_config
from fl_core.model import sentence_embeddings
from scripts.study.plan import FULL, QUICK

REPO = Path(__file__).resolve().parents[1]


def test_sentence_embeddings_are_unit_rows_in_input_order_whatever_the_batching() -> None:
    texts = ["Malignant neoplasm of upper lobe, right bronchus or lung", "Fever", "Fever",
             "Displaced fracture of shaft of right clavicle, initial encounter for closed fracture"]
    one_batch = sentence_embeddings(texts, torch.device("cpu"), batch_size=8)
    one_by_one = sentence_embeddings(texts, torch.device("cpu"), batch_size=1)
    assert one_batch.shape == (4, 384) and one_batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one_batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one_batch, one_by_one, atol=1e-5)
    assert np.array_equal(one_batch[1], one_batch[2])
    assert one_batch[0] @ one_batch[3] < one_batch[1] @ one_batch[2]


def test_the_study_federates_the_product_model_with_the_main_jobs_strategy() -> None:
    """The LoRA arms stand for what `make demo` runs: FedProx's mu and the server's step are the main job's."""
    main_job = to_app_config(compose_config([])).strategy
    for plan in (FULL, QUICK):
        arm = plan.config(8.0, 0, plan.lora.setting, lora=True).strategy
        assert (arm.proximal_mu, arm.server_optimizer) == (main_job.proximal_mu, main_job.server_optimizer)


@pytest.mark.slow
def test_the_quick_study_writes_tables_plots_and_raw_results(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "scripts.study", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "results.md").read_text()
    assert report.startswith("# Privacy-utility study (quick smoke run: not a result)")
    for name in ("accuracy_vs_epsilon.png", "macro_f1_vs_epsilon.png", "settings.png"):
        assert (tmp_path / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(results/{name})" in report
    raw = json.loads((tmp_path / "results" / "study.json").read_text())
    arms = {(r["arm"], r["epsilon"]) for r in raw["results"]}
    assert {("pooled", 8.0), ("federated", 8.0), ("alone-mean", 8.0), ("alone-best", 8.0)} <= arms
    assert all(r["epsilon_spent"] <= r["epsilon"] for r in raw["results"])
    traffic = raw["traffic_per_hospital_per_round"]["3"]
    assert traffic["bytes_down"] > 0 and traffic["bytes_up"] > 0
    alone = {r["setting"]: r for r in raw["results"] if r["arm"] == "alone-mean" and r["epsilon"] == float("inf")}
    shared, own = alone["3 hospitals, IID, FedProx mu=0.001"], \
        alone["3 hospitals, IID, FedProx mu=0.001, server lr 1.5 momentum 0.7"]
    assert shared["accuracy"] == own["accuracy"] and shared["seconds"] == 0 < own["seconds"]  # only the server differs
    lora = {(r["arm"], r["setting"]) for r in raw["results"] if r["setting"].startswith("LoRA adapters, ")}
    assert {arm for arm, _ in lora} == {"pooled", "federated", "alone-mean", "alone-best"}  # the product's model too
    assert "## The product's model: LoRA adapters" in report
    lora_traffic = raw["lora_traffic_per_hospital_per_round"]["3"]  # counted per arm: the adapter, not the head
    assert lora_traffic["bytes_up"] > raw["communication"]["lora_adapter_bytes"] > traffic["bytes_up"]
    assert raw["communication"]["full_model_bytes"] > raw["communication"]["head_bytes"] > 0
