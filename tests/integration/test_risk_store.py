"""The daily-limit contract, run against the in-memory store and real Redis alike."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp

import pytest

from core.keys import Keys
from core.risk_store import MemoryDailyLimitStore, RedisDailyLimitStore
from core.runtime import connect_redis

DAY = dt.date(2024, 6, 3)
LIMIT = 500_000  # $5,000 in cents


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest):
    if request.param == "memory":
        return MemoryDailyLimitStore()
    client = request.getfixturevalue("redis_client")
    return RedisDailyLimitStore(client, Keys())


def test_reserve_counts_once_per_order(store) -> None:
    first = store.reserve(DAY, "orb-AAPL-20240603-0945-L", 100_000, LIMIT)
    again = store.reserve(DAY, "orb-AAPL-20240603-0945-L", 100_000, LIMIT)
    assert (first.status, first.used_cents) == ("reserved", 100_000)
    assert (again.status, again.amount_cents) == ("exists", 100_000)
    assert store.used(DAY) == 100_000


def test_limit_is_strict(store) -> None:
    assert store.reserve(DAY, "a", 300_000, LIMIT).ok
    assert store.reserve(DAY, "b", 200_000, LIMIT).ok  # exactly at the limit
    refused = store.reserve(DAY, "c", 1, LIMIT)
    assert refused.status == "limit" and not refused.ok
    assert store.used(DAY) == LIMIT
    assert "c" not in store.reservations(DAY)


@pytest.mark.parametrize("amount", [0, -5, 10**16, 1.5, float("nan"), True, "100"])
def test_bad_amounts_rejected_before_any_write(store, amount) -> None:
    res = store.reserve(DAY, "x", amount, LIMIT)
    assert res.status == "invalid"
    assert store.used(DAY) == 0
    assert store.reservations(DAY) == {}


def test_release_and_shrink(store) -> None:
    store.reserve(DAY, "a", 100_000, LIMIT)
    store.reserve(DAY, "b", 50_000, LIMIT)
    assert store.adjust(DAY, "a", 80_000) == 130_000  # partial fill shrinks
    assert store.adjust(DAY, "b", 0) == 80_000  # rejection releases
    assert store.peak(DAY) == 150_000
    # a released order cannot reserve again under the same id (a redelivery must not trade)
    again = store.reserve(DAY, "b", 50_000, LIMIT)
    assert again.status == "released" and not again.ok
    with pytest.raises(ValueError):
        store.adjust(DAY, "a", 90_000)  # never grows
    with pytest.raises(ValueError):
        store.adjust(DAY, "zzz", 0)


def test_days_are_separate(store) -> None:
    store.reserve(DAY, "a", LIMIT, LIMIT)
    assert store.reserve(DAY + dt.timedelta(days=1), "a", LIMIT, LIMIT).ok


def test_redis_key_name_is_the_documented_one(redis_client) -> None:
    RedisDailyLimitStore(redis_client, Keys()).reserve(DAY, "a", 1234, LIMIT)
    assert int(redis_client.get("daily_used_capital:2024-06-03")) == 1234
    assert redis_client.ttl("daily_used_capital:2024-06-03") > 0
    sim = RedisDailyLimitStore(redis_client, Keys.for_mode("sim", "run1"))
    sim.reserve(DAY, "a", 99, LIMIT)
    assert int(redis_client.get("sim:run1:daily_used_capital:2024-06-03")) == 99


def _hammer(url: str, worker: int, n: int, amount: int) -> None:
    store = RedisDailyLimitStore(connect_redis(url), Keys())
    for i in range(n):
        store.reserve(DAY, f"w{worker}-{i}", amount, LIMIT)


def test_concurrent_reservations_from_processes_never_exceed_limit(redis_client, redis_url):
    # 8 processes, 50 reservations in all, asking for 2x the limit together
    amount = 2 * LIMIT // 50
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(redis_url, w, 50 // 8 + (w < 50 % 8), amount))
             for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = RedisDailyLimitStore(redis_client, Keys())
    used = store.used(DAY)
    assert used <= LIMIT
    assert used == sum(store.reservations(DAY).values())
    assert len(store.reservations(DAY)) == LIMIT // amount  # exactly as many as fit
