import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fl_core.data import load_splits
from fl_core.model import build_model, load_tokenizer
from fl_core.training import train_local
from privacy.accountant import AccountantState
from privacy.calibration import UnreachableTarget, calibrate_noise, epsilon_for, sampling_plan
from privacy.evaluation_release import (
    evaluation_noise_multiplier,
    noisy_classification_scores,
    noisy_language_model_scores,
)
from privacy.loss import IGNORE_INDEX, PerSequenceLMLoss, SequenceClassificationLoss
from privacy.secure_random import SecureRandom
from tests.conftest import tiny_config


@pytest.mark.parametrize(("target", "q", "steps", "accountant"), [
    (8.0, 0.01, 300, "pld"), (1.0, 0.01, 300, "pld"), (4.0, 0.05, 1000, "pld"), (0.5, 0.001, 5000, "pld"),
    (8.0, 0.01, 300, "rdp"), (1.0, 0.01, 300, "rdp"),
])
def test_calibrated_epsilon_is_within_one_percent_and_never_above(target: float, q: float, steps: int,
                                                                   accountant: str) -> None:
    sigma = calibrate_noise(target, 1e-5, q, steps, kind=accountant)
    eps = epsilon_for(sigma, 1e-5, q, steps, accountant)
    assert eps <= target
    assert eps >= 0.99 * target


def test_replace_one_noise_against_published_add_remove_figures() -> None:
    """FACTS (add/remove, Opacus): delta 1e-5, q 0.01, 300 steps: epsilon 8 -> RDP sigma 0.547, PRV 0.514;
    epsilon 1 -> RDP 1.172, PRV 1.035. Replace-one needs more noise than either, pld much less than rdp's bound."""
    pld8, rdp8 = calibrate_noise(8.0, 1e-5, 0.01, 300), calibrate_noise(8.0, 1e-5, 0.01, 300, kind="rdp")
    pld1, rdp1 = calibrate_noise(1.0, 1e-5, 0.01, 300), calibrate_noise(1.0, 1e-5, 0.01, 300, kind="rdp")
    assert 0.514 < pld8 < 0.547 * 1.05 < rdp8 < 0.547 * 1.6
    assert 1.035 < pld1 < 1.172 * 1.25 < rdp1 < 1.172 * 2.0


def test_an_unreachable_target_is_one_error_that_says_so() -> None:
    with pytest.raises(UnreachableTarget, match="out of reach"):
        calibrate_noise(1e-6, 1e-10, 1.0, 10_000, kind="rdp")  # it would take sigma ~ 1e9


def test_sampling_plan_takes_every_batch_of_every_epoch() -> None:
    plan = sampling_plan(num_examples=1000, batch_size=64, local_epochs=2, num_rounds=5)
    assert plan.sample_rate == pytest.approx(1 / 16)
    assert plan.steps_per_round == 32 and plan.total_steps == 160


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_round_by_round_composition_equals_one_shot(kind: str) -> None:
    sigma, q = 0.8, 0.02
    state = AccountantState(kind=kind)
    for _ in range(4):
        state = AccountantState.from_json(state.to_json()).then(sigma, q, 50)  # a restart between rounds
    assert state.steps == 200 and state.kind == kind
    assert state.epsilon(1e-5) == pytest.approx(epsilon_for(sigma, 1e-5, q, 200, kind), rel=1e-9)


def test_training_rounds_compose_to_the_calibrated_epsilon() -> None:
    cfg = tiny_config("data.max_train_examples=96")
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg, tok, len(splits.train.label_names), torch.device("cpu"))
    rounds = 3
    plan = sampling_plan(len(splits.train), cfg.train.batch_size, cfg.train.local_epochs, rounds)
    sigma = calibrate_noise(2.0, 1e-3, plan.sample_rate, plan.total_steps)
    state = AccountantState()
    for _ in range(rounds):
        result = train_local(cfg, model, tok, splits.train, torch.device("cpu"), plan=plan, noise_multiplier=sigma,
                             accountant=state)
        assert result.accountant is not None
        state = result.accountant
    assert state.steps == plan.total_steps
    assert result.epsilon == pytest.approx(epsilon_for(sigma, cfg.privacy.delta, plan.sample_rate,
                                                       plan.total_steps), rel=1e-9)


