"""The shared circuit breaker against real Redis, with a fake clock (no sleeps)."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable

import pytest

from core.breaker import BreakerConfig, RedisCircuitBreaker
from core.errors import ConfigError
from core.keys import Keys
from core.runtime import connect_redis

T0 = 1_717_400_000.0  # a realistic epoch second
CFG = BreakerConfig(failure_threshold=3, window_s=60.0, cooldown_s=30.0)


class FakeClock:
    """Seconds, moved by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(redis_client, redis_url, clock) -> Callable[..., RedisCircuitBreaker]:
    """A breaker on its own client (another 'process'), sharing Redis and the fake clock."""

    def _make(keys: Keys | None = None, config: BreakerConfig = CFG,
              own_client: bool = False) -> RedisCircuitBreaker:
        client = connect_redis(redis_url) if own_client else redis_client
        return RedisCircuitBreaker(client, keys or Keys(), config, clock=clock)

    return _make


def _open(breaker: RedisCircuitBreaker) -> None:
    for _ in range(breaker.config.failure_threshold):
        breaker.record_failure()
    assert breaker.state().state == "open"


def test_closed_allows(make) -> None:
    b = make()
    assert b.allow()
    st = b.state()
    assert (st.state, st.failures, st.opened_at, st.retry_at) == ("closed", 0, None, None)


def test_threshold_minus_one_failures_keep_it_closed(make) -> None:
    b = make()
    assert [b.record_failure() for _ in range(CFG.failure_threshold - 1)] == ["closed"] * 2
    assert b.allow()
    assert b.state().failures == CFG.failure_threshold - 1


def test_threshold_opens_and_open_refuses(make, clock) -> None:
    b = make()
    b.record_failure()
    clock.advance(1)
    b.record_failure()
    clock.advance(1)
    assert b.record_failure() == "open"
    st = b.state()
    assert st.state == "open" and st.failures == 3
    assert st.opened_at == T0 + 2 and st.retry_at == T0 + 2 + CFG.cooldown_s
    assert not b.allow()
    assert not make(own_client=True).allow()  # another process sees it too
    clock.advance(CFG.cooldown_s - 0.001)
    assert not b.allow()


def test_failures_and_successes_while_open_keep_the_cooldown(make, clock) -> None:
    b = make()
    _open(b)
    clock.advance(10)
    assert b.record_failure() == "open"  # e.g. an exit failing: no new cooldown
    assert b.record_success() == "open"  # a stray success does not close it early
    assert b.state().opened_at == T0
    clock.advance(CFG.cooldown_s - 10)
    assert b.state().state == "half_open"
    assert b.allow()


