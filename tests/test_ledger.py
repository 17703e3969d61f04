"""The privacy ledger: reserve, charge, close, caps, composition, concurrency, and the fl-ledger CLI."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from privacy.accountant import AccountantState, compose
from privacy.calibration import epsilon_for
from privacy.ledger import ABORTED, COMMITTED, RESERVED, Budget, BudgetExceeded, Ledger, LedgerError, SpendRequest
from privacy.ledger_cli import main

SIGMA, Q = 1.0, 0.05


def request(run_id: str, steps: int = 200, hospital: str = "h0", sigma: float = SIGMA) -> SpendRequest:
    return SpendRequest(run_id, hospital, "icd10", sigma, Q, steps, 1e-5, "rdp")


def one_run_epsilon(steps: int) -> float:
    return epsilon_for(SIGMA, 1e-5, Q, steps, "rdp")


def test_reserve_charge_commit_keeps_the_spend_and_frees_the_unspent_plan(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    entry = ledger.reserve(request("run-a"))
    assert entry.status == RESERVED and entry.planned.steps == 200 and entry.spent.steps == 0
    # An open reservation counts in full.
    assert ledger.balance("h0", "icd10").rdp_epsilon == pytest.approx(one_run_epsilon(200), rel=1e-12)
    ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 100)]))
    closed = ledger.close("run-a", "h0", "icd10", COMMITTED)
    assert closed.status == COMMITTED and closed.epsilon == pytest.approx(one_run_epsilon(100), rel=1e-12)
    assert ledger.balance("h0", "icd10").rdp_epsilon == pytest.approx(one_run_epsilon(100), rel=1e-12)


def test_lifetime_spend_composes_with_rdp_and_shows_the_sum(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for run in ("run-a", "run-b"):
        ledger.reserve(request(run))
        ledger.charge(run, "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 200)]))
        ledger.close(run, "h0", "icd10", COMMITTED)
    balance = ledger.balance("h0", "icd10")
    assert balance.rdp_epsilon == pytest.approx(one_run_epsilon(400), rel=1e-12)
    assert balance.summed_epsilon == pytest.approx(2 * one_run_epsilon(200), rel=1e-12)
    assert balance.summed_delta == pytest.approx(2e-5)
    assert balance.rdp_epsilon < balance.summed_epsilon  # RDP composition is the tighter one here
    # Another dataset of the same hospital is a different set of records: its own balance.
    assert ledger.balance("h0", "drugreview").rdp_epsilon == 0.0


def test_a_budget_that_admits_one_run_refuses_the_second_and_charges_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("h0", 1.2 * one_run_epsilon(200), 1e-5)
    ledger.reserve(request("run-a"))
    with pytest.raises(BudgetExceeded, match=r"h0/icd10: run run-b .* above the ledger budget"):
        ledger.reserve(request("run-b"))  # refused while run-a still holds its reservation
    assert [e.run_id for e in ledger.entries()] == ["run-a"]


def test_a_policy_cap_is_enforced_beside_the_ledger_budget(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    cap = Budget(0.5 * one_run_epsilon(200), 1e-5, source="policy")
    with pytest.raises(BudgetExceeded, match="above the policy budget"):
        ledger.reserve(request("run-a"), policy_cap=cap)
    assert ledger.entries() == []


def test_charging_past_the_cap_is_refused_before_the_round(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("h0", one_run_epsilon(200) * 1.01, 1e-5)
    ledger.reserve(request("run-a"))
    ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 200)]))
    with pytest.raises(BudgetExceeded):  # a round beyond the plan would pass the lifetime cap
        ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 300)]))
    assert ledger.entry("run-a", "h0", "icd10").spent.steps == 200  # type: ignore[union-attr]


def test_charges_need_an_open_reservation_and_never_forget_spend(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerError, match="no open reservation"):
        ledger.charge("run-x", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 10)]))
    ledger.reserve(request("run-a"))
    ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 100)]))
    with pytest.raises(LedgerError, match="would forget spend"):
        ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 50)]))
    ledger.close("run-a", "h0", "icd10", ABORTED)
    with pytest.raises(LedgerError, match="no open reservation"):
        ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 150)]))


def test_a_resumed_run_continues_its_own_entry_instead_of_double_counting(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.reserve(request("run-a", steps=200))
    ledger.charge("run-a", "h0", "icd10", AccountantState("rdp", [(SIGMA, Q, 100)]))
    # The server died; the run resumes under the same id with the same plan.
    again = ledger.reserve(request("run-a", steps=200))
    assert again.spent.steps == 100 and again.planned.steps == 200
    assert len(ledger.entries()) == 1
    assert ledger.balance("h0", "icd10").rdp_epsilon == pytest.approx(one_run_epsilon(200), rel=1e-12)


def test_a_run_without_dp_has_infinite_epsilon_and_fails_any_cap(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("h0", 100.0, 1e-5)
    with pytest.raises(BudgetExceeded, match="inf"):
        ledger.reserve(request("run-a", sigma=0.0))


def _reserve_after_barrier(path: str, run_id: str, barrier: multiprocessing.synchronize.Barrier,
                           results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ledger = Ledger(Path(path))
    barrier.wait()
    try:
        ledger.reserve(request(run_id))
        results.put((run_id, "admitted"))
    except BudgetExceeded:
        results.put((run_id, "refused"))


def test_two_concurrent_writers_cannot_overspend_one_budget(tmp_path: Path) -> None:
    for attempt in range(3):
        path = tmp_path / f"ledger-{attempt}.sqlite"
        Ledger(path).set_budget("h0", 1.2 * one_run_epsilon(200), 1e-5)
        ctx = multiprocessing.get_context("fork")  # two real processes, sharing only the file
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_reserve_after_barrier, args=(str(path), run, barrier, results))
                 for run in ("run-a", "run-b")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        outcomes = sorted(results.get(timeout=5)[1] for _ in procs)
        assert outcomes == ["admitted", "refused"]
        assert len(Ledger(path).entries()) == 1


def fl_ledger(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], home: Path,
              *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process (a subprocess would pay Opacus's import each time): exit code, stdout, stderr."""
    monkeypatch.setenv("FEDERATED_DP_LLM_NODE_HOME", str(home))
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_fl_ledger_sets_budgets_shows_exports_and_aborts_a_crashed_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "nodes"

    def cli(*args: str) -> tuple[int, str, str]:
        return fl_ledger(monkeypatch, capsys, home, *args)

    assert cli("set-budget", "hospital-0", "9")[0] == 0
    ledger = Ledger(home / "hospital-0" / "ledger.sqlite")
    assert ledger.budget("hospital-0", "icd10") == Budget(9.0, 1e-5)
    shown = json.loads(cli("show", "--json")[1])  # a fresh budget shows before any spend
    assert [(r["dataset"], r["budget_epsilon"], r["rdp_epsilon"]) for r in shown] == [("*", 9.0, 0.0)]
    ledger.reserve(request("run-a", hospital="hospital-0"))
    ledger.charge("run-a", "hospital-0", "icd10", AccountantState("rdp", [(SIGMA, Q, 50)]))

    shown = json.loads(cli("show", "--json")[1])
    assert [r["dataset"] for r in shown] == ["icd10"]
    assert shown[0]["open_reservations"] == 1
    assert shown[0]["rdp_epsilon"] == pytest.approx(one_run_epsilon(200), rel=1e-9)  # reservation in full
    assert shown[0]["remaining_epsilon"] == pytest.approx(9 - one_run_epsilon(200), rel=1e-9)
    csv_lines = cli("export", "--csv")[1].strip().splitlines()
    assert csv_lines[0].startswith("run_id,hospital,dataset,status,epsilon") and len(csv_lines) == 2
    assert "run-a" in cli("history")[1]

    code, _, err = cli("abort", "run-a")
    assert code == 0, err
    shown = json.loads(cli("show", "--json")[1])
    assert shown[0]["open_reservations"] == 0
    assert shown[0]["rdp_epsilon"] == pytest.approx(one_run_epsilon(50), rel=1e-9)  # the spent part stays

    code, _, err = cli("--ledger", str(tmp_path / "nope.sqlite"), "show")
    assert code == 2 and err.strip() == f"fl-ledger: error: --ledger: {tmp_path / 'nope.sqlite'} does not exist"
    assert cli("abort", "run-zzz")[0] == 2
    code, _, err = cli("set-budget", "hospital-1", "0")
    assert code == 2 and err.strip() == "fl-ledger: error: EPSILON must be > 0, got 0.0"
    code, _, err = cli("set-budget", "hospital-1", "5", "--delta", "1")
    assert code == 2 and err.strip() == "fl-ledger: error: --delta must be in (0, 1), got 1.0"
    assert not (home / "hospital-1").exists()  # a refused command creates nothing


def test_compose_concatenates_histories_as_rdp() -> None:
    a = AccountantState("prv", [(1.0, 0.1, 10)])
    b = AccountantState("rdp", [(2.0, 0.2, 5)])
    assert compose([a, b]) == AccountantState("rdp", [(1.0, 0.1, 10), (2.0, 0.2, 5)])
