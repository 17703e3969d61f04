"""Per-user request limits and privacy spend, taken atomically in SQLite (one gateway) or Redis (several).

Two primitives serve both: a sliding-window counter (requests per hour) and capped sums taken together (a query's
privacy cost, added to its user's spend and to each voting hospital model's total, all or none; each adds what the
query cost, so that a change of configuration prices only the queries after it). A refused take changes nothing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis

from .database import open_database, write_transaction

SWEEP_INTERVAL = 60.0  # seconds between deletions of expired window events
SCHEMA = """
CREATE TABLE IF NOT EXISTS window_events (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS window_events_key_at ON window_events (key, at);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS spends (key TEXT PRIMARY KEY, total REAL NOT NULL);
"""
REDIS_PREFIX = "fl-gateway:"  # every key the gateway keeps in Redis starts with it: fl-backup copies those alone
LEGACY_BUDGET_PREFIX = "budget:"  # query counts, kept before spend was stored as what each query cost


class LimitStoreDown(Exception):
    """The store of limits and budgets cannot be reached: nothing can be checked, so nothing is answered (503)."""


@contextmanager
def _reachable(store: str) -> Iterator[None]:
    try:
        yield
    except (redis.RedisError, sqlite3.OperationalError) as err:
        raise LimitStoreDown(f"{store} unavailable: {type(err).__name__}") from err


@dataclass(frozen=True)
class Take:
    allowed: bool
    count: int  # events in the window (or the counter) after this take
    retry_after: float  # seconds until a refused take could succeed; 0 when allowed


@dataclass(frozen=True)
class Spend:
    allowed: bool
    totals: tuple[float, ...]  # each sum after this take (unchanged when refused), in the order of its keys


class LimitStore(Protocol):
    def take_window(self, key: str, cap: int, window: float) -> Take: ...
    def take_spends(self, keys: Sequence[str], cost: float, caps: Sequence[float]) -> Spend: ...
    def spent(self, key: str) -> float: ...
    def migrate_counts(self, prefix: str, cost_per_count: float) -> int: ...


class SQLiteLimitStore:
    """One gateway process: a write transaction per take (BEGIN IMMEDIATE) makes check-and-add atomic."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, SCHEMA)
        self._lock = threading.Lock()
        self._swept = 0.0

    def take_window(self, key: str, cap: int, window: float) -> Take:
        now = time.time()
        with _reachable("limit database"), write_transaction(self._db, self._lock) as db:
            if now - self._swept > SWEEP_INTERVAL:  # expired events cost nothing but space: sweep now and then
                db.execute("DELETE FROM window_events WHERE at <= ?", (now - window,))
                self._swept = now
            count, oldest = db.execute("SELECT COUNT(*), MIN(at) FROM window_events WHERE key = ? AND at > ?",
                                       (key, now - window)).fetchone()
            if count >= cap:
                return Take(False, count, max(oldest + window - now, 0.0))
            db.execute("INSERT INTO window_events (key, at) VALUES (?, ?)", (key, now))
        return Take(True, count + 1, 0.0)

    def take_spends(self, keys: Sequence[str], cost: float, caps: Sequence[float]) -> Spend:
        with _reachable("limit database"), write_transaction(self._db, self._lock) as db:
            totals = tuple(self._spent(key) for key in keys)
            if any(total + cost > cap for total, cap in zip(totals, caps, strict=True)):
                return Spend(False, totals)
            db.executemany("INSERT INTO spends (key, total) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET total = total + excluded.total",
                           [(key, cost) for key in keys])
        return Spend(True, tuple(total + cost for total in totals))

    def _spent(self, key: str) -> float:
        row = self._db.execute("SELECT total FROM spends WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else 0.0

    def spent(self, key: str) -> float:
        with _reachable("limit database"), self._lock:
            return self._spent(key)

    def migrate_counts(self, prefix: str, cost_per_count: float) -> int:
        """Fold query counts stored under `LEGACY_BUDGET_PREFIX` into spends at `cost_per_count` each; once."""
        with write_transaction(self._db, self._lock) as db:
            rows = db.execute("SELECT key, value FROM counters WHERE key LIKE ?",
                              (LEGACY_BUDGET_PREFIX + "%",)).fetchall()
            for key, value in rows:
                db.execute("INSERT INTO spends (key, total) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                           "total = total + excluded.total",
                           (prefix + key.removeprefix(LEGACY_BUDGET_PREFIX), value * cost_per_count))
            db.execute("DELETE FROM counters WHERE key LIKE ?", (LEGACY_BUDGET_PREFIX + "%",))
        return len(rows)


# Sliding window as a sorted set of arrival times; a member is unique per take (time plus a sequence number).
WINDOW_SCRIPT = """
local key, cap, window, now = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count >= cap then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, count, tostring(tonumber(oldest[2]) + window - now)}
end
local seq = redis.call('INCR', key .. ':seq')
redis.call('ZADD', key, now, now .. ':' .. seq)
redis.call('PEXPIRE', key, math.ceil(window * 1000))
redis.call('PEXPIRE', key .. ':seq', math.ceil(window * 1000))
return {1, count + 1, '0'}
"""

# Floats travel as strings: Lua numbers are doubles, and Redis's reply would truncate them to integers.
SPEND_SCRIPT = """
local cost, totals, allowed = tonumber(ARGV[1]), {}, 1
for i, key in ipairs(KEYS) do
  totals[i] = redis.call('GET', key) or '0'
  if tonumber(totals[i]) + cost > tonumber(ARGV[i + 1]) then allowed = 0 end
end
if allowed == 1 then
  for i, key in ipairs(KEYS) do totals[i] = redis.call('INCRBYFLOAT', key, ARGV[1]) end
end
return {allowed, unpack(totals)}
"""
MIGRATE_SCRIPT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 0 then redis.call('INCRBYFLOAT', KEYS[2], count * tonumber(ARGV[1])) end
redis.call('DEL', KEYS[1])
return count
"""


class RedisLimitStore:
    """Several gateway replicas: each take is one Lua script, which Redis runs atomically."""

    def __init__(self, url: str, password: str | None = None, ca_file: str | None = None,
                 prefix: str = REDIS_PREFIX) -> None:
        tls = {"ssl_ca_certs": ca_file} if ca_file else {}
        self._redis = redis.Redis.from_url(url, password=password, socket_timeout=5, socket_connect_timeout=2, **tls)
        self._redis.ping()
        self._prefix = prefix
        self._window = self._redis.register_script(WINDOW_SCRIPT)
        self._spend = self._redis.register_script(SPEND_SCRIPT)
        self._migrate = self._redis.register_script(MIGRATE_SCRIPT)

    def take_window(self, key: str, cap: int, window: float) -> Take:
        with _reachable("redis"):
            allowed, count, retry = self._window(keys=[self._prefix + key], args=[cap, window, time.time()])
        return Take(bool(allowed), int(count), max(float(retry), 0.0))

    def take_spends(self, keys: Sequence[str], cost: float, caps: Sequence[float]) -> Spend:
        with _reachable("redis"):
            allowed, *totals = self._spend(keys=[self._prefix + key for key in keys],
                                           args=[repr(cost), *map(repr, caps)])
        return Spend(bool(allowed), tuple(float(total) for total in totals))

    def spent(self, key: str) -> float:
        with _reachable("redis"):
            value = self._redis.get(self._prefix + key)
        return float(value) if value is not None else 0.0

    def migrate_counts(self, prefix: str, cost_per_count: float) -> int:
        legacy = [k.decode() for k in self._redis.scan_iter(match=self._prefix + LEGACY_BUDGET_PREFIX + "*")
                  if not k.decode().endswith(":seq")]
        for key in legacy:
            user = key.removeprefix(self._prefix + LEGACY_BUDGET_PREFIX)
            self._migrate(keys=[key, self._prefix + prefix + user], args=[repr(cost_per_count)])
        return len(legacy)
