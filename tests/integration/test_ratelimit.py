"""The shared Redis token bucket (core.ratelimit) against a real Redis."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from core.errors import RateLimited
from core.ratelimit import BucketConfig, RedisTokenBucket
from core.runtime import connect_redis

KEY = "test:ratelimit:bucket"


def test_capacity_then_refill(redis_client):
    b = RedisTokenBucket(redis_client, KEY, BucketConfig(capacity=5, refill_per_s=10,
                                                         exit_reserve=0))
    assert [b.try_acquire()[0] for _ in range(5)] == [True] * 5
    granted, wait = b.try_acquire()
    assert not granted and 0 < wait <= 0.1 + 1e-6
    time.sleep(0.12)
    assert b.try_acquire()[0]


def test_entries_cannot_touch_the_exit_reserve(redis_client):
    b = RedisTokenBucket(redis_client, KEY, BucketConfig(capacity=5, refill_per_s=0.01,
                                                         exit_reserve=2))
    entries = [b.try_acquire("entry")[0] for _ in range(5)]
    assert entries == [True, True, True, False, False]
    # the reserve is there for exits, and only for them
    assert b.try_acquire("exit")[0] and b.try_acquire("exit")[0]
    assert not b.try_acquire("exit")[0]


def test_acquire_waits_then_raises(redis_client):
    b = RedisTokenBucket(redis_client, KEY, BucketConfig(capacity=1, refill_per_s=5,
                                                         exit_reserve=0, max_wait_s=1.0))
    assert b.acquire() == pytest.approx(0, abs=0.05)
    t0 = time.monotonic()
    waited = b.acquire()
    assert 0.15 <= waited <= 0.6 and time.monotonic() - t0 == pytest.approx(waited, abs=0.1)
    slow = RedisTokenBucket(redis_client, KEY + ":slow",
                            BucketConfig(capacity=1, refill_per_s=0.1, exit_reserve=0,
                                         max_wait_s=0.5))
    slow.acquire()
    t0 = time.monotonic()
    with pytest.raises(RateLimited, match="no entry token"):
        slow.acquire()
    assert time.monotonic() - t0 < 0.2  # it knows the wait is too long: no pointless sleep


def test_penalize_silences_everyone(redis_client, redis_url):
    cfg = BucketConfig(capacity=10, refill_per_s=10, exit_reserve=0)
    a = RedisTokenBucket(redis_client, KEY, cfg)
    b = RedisTokenBucket(connect_redis(redis_url), KEY, cfg)  # another client, same bucket
    a.penalize(0.5)
    granted, wait = b.try_acquire()
    assert not granted and 0.5 <= wait <= 0.7


def _worker(url: str, seconds: float, out) -> None:
    r = connect_redis(url)
    b = RedisTokenBucket(r, KEY, BucketConfig(capacity=4, refill_per_s=8, exit_reserve=0))
    got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ok, wait = b.try_acquire()
        if ok:
            got += 1
        else:
            time.sleep(min(wait, 0.01))
    out.put(got)


def test_one_bucket_across_processes(redis_client, redis_url):
    url = redis_url
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, 1.0, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    total = sum(out.get(timeout=5) for _ in procs)
    # capacity 4 at the start plus 8/s for ~1 s (process start-up skew adds a little)
    assert 6 <= total <= 4 + 8 * 1.5, total


def test_bad_config_refused():
    with pytest.raises(ValueError):
        BucketConfig(capacity=2, exit_reserve=2)
    with pytest.raises(ValueError):
        BucketConfig(refill_per_s=0)
