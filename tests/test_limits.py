"""The limit stores' capped sums, on SQLite and on a real redis-server (with a password, and over TLS): a query's
cost is added to its user's and to each voting hospital model's spend together, or to none, with a float's precision
(Redis sums in long double)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from servers import redis_server

from gateway.limits import LimitStore, RedisLimitStore, SQLiteLimitStore
from scripts.federation import init

PASSWORD = "redis-password-of-32-characters!"

COST = 0.1  # not a binary fraction: a sum kept as anything coarser than a double (an integer, 14 digits) would drift


@pytest.fixture(params=["sqlite", "redis", "redis-tls"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LimitStore]:
    if request.param == "sqlite":
        yield SQLiteLimitStore(tmp_path / "limits.sqlite")
        return
    tls = request.param == "redis-tls"
    if tls:
        init(tmp_path / "certs", [], [], days=1)  # the federation's CA and a server certificate for 127.0.0.1
    certs = tmp_path / "certs"
    with redis_server(PASSWORD, certs if tls else None) as port:
        if tls:
            with pytest.raises(redis.ConnectionError):  # plaintext is not spoken
                RedisLimitStore(f"redis://127.0.0.1:{port}/0", PASSWORD)
            yield RedisLimitStore(f"rediss://127.0.0.1:{port}/0", PASSWORD, str(certs / "ca.crt"))
        else:
            with pytest.raises(redis.AuthenticationError):
                RedisLimitStore(f"redis://127.0.0.1:{port}/0")
            yield RedisLimitStore(f"redis://127.0.0.1:{port}/0", PASSWORD)


def test_a_charge_goes_to_every_key_or_to_none(store: LimitStore) -> None:
    keys, caps = ["spend:ann", "deployment-spend:h0", "deployment-spend:h1"], [0.35, 1.0, 0.25]
    assert [store.take_spends(keys, COST, caps).allowed for _ in range(3)] == [True, True, False]
    refused = store.take_spends(keys, COST, caps)  # h1's cap: nothing is added anywhere
    assert not refused.allowed and refused.totals == pytest.approx((0.2, 0.2, 0.2))
    assert [store.spent(k) for k in keys] == pytest.approx([0.2] * 3, rel=1e-15)
    other = store.take_spends(["spend:bob", "deployment-spend:h0"], COST, [0.35, 1.0])
    assert other.allowed and other.totals == pytest.approx((0.1, 0.3), rel=1e-15)


def test_concurrent_charges_never_overspend_a_shared_total(store: LimitStore) -> None:
    """Twenty users at once against one hospital model's total of five queries: five pass, and it holds five."""
    def ask(i: int) -> bool:
        return store.take_spends([f"spend:u{i}", "deployment-spend:h0"], 1.0, [3.0, 5.0]).allowed

    with ThreadPoolExecutor(8) as pool:
        allowed = list(pool.map(ask, range(20)))
    assert allowed.count(True) == 5 and store.spent("deployment-spend:h0") == 5.0
