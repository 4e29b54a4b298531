"""Simulated fills on real Redis: volume participation, partial fills, protective stops.

Bars are built by hand: AAA opens at 50.00 with high/low 0.40 either side and 1,000 shares a
bar unless a test says otherwise. Slippage 10 bps, fees max($1, 1 cent a share), so every
price, fee and P/L below is worked out by hand.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import numpy as np
import pytest

from core import execution
from core.brokers.base import OrderRequest
from core.brokers.fill_model import FillModel
from core.calendar import session_bounds
from core.config import load_settings
from core.engine import _end_of_day
from core.models import DayBars
from core.orders import OrderIntent, entry_client_order_id
from core.risk import collar_price
from core.runtime import build_runtime
from core.sim import prepare_replay
from tests.helpers import step

DAY = dt.date(2024, 6, 3)
START = 5  # bars published before a test acts: decisions at bar 4 fill at bar 5
FILL = START
START_CASH = 10_000_000  # $100,000 in cents


def make_day(aaa: dict[int, dict[str, float]] | None = None) -> DayBars:
    """AAA at 50 (high 50.4, low 49.6, 1,000 shares), BBB at 20; ``aaa`` overrides bars."""
    open_, close = session_bounds(DAY)
    n_bars = int((close - open_).total_seconds()) // 60
    arr = np.zeros((n_bars, 2, 5))
    for s, price in enumerate((50.0, 20.0)):
        arr[:, s] = (price, price + 0.4, price - 0.4, price, 1000.0)
    for bar, spec in (aaa or {}).items():
        o = spec.get("open", 50.0)
        arr[bar, 0] = (o, spec.get("high", o + 0.4), spec.get("low", o - 0.4),
                       spec.get("close", o), spec.get("volume", 1000.0))
    return DayBars(DAY, ("AAA", "BBB"), open_, close, 60, arr)


@pytest.fixture
def make_rt(redis_client, redis_url):
    def build(aaa: dict[int, dict[str, float]] | None = None, **overrides):
        settings = load_settings(
            redis_url=redis_url, sim_run_id="fills", sim_slippage_bps=10,
            sim_fee_per_share="0.01", sim_fee_min="1", daily_position_limit="100000",
            **overrides)
        rt = build_runtime(settings)
        prepare_replay(rt, settings, [make_day(aaa)])
        for _ in range(START):
            step(rt)
        execution.reconcile(rt, DAY)
        return rt
    return build


def entry(rt, side: str = "buy", qty: int = 100, symbol: str = "AAA",
          ref: str = "50.0000") -> dict:
    meta, bar = rt.replay.now()
    price = Decimal(ref)
    return OrderIntent(
        client_order_id=entry_client_order_id("orb", symbol, meta.bar_time(bar), side),
        symbol=symbol, side=side, qty=qty, intent="entry", reason="orb", strategy="orb",
        ref_price=ref, limit_price=str(collar_price(price, side, 0.005)),
        session_date=DAY, bar=bar).model_dump(mode="json")


def open_position(rt, side: str = "buy", qty: int = 150) -> str:
    """Enter at bar 4, filled at bar 5's open; returns the entry's client_order_id."""
    intent = entry(rt, side, qty)
    assert execution.submit_order(rt, intent)["status"] == "accepted"
    step(rt)
    assert rt.broker.get_positions()["AAA"].qty == (qty if side == "buy" else -qty)
    return intent["client_order_id"]


# --- volume participation ---------------------------------------------------------------------
def test_volume_cap_is_exact_floor_of_volume_times_participation() -> None:
    assert FillModel(max_participation=0.29).volume_cap(100.0) == 29  # 28.999... in floats
    assert FillModel(max_participation=0.1).volume_cap(1239.0) == 123
    assert FillModel(max_participation=0.1).volume_cap(9.0) == 0
    assert FillModel(max_participation=0.1).volume_cap(float("nan")) == 0
    assert FillModel().volume_cap(0.0) is None  # no cap configured
    with pytest.raises(ValueError):
        FillModel(max_participation=1.5)


def test_entry_partially_filled_by_volume_and_reservation_shrinks(make_rt) -> None:
    rt = make_rt({FILL: {"volume": 1239.0}}, sim_max_participation=0.1)
    intent = entry(rt, "buy", qty=300)
    coid = intent["client_order_id"]
    assert execution.submit_order(rt, intent)["status"] == "accepted"
    assert rt.limits.reservation(DAY, coid) == 300 * 5025  # 300 x the 50.25 limit
    (event,) = step(rt)
    # floor(1239 x 0.1) = 123 shares at 50 x 1.001 = 50.0500; the rest cancelled (IOC)
    assert (event.status, event.filled_qty, event.notional_cents) == ("filled", 123, 615_615)
    order = rt.broker.get_order_by_client_id(coid)
    assert order.status == "filled" and order.qty == 300 and order.filled_qty == 123
    assert order.status_reason == "partial fill, remainder cancelled (IOC)"
    assert order.filled_avg_price == "50.0500" and order.fees_cents == 123
    assert rt.broker.list_open_orders() == []
    assert rt.broker.get_positions()["AAA"].qty == 123
    assert rt.limits.reservation(DAY, coid) == 615_615  # 123 x 50.05 = $6,156.15
    assert rt.limits.used(DAY) == 615_615
    assert rt.broker.cash_cents() == START_CASH - 615_615 - 123
    # reconcile agrees with the shrunk reservation
    assert execution.reconcile(rt, DAY)["fixed"] == 0


def test_zero_volume_bar_expires_the_ioc_entry_and_releases_capital(make_rt) -> None:
    rt = make_rt({FILL: {"volume": 0.0}}, sim_max_participation=0.1)
    intent = entry(rt, "buy", qty=40)
    execution.submit_order(rt, intent)
    assert rt.limits.used(DAY) == 40 * 5025
    (event,) = step(rt)
    assert (event.status, event.filled_qty, event.notional_cents) == ("expired", 0, 0)
    order = rt.broker.get_order_by_client_id(intent["client_order_id"])
    assert order.status == "expired" and "no volume" in order.status_reason
    assert rt.limits.reservation(DAY, intent["client_order_id"]) == 0
    assert rt.limits.used(DAY) == 0
    assert rt.broker.get_positions() == {} and rt.broker.cash_cents() == START_CASH


def test_exit_fills_over_three_bars_with_exact_trade_rows(make_rt) -> None:
    rt = make_rt({
        FILL: {"volume": 2000.0},  # entry: cap 200 >= 150, fills whole at 50.0500
        FILL + 1: {"open": 51.0, "volume": 500.0},  # cap 50
        FILL + 2: {"open": 52.0, "volume": 0.0},  # no volume: nothing, keeps working
        FILL + 3: {"open": 50.5, "volume": 700.0},  # cap 70
        FILL + 4: {"open": 49.0, "volume": 400.0},  # cap 40, 30 left
    }, sim_max_participation=0.1)
    coid = open_position(rt, "buy", 150)
    pos = rt.broker.get_positions()["AAA"]
    assert pos.avg_price == "50.0500" and pos.entry_fees_cents == 150
    out = execution.close_symbol(rt, "AAA", f"{coid}-x1", "stop_loss")
    assert out["status"] == "accepted"

    (ev,) = step(rt)
    assert (ev.status, ev.filled_qty) == ("partially_filled", 50)
    order = rt.broker.get_order_by_client_id(f"{coid}-x1")
    assert order.status == "partially_filled" and order.filled_qty == 50
    assert [o.client_order_id for o in rt.broker.list_open_orders()] == [f"{coid}-x1"]
    assert rt.broker.get_positions()["AAA"].qty == 100
    assert rt.broker.get_positions()["AAA"].entry_fees_cents == 100

    assert step(rt) == []  # zero volume: no fill, the order keeps working
    assert rt.broker.get_order_by_client_id(f"{coid}-x1").filled_qty == 50

    (ev,) = step(rt)
    assert (ev.status, ev.filled_qty) == ("partially_filled", 120)
    (ev,) = step(rt)
    assert (ev.status, ev.filled_qty) == ("filled", 150)
    assert rt.broker.get_positions() == {} and rt.broker.list_open_orders() == []

    order = rt.broker.get_order_by_client_id(f"{coid}-x1")
    # VWAP: (50 x 50.9490 + 70 x 50.4495 + 30 x 48.9510) / 150 = 7547.445 / 150
    assert order.filled_avg_price == "50.3163" and order.fees_cents == 300
    trades = rt.broker.trades()
    rows = [(t["qty"], t["exit_price"], t["gross_pnl_cents"], t["fees_cents"], t["pnl_cents"])
            for t in trades]
    assert rows == [
        # 50 x (50.9490 - 50.05) = 44.95; entry fees 150 x 50/150 = 50, exit fee 100
        (50, "50.9490", 4495, 150, 4345),
        # 70 x 0.3995 = 27.965 -> 2796 (half-even); entry fees 100 x 70/100 = 70
        (70, "50.4495", 2796, 170, 2626),
        # 30 x (48.9510 - 50.05) = -32.97; the last 30 cents of entry fees
        (30, "48.9510", -3297, 130, -3427),
    ]
    assert sum(t["qty"] for t in trades) == 150
    assert sum(t["fees_cents"] for t in trades) == 150 + 3 * 100
    assert {t["exit_reason"] for t in trades} == {"stop_loss"}
    assert rt.broker.realized_pnl_cents(DAY) == 4345 + 2626 - 3427
    # cash: entry 750,750 + 150 fee; exits 254,745, 353,146 (353,146.5 half-even), 146,853
    assert rt.broker.cash_cents() == (START_CASH - 750_750 - 150 + 254_745 + 353_146
                                      + 146_853 - 3 * 100)


def test_processing_a_bar_twice_does_not_fill_a_working_exit_twice(make_rt) -> None:
    rt = make_rt({FILL + 1: {"volume": 500.0}}, sim_max_participation=0.1)
    coid = open_position(rt, "buy", 90)
    execution.close_symbol(rt, "AAA", f"{coid}-x1", "stop_loss")
    step(rt)
    meta, bar = rt.replay.now()
    assert rt.broker.process_bar(meta, bar, rt.replay.row(meta, bar)) == []  # redispatched
    assert rt.broker.get_positions()["AAA"].qty == 40
    assert len(rt.broker.trades()) == 1


def test_exit_still_partial_at_the_close_expires_and_position_stays_open(make_rt) -> None:
    rt = make_rt({FILL + 1: {"volume": 300.0}}, sim_max_participation=0.1)
    coid = open_position(rt, "sell", 100)
    execution.close_symbol(rt, "AAA", f"{coid}-x1", "eod")
    step(rt)  # 30 of 100 bought back
    assert rt.broker.get_positions()["AAA"].qty == -70
    meta = rt.replay.days()[0]
    _end_of_day(rt, meta)  # what the tick does after the session's last bar
    order = rt.broker.get_order_by_client_id(f"{coid}-x1")
    assert order.status == "expired" and order.filled_qty == 30
    assert order.status_reason == "session closed with 30 of 100 filled"
    assert rt.broker.list_open_orders() == []
    pos = rt.broker.get_positions()["AAA"]
    assert pos.qty == -70 and pos.exit_attempt == 1  # the next exit gets a fresh id
    (stats,) = rt.replay.day_stats()
    assert stats["open_positions_at_close"] == 1
    (trade,) = rt.broker.trades()
    assert trade["qty"] == 30


def test_without_a_cap_orders_fill_whole_as_before(make_rt) -> None:
    rt = make_rt({FILL: {"volume": 1.0}})
    coid = open_position(rt, "buy", 300)
    order = rt.broker.get_order_by_client_id(coid)
    assert order.filled_qty == 300 and order.status_reason == "" and order.stop_price is None
    assert rt.broker.get_positions()["AAA"].stop_price is None


# --- protective stops -------------------------------------------------------------------------
@pytest.mark.parametrize(("side", "bar", "exit_price"), [
    # long, stop 50 x 0.99 = 49.5000: the low touches it -> sold at 49.5 x 0.999
    ("buy", {"open": 50.0, "low": 49.4}, "49.4505"),
    # long, the open gaps below the stop -> sold at the open 49 x 0.999
    ("buy", {"open": 49.0, "low": 48.8, "high": 49.2}, "48.9510"),
    # short, stop 50 x 1.01 = 50.5000: the high touches it -> bought at 50.5 x 1.001
    ("sell", {"open": 50.0, "high": 50.6}, "50.5505"),
    # short, the open gaps above the stop -> bought at the open 51 x 1.001
    ("sell", {"open": 51.0, "high": 51.2, "low": 50.8}, "51.0510"),
])
def test_protective_stop_closes_at_the_stop_or_the_gap_open(make_rt, side, bar,
                                                            exit_price) -> None:
    rt = make_rt({FILL + 1: bar}, protective_stop=True)
    coid = open_position(rt, side, 100)
    stop = "49.5000" if side == "buy" else "50.5000"
    assert rt.broker.get_order_by_client_id(coid).stop_price == stop
    assert rt.broker.get_positions()["AAA"].stop_price == stop
    # the cluster already sent its own close; the stop fills first and cancels it
    assert execution.close_symbol(rt, "AAA", f"{coid}-x1", "stop_loss")["status"] == "accepted"
    events = step(rt)
    assert sorted((e.client_order_id, e.status) for e in events) == [
        (f"{coid}-s", "filled"), (f"{coid}-x1", "cancelled")]
    assert rt.broker.get_positions() == {}
    stop_order = rt.broker.get_order_by_client_id(f"{coid}-s")
    assert (stop_order.intent, stop_order.status, stop_order.filled_qty) == ("exit", "filled", 100)
    assert stop_order.filled_avg_price == exit_price and stop_order.fees_cents == 100
    assert stop_order.side == ("sell" if side == "buy" else "buy")
    assert len(stop_order.client_order_id) <= 48
    assert f"{coid}-s" in rt.broker.order_log()
    mine = rt.broker.get_order_by_client_id(f"{coid}-x1")
    assert mine.status == "cancelled"
    assert mine.status_reason == "position closed by protective stop"
    (trade,) = rt.broker.trades()
    entry_px = Decimal("50.0500") if side == "buy" else Decimal("49.9500")
    direction = 1 if side == "buy" else -1
    gross = int((Decimal(exit_price) - entry_px) * 100 * direction * 100)
    assert trade["exit_reason"] == "broker_stop" and trade["exit_price"] == exit_price
    assert trade["exit_client_order_id"] == f"{coid}-s" and trade["qty"] == 100
    assert trade["gross_pnl_cents"] == gross and trade["fees_cents"] == 200
    assert trade["pnl_cents"] == gross - 200
    # a later close by the cluster finds nothing and never flips the position
    assert execution.close_symbol(rt, "AAA", f"{coid}-x2", "eod")["status"] == "flat"
    step(rt)
    assert rt.broker.get_positions() == {} and len(rt.broker.trades()) == 1
    notional = int(entry_px * 100 * 100) - int(Decimal(exit_price) * 100 * 100)
    assert rt.broker.cash_cents() == START_CASH - direction * notional - 200


def test_protective_stop_not_reached_does_nothing(make_rt) -> None:
    # the fill bar's low (49.0) is below the 49.5 stop: the stop rests only from the next
    # bar; bars after it stay above the stop
    rt = make_rt({FILL: {"open": 50.0, "low": 49.0},
                  FILL + 1: {"open": 50.0, "low": 49.5001}}, protective_stop=True)
    coid = open_position(rt, "buy", 100)
    cash = rt.broker.cash_cents()
    for _ in range(3):
        assert step(rt) == []
    assert rt.broker.get_positions()["AAA"].qty == 100
    assert rt.broker.get_order_by_client_id(f"{coid}-s") is None
    assert rt.broker.trades() == [] and rt.broker.cash_cents() == cash


def test_protective_stop_is_rounded_away_from_the_entry(make_rt) -> None:
    rt = make_rt(protective_stop=True)
    buy = entry(rt, "buy", 10, "BBB", ref="33.3333")
    sell = entry(rt, "sell", 10, "AAA", ref="33.3333")
    execution.submit_order(rt, buy)
    execution.submit_order(rt, sell)
    # 33.3333 x 0.99 = 32.999967 -> floor; 33.3333 x 1.01 = 33.666633 -> ceiling
    assert rt.broker.get_order_by_client_id(buy["client_order_id"]).stop_price == "32.9999"
    assert rt.broker.get_order_by_client_id(sell["client_order_id"]).stop_price == "33.6667"


def test_stop_off_by_default_and_refused_when_the_broker_has_none(make_rt) -> None:
    rt = make_rt()
    intent = entry(rt)
    execution.submit_order(rt, intent)
    assert rt.broker.get_order_by_client_id(intent["client_order_id"]).stop_price is None
    order = rt.broker.submit_order(OrderRequest(
        "raw-1", "BBB", "buy", 1, order_type="limit", limit_price="20.1",
        time_in_force="ioc", stop_price="19.8"))
    assert order.status == "rejected" and "not enabled" in order.status_reason


def test_protective_stop_after_a_partial_exit_closes_the_rest(make_rt) -> None:
    rt = make_rt({FILL + 1: {"volume": 400.0}, FILL + 2: {"open": 50.0, "low": 49.0}},
                 protective_stop=True, sim_max_participation=0.1)
    coid = open_position(rt, "buy", 100)
    execution.close_symbol(rt, "AAA", f"{coid}-x1", "stop_loss")
    step(rt)  # 40 sold at 50 x 0.999
    assert rt.broker.get_positions()["AAA"].qty == 60
    events = step(rt)  # the stop takes the other 60 at 49.4505; the working exit is cancelled
    assert sorted((e.client_order_id, e.status, e.filled_qty) for e in events) == [
        (f"{coid}-s", "filled", 60), (f"{coid}-x1", "cancelled", 40)]
    trades = rt.broker.trades()
    assert [(t["qty"], t["exit_reason"], t["exit_price"]) for t in trades] == [
        (40, "stop_loss", "49.9500"), (60, "broker_stop", "49.4505")]
    # entry fee 100 cents: 40 to the first row, 60 to the stop's row
    assert [t["fees_cents"] for t in trades] == [40 + 100, 60 + 100]
    assert rt.broker.get_positions() == {}


def test_keep_policy_leaves_the_rest_of_an_entry_working_until_filled(make_rt) -> None:
    rt = make_rt({FILL: {"volume": 1239.0}, FILL + 1: {"volume": 1000.0}},
                 sim_max_participation=0.1, partial_fill_policy="keep")
    intent = entry(rt, "buy", qty=200)
    coid = intent["client_order_id"]
    assert execution.submit_order(rt, intent)["status"] == "accepted"
    (first,) = step(rt)
    # 123 shares now; the order keeps working and keeps its whole reservation
    assert (first.status, first.filled_qty) == ("partially_filled", 123)
    assert rt.limits.reservation(DAY, coid) == 200 * 5025
    (second,) = step(rt)
    # 77 more (cap 100) complete it; the reservation shrinks to the value filled
    assert (second.status, second.filled_qty) == ("filled", 200)
    assert rt.broker.get_positions()["AAA"].qty == 200
    assert rt.limits.reservation(DAY, coid) == second.notional_cents < 200 * 5025
