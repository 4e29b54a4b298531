"""The simulated broker, bar store and replay clock against a real Redis."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import numpy as np
import pytest

from core.brokers.base import OrderRequest
from core.brokers.fill_model import FillModel
from core.brokers.simulated import SimulatedBroker
from core.calendar import session_bounds
from core.keys import Keys
from core.market.bar_store import BarWindow, RedisBarStore, SessionMeta
from core.models import DayBars
from core.replay import RedisReplay

DAY = dt.date(2024, 6, 3)


def make_day(symbols=("AAA", "BBB"), n=None, price=100.0) -> DayBars:
    open_, close = session_bounds(DAY)
    n_bars = int((close - open_).total_seconds()) // 60
    arr = np.zeros((n_bars, len(symbols), 5))
    for s in range(len(symbols)):
        base = price * (s + 1) + np.arange(n_bars) * 0.01
        arr[:, s, 0] = base
        arr[:, s, 1] = base + 0.05
        arr[:, s, 2] = base - 0.05
        arr[:, s, 3] = base + 0.01
        arr[:, s, 4] = 1000
    return DayBars(DAY, tuple(symbols), open_, close, 60, arr)


@pytest.fixture
def world(redis_client):
    keys = Keys.for_mode("sim", "t1")
    store = RedisBarStore(redis_client, keys)
    replay = RedisReplay(redis_client, keys, store)
    model = FillModel(slippage_bps=10, fee_per_share=Decimal("0.01"), fee_min=Decimal("1"))
    broker = SimulatedBroker(redis_client, keys, replay, model, starting_cash_cents=1_000_000)
    day = make_day()
    replay.prepare([day])
    broker.open_account()
    return keys, store, replay, broker, day


def advance(replay: RedisReplay, keys: Keys, settle: bool = True):
    st = replay.state()
    meta = replay.days()[st.day]
    adv = replay.advance(st, keys.tick_guard(meta.date, st.bar + 1), 0.0)
    assert adv.status == "advanced"
    if settle:
        replay.settle(meta.date, adv.bar)
    return adv


def test_bar_store_appends_once_and_reads_incrementally(redis_client) -> None:
    keys = Keys.for_mode("sim", "bs")
    store = RedisBarStore(redis_client, keys)
    day = make_day(("X", "Y", "Z"))
    store.start_session(SessionMeta(day.date, day.symbols, day.open_time, day.close_time, 60))
    for i in range(5):
        assert store.append(DAY, i, day.ohlcv[i])
    assert not store.append(DAY, 4, day.ohlcv[4])  # a repeated publish is a no-op
    with pytest.raises(ValueError):
        store.append(DAY, 7, day.ohlcv[7])  # a gap is refused
    window = BarWindow(store)
    _meta, w = window.get(DAY, 2)
    assert w.shape == (3, 3, 5) and np.array_equal(w, day.ohlcv[:3])
    store.append(DAY, 5, day.ohlcv[5])
    _, w = window.get(DAY, 5)
    assert np.array_equal(w, day.ohlcv[:6])
    with pytest.raises(ValueError):
        window.get(DAY, 9)


def test_replay_advances_only_after_settlement(world) -> None:
    keys, store, replay, _broker, day = world
    st = replay.state()
    first = replay.advance(st, keys.tick_guard(DAY, 0), 1.0)
    assert first.status == "advanced" and first.bar == 0
    assert np.array_equal(first.row, day.ohlcv[0])
    st = replay.state()
    assert replay.advance(st, keys.tick_guard(DAY, 1), 2.0).status == "waiting"
    replay.register_pending(DAY, 0, ["o1", "o2"])
    assert not replay.complete_pending(DAY, 0, "o1")
    assert replay.complete_pending(DAY, 0, "o2")
    st = replay.state()
    assert st.settled == 0
    assert replay.advance(st, keys.tick_guard(DAY, 1), 3.0).status == "advanced"
    # the same bar twice (a duplicated beat) does nothing
    stale = replay.advance(st, keys.tick_guard(DAY, 1), 3.0)
    assert stale.status in ("stale", "duplicate")
    assert np.array_equal(store.read(DAY), day.ohlcv[:2])


def test_market_order_fills_at_next_open_with_slippage_and_fees(world) -> None:
    keys, _store, replay, broker, day = world
    advance(replay, keys)  # bar 0 published
    order = broker.submit_order(OrderRequest("e1", "AAA", "buy", 10))
    assert order.status == "accepted" and order.fill_after_bar == 1
    again = broker.submit_order(OrderRequest("e1", "AAA", "buy", 99))
    assert again.qty == 10 and broker.order_log() == ["e1"]  # no duplicate
    adv = advance(replay, keys)
    events = broker.process_bar(replay.days()[0], adv.bar, adv.row)
    assert [e.status for e in events] == ["filled"]
    filled = broker.get_order_by_client_id("e1")
    open_px = Decimal(repr(float(day.ohlcv[1, 0, 0])))
    expected = (open_px * Decimal("1.001")).quantize(Decimal("0.0001"))
    assert Decimal(filled.filled_avg_price) == expected
    assert filled.fees_cents == 100  # minimum $1
    pos = broker.get_positions()["AAA"]
    assert pos.qty == 10 and Decimal(pos.avg_price) == expected
    assert broker.cash_cents() == 1_000_000 - round(expected * 10 * 100) - 100


def test_no_fill_without_data_then_fill_on_next_bar(world, redis_client) -> None:
    keys, _store, replay, broker, day = world
    advance(replay, keys)
    broker.submit_order(OrderRequest("e1", "BBB", "buy", 5))
    adv = advance(replay, keys)
    row = adv.row.copy()
    row[1, :] = np.nan  # BBB has no bar 1
    assert broker.process_bar(replay.days()[0], adv.bar, row) == []
    assert broker.get_order_by_client_id("e1").status == "accepted"
    adv = advance(replay, keys)
    events = broker.process_bar(replay.days()[0], adv.bar, adv.row)
    assert events[0].status == "filled"
    assert broker.get_order_by_client_id("e1").filled_at == day.bar_time(2).isoformat()


def test_close_position_round_trip_records_trade_and_never_flips(world) -> None:
    keys, _store, replay, broker, _day = world
    meta = replay.days()[0]
    advance(replay, keys)
    broker.submit_order(OrderRequest("s1", "AAA", "sell", 4, strategy="orb"))
    adv = advance(replay, keys)
    broker.process_bar(meta, adv.bar, adv.row)
    assert broker.get_positions()["AAA"].qty == -4
    broker.close_position("AAA", "s1-x1", "stop_loss")
    broker.submit_order(OrderRequest("s1-x2", "AAA", "buy", 4, intent="exit", close=True))
    adv = advance(replay, keys)
    events = broker.process_bar(meta, adv.bar, adv.row)
    assert sorted(e.status for e in events) == ["cancelled", "filled"]
    assert broker.get_positions() == {}
    (trade,) = broker.trades()
    assert trade["side"] == "sell" and trade["qty"] == 4 and trade["exit_reason"] == "stop_loss"
    gross = (Decimal(trade["entry_price"]) - Decimal(trade["exit_price"])) * 4
    assert trade["gross_pnl_cents"] == int((gross * 100).to_integral_value())
    assert trade["pnl_cents"] == trade["gross_pnl_cents"] - trade["fees_cents"]


def test_ioc_limit_expires_beyond_the_limit(world) -> None:
    keys, _store, replay, broker, _day = world
    advance(replay, keys)
    broker.submit_order(OrderRequest("e1", "AAA", "buy", 1, order_type="limit",
                                     limit_price="50", time_in_force="ioc"))
    adv = advance(replay, keys)
    (event,) = broker.process_bar(replay.days()[0], adv.bar, adv.row)
    assert event.status == "expired" and broker.get_positions() == {}


@pytest.mark.parametrize(("request_kwargs", "why"), [
    ({"symbol": "NOPE"}, "unknown symbol"),
    ({"qty": 0}, "positive whole"),
    ({"order_type": "limit", "limit_price": "nan"}, "limit price"),
])
def test_bad_orders_are_rejected(world, request_kwargs, why) -> None:
    keys, _store, replay, broker, _day = world
    advance(replay, keys)
    args = {"client_order_id": "bad", "symbol": "AAA", "side": "buy", "qty": 1, **request_kwargs}
    order = broker.submit_order(OrderRequest(**args))
    assert order.status == "rejected" and why in order.status_reason
    assert broker.list_open_orders() == []


def test_orders_refused_when_no_bar_is_left(world) -> None:
    keys, _store, replay, broker, day = world
    for _ in range(day.n_bars):
        advance(replay, keys)
    order = broker.submit_order(OrderRequest("late", "AAA", "sell", 1))
    assert order.status == "rejected" and "market closed" in order.status_reason
