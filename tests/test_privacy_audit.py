"""The privacy audit: its statistics on a mechanism whose epsilon is known, then the shipped product and a broken one
audited in real federated runs (`fl-privacy audit`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privacy.audit import AuditError, epsilon_lower_bound, guess, p_value

# The audited run: the tiny model, two hospitals, a claim of epsilon 0.5. SGD at a high rate and four local epochs
# let a canary leave a trace when nothing hides it; the guarantee does not depend on either.
AUDITED = ["model=tiny", "data.max_train_examples=200", "data.max_test_examples=60", "train.device=cpu",
           "train.num_threads=1", "train.batch_size=32", "train.optimizer=sgd", "train.lr=0.5",
           "train.local_epochs=4", "federation.num_rounds=3", "federation.num_clients=2",
           "federation.min_participants=2", "privacy.target_epsilon=0.5"]


def randomized_response_guesses(epsilon: float, m: int, rng: np.random.Generator) -> int:
    """Correct guesses of an auditor against epsilon-DP randomised response of m fair coins: the worst case."""
    return int(rng.binomial(m, math.exp(epsilon) / (1 + math.exp(epsilon))))


def test_the_bound_holds_at_its_confidence_and_approaches_the_truth_for_a_known_mechanism() -> None:
    rng = np.random.default_rng(0)
    bounds = [epsilon_lower_bound(1000, 1000, randomized_response_guesses(1.0, 1000, rng), 1e-6, 0.95)
              for _ in range(200)]
    assert sum(b > 1.0 for b in bounds) <= 0.05 * 200 + 5  # wrong at most 5% of the time (binomial slack)
    assert np.mean(bounds) > 0.8  # and with many guesses it sees most of the epsilon that is there


def test_the_p_value_is_the_binomial_tail_without_delta_and_grows_with_it() -> None:
    from scipy.stats import binom

    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(binom.sf(39, 50, 1 / (1 + math.exp(-1.0))))
    assert p_value(100, 50, 40, 1.0, 1e-3) > p_value(100, 50, 40, 1.0, 0.0)
    assert p_value(100, 50, 40, 2.0, 0.0) > p_value(100, 50, 40, 1.0, 0.0)
    assert epsilon_lower_bound(100, 50, 25, 1e-5, 0.95) == 0.0  # chance-level guessing shows nothing


def test_guesses_take_the_top_and_bottom_scores_only() -> None:
    scores = [0.1, 5.0, -3.0, 0.2, 4.0, -2.0]
    picked = [False, True, False, True, True, True]
    g = guess(scores, picked, 2)
    assert (g.canaries, g.guesses, g.correct) == (6, 4, 3)  # 5.0, 4.0 right; -3.0 right, -2.0 wrong
    with pytest.raises(AuditError):
        guess(scores, picked, 4)


@pytest.mark.parametrize(("args", "message"), [
    (["--confidence", "1.5"], "--confidence must be strictly between 0 and 1, got 1.5"),
    (["--canaries", "10"], "--canaries must be at least 40, got 10"),
    (["task=causal-lm"], "task.name: the privacy audit scores canaries of a classification task"),
])
def test_bad_audit_input_is_one_line_before_anything_runs(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "privacy.cli", "audit", "--output", str(tmp_path / "a"), *args,
                           "model=tiny"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"fl-privacy: error: {message}"]
    assert not (tmp_path / "a" / "run").exists()


def start_audit(folder: Path, sabotage: str) -> subprocess.Popen[str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "privacy.cli", "audit", "--sabotage", sabotage, "--canaries", "1000",
               "--output", str(folder), *AUDITED, f"tracking.mlflow_uri=sqlite:///{folder / 'mlflow.db'}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder)


def audit_result(folder: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    result: dict[str, object] = json.loads((folder / "audit.json").read_text())
    report = json.loads((folder / "run" / "privacy_report.json").read_text())
    assert report["audit"] == result  # in the run's privacy report too
    assert "## Privacy audit" in (folder / "run" / "privacy_report.md").read_text()
    return result


@pytest.mark.slow
def test_the_shipped_mechanism_stays_below_its_claim_and_a_broken_one_is_caught(tmp_path: Path) -> None:
    # Two independent audits (own node homes, own Ray clusters), side by side: most of each is start-up.
    runs = {sabotage: start_audit(tmp_path / sabotage, sabotage) for sabotage in ("none", "no-noise")}
    shipped, broken = (audit_result(tmp_path / sabotage, proc) for sabotage, proc in runs.items())
    assert 0.45 < float(shipped["epsilon_claimed"]) <= 0.5  # type: ignore[arg-type]
    assert float(shipped["epsilon_lower_bound"]) <= float(shipped["epsilon_claimed"])  # type: ignore[arg-type]
    # the same claim, no noise behind it
    assert broken["epsilon_claimed"] == pytest.approx(shipped["epsilon_claimed"], rel=1e-6)
    assert float(broken["epsilon_lower_bound"]) > float(broken["epsilon_claimed"])  # type: ignore[arg-type]
    assert broken["guesses"] == 100 and broken["canaries"] == 1000