def test_after_cooldown_exactly_one_concurrent_caller_gets_the_probe(make, clock) -> None:
    _open(make())
    clock.advance(CFG.cooldown_s)
    breakers = [make(own_client=True) for _ in range(8)]
    assert breakers[0].state().state == "half_open"
    start = threading.Barrier(len(breakers))
    results: list[bool] = [False] * len(breakers)

    def call(i: int) -> None:
        start.wait()
        results[i] = breakers[i].allow()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(breakers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(results) == 1
    assert not any(b.allow() for b in breakers)  # still only the one probe


def test_probe_success_closes_and_resets(make, redis_client, clock) -> None:
    b = make()
    _open(b)
    clock.advance(CFG.cooldown_s)
    assert b.allow()
    assert b.record_success() == "closed"
    st = b.state()
    assert (st.state, st.failures, st.opened_at) == ("closed", 0, None)
    assert all(make(own_client=True).allow() for _ in range(3))
    assert redis_client.keys("breaker:*") == []
    # the count starts over: threshold - 1 new failures keep it closed
    b.record_failure()
    assert b.record_failure() == "closed"


def test_probe_failure_reopens_with_a_fresh_cooldown(make, clock) -> None:
    b = make()
    _open(b)
    clock.advance(CFG.cooldown_s + 5)
    assert b.allow()
    assert b.record_failure() == "open"
    st = b.state()
    assert st.state == "open" and st.opened_at == T0 + CFG.cooldown_s + 5
    assert not b.allow()
    clock.advance(CFG.cooldown_s - 1)
    assert not make(own_client=True).allow()
    clock.advance(1)
    assert make(own_client=True).allow()  # a new probe after the new cooldown
    assert not b.allow()


def test_a_probe_that_never_reports_loses_its_lease(make, clock) -> None:
    b = make()
    _open(b)
    clock.advance(CFG.cooldown_s)
    assert b.allow()
    other = make(own_client=True)
    clock.advance(CFG.cooldown_s - 1)
    assert not other.allow()
    clock.advance(1)
    assert other.allow()
    assert not b.allow()


def test_a_success_while_closed_clears_the_count(make) -> None:
    b = make()
    b.record_failure()
    b.record_failure()
    assert b.record_success() == "closed"
    assert b.state().failures == 0
    b.record_failure()
    assert b.record_failure() == "closed"


def test_failures_older_than_the_window_do_not_count(make, clock) -> None:
    b = make()
    b.record_failure()
    clock.advance(30)
    b.record_failure()
    clock.advance(CFG.window_s - 30)  # the first failure is now exactly window_s old
    assert b.record_failure() == "closed"
    assert b.state().failures == 2
    clock.advance(29)
    assert b.record_failure() == "open"  # 3 within the last 60 s
    clock.advance(CFG.window_s * 10)
    assert b.state().failures == 0


def test_namespaces_and_names_are_independent(make, redis_client) -> None:
    a = make(keys=Keys.for_mode("sim", "a"))
    b = make(keys=Keys.for_mode("sim", "b"), own_client=True)
    _open(a)
    assert not a.allow()
    assert b.allow() and b.state().state == "closed"
    other_name = RedisCircuitBreaker(redis_client, Keys.for_mode("sim", "a"), CFG,
                                     name="data")
    assert other_name.allow()
    assert redis_client.exists("sim:a:breaker:broker") == 1
    assert redis_client.exists("sim:b:breaker:broker") == 0


def test_keys_expire(make, redis_client, clock) -> None:
    b = make()
    _open(b)
    clock.advance(CFG.cooldown_s)
    assert b.allow()
    keys = sorted(k.decode() for k in redis_client.keys("breaker:*"))
    assert keys == ["breaker:broker", "breaker:broker:failures", "breaker:broker:probe"]
    for key in keys:
        assert redis_client.pttl(key) > 0


@pytest.mark.parametrize("kwargs", [{"failure_threshold": 0}, {"window_s": 0},
                                    {"cooldown_s": -1.0}, {"failure_threshold": 2.5}])
def test_bad_config_refused(kwargs) -> None:
    with pytest.raises(ConfigError):
        BreakerConfig(**kwargs)


def test_bad_name_refused(redis_client) -> None:
    with pytest.raises(ConfigError):
        RedisCircuitBreaker(redis_client, Keys(), CFG, name="a:failures")


def _fail_many(url: str, prefix: str, threshold: int, n: int, start, out) -> None:
    b = RedisCircuitBreaker(connect_redis(url), Keys(prefix=prefix),
                            BreakerConfig(failure_threshold=threshold, window_s=600.0,
                                          cooldown_s=600.0))
    start.wait(30)
    out.put([b.record_failure() for _ in range(n)])


@pytest.mark.parametrize(("threshold", "per_proc"), [(1000, 200), (700, 200)])
def test_failures_from_four_processes(redis_client, redis_url, threshold, per_proc) -> None:
    procs_n = 4
    total = procs_n * per_proc
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(procs_n)
    out = ctx.Queue()
    procs = [ctx.Process(target=_fail_many,
                         args=(redis_url, "mp:", threshold, per_proc, start, out))
             for _ in range(procs_n)]
    for p in procs:
        p.start()
    returned = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    states = [s for r in returned for s in r]
    assert len(states) == total
    b = RedisCircuitBreaker(redis_client, Keys(prefix="mp:"),
                            BreakerConfig(failure_threshold=threshold, window_s=600.0,
                                          cooldown_s=600.0))
    st = b.state()
    if total < threshold:
        assert set(states) == {"closed"}
        assert (st.state, st.failures) == ("closed", total)
        assert b.allow()
    else:
        # every call saw one consistent order: exactly threshold - 1 saw it closed
        assert states.count("closed") == threshold - 1
        assert states.count("open") == total - threshold + 1
        assert st.state == "open" and st.opened_at is not None
        assert st.failures == total  # failures while open are still counted
        assert not b.allow()
