"""The hot path's Redis pieces on a real server: the positions log that lets each process read
only the positions that changed, reads that ride on another round trip (locks, lookups, the
breaker, the decision's snapshot), the fills settlement script and the one-round-trip tick,
each against its plain form and the backtester's in-memory twin."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from core import replay as replay_mod
from core import risk_store
from core.breaker import BreakerConfig, RedisCircuitBreaker
from core.brokers.base import OrderRequest
from core.brokers.fill_model import FillModel
from core.brokers.simulated import SimulatedBroker
from core.keys import Keys
from core.locks import TokenLock
from core.market.bar_store import RedisBarStore
from core.memredis import MemoryRedis
from core.replay import RedisReplay
from core.risk_store import MemoryDailyLimitStore, RedisDailyLimitStore
from tests.integration.test_memredis import _dump
from tests.integration.test_sim_broker import DAY, advance, make_day


def _broker(redis: Any, keys: Keys, replay: RedisReplay) -> SimulatedBroker:
    model = FillModel(slippage_bps=10, fee_per_share=Decimal("0.01"), fee_min=Decimal("1"))
    return SimulatedBroker(redis, keys, replay, model, starting_cash_cents=10_000_000)


@pytest.fixture
def two(redis_client):
    """Two processes' views of one simulated account: the tick's broker and another."""
    keys = Keys.for_mode("sim", "hot")
    store = RedisBarStore(redis_client, keys)
    replay = RedisReplay(redis_client, keys, store)
    day = make_day(("AAA", "BBB", "CCC"))
    replay.prepare([day])
    writer = _broker(redis_client, keys, replay)
    writer.open_account()
    reader = _broker(redis_client, keys, RedisReplay(redis_client, keys, store))
    return keys, replay, writer, reader


def _fill_bar(replay: RedisReplay, keys: Keys, broker: SimulatedBroker) -> None:
    adv = advance(replay, keys)
    broker.process_bar(replay.days()[0], adv.bar, adv.row)


def test_every_reader_sees_the_positions_the_hash_holds(two) -> None:
    keys, replay, writer, reader = two
    advance(replay, keys)
    assert reader.positions_cached() == {} == writer.get_positions()
    steps = [
        [OrderRequest("a1", "AAA", "buy", 10), OrderRequest("b1", "BBB", "sell", 5)],
        [OrderRequest("a2", "AAA", "buy", 5)],  # adds to a position
        [OrderRequest("b1-x1", "BBB", "buy", 5, intent="exit", close=True)],  # closes one
        [OrderRequest("c1", "CCC", "buy", 3),
         OrderRequest("a1-x1", "AAA", "sell", 15, intent="exit", close=True)],
    ]
    for orders in steps:
        for request in orders:
            assert writer.submit_order(request).status == "accepted", request
        _fill_bar(replay, keys, writer)
        truth = writer.get_positions()
        assert reader.positions_cached() == truth
        assert reader.snapshot()[0] == truth
        assert _broker(writer._r, keys, replay).positions_cached() == truth  # a new reader
    assert set(writer.get_positions()) == {"CCC"}
    # an exit that ends unfilled bumps the position's attempt count: a change like any other
    writer.submit_order(OrderRequest("c1-x1", "CCC", "sell", 3, intent="exit", close=True))
    writer.cancel_order("c1-x1")
    assert reader.positions_cached()["CCC"].exit_attempt == 1
    # the end of a session empties the log; readers reload once and stay right
    writer.compact_positions_log()
    assert writer._r.llen(keys.broker("positions_log")) == 0
    assert reader.positions_cached() == writer.get_positions()
    writer.submit_order(OrderRequest("c1-x2", "CCC", "sell", 3, intent="exit", close=True))
    _fill_bar(replay, keys, writer)
    assert reader.positions_cached() == writer.get_positions() == {}


def test_queued_snapshot_matches_the_plain_one(two, redis_client) -> None:
    keys, replay, writer, reader = two
    advance(replay, keys)
    writer.submit_order(OrderRequest("a1", "AAA", "buy", 10))
    _fill_bar(replay, keys, writer)
    writer.submit_order(OrderRequest("a1-x1", "AAA", "sell", 10, intent="exit", close=True))
    writer.submit_order(OrderRequest("b1", "BBB", "buy", 2, order_type="limit",
                                     limit_price="500", time_in_force="day"))
    pipe = redis_client.pipeline(transaction=True)
    n, finish = reader.queue_snapshot(pipe, DAY)
    positions, orders, realized = finish(pipe.execute()[:n])
    assert (positions, orders) == writer.snapshot()
    assert realized == writer.realized_pnl_cents(DAY)
    assert [o.client_order_id for o in orders] == ["a1-x1", "b1"]


def test_a_lookup_and_a_lock_ride_on_one_round_trip(redis_client, two) -> None:
    keys, replay, writer, _reader = two
    advance(replay, keys)
    writer.submit_order(OrderRequest("a1", "AAA", "buy", 1))
    lock = TokenLock(redis_client, keys.order_lock("a1"))
    pipe = redis_client.pipeline(transaction=False)
    lock.queue_acquire(pipe)
    lookup = writer.queue_lookup(pipe, "a1")
    taken, raw = pipe.execute()
    assert lock.taken(taken) and lookup(raw) == writer.get_order_by_client_id("a1")
    other = TokenLock(redis_client, keys.order_lock("a1"))
    assert not other.acquire()  # held
    pipe = redis_client.pipeline(transaction=True)
    pipe.get(keys.order_lock("a1"))
    lock.queue_release(pipe)
    assert lock.held  # until the pipeline ran
    token, released = pipe.execute()
    lock.released()
    assert token and released == 1 and not lock.held and other.acquire()
    assert writer.queue_lookup(redis_client.pipeline(), "nope")(None) is None


def test_breaker_answers_the_same_on_a_shared_round_trip(redis_client) -> None:
    now = [1000.0]
    cfg = BreakerConfig(failure_threshold=2, window_s=60, cooldown_s=10)

    def both() -> tuple[bool, bool]:
        a = RedisCircuitBreaker(redis_client, Keys("x:"), cfg, clock=lambda: now[0])
        pipe = redis_client.pipeline(transaction=False)
        finish = a.queue_allow(pipe)
        queued = finish(pipe.execute()[0])
        clean = a.clean
        plain = RedisCircuitBreaker(redis_client, Keys("x:"), cfg, clock=lambda: now[0])
        return queued, clean, plain.allow(), plain.clean

    assert both() == (True, True, True, True)  # nothing on record
    b = RedisCircuitBreaker(redis_client, Keys("x:"), cfg, clock=lambda: now[0])
    b.record_failure()
    queued, clean, plain, plain_clean = both()  # closed, a failure in the window
    assert queued is plain is True and clean == plain_clean
    b.record_failure()
    assert both()[0] is False and both()[2] is False  # open
    b.record_success()  # a success while open and cooling down changes nothing
    assert both()[0] is False
    now[0] += 11  # half-open: one probe only, whichever form asks first
    a = RedisCircuitBreaker(redis_client, Keys("x:"), cfg, clock=lambda: now[0])
    pipe = redis_client.pipeline(transaction=False)
    finish = a.queue_allow(pipe)
    assert finish(pipe.execute()[0]) is True
    assert b.allow() is False


def test_settling_fills_in_one_script_equals_adjusting_each(redis_client) -> None:
    day = dt.date(2024, 6, 3)
    real = RedisDailyLimitStore(redis_client, Keys("r:"))
    mem = RedisDailyLimitStore(MemoryRedis(), Keys("r:"))  # the backtester's twin
    plain = MemoryDailyLimitStore()
    for store in (real, mem, plain):
        for coid, amount in (("a", 50_000), ("b", 30_000), ("c", 20_000), ("d", 10_000)):
            assert store.reserve(day, coid, amount, 1_000_000).ok
    fills = [("a", 49_000, True), ("b", 0, False), ("c", 25_000, True), ("zz", 5, True),
             ("d", 10_000, True)]
    got = [store.settle_fills(day, fills) for store in (real, mem, plain)]
    assert got[0] == got[1] == got[2] == [50_000, 30_000, 20_000, None, 10_000]
    for store in (real, mem, plain):
        assert store.reservations(day) == {"a": 49_000, "b": 0, "c": 20_000, "d": 10_000}
        assert store.used(day) == 79_000 and store.peak(day) == 110_000
    # queued on a pipeline with other commands: the replies keep their places
    pipe = redis_client.pipeline(transaction=False)
    pipe.set("before", 1)
    read = real.settle_fills(day, [("a", 40_000, True)], pipe)
    pipe.set("after", 1)
    before, reply, after = pipe.execute()
    assert before and after and read(reply) == [49_000] and real.used(day) == 70_000
    with pytest.raises(ValueError):
        real.settle_fills(day, [("a", -1, True)])


def test_memory_twin_of_settle_leaves_the_same_data(redis_client) -> None:
    mem = MemoryRedis()
    args = [3600, "a", 900, "1", "b", 0, "0", "q", 1, "1"]
    keys = ["used", "res", "peak"]
    for r in (redis_client, mem):
        r.set("used", 3000)
        r.hset("res", mapping={"a": 1000, "b": 2000})
    real = redis_client.register_script(risk_store._SETTLE_LUA)(keys=keys, args=args)
    fake = mem.register_script(risk_store._SETTLE_LUA)(keys=keys, args=args)
    assert fake == real == [1000, 2000, -1]
    assert _dump(mem) == _dump(redis_client)


def test_a_twin_queued_on_a_memory_pipeline_runs_in_order() -> None:
    mem = MemoryRedis()
    release = mem.register_script(replay_mod._SETTLE_LUA)
    pipe = mem.pipeline()
    pipe.hset("st", mapping={"date": "2024-06-03", "bar": 4, "settled": 3})
    release(keys=["st"], args=["2024-06-03", 4, "9.5"], client=pipe)
    pipe.hget("st", "settled")
    assert pipe.execute() == [3, 1, b"4"]


@pytest.mark.parametrize("make", ["real", "memory"])
def test_the_one_round_trip_advance_equals_the_full_path(redis_client, make) -> None:
    redis = redis_client if make == "real" else MemoryRedis()
    keys = Keys.for_mode("sim", "adv")
    store = RedisBarStore(redis, keys)
    replay = RedisReplay(redis, keys, store)
    day = make_day(("AAA", "BBB"))
    replay.prepare([day])
    fresh = RedisReplay(redis, keys, store)
    assert fresh.advance_next(1.0) is None  # no session seen yet: the full path decides
    replay.state()  # seen
    first = replay.advance_next(1.0)
    assert (first.status, first.bar) == ("advanced", 0)
    assert np.array_equal(first.row, day.ohlcv[0])
    assert replay.advance_next(2.0) is None  # bar 0 not settled: the full path waits
    replay.settle(DAY, 0)
    second = replay.advance_next(3.0)
    assert (second.status, second.bar) == ("advanced", 1)
    assert redis.exists(keys.tick_guard(DAY, 1))
    assert np.array_equal(store.read(DAY), day.ohlcv[:2])
    st = replay.state()
    assert (st.bar, st.settled, st.dispatched_at) == (1, 0, 3.0)
    # a guard already taken for the next bar (a duplicated beat): nothing moves
    replay.settle(DAY, 1)
    redis.set(keys.tick_guard(DAY, 2), "1")
    dup = replay.advance_next(4.0)
    assert (dup.status, dup.bar) == ("duplicate", 2) and replay.state().bar == 1
    # the day's last bar done: end of day is the full path's
    redis.delete(keys.tick_guard(DAY, 2))
    for bar in range(2, day.n_bars):
        assert replay.advance_next(5.0).bar == bar
        replay.settle(DAY, bar)
    assert replay.advance_next(6.0) is None


def test_memory_twin_of_the_one_round_trip_advance(redis_client) -> None:
    mem = MemoryRedis()
    script = replay_mod._ADVANCE_NEXT_LUA
    for r in (redis_client, mem):
        r.hset("st", mapping={"day": 0, "bar": 1, "settled": 1, "status": "running"})
        r.set("data", b"0123456789abcdefghij")
        r.set("bars", b"01234567")
    cases = [[0, 4, "7.5", 60, "g:", 5, "chan", "2024-06-03"],
             [0, 4, "8.5", 60, "g:", 5, "chan", "2024-06-03"],
             [1, 4, "1", 60, "g:", 5, "chan", "2024-06-03"],
             [0, 4, "9", 60, "g:", 3, "chan", "2024-06-03"]]
    for args in cases:
        real = redis_client.register_script(script)(keys=["st", "data", "bars"], args=args)
        fake = mem.register_script(script)(keys=["st", "data", "bars"], args=args)
        assert fake == real, args
        for r in (redis_client, mem):
            r.hset("st", "settled", r.hget("st", "bar"))
    assert _dump(mem) == _dump(redis_client)


def test_the_broker_reuses_a_check_only_on_the_same_account(two) -> None:
    keys, replay, writer, _reader = two
    advance(replay, keys)
    cash = writer.cash_cents()
    price = "100.5"  # AAA trades near 100 on bar 0
    qty = int(cash * writer._margin / 100 / 100.5 * 0.6)  # 60 % of the buying power
    first = OrderRequest("e1", "AAA", "buy", qty, order_type="limit", limit_price=price,
                         time_in_force="ioc")
    assert writer.entry_check(first) is None
    # another process sends a working entry in between: the account changed, so the
    # submission checks again and refuses what no longer fits
    other = _broker(writer._r, keys, replay)
    big = OrderRequest("e2", "BBB", "buy", qty // 2, order_type="limit", limit_price="201",
                       time_in_force="day")
    assert other.submit_order(big).status == "accepted"
    order = writer.submit_order(first)
    assert order.status == "rejected" and "buying power" in order.status_reason
    # nothing changed between check and submission: the same answer, one read fewer
    small = OrderRequest("e3", "CCC", "buy", 1, order_type="limit", limit_price="301",
                         time_in_force="ioc")
    assert writer.entry_check(small) is None
    calls: list[str] = []
    inner = writer._entry_refusal
    writer._entry_refusal = lambda *a: calls.append("checked") or inner(*a)
    assert writer.submit_order(small).status == "accepted" and calls == []
    # a different request (or a second submission) is checked in full
    assert writer.submit_order(OrderRequest("e4", "CCC", "buy", 1, order_type="limit",
                                            limit_price="301")).status == "accepted"
    assert calls == ["checked"]


def test_the_book_reports_which_positions_changed(two) -> None:
    keys, replay, writer, reader = two
    advance(replay, keys)
    cursor, changes = reader.book_changes(None)
    assert changes is None  # a new reader reads everything once
    reader.positions_cached()
    cursor, changes = reader.book_changes(None)
    writer.submit_order(OrderRequest("a1", "AAA", "buy", 10))
    writer.submit_order(OrderRequest("b1", "BBB", "sell", 5))
    _fill_bar(replay, keys, writer)
    reader.positions_cached()
    cursor, changes = reader.book_changes(cursor)
    assert sorted(changes) == ["AAA", "BBB"]
    cursor, changes = reader.book_changes(cursor)
    assert changes == []  # nothing since
    writer.submit_order(OrderRequest("b1-x1", "BBB", "buy", 5, intent="exit", close=True))
    _fill_bar(replay, keys, writer)
    reader.positions_cached()
    cursor, changes = reader.book_changes(cursor)
    assert changes == ["BBB"]
    writer.compact_positions_log()  # the copy is reloaded: readers start over
    reader.positions_cached()
    assert reader.book_changes(cursor)[1] is None


@pytest.mark.parametrize("make", ["real", "memory"])
def test_a_bar_settles_when_its_registered_orders_are_done_in_any_order(redis_client,
                                                                         make) -> None:
    """The decision hands its first order on before it registers the bar's orders: an
    order done before the registration counts as done; the bar settles exactly when every
    registered order is done, and not before the orders are registered."""
    redis = redis_client if make == "real" else MemoryRedis()
    keys = Keys.for_mode("sim", "ledger")
    store = RedisBarStore(redis, keys)
    replay = RedisReplay(redis, keys, store)
    replay.prepare([make_day(("AAA",))])
    replay.state()
    for bar in range(4):
        assert replay.advance_next(1.0).bar == bar
        if bar == 0:  # done before the registration: nothing settles until it comes
            assert not replay.complete_pending(DAY, bar, "a")
            assert replay.state().settled == -1
            assert replay.register_pending(DAY, bar, ["a"])  # everything already done
        elif bar == 1:  # the first done early, the second after the registration
            assert not replay.complete_pending(DAY, bar, "a")
            assert not replay.register_pending(DAY, bar, ["a", "b"])
            assert not replay.complete_pending(DAY, bar, "a")  # a retry changes nothing
            assert replay.state().settled == 0
            assert replay.complete_pending(DAY, bar, "b")
        elif bar == 2:  # registered first, as before
            assert not replay.register_pending(DAY, bar, ["a", "b"])
            assert not replay.complete_pending(DAY, bar, "b")
            assert replay.complete_pending(DAY, bar, "a")
        else:  # a decision dispatched again adds its orders to the same ledger
            assert not replay.register_pending(DAY, bar, ["a"])
            assert not replay.register_pending(DAY, bar, ["a", "c"])
            assert not replay.complete_pending(DAY, bar, "a")
            assert replay.complete_pending(DAY, bar, "c")
        assert replay.state().settled == bar


def test_memory_twins_of_the_ledger(redis_client) -> None:
    mem = MemoryRedis()
    keys = ["st", "pend", "done", "reg"]
    for r in (redis_client, mem):
        r.hset("st", mapping={"date": "2024-06-03", "bar": 5, "settled": 4})
    steps = [(replay_mod._COMPLETE_LUA, ["2024-06-03", 5, "a", "1.5", 60]),
             (replay_mod._REGISTER_LUA, ["2024-06-03", 5, "2.5", 60, "a", "b"]),
             (replay_mod._COMPLETE_LUA, ["2024-06-03", 5, "b", "3.5", 60]),
             (replay_mod._REGISTER_LUA, ["2024-06-04", 5, "4.5", 60, "x"]),
             (replay_mod._COMPLETE_LUA, ["2024-06-04", 5, "x", "5.5", 60])]
    for script, args in steps:
        real = redis_client.register_script(script)(keys=keys, args=args)
        fake = mem.register_script(script)(keys=keys, args=args)
        assert fake == real, args
    assert _dump(mem) == _dump(redis_client)


def test_published_bars_reach_the_scoring_window_without_a_read(redis_client) -> None:
    """The replay's advance and the feed's append publish each row; a listener hands it to
    the window, which then serves the bar without asking the store. A row it missed (or
    one from another session) is read from the store: the window is the same either way."""
    import time

    from core.market.bar_store import BarListener, BarWindow, SessionMeta

    keys = Keys.for_mode("sim", "pub")
    store = RedisBarStore(redis_client, keys)
    replay = RedisReplay(redis_client, keys, store)
    day = make_day(("AAA", "BBB"))
    replay.prepare([day])
    window = BarWindow(RedisBarStore(redis_client, keys))
    listener = BarListener(redis_client, keys, window).start()
    try:
        assert listener.subscribed.wait(5)
        replay.state()
        assert replay.advance_next(1.0).bar == 0
        window.get(DAY, 0)  # the first bar of a session: read (the window starts it)
        for bar in range(1, 6):
            replay.settle(DAY, bar - 1)
            assert replay.advance_next(1.0).bar == bar
            deadline = time.monotonic() + 5
            while window.delivered < bar and time.monotonic() < deadline:
                time.sleep(0.005)
        assert window.delivered == 5
        reads: list[int] = []
        inner = window._store.read
        window._store.read = lambda *a: reads.append(1) or inner(*a)  # type: ignore
        _, got = window.get(DAY, 5)
        assert reads == [] and np.array_equal(got, day.ohlcv[:6])  # no read: all delivered
        # a row that is not the next one is ignored; the store fills the gap
        assert not window.deliver(DAY, 9, day.ohlcv[9].tobytes())
        replay.settle(DAY, 5)
        window.deliver(DAY, 6, b"short")  # malformed: ignored too
        listener.stop()
        assert replay.advance_next(1.0).bar == 6  # published with nobody listening
        _, got = window.get(DAY, 6)
        assert reads == [1] and np.array_equal(got, day.ohlcv[:7])
    finally:
        listener.stop()
    # the feed's append publishes the same way
    feed_keys = Keys.for_mode("paper", "x")
    feed_store = RedisBarStore(redis_client, feed_keys)
    meta = SessionMeta(DAY, day.symbols, day.open_time, day.close_time, 60)
    feed_store.start_session(meta)
    feed_window = BarWindow(RedisBarStore(redis_client, feed_keys))
    feed_listener = BarListener(redis_client, feed_keys, feed_window).start()
    try:
        assert feed_listener.subscribed.wait(5)
        feed_store.append(DAY, 0, day.ohlcv[0])
        feed_window.get(DAY, 0)
        feed_store.append(DAY, 1, day.ohlcv[1])
        deadline = time.monotonic() + 5
        while feed_window.delivered < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert feed_window.delivered == 1
        assert np.array_equal(feed_window.get(DAY, 1)[1], day.ohlcv[:2])
    finally:
        feed_listener.stop()


def test_a_listening_copy_of_the_positions_follows_the_pushes(two, redis_client) -> None:
    """The fills push what they append to the positions log; a process that takes the
    pushes knows the positions without reading them. A push that does not continue its copy
    (never read, a write without a push, a new epoch) makes it read again; reads and pushes
    that overlap count nothing twice."""
    keys, replay, writer, reader = two
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.positions_channel())

    def deliver() -> list[bool]:
        out = []
        while (msg := pubsub.get_message(timeout=0.2)) is not None:
            out.append(reader.apply_pushed(msg["data"]))
        return out

    def mark(events: Any, pipe: Any) -> Any:  # the tick's bookkeeping, as process_bar's also
        pipe.get(keys.broker("cash"))
        return lambda replies: None

    def fill(*requests: OrderRequest) -> None:
        for request in requests:
            assert writer.submit_order(request).status == "accepted", request
        adv = advance(replay, keys)
        writer.process_bar(replay.days()[0], adv.bar, adv.row, also=mark)

    try:
        pubsub.get_message(timeout=1)  # the subscription's confirmation
        fill(OrderRequest("a1", "AAA", "buy", 10))
        assert deliver() == [False]  # this copy was never read: a gap
        assert reader.pushed_positions() is None
        assert set(reader.positions_cached()) == {"AAA"}
        fill()  # nothing working: the sync point alone continues the copy
        assert deliver() == [True]
        assert reader.pushed_positions() == writer.get_positions()
        steps = [[OrderRequest("b1", "BBB", "sell", 5)],
                 [OrderRequest("a2", "AAA", "buy", 5)],
                 [OrderRequest("b1-x1", "BBB", "buy", 5, intent="exit", close=True),
                  OrderRequest("c1", "CCC", "buy", 3)]]
        for i, requests in enumerate(steps):
            fill(*requests)
            if i == 1:  # a read before the push arrives: the push skips what it brought
                assert reader.positions_cached() == writer.get_positions()
            assert deliver() == [True]
            assert reader.pushed_positions() == writer.get_positions()
            assert reader.positions_cached() == writer.get_positions()  # nothing twice
        assert set(writer.get_positions()) == {"AAA", "CCC"}
        # an exit that ends unfilled changes the position without a push: the next push
        # leaves a gap, a read closes it, the push after that continues the copy again
        writer.submit_order(OrderRequest("c1-x1", "CCC", "sell", 3, intent="exit",
                                         close=True))
        writer.cancel_order("c1-x1")
        fill()
        assert deliver() == [False] and reader.pushed_positions() is None
        assert reader.positions_cached()["CCC"].exit_attempt == 1
        fill(OrderRequest("a1-x1", "AAA", "sell", 15, intent="exit", close=True))
        assert deliver() == [True]
        assert reader.pushed_positions() == writer.get_positions()
        assert set(writer.get_positions()) == {"CCC"}
        # a new epoch (the end of a session): pushes stop counting until a read reloads
        writer.compact_positions_log()
        fill(OrderRequest("c1-x2", "CCC", "sell", 3, intent="exit", close=True))
        assert deliver() == [False] and reader.pushed_positions() is None
        assert reader.positions_cached() == writer.get_positions() == {}
        fill()
        assert deliver() == [True] and reader.pushed_positions() == {}
        assert not reader.apply_pushed(b"garbage")  # not understood: read instead
        assert reader.pushed_positions() is None
    finally:
        pubsub.close()
