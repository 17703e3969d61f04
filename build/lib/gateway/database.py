"""The gateway's SQLite files (limits and budgets, audit log): how they are opened and written."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from privacy.ledger import create_tables, immediate_transaction


def open_database(path: Path, schema: str, synchronous: str = "NORMAL", timeout: float = 30.0) -> sqlite3.Connection:
    """Autocommit with explicit write transactions, WAL so readers never block the writer. NORMAL sync: a commit
    survives a process crash, a power cut may lose the last ones; FULL: it survives both. `timeout`: seconds to wait
    for another connection's write lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    db.execute(f"PRAGMA synchronous={synchronous}")
    create_tables(db, schema, timeout)
    return db


@contextmanager
def write_transaction(db: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    """One writer at a time: the thread lock within this process (threads share `db`), the ledger's immediate
    transaction across processes sharing the file."""
    with lock, immediate_transaction(db):
        yield db
