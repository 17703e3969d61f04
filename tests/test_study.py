"""The privacy-utility study's smoke run completes and writes its report, figures and raw results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    assert raw["communication"]["full_model_bytes"] > raw["communication"]["adapter_bytes"] > 0
