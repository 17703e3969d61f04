"""Per-user request limits and query budgets, taken atomically in SQLite (one gateway) or Redis (several).

Two primitives serve both: a sliding-window counter (requests per hour) and a capped counter (epsilon-spending
queries a user may still make). A refused take changes nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .database import open_database, write_transaction

SWEEP_INTERVAL = 60.0  # seconds between deletions of expired window events
SCHEMA = """
CREATE TABLE IF NOT EXISTS window_events (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS window_events_key_at ON window_events (key, at);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Take:
    allowed: bool
    count: int  # events in the window (or the counter) after this take
    retry_after: float  # seconds until a refused take could succeed; 0 when allowed


class LimitStore(Protocol):
    def take_window(self, key: str, cap: int, window: float) -> Take: ...
    def take_counter(self, key: str, cap: int) -> Take: ...
    def counter(self, key: str) -> int: ...


class SQLiteLimitStore:
    """One gateway process: a write transaction per take (BEGIN IMMEDIATE) makes check-and-add atomic."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, SCHEMA)
        self._lock = threading.Lock()
        self._swept = 0.0

    def take_window(self, key: str, cap: int, window: float) -> Take:
        now = time.time()
        with write_transaction(self._db, self._lock) as db:
            if now - self._swept > SWEEP_INTERVAL:  # expired events cost nothing but space: sweep now and then
                db.execute("DELETE FROM window_events WHERE at <= ?", (now - window,))
                self._swept = now
            count, oldest = db.execute("SELECT COUNT(*), MIN(at) FROM window_events WHERE key = ? AND at > ?",
                                       (key, now - window)).fetchone()
            if count >= cap:
                return Take(False, count, max(oldest + window - now, 0.0))
            db.execute("INSERT INTO window_events (key, at) VALUES (?, ?)", (key, now))
        return Take(True, count + 1, 0.0)

    def take_counter(self, key: str, cap: int) -> Take:
        with write_transaction(self._db, self._lock) as db:
            value = self._counter(key)
            if value >= cap:
                return Take(False, value, 0.0)
            db.execute("INSERT INTO counters (key, value) VALUES (?, 1) "
                       "ON CONFLICT (key) DO UPDATE SET value = value + 1", (key,))
        return Take(True, value + 1, 0.0)

    def _counter(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def counter(self, key: str) -> int:
        with self._lock:
            return self._counter(key)


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

COUNTER_SCRIPT = """
local value = tonumber(redis.call('GET', KEYS[1]) or '0')
if value >= tonumber(ARGV[1]) then return {0, value} end
return {1, redis.call('INCR', KEYS[1])}
"""


class RedisLimitStore:
    """Several gateway replicas: each take is one Lua script, which Redis runs atomically."""

    def __init__(self, url: str, prefix: str = "fl-gateway:") -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=5)
        self._redis.ping()
        self._prefix = prefix
        self._window = self._redis.register_script(WINDOW_SCRIPT)
        self._counter_script = self._redis.register_script(COUNTER_SCRIPT)

    def take_window(self, key: str, cap: int, window: float) -> Take:
        allowed, count, retry = self._window(keys=[self._prefix + key], args=[cap, window, time.time()])
        return Take(bool(allowed), int(count), max(float(retry), 0.0))

    def take_counter(self, key: str, cap: int) -> Take:
        allowed, value = self._counter_script(keys=[self._prefix + key], args=[cap])
        return Take(bool(allowed), int(value), 0.0)

    def counter(self, key: str) -> int:
        value = self._redis.get(self._prefix + key)
        return int(value) if value is not None else 0
