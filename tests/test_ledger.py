"""The privacy ledger: reserve, charge, close, caps, composition, concurrency, and the fl-ledger CLI."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privacy.accountant import AccountantState, compose
from privacy.calibration import epsilon_for
from privacy.ledger import ABORTED, COMMITTED, RESERVED, Budget, BudgetExceeded, Ledger, LedgerError, SpendRequest
from privacy.ledger_cli import main

SIGMA, Q, ROUND = 1.0, 0.05, 50  # a round: 50 steps
PLAN = "the admitted plan"


def request(run_id: str, steps: int = 200, hospital: str = "h0", sigma: float = SIGMA,
            flower_run: int | None = 7) -> SpendRequest:
    rounds = AccountantState(((sigma, Q, ROUND),) * (steps // ROUND))
    return SpendRequest(run_id, hospital, "icd10", flower_run, PLAN, rounds, 1e-5, sigma, Q)


def charge(ledger: Ledger, run_id: str, hospital: str = "h0", flower_run: int | None = 7, plan: str = PLAN,
           **caps: object):  # type: ignore[no-untyped-def]
    return ledger.charge(run_id, hospital, "icd10", flower_run=flower_run, plan=plan, release=(SIGMA, Q, ROUND),
                         **caps)  # type: ignore[arg-type]


def one_run_epsilon(steps: int) -> float:
    return epsilon_for(SIGMA, 1e-5, Q, steps)


def test_reserve_charge_commit_keeps_the_spend_and_frees_the_unspent_plan(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    entry = ledger.reserve(request("run-a"))
    assert entry.status == RESERVED and entry.planned.steps == 200 and entry.spent.steps == 0
    # An open reservation counts in full.
    assert ledger.balance("h0", "icd10").rdp_epsilon == pytest.approx(one_run_epsilon(200), rel=1e-12)
    charge(ledger, "run-a")
    charge(ledger, "run-a")
    closed = ledger.close("run-a", "h0", "icd10", COMMITTED)
    assert closed.status == COMMITTED and closed.epsilon == pytest.approx(one_run_epsilon(100), rel=1e-12)
    assert ledger.balance("h0", "icd10").rdp_epsilon == pytest.approx(one_run_epsilon(100), rel=1e-12)


def test_lifetime_spend_composes_with_rdp_and_shows_the_sum(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for run in ("run-a", "run-b"):
        ledger.reserve(request(run))
        for _ in range(4):
            charge(ledger, run)
        ledger.close(run, "h0", "icd10", COMMITTED)
    balance = ledger.balance("h0", "icd10")
    assert balance.rdp_epsilon == pytest.approx(one_run_epsilon(400), rel=1e-12)
    assert balance.summed_epsilon == pytest.approx(2 * one_run_epsilon(200), rel=1e-12)
    assert balance.summed_delta == pytest.approx(2e-5)
    assert balance.rdp_epsilon < balance.summed_epsilon  # composing is tighter than adding epsilons
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


def test_a_charge_past_the_lifetime_cap_or_the_run_cap_is_refused_before_the_round(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("h0", one_run_epsilon(200) * 1.01, 1e-5)
    ledger.reserve(request("run-a"))
    charge(ledger, "run-a")
    with pytest.raises(BudgetExceeded, match="above its cap"):
        charge(ledger, "run-a", run_cap=one_run_epsilon(100) * 0.99)  # the run's own cap, checked every round
    ledger.set_budget("h0", one_run_epsilon(50) * 1.05, 1e-5)  # the officer lowers the lifetime budget
    with pytest.raises(BudgetExceeded, match="above the ledger budget"):
        charge(ledger, "run-a")
    assert ledger.entry("run-a", "h0", "icd10").spent.steps == ROUND  # type: ignore[union-attr]


def test_a_charge_comes_only_from_the_bound_run_for_the_admitted_plan_and_within_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerError, match="no open reservation"):
        charge(ledger, "run-x")
    ledger.reserve(request("run-a", steps=100))  # two rounds
    with pytest.raises(LedgerError, match="admitted by Flower run 7, not by run 8"):
        charge(ledger, "run-a", flower_run=8)
    with pytest.raises(LedgerError, match="another plan"):
        charge(ledger, "run-a", plan="a plan with sigma 0")
    charge(ledger, "run-a")
    charge(ledger, "run-a")
    with pytest.raises(LedgerError, match="beyond the plan"):  # a third round was never admitted
        charge(ledger, "run-a")
    ledger.close("run-a", "h0", "icd10", ABORTED)
    with pytest.raises(LedgerError, match="no open reservation"):
        charge(ledger, "run-a")
    assert ledger.entry("run-a", "h0", "icd10").spent.steps == 2 * ROUND  # type: ignore[union-attr]


def test_a_resumed_run_continues_its_own_entry_instead_of_double_counting(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.reserve(request("run-a", steps=200))
    charge(ledger, "run-a")
    charge(ledger, "run-a")
    # The server died; the run resumes under the same id with the same plan, from a new Flower run.
    again = ledger.reserve(request("run-a", steps=200, flower_run=9))
    assert again.spent.steps == 100 and again.planned.steps == 200 and again.flower_run == 9
    assert len(ledger.entries()) == 1
    assert ledger.balance("h0", "icd10").rdp_epsilon == pytest.approx(one_run_epsilon(200), rel=1e-9)
    with pytest.raises(LedgerError, match="not by run 7"):  # the old Flower run lost the admission
        charge(ledger, "run-a", flower_run=7)


def test_reservations_of_silent_runs_expire_keeping_what_they_spent(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("h0", one_run_epsilon(200) * 1.2, 1e-5)
    ledger.reserve(request("made-up"))  # an admission whose run never trains: it holds the whole budget
    with pytest.raises(BudgetExceeded):
        ledger.reserve(request("real"))
    time.sleep(2.1)
    entry = ledger.reserve(request("real"), stale_after=1.0)  # the node's timeout frees the made-up reservation
    assert entry.status == RESERVED
    expired = ledger.entry("made-up", "h0", "icd10")
    assert expired is not None and expired.status == ABORTED and "expired" in str(expired.closed_reason)


def test_open_reservations_are_capped_so_made_up_admissions_cannot_pile_up(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for made_up in ("x1", "x2"):
        ledger.reserve(request(made_up), max_open=2)
    with pytest.raises(LedgerError, match="2 other runs already hold a reservation"):
        ledger.reserve(request("x3"), max_open=2)
    ledger.reserve(request("x2"), max_open=2)  # re-admitting one of them is not another reservation
    ledger.close("x1", "h0", "icd10", ABORTED)
    assert ledger.reserve(request("x3"), max_open=2).status == RESERVED


def test_refusals_are_kept_in_the_hospitals_own_history(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.record_refusal("h0", "icd10", "run-z", 11, "policy: model 'tiny' is not in allowed_models")
    assert [(r["run_id"], r["flower_run"], r["reason"]) for r in ledger.refusals("h0")] == [
        ("run-z", 11, "policy: model 'tiny' is not in allowed_models")]


def test_an_older_ledger_gains_the_new_columns_and_keeps_its_entries(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE entries (run_id TEXT NOT NULL, hospital TEXT NOT NULL, dataset TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'aborted')), delta REAL NOT NULL,
            noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, planned TEXT NOT NULL, spent TEXT NOT NULL,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (run_id, hospital, dataset));
        INSERT INTO entries VALUES ('old', 'h0', 'icd10', 'committed', 1e-5, 1.0, 0.05,
            '{"kind": "prv", "history": [[1.0, 0.05, 100]]}', '{"kind": "prv", "history": [[1.0, 0.05, 100]]}',
            '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00');""")
    db.commit()
    db.close()
    entry = Ledger(path).entry("old", "h0", "icd10")
    assert entry is not None and entry.flower_run is None and entry.spent.kind == "rdp"  # re-accounted, replace-one
    assert entry.epsilon == pytest.approx(epsilon_for(1.0, 1e-5, 0.05, 100, "rdp"), rel=1e-9)


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