def test_per_sequence_lm_loss_ignores_other_samples_padding() -> None:
    torch.manual_seed(0)
    loss = PerSequenceLMLoss(reduction="none")
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    short = labels.clone()
    short[1, 3:] = IGNORE_INDEX
    alone = loss(logits[:1], labels[:1])
    assert torch.allclose(loss(logits, labels)[0], alone[0])
    assert torch.allclose(loss(logits, short)[0], alone[0])  # sample 1's length leaves sample 0 untouched


def test_classification_loss_reductions() -> None:
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    per_sample = SequenceClassificationLoss("none")(logits, labels)
    assert per_sample.shape == (4,)
    assert torch.allclose(SequenceClassificationLoss()(logits, labels), per_sample.mean())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privacy.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_calibrates_and_reports_epsilon_never_above_target() -> None:
    proc = _cli("calibrate", "--epsilon", "4", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0.99 * 4 <= out["epsilon"] <= 4 and out["noise_multiplier"] > 0
    proc = _cli("calibrate", "--noise-multiplier", str(out["noise_multiplier"]), "--delta", "1e-5",
                "--sample-rate", "0.01", "--steps", "1000")
    assert json.loads(proc.stdout)["epsilon"] == pytest.approx(out["epsilon"])


def test_cli_calibrates_the_runs_own_plan_as_training_samples_it() -> None:
    """2,000 records in Poisson batches of 64 over 3 rounds of 1 epoch: 32 batches a round, rate 1/32, 96 steps."""
    proc = _cli("calibrate", "--epsilon", "8", "--delta", "1e-5", "--examples", "2000", "--batch-size", "64",
                "--rounds", "3")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["sample_rate"], out["steps"], out["examples"], out["epochs"]) == (1 / 32, 96, 2000, 1)
    assert out["noise_multiplier"] == calibrate_noise(8.0, 1e-5, 1 / 32, 96)
    two_epochs = json.loads(_cli("calibrate", "--epsilon", "8", "--delta", "1e-5", "--examples", "2000",
                                 "--batch-size", "64", "--epochs", "2", "--rounds", "3").stdout)
    assert two_epochs["steps"] == 192 and two_epochs["noise_multiplier"] > out["noise_multiplier"]


