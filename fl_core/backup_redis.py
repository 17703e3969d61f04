"""Redis items for fl-backup: the limits and privacy spend that gateway replicas share in Redis, copied as of one
instant and put back all at once or not at all. A lost Redis would hand every user their spent epsilon back.

Only the gateway's keys (`REDIS_PREFIX`) are read or written, and a restore's own temporary ones (`STAGING_PREFIX`):
a Redis may hold other applications' keys. A copy is one read-only Lua script, which Redis runs atomically, so no
take interleaves: it SCANs for the prefix and DUMPs each key with its PTTL, stamped with Redis's own clock (a MULTI
could not: it cannot DUMP keys a SCAN in it has yet to find, and a SCAN before it misses keys made in between). The
script blocks Redis for as long as it takes over the whole keyspace (SCAN visits every key), which is why the
gateways should have a Redis of their own; EVAL_RO needs Redis 7. Expiry is kept as that absolute time, so a
restored rate window ends when it would have, and a key that has expired since is not brought back.

A restore is all or none: MULTI/EXEC rolls nothing back when one command in it fails, and a RESTORE fails on a
payload Redis refuses, so each payload is first RESTOREd under a temporary name outside the gateway's keys (where no
copy reads it), and only once Redis has accepted them all are they RENAMEd over the gateway's keys in one MULTI/EXEC,
which cannot fail part way. The transaction runs under WATCH of every key it writes and of the temporary ones: a
write to any of them in between aborts it, so what was kept aside before it is exactly what it replaced.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from gateway.limits import REDIS_PREFIX

FORMAT = 1
ATTEMPTS = 5  # restores aborted by a write in between before giving up: the gateways should be stopped
STAGING_PREFIX = "fl-backup:restoring:"  # a restore's payloads before they are renamed over the gateway's keys
STAGING_TTL_MS = 3_600_000  # what a restore that died half way staged is gone within the hour
SNAPSHOT_SCRIPT = """
local out, cursor = {redis.call('TIME')}, '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    local dump, pttl = redis.call('DUMP', key), redis.call('PTTL', key)
    if dump and pttl ~= 0 then out[#out + 1] = {key, pttl, dump} end  -- 0: it expires this millisecond
  end
until cursor == '0'
return out
"""


class InTheWay(Exception):
    """Some of the keys a restore would write are in the target, and replacing them was not asked for."""


class Refused(Exception):
    """Redis refused a key's payload: nothing of the restore was written."""


@dataclass(frozen=True)
class RedisAccess:
    """How fl-backup reaches a Redis: the gateway's password (never in a URL, a log or a repr) and, for
    rediss://, the CA that signed its certificate (default: the system's)."""

    password: str = field(repr=False)
    ca_file: Path | None = None


@dataclass(frozen=True)
class Key:
    key: bytes
    pttl: int  # milliseconds left at the snapshot's time; -1: no expiry
    dump: bytes  # Redis's DUMP serialization, with its own checksum


@dataclass(frozen=True)
class Snapshot:
    time_ms: int  # Redis's clock when the copy was taken
    keys: list[Key]


def url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, without repeating it (it might hold a password)."""
    try:
        parsed = urlparse(url)
        _ = parsed.port  # raises on a port that is no number
    except ValueError:
        return "not a URL like redis://HOST:PORT/DB"
    if parsed.password is not None or "password" in parsed.query:
        return "holds a password: pass it in the environment variable --redis-password-env names"
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        return "expected redis://HOST:PORT/DB, or rediss:// for TLS"
    if parsed.query or parsed.fragment or parsed.path.strip("/") not in ("", *map(str, range(16))):
        return "expected redis://HOST:PORT/DB with DB a number and no options after it"
    return None


def connect(url: str, access: RedisAccess) -> redis.Redis:
    """A client for `url`, checked with a PING (so a wrong password or address fails before anything is written)."""
    tls = {"ssl_ca_certs": str(access.ca_file)} if access.ca_file else {}
    client = redis.Redis.from_url(url, password=access.password, socket_timeout=60, socket_connect_timeout=5, **tls)
    client.ping()
    return client


def take_snapshot(client: redis.Redis, target: Path) -> int:
    """Write the gateway's keys as of one instant to `target`; returns how many."""
    (seconds, micros), *rows = client.eval_ro(SNAPSHOT_SCRIPT, 0, REDIS_PREFIX + "*")
    keys = [{"key": _b64(key), "pttl": int(pttl), "dump": _b64(dump)} for key, pttl, dump in rows]
    target.write_text(json.dumps({"format": FORMAT, "prefix": REDIS_PREFIX,
                                  "time_ms": int(seconds) * 1000 + int(micros) // 1000, "keys": keys}) + "\n")
    return len(keys)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot file, every key checked to be the gateway's; ValueError saying what is wrong."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        version = (data["format"], data["prefix"])
        keys = [Key(base64.b64decode(k["key"], validate=True), int(k["pttl"]),
                    base64.b64decode(k["dump"], validate=True)) for k in data["keys"]]
        snapshot = Snapshot(int(data["time_ms"]), keys)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as err:
        raise ValueError(f"unreadable ({type(err).__name__})") from None
    if version != (FORMAT, REDIS_PREFIX):
        raise ValueError(f"format {version[0]!r} of keys {version[1]!r}, this version reads {FORMAT} of "
                         f"{REDIS_PREFIX!r}")
    if any(not k.key.startswith(REDIS_PREFIX.encode()) or not (k.pttl == -1 or k.pttl > 0) for k in keys):
        raise ValueError(f"holds a key outside {REDIS_PREFIX!r}, or an expiry Redis does not give")
    return snapshot


def to_write(client: redis.Redis, snapshot: Snapshot) -> list[Key]:
    """The snapshot's keys that have not expired by the target's clock: the others are not brought back."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return [k for k in snapshot.keys if k.pttl < 0 or snapshot.time_ms + k.pttl > now_ms]


def existing(client: redis.Redis, keys: list[Key]) -> int:
    """How many of `keys` are in the target now."""
    return int(client.exists(*(k.key for k in keys))) if keys else 0


def stage(client: redis.Redis, keys: list[Key]) -> list[bytes]:
    """RESTORE each key's payload under a temporary name of its own, in one round trip; returns the names. When
    Redis refuses any payload, removes them all and raises Refused naming the first key refused."""
    token = uuid.uuid4().hex
    staged = [f"{STAGING_PREFIX}{token}:{i}".encode() for i in range(len(keys))]
    try:
        with client.pipeline(transaction=False) as pipe:
            for k, name in zip(keys, staged, strict=True):
                pipe.restore(name, STAGING_TTL_MS, k.dump)
            results = pipe.execute(raise_on_error=False)
        for k, result in zip(keys, results, strict=True):
            if isinstance(result, redis.ResponseError):
                first = str(result).splitlines()[0] if str(result) else ""
                raise Refused(f"redis refused the copy of key {k.key.decode(errors='replace')!r} ({first})")
    except BaseException:
        unstage(client, staged)
        raise
    return staged


def unstage(client: redis.Redis, staged: list[bytes]) -> None:
    """Remove what `stage` left; on a lost connection, their expiry removes them."""
    with contextlib.suppress(redis.RedisError):
        client.delete(*staged)


def check_payloads(client: redis.Redis, keys: list[Key]) -> None:
    """Refused, before anything is written, when Redis would refuse any key's payload."""
    if keys:
        unstage(client, stage(client, keys))


def put_back(client: redis.Redis, snapshot: Snapshot, replace: bool, keep_aside: Callable[[], Path]) -> Path | None:
    """Restore the snapshot's unexpired keys, all or none (Refused when Redis refuses a payload). When some exist
    already: without `replace`, InTheWay; with it, `keep_aside` first backs up what is there, and that backup is
    returned."""
    for _ in range(ATTEMPTS):
        keys = to_write(client, snapshot)
        if not keys:
            return None
        staged = stage(client, keys)
        try:
            with client.pipeline() as pipe:
                pipe.watch(*(k.key for k in keys), *staged)
                kept = None
                if existing(pipe, keys):  # a watching pipeline runs it at once
                    if not replace:
                        raise InTheWay
                    kept = keep_aside()
                pipe.multi()
                for k, name in zip(keys, staged, strict=True):
                    pipe.rename(name, k.key)  # the staged key is there (watched): RENAME cannot fail
                    if k.pttl > 0:
                        pipe.pexpireat(k.key, snapshot.time_ms + k.pttl)  # one that has ended since is removed
                    else:
                        pipe.persist(k.key)
                try:
                    pipe.execute()
                    return kept
                except redis.WatchError:
                    if kept is not None:
                        shutil.rmtree(kept)  # it no longer holds what a retry would replace
        finally:
            unstage(client, staged)
    raise redis.WatchError(f"its keys kept changing over {ATTEMPTS} tries: stop the gateways that use it first")