def _open_after_barrier(path: str, barrier: multiprocessing.synchronize.Barrier,
                        results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    barrier.wait()
    try:
        Ledger(Path(path))
        results.put("opened")
    except Exception as err:  # the test reports what went wrong
        results.put(f"{type(err).__name__}: {err}")


def test_processes_opening_one_new_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    """Several runs of one hospital start together on a new node: each creates the ledger and adds its columns.
    Without one transaction around the additions two of them added the same column (seen in the gateway tests);
    without retrying the switch to WAL, which SQLite refuses at once while another connection makes it, about one
    new ledger in eight failed to open (seen in CI)."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(24):
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_after_barrier, args=(str(tmp_path / f"ledger-{attempt}.sqlite"), barrier,
                                                                results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert sorted(results.get(timeout=5) for _ in procs) == ["opened"] * 6


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
    charge(ledger, "run-a", hospital="hospital-0")
    assert "run-a" in cli("reservations")[1]
    assert json.loads(cli("reservations", "--json")[1])[0]["silent_seconds"] >= 0

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


def test_an_erasure_is_noted_with_the_epsilon_that_bounds_the_records_influence_then(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "nodes"

    def cli(*args: str) -> tuple[int, str, str]:
        return fl_ledger(monkeypatch, capsys, home, *args)

    ledger = Ledger(home / "hospital-0" / "ledger.sqlite")
    ledger.reserve(request("run-a", hospital="hospital-0"))
    charge(ledger, "run-a", hospital="hospital-0")
    ledger.close("run-a", "hospital-0", "icd10", COMMITTED)
    code, out, err = cli("note-erasure", "hospital-0", "icd10", "DPO-2026-117")
    bound = one_run_epsilon(50)
    assert code == 0, err
    assert out.strip() == (f"hospital-0/icd10: erasure DPO-2026-117 noted; the erased records' influence on the 1 "
                           f"runs before it is bounded by epsilon {bound:.4f} at delta 1e-05")
    ledger.reserve(request("run-b", hospital="hospital-0"))  # a later run: it does not train on the erased records
    (noted,) = json.loads(cli("erasures", "--json")[1])
    assert (noted["reference"], noted["runs"]) == ("DPO-2026-117", 1)
    assert noted["rdp_epsilon"] == pytest.approx(bound, rel=1e-9)  # the bound as it was when noted
    assert "DPO-2026-117" in cli("erasures")[1]
    for reference in ("", "x" * 41, "Jane Doe MRN 1234", "DPO\n117"):
        code, _, err = cli("note-erasure", "hospital-0", "icd10", reference)
        assert code == 2 and err.startswith("fl-ledger: error: REFERENCE: a ticket number") and err.count("\n") == 1
    code, _, err = cli("note-erasure", "hospital-0", "icd-10", "DPO-2026-118")  # a mistyped dataset: no bound of 0
    assert code == 2 and "hospital-0/icd-10: no run in this ledger trained on it" in err
    code, _, err = cli("note-erasure", "hospital-9", "icd10", "DPO-2026-119")
    assert code == 2 and "hospital-9: no ledger at" in err and not (home / "hospital-9").exists()
    assert len(json.loads(cli("erasures", "--json")[1])) == 1


def test_compose_concatenates_histories_and_keeps_the_looser_accountant() -> None:
    a = AccountantState(((1.0, 0.1, 10),), "pld")
    b = AccountantState(((2.0, 0.2, 5),), "rdp")
    assert compose([a, b]) == AccountantState(((1.0, 0.1, 10), (2.0, 0.2, 5)), "rdp")
    assert compose([a, a]).kind == "pld"
    assert compose([a, b]).epsilon(1e-5) >= max(a.epsilon(1e-5), b.epsilon(1e-5))


def test_a_listing_whose_reader_goes_away_ends_quietly(tmp_path: Path) -> None:
    """`fl-ledger show | head`: the reader closes the pipe before the listing is written; no traceback."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for hospital in range(50):
        ledger.set_budget(f"hospital-{hospital}", 5.0, 1e-6)
    listing = subprocess.Popen([sys.executable, "-m", "privacy.ledger_cli", "--ledger", str(ledger.path), "show"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert listing.stdout is not None and listing.stderr is not None
    listing.stdout.close()  # before the command has started: its first write finds no reader
    assert listing.wait(timeout=60) == 1
    assert listing.stderr.read() == b""
