"""A hospital's lifetime privacy ledger: every run's spend, in SQLite on the hospital's own node.

A run's whole plan is reserved when the hospital admits it, bound to the Flower run that asked; each release (a
round of DP-SGD, a noised evaluation) is charged before the work that makes it, so a crash can over-count but never
forget, and a charge is refused unless it comes from the bound run, for the admitted plan, within what the plan
reserved and within every cap. The run is then closed, committed, or aborted keeping only what it spent; a
reservation whose run stopped talking to the node expires the same way. Caps are checked against the Renyi
composition of every run on the same (hospital, dataset), open reservations counted in full, inside one write
transaction: two runs admitted at once cannot overspend one budget. Refused runs are recorded too.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .accountant import AccountantState, Step, compose

RESERVED, COMMITTED, ABORTED = "reserved", "committed", "aborted"
ANY_DATASET = "*"
LOCAL_RUN = None  # the Flower run of a local job (fl-train-local): none
LOCK_TIMEOUT = 60.0  # seconds a connection waits for another process's write lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    hospital TEXT NOT NULL, dataset TEXT NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL, set_at TEXT NOT NULL,
    PRIMARY KEY (hospital, dataset));
CREATE TABLE IF NOT EXISTS entries (
    run_id TEXT NOT NULL, hospital TEXT NOT NULL, dataset TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'aborted')),
    delta REAL NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL,
    planned TEXT NOT NULL, spent TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, hospital, dataset));
CREATE TABLE IF NOT EXISTS refusals (
    at TEXT NOT NULL, hospital TEXT NOT NULL, dataset TEXT NOT NULL, run_id TEXT NOT NULL, flower_run TEXT,
    reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS erasures (
    at TEXT NOT NULL, hospital TEXT NOT NULL, dataset TEXT NOT NULL, reference TEXT NOT NULL, runs INTEGER NOT NULL,
    rdp_epsilon REAL NOT NULL, delta REAL NOT NULL);
"""
# An erasure's reference: a ticket number, never a patient's name or record id (no spaces, so no names).
ERASURE_REFERENCE = re.compile(r"^[A-Za-z0-9._#/-]{1,40}$")
# Columns added since the first ledgers were written; an older ledger gains them when it is opened. Flower's run ids
# are unsigned 64-bit integers, which SQLite's INTEGER cannot hold: they are kept as text.
ADDED_COLUMNS = {"flower_run": "TEXT", "plan": "TEXT", "closed_reason": "TEXT"}


class LedgerError(RuntimeError):
    """The ledger refuses an operation; the message says why."""


class BudgetExceeded(LedgerError):
    """Admitting or continuing this run would take the hospital past a lifetime cap."""


@dataclass(frozen=True)
class Budget:
    """A lifetime cap: the composition of every run on a dataset stays within (epsilon, delta)."""

    epsilon: float
    delta: float
    source: str = "ledger"


@dataclass(frozen=True)
class SpendRequest:
    """A run's plan for one hospital's dataset: every release it would make, bound to the Flower run that asks."""

    run_id: str  # the run's lineage (the server's MLflow run id): a resumed run continues its entry
    hospital: str
    dataset: str
    flower_run: int | None  # Flower's own run id, which only the SuperLink assigns; None for a local job
    plan: str  # the admitted plan as JSON: every later charge must ask for exactly this plan
    releases: AccountantState  # the plan's releases: each round's DP-SGD steps, each noised evaluation
    delta: float
    noise_multiplier: float  # 0 for a run without DP: its epsilon is infinite
    sample_rate: float


@dataclass(frozen=True)
class Entry:
    """One run's spend for one hospital's dataset."""

    run_id: str
    hospital: str
    dataset: str
    status: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned: AccountantState
    spent: AccountantState
    created_at: str
    updated_at: str
    flower_run: int | None = None
    plan: str | None = None
    closed_reason: str | None = None

    @property
    def charge(self) -> AccountantState:
        """What counts against the budget: the whole plan while the run is open, what it spent once closed."""
        return self.planned if self.status == RESERVED else self.spent

    @property
    def epsilon(self) -> float:
        return self.spent.epsilon(self.delta)

    @property
    def planned_epsilon(self) -> float:
        return self.planned.epsilon(self.delta)

    def as_row(self) -> dict[str, object]:
        return {
            "run_id": self.run_id, "hospital": self.hospital, "dataset": self.dataset, "status": self.status,
            "epsilon": self.epsilon, "planned_epsilon": self.planned_epsilon, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.spent.steps,
            "planned_steps": self.planned.steps, "flower_run": self.flower_run, "created_at": self.created_at,
            "updated_at": self.updated_at, "closed_reason": self.closed_reason,
        }


