import json
import subprocess
import sys

import pytest
import torch

from fl_core.data import load_splits
from fl_core.model import build_model, load_tokenizer
from fl_core.training import train_local
from privacy.accountant import AccountantState
from privacy.calibration import calibrate_noise, epsilon_for, sampling_plan
from privacy.loss import IGNORE_INDEX, PerSequenceLMLoss, SequenceClassificationLoss
from tests.conftest import tiny_config


@pytest.mark.parametrize(("target", "q", "steps", "accountant"), [
    (8.0, 0.01, 300, "rdp"), (1.0, 0.01, 300, "rdp"), (4.0, 0.05, 1000, "rdp"), (0.5, 0.001, 5000, "rdp"),
    (8.0, 0.01, 300, "prv"),
])
def test_calibrated_epsilon_is_within_one_percent_and_never_above(target: float, q: float, steps: int,
                                                                   accountant: str) -> None:
    sigma = calibrate_noise(target, 1e-5, q, steps, accountant)
    eps = epsilon_for(sigma, 1e-5, q, steps, accountant)
    assert eps <= target
    assert eps >= 0.99 * target


def test_known_sigma_matches_published_figures() -> None:
    # FACTS: delta 1e-5, q 0.01, 300 steps: epsilon 8 -> RDP sigma 0.547; epsilon 1 -> 1.172.
    assert calibrate_noise(8.0, 1e-5, 0.01, 300, "rdp") == pytest.approx(0.547, abs=0.01)
    assert calibrate_noise(1.0, 1e-5, 0.01, 300, "rdp") == pytest.approx(1.172, abs=0.01)


def test_sampling_plan_matches_opacus_poisson_loader() -> None:
    plan = sampling_plan(num_examples=1000, batch_size=64, local_epochs=2, num_rounds=5)
    assert plan.sample_rate == pytest.approx(1 / 16)
    assert plan.steps_per_round == 32 and plan.total_steps == 160


def test_round_by_round_composition_equals_one_shot() -> None:
    sigma, q = 0.8, 0.02
    state = AccountantState("rdp")
    for _ in range(4):
        resumed = AccountantState.from_json(state.to_json()).to_accountant()
        resumed.step(noise_multiplier=sigma, sample_rate=q)
        for _ in range(49):
            resumed.step(noise_multiplier=sigma, sample_rate=q)
        state = AccountantState.of(resumed)
    assert state.steps == 200
    assert state.epsilon(1e-5) == pytest.approx(epsilon_for(sigma, 1e-5, q, 200, "rdp"), rel=1e-12)


def test_training_rounds_compose_to_the_calibrated_epsilon() -> None:
    cfg = tiny_config("data.max_train_examples=96")
    splits = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg, tok, len(splits.train.label_names), torch.device("cpu"))
    rounds = 3
    plan = sampling_plan(len(splits.train), cfg.train.batch_size, cfg.train.local_epochs, rounds)
    sigma = calibrate_noise(2.0, 1e-3, plan.sample_rate, plan.total_steps, "rdp")
    state = AccountantState("rdp")
    for _ in range(rounds):
        result = train_local(cfg, model, tok, splits.train, torch.device("cpu"), noise_multiplier=sigma,
                             accountant=state, rng_seed=0)
        assert result.accountant is not None
        state = result.accountant
    assert state.steps == plan.total_steps
    assert result.epsilon == pytest.approx(epsilon_for(sigma, cfg.privacy.delta, plan.sample_rate,
                                                       plan.total_steps, "rdp"), rel=1e-9)


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


@pytest.mark.parametrize("args", [
    ("calibrate", "--epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"),
    ("calibrate", "--epsilon", "1", "--delta", "2", "--sample-rate", "0.01", "--steps", "10"),
    ("calibrate", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01"),
])
def test_cli_bad_arguments_fail_in_one_line(args: tuple[str, ...]) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("fl-privacy: error:")


def test_cli_accountant_choices_match_the_accountants() -> None:
    from privacy.accountant import ACCOUNTANT_TYPES
    from privacy.cli import ACCOUNTANTS

    assert set(ACCOUNTANTS) == set(ACCOUNTANT_TYPES)