@pytest.mark.parametrize(("args", "named"), [
    (("--examples", "2000", "--batch-size", "64"), "--rounds"),
    (("--examples", "0", "--batch-size", "64", "--rounds", "3"), "--examples"),
    (("--examples", "2000", "--batch-size", "64", "--rounds", "3", "--steps", "10"), "--examples"),
    (("--sample-rate", "0.01",), "--steps"),
])
def test_cli_refuses_a_plan_that_is_incomplete_or_mixed_naming_the_option(args: tuple[str, ...], named: str) -> None:
    proc = _cli("calibrate", "--epsilon", "8", "--delta", "1e-5", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr


@pytest.mark.parametrize("args", [
    ("calibrate", "--epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"),
    ("calibrate", "--epsilon", "1", "--delta", "2", "--sample-rate", "0.01", "--steps", "10"),
    ("calibrate", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01"),
])
def test_cli_bad_arguments_fail_in_one_line(args: tuple[str, ...]) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("fl-privacy: error:")


def test_cli_and_config_accountant_choices_match_the_accountants() -> None:
    from fl_core.config import ACCOUNTANTS as CONFIGURED
    from privacy.accountant import ACCOUNTANTS
    from privacy.cli import ACCOUNTANTS as OFFERED

    assert set(OFFERED) == set(ACCOUNTANTS) == set(CONFIGURED)


def test_cli_says_in_one_line_when_a_target_cannot_be_reached() -> None:
    proc = _cli("calibrate", "--epsilon", "0.000001", "--delta", "1e-10", "--sample-rate", "1", "--steps", "10000",
                "--accountant", "rdp")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "out of reach" in proc.stderr


def test_the_evaluation_release_is_the_exact_score_plus_noise_of_the_stated_size() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2000, 5), torch.randint(0, 5, (2000,))
    exact = float((logits.argmax(dim=-1) == labels).float().mean())
    clipped_loss = float(torch.nn.functional.cross_entropy(logits, labels, reduction="none").clamp(0, 5).mean())
    rng = SecureRandom()
    quiet = noisy_classification_scores(logits, labels, noise=1e-9, loss_bound=5.0, rng=rng)
    assert quiet["accuracy"] == pytest.approx(exact) and quiet["loss"] == pytest.approx(clipped_loss)
    draws = [noisy_classification_scores(logits, labels, noise=30.0, loss_bound=5.0, rng=rng) for _ in range(400)]
    accuracy = torch.tensor([d["accuracy"] for d in draws])
    assert float(accuracy.std()) == pytest.approx(30.0 / 2000, rel=0.15)  # noise std 30 on the correct count
    assert abs(float(accuracy.mean()) - exact) < 4 * 30.0 / 2000 / 20
    # Sensitivity sqrt(2) against the accountant's replace-one step, which moves by 2: multiplier 2 * 30 / sqrt(2).
    assert evaluation_noise_multiplier(30.0, classification=True) == pytest.approx(30.0 * 2 ** 0.5)
    assert evaluation_noise_multiplier(30.0, classification=False) == pytest.approx(60.0)
    lm = noisy_language_model_scores(torch.full((100,), 9.0), noise=1e-9, loss_bound=5.0, rng=rng)
    assert lm["loss"] == pytest.approx(5.0)  # each sequence's loss clipped to the bound before it is summed
    # A record whose loss overflows (weights a server chose) counts as the bound, not as a NaN that marks it.
    overflowing = noisy_language_model_scores(torch.tensor([1.0, float("nan"), float("inf")]), noise=1e-9,
                                              loss_bound=5.0, rng=rng)
    assert overflowing["loss"] == pytest.approx(11.0 / 3)
    broken_logits = logits[:3].clone()
    broken_logits[0, 0] = float("nan")
    assert all(math.isfinite(v) for v in noisy_classification_scores(broken_logits, labels[:3], noise=1.0,
                                                                      loss_bound=5.0, rng=rng).values())


def test_renyi_to_epsilon_is_opacus_conversion() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from privacy.accountant import ORDERS, rdp_to_epsilon

    for sigma, q, steps, delta in [(0.6, 0.01, 300, 1e-5), (1.5, 0.05, 1000, 1e-6), (40.0, 1.0, 1, 1e-6),
                                   (0.3, 0.2, 50, 1e-3)]:
        curve = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
        assert rdp_to_epsilon(curve, delta) == pytest.approx(get_privacy_spent(orders=ORDERS, rdp=curve,
                                                                               delta=delta)[0], rel=1e-12)
    assert rdp_to_epsilon(ORDERS * math.inf, 1e-5) == math.inf
    with pytest.raises(ValueError, match="orders"):
        rdp_to_epsilon(ORDERS[:3], 1e-5)


def test_sigma_is_calibrated_once_per_machine_and_a_kept_one_is_checked_before_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployed node plans in every message's process; the simulation's preflight plans too."""
    from fl_client import plan as planning

    monkeypatch.setenv("FEDERATED_DP_LLM_CACHE", str(tmp_path))
    calls: list[float] = []
    real = planning.calibrate_noise

    def counted(*args: Any, **kwargs: Any) -> float:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(planning, "calibrate_noise", counted)
    cfg = tiny_config()
    first = planning.privacy_plan(cfg, 200)[1]
    assert planning.privacy_plan(cfg, 200)[1] == first and len(calls) == 1
    (kept,) = (tmp_path / "calibrations").glob("*.json")
    record = json.loads(kept.read_text())
    assert first is not None and record["noise_multiplier"] == first
    record["noise_multiplier"] = first / 2  # too little noise for the target: never used
    kept.write_text(json.dumps(record))
    assert planning.privacy_plan(cfg, 200)[1] == first and len(calls) == 2
    record["noise_multiplier"] = first * 2  # within the target but far below it: not what a calibration gives
    kept.write_text(json.dumps(record))
    assert planning.privacy_plan(cfg, 200)[1] == first and len(calls) == 3
    kept.write_text("damaged")
    assert planning.privacy_plan(cfg, 200)[1] == first and len(calls) == 4
    assert planning.privacy_plan(tiny_config("privacy.target_epsilon=4"), 200)[1] != first  # other inputs, own entry
    assert len(calls) == 5 and len(list((tmp_path / "calibrations").glob("*.json"))) == 2