@dataclass(frozen=True)
class Balance:
    """Lifetime spend on one (hospital, dataset), composed two ways, against the tightest cap."""

    hospital: str
    dataset: str
    delta: float  # the delta at which the RDP composition is stated (the cap's, else the largest run delta)
    rdp_epsilon: float  # RDP composition of every run's charge
    summed_epsilon: float  # basic composition: the sum of the runs' epsilons, at summed_delta
    summed_delta: float
    runs: int
    open_reservations: int
    cap: Budget | None

    @property
    def remaining(self) -> float | None:
        return None if self.cap is None else self.cap.epsilon - self.rdp_epsilon

    def as_row(self) -> dict[str, object]:
        return {
            "hospital": self.hospital, "dataset": self.dataset, "rdp_epsilon": self.rdp_epsilon,
            "delta": self.delta, "summed_epsilon": self.summed_epsilon, "summed_delta": self.summed_delta,
            "budget_epsilon": self.cap.epsilon if self.cap else None,
            "budget_delta": self.cap.delta if self.cap else None,
            "budget_source": self.cap.source if self.cap else None,
            "remaining_epsilon": self.remaining, "runs": self.runs, "open_reservations": self.open_reservations,
        }


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock up front, so a check and the write it guards see the same file, across
    processes); commits when the block ends, a `return` inside it included, and rolls back if it raises.
    `db` must be in autocommit mode (`isolation_level=None`)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def create_tables(db: sqlite3.Connection, schema: str, timeout: float) -> None:
    """Put a new or existing SQLite file in WAL mode and create `schema`'s missing tables and indexes, safely when
    several processes open one new file at once. SQLite answers a switch to WAL that races another connection with
    "database is locked" at once, without waiting its busy timeout: the switch is retried here for `timeout` seconds.
    The schema is created in one immediate transaction (a statement that read the schema and then tried to write it
    could fail on another's commit). `db` must be in autocommit mode."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with immediate_transaction(db):
        for statement in schema.split(";"):
            if statement.strip():
                db.execute(statement)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(
        row["run_id"], row["hospital"], row["dataset"], row["status"], row["delta"], row["noise_multiplier"],
        row["sample_rate"], AccountantState.from_json(row["planned"]), AccountantState.from_json(row["spent"]),
        row["created_at"], row["updated_at"], _flower_run(row["flower_run"]), row["plan"], row["closed_reason"],
    )


def _flower_run(text: str | None) -> int | None:
    return None if text is None else int(text)


def _text(flower_run: int | None) -> str | None:
    return None if flower_run is None else str(flower_run)


def _find(entries: list[Entry], run_id: str) -> Entry | None:
    return next((e for e in entries if e.run_id == run_id), None)


def unspent(releases: AccountantState, spent: AccountantState) -> AccountantState:
    """The releases of a plan that `spent` has not made yet (a multiset difference): what a resumed run still needs."""
    left = Counter(spent.history)
    remaining: list[Step] = []
    for step in releases.history:
        if left[step]:
            left[step] -= 1
        else:
            remaining.append(step)
    return AccountantState(tuple(remaining), releases.kind)


def within(spent: AccountantState, planned: AccountantState) -> bool:
    """Is every release in `spent` one that `planned` reserved?"""
    return not Counter(spent.history) - Counter(planned.history)


def check_erasure_reference(reference: str) -> None:
    if not ERASURE_REFERENCE.match(reference):
        raise LedgerError("REFERENCE: a ticket number, 1-40 letters, digits and ._#/- (never a patient's name or "
                          "record id)")


def balance_of(hospital: str, dataset: str, entries: list[Entry], cap: Budget | None) -> Balance:
    """Compose `entries` (one hospital's runs on one dataset) into a lifetime balance."""
    delta = cap.delta if cap else max((e.delta for e in entries), default=1e-5)
    return Balance(
        hospital, dataset, delta, compose([e.charge for e in entries]).epsilon(delta),
        sum(e.charge.epsilon(e.delta) for e in entries), sum(e.delta for e in entries if e.charge.steps),
        len(entries), sum(e.status == RESERVED for e in entries), cap,
    )


class Ledger:
    """The SQLite ledger at `path`, created on first use; safe for several processes at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            create_tables(db, SCHEMA, LOCK_TIMEOUT)
            with immediate_transaction(db):  # processes opening one new ledger at once each add a column once
                present = {row["name"] for row in db.execute("PRAGMA table_info(entries)")}
                for column, kind in ADDED_COLUMNS.items():
                    if column not in present:
                        db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the check and the write it guards see the same ledger."""
        with closing(self._connect()) as db, immediate_transaction(db):
            yield db

    def set_budget(self, hospital: str, epsilon: float, delta: float, dataset: str = ANY_DATASET) -> None:
        if not (epsilon > 0 and 0 < delta < 1):
            raise LedgerError(f"budget: need epsilon > 0 and 0 < delta < 1 (got {epsilon}, {delta})")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?, ?)",
                       (hospital, dataset, epsilon, delta, _now()))

    def budget(self, hospital: str, dataset: str) -> Budget | None:
        """The dataset's own budget, else the hospital's budget for any dataset."""
        with closing(self._connect()) as db:
            return self._budget(db, hospital, dataset)

    @staticmethod
    def _budget(db: sqlite3.Connection, hospital: str, dataset: str) -> Budget | None:
        row = db.execute("SELECT epsilon, delta FROM budgets WHERE hospital = ? AND dataset IN (?, ?) "
                         "ORDER BY dataset = ? LIMIT 1", (hospital, dataset, ANY_DATASET, ANY_DATASET)).fetchone()
        return Budget(row["epsilon"], row["delta"]) if row else None

    def entries(self, hospital: str | None = None, dataset: str | None = None) -> list[Entry]:
        with closing(self._connect()) as db:
            return self._entries(db, hospital, dataset)

    @staticmethod
    def _entries(db: sqlite3.Connection, hospital: str | None, dataset: str | None) -> list[Entry]:
        rows = db.execute(
            "SELECT * FROM entries WHERE (? IS NULL OR hospital = ?) AND (? IS NULL OR dataset = ?) "
            "ORDER BY created_at, run_id", (hospital, hospital, dataset, dataset)).fetchall()
        return [_entry(r) for r in rows]

    def entry(self, run_id: str, hospital: str, dataset: str) -> Entry | None:
        return _find(self.entries(hospital, dataset), run_id)

    def balances(self) -> list[Balance]:
        with closing(self._connect()) as db:
            # A budget for every dataset shows as its own row only until the hospital has spent on some dataset.
            keys = db.execute("SELECT DISTINCT hospital, dataset FROM entries UNION SELECT hospital, dataset "
                              "FROM budgets WHERE dataset != ? OR hospital NOT IN (SELECT hospital FROM entries) "
                              "ORDER BY 1, 2", (ANY_DATASET,)).fetchall()
            return [self._balance(db, h, d, None) for h, d in keys]

    def balance(self, hospital: str, dataset: str, policy_cap: Budget | None = None) -> Balance:
        with closing(self._connect()) as db:
            return self._balance(db, hospital, dataset, policy_cap)

    def _balance(self, db: sqlite3.Connection, hospital: str, dataset: str, policy_cap: Budget | None) -> Balance:
        caps = [c for c in (self._budget(db, hospital, dataset), policy_cap) if c is not None]
        tightest = min(caps, key=lambda c: (c.epsilon, c.delta), default=None)
        return balance_of(hospital, dataset, self._entries(db, hospital, dataset), tightest)

    def _check_caps(self, db: sqlite3.Connection, entries: list[Entry], run: Entry, charge: AccountantState,
                    policy_cap: Budget | None, action: str) -> None:
        """Would the ledger, with `charge` counted for `run` and every other entry as it stands, stay within every
        lifetime cap?"""
        charges = [e.charge for e in entries if e.run_id != run.run_id] + [charge]
        for cap in (self._budget(db, run.hospital, run.dataset), policy_cap):
            if cap is None:
                continue
            epsilon = compose(charges).epsilon(cap.delta)
            if epsilon > cap.epsilon:
                raise BudgetExceeded(
                    f"{run.hospital}/{run.dataset}: {action} would bring lifetime epsilon to {epsilon:.4f} "
                    f"at delta {cap.delta:g}, above the {cap.source} budget {cap.epsilon:g}")

    @staticmethod
    def _expire(db: sqlite3.Connection, hospital: str, dataset: str, stale_after: float | None) -> None:
        """Close the reservations of runs silent for `stale_after` seconds, keeping what they spent."""
        if stale_after is None:
            return
        cutoff = (datetime.now(UTC) - timedelta(seconds=stale_after)).isoformat(timespec="seconds")
        db.execute("UPDATE entries SET status = ?, closed_reason = ?, updated_at = ? WHERE hospital = ? AND "
                   "dataset = ? AND status = ? AND updated_at < ?",
                   (ABORTED, f"expired: no word from its run for {stale_after:g} s", _now(), hospital, dataset,
                    RESERVED, cutoff))

    def plan(self, request: SpendRequest) -> Entry:
        """The entry `reserve` would write, without writing it: to check a hospital's policy first."""
        with closing(self._connect()) as db:
            return self._plan(self._entries(db, request.hospital, request.dataset), request)

    @staticmethod
    def _plan(entries: list[Entry], r: SpendRequest) -> Entry:
        previous = _find(entries, r.run_id)
        kind = r.releases.kind
        spent = AccountantState(previous.spent.history, kind) if previous else AccountantState(kind=kind)
        planned = AccountantState((*spent.history, *unspent(r.releases, spent).history), kind)
        now = _now()
        return Entry(r.run_id, r.hospital, r.dataset, RESERVED, r.delta, r.noise_multiplier, r.sample_rate, planned,
                     spent, previous.created_at if previous else now, now, r.flower_run, r.plan)

    def reserve(self, request: SpendRequest, policy_cap: Budget | None = None,
                stale_after: float | None = None, max_open: int | None = None) -> Entry:
        """Admit a run: reserve its whole plan, continuing what it already spent if it ran here before (a resume),
        bound to the Flower run that asked; refused if `max_open` other runs already hold a reservation."""
        with self._transaction() as db:
            self._expire(db, request.hospital, request.dataset, stale_after)
            entries = self._entries(db, request.hospital, request.dataset)
            open_runs = [e.run_id for e in entries if e.status == RESERVED and e.run_id != request.run_id]
            if max_open is not None and len(open_runs) >= max_open:
                raise LedgerError(f"{request.hospital}/{request.dataset}: {len(open_runs)} other runs already hold a "
                                  f"reservation (max_open_reservations {max_open}; `fl-ledger reservations` lists "
                                  "them)")
            entry = self._plan(entries, request)
            self._check_caps(db, entries, entry, entry.planned, policy_cap,
                             f"run {request.run_id} (planned epsilon {entry.planned_epsilon:.4f})")
            db.execute("INSERT OR REPLACE INTO entries (run_id, hospital, dataset, status, delta, noise_multiplier, "
                       "sample_rate, planned, spent, created_at, updated_at, flower_run, plan, closed_reason) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)", (
                           entry.run_id, entry.hospital, entry.dataset, RESERVED, entry.delta, entry.noise_multiplier,
                           entry.sample_rate, entry.planned.to_json(), entry.spent.to_json(), entry.created_at,
                           entry.updated_at, _text(entry.flower_run), entry.plan))
            return entry

    def charge(self, run_id: str, hospital: str, dataset: str, *, flower_run: int | None, plan: str, release: Step,
               policy_cap: Budget | None = None, run_cap: float | None = None,
               stale_after: float | None = None) -> Entry:
        """Record one release of an admitted run before the work that makes it; refuse it unless it comes from the
        run's bound Flower run, for its admitted plan, within what the plan reserved, `run_cap` and every cap."""
        with self._transaction() as db:
            self._expire(db, hospital, dataset, stale_after)
            entries = self._entries(db, hospital, dataset)
            previous = _find(entries, run_id)
            where = f"{hospital}/{dataset}: run {run_id}"
            if previous is None or previous.status != RESERVED:
                why = f" ({previous.closed_reason or previous.status})" if previous else ""
                raise LedgerError(f"{where} holds no open reservation{why}; a hospital trains only for a run it "
                                  "admitted")
            if previous.flower_run != flower_run:
                raise LedgerError(f"{where} was admitted by Flower run {previous.flower_run}, not by run "
                                  f"{flower_run}; a run must be admitted by the hospital itself")
            if previous.plan != plan:
                raise LedgerError(f"{where}: this round asks for another plan than the one admitted")
            spent = previous.spent.then(*release)
            if not within(spent, previous.planned):
                raise LedgerError(f"{where}: another release (sigma {release[0]:.4g}, rate {release[1]:.4g}, "
                                  f"{release[2]} steps) is beyond the plan the hospital admitted")
            if run_cap is not None and spent.epsilon(previous.delta) > run_cap:
                raise BudgetExceeded(f"{where}: the next release would bring the run's epsilon to "
                                     f"{spent.epsilon(previous.delta):.4f}, above its cap {run_cap:g}")
            entry = replace(previous, spent=spent, updated_at=_now())
            self._check_caps(db, entries, entry, spent, policy_cap, f"run {run_id}'s next release")
            db.execute("UPDATE entries SET spent = ?, updated_at = ? WHERE run_id = ? AND hospital = ? AND "
                       "dataset = ?", (spent.to_json(), entry.updated_at, run_id, hospital, dataset))
            return entry

    def close(self, run_id: str, hospital: str, dataset: str, status: str, *, flower_run: int | None = None,
              check_run: bool = False, reason: str | None = None) -> Entry:
        """End a run: committed, or aborted; either way what it spent stays and the rest of the plan is freed.
        With `check_run`, only the Flower run the entry is bound to may close it."""
        if status not in (COMMITTED, ABORTED):
            raise LedgerError(f"close: status must be {COMMITTED!r} or {ABORTED!r}, got {status!r}")
        with self._transaction() as db:
            previous = _find(self._entries(db, hospital, dataset), run_id)
            if previous is None:
                raise LedgerError(f"{hospital}/{dataset}: no entry for run {run_id}")
            if check_run and previous.flower_run != flower_run:
                raise LedgerError(f"{hospital}/{dataset}: run {run_id} is bound to Flower run {previous.flower_run}, "
                                  f"not {flower_run}")
            if previous.status != RESERVED:
                return previous  # closing twice changes nothing
            entry = replace(previous, status=status, updated_at=_now(), closed_reason=reason)
            db.execute("UPDATE entries SET status = ?, updated_at = ?, closed_reason = ? WHERE run_id = ? AND "
                       "hospital = ? AND dataset = ?", (status, entry.updated_at, reason, run_id, hospital, dataset))
            return entry

    def record_refusal(self, hospital: str, dataset: str, run_id: str, flower_run: int | None, reason: str) -> None:
        """A run the hospital refused, and why: its own history shows it, though nothing was spent."""
        with self._transaction() as db:
            db.execute("INSERT INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
                       (_now(), hospital, dataset, run_id, _text(flower_run), reason))

    def note_erasure(self, hospital: str, dataset: str, reference: str) -> dict[str, object]:
        """Record that a patient's records were erased from a hospital's dataset, with the bound DP gives on their
        influence on every run that trained on them before: the dataset's lifetime epsilon now (RDP composition of
        every run, open ones in full). The model is not untrained; this is what the hospital can truthfully say."""
        check_erasure_reference(reference)
        with self._transaction() as db:
            if not self._entries(db, hospital, dataset):  # a mistyped name would otherwise read as "no influence"
                raise LedgerError(f"{hospital}/{dataset}: no run in this ledger trained on it; check the names "
                                  "(fl-ledger show)")
            bound = self._balance(db, hospital, dataset, None)
            row = {"at": _now(), "hospital": hospital, "dataset": dataset, "reference": reference,
                   "runs": bound.runs, "rdp_epsilon": bound.rdp_epsilon, "delta": bound.delta}
            db.execute("INSERT INTO erasures VALUES (:at, :hospital, :dataset, :reference, :runs, :rdp_epsilon, "
                       ":delta)", row)
        return row

    def erasures(self, hospital: str | None = None) -> list[dict[str, object]]:
        with closing(self._connect()) as db:
            return [dict(r) for r in db.execute("SELECT * FROM erasures WHERE ? IS NULL OR hospital = ? ORDER BY at",
                                                (hospital, hospital))]

    def refusals(self, hospital: str | None = None) -> list[dict[str, object]]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM refusals WHERE ? IS NULL OR hospital = ? ORDER BY at",
                              (hospital, hospital)).fetchall()
            return [{**dict(r), "flower_run": _flower_run(r["flower_run"])} for r in rows]
