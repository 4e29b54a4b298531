"""Tests for core.exits.exit_reason and core.decision (decide, in_eod_window, reservations)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core.brokers.base import Position
from core.calendar import NY
from core.decision import (
    DecisionInput,
    DecisionParams,
    decide,
    in_eod_window,
    reservation_cents,
)
from core.exits import exit_reason
from core.orders import OrderIntent
from core.risk import RiskLimits
from core.signals import Signal

DAY = dt.date(2025, 3, 12)
DAY_S = DAY.isoformat()
CLOSE = dt.datetime(2025, 3, 12, 16, 0, tzinfo=NY)
MORNING = dt.datetime(2025, 3, 12, 10, 0, tzinfo=NY)
BAR_TIME = dt.datetime(2025, 3, 12, 9, 59, tzinfo=NY)
LIMITS = RiskLimits(daily_limit_cents=500_000, risk_pct_per_trade=0.002, stop_loss_pct=0.01,
                    max_open_positions=10, entry_collar_pct=0.005)
PARAMS = DecisionParams(limits=LIMITS, eod_close_minutes_before=10,
                        no_entry_minutes_before_close=30)


def _pos(symbol: str = "AAA", qty: int = 10, avg: str = "100.00", session: str = DAY_S,
         coid: str | None = None) -> Position:
    return Position(symbol=symbol, qty=qty, avg_price=avg,
                    opened_at="2025-03-12T09:50:00-04:00", session_date=session,
                    entry_client_order_id=coid or f"orb-{symbol}-20250312-0949-L",
                    strategy="orb", confidence=0.7)


def _sig(symbol: str, side: str = "buy", confidence: float = 0.7,
         price: float = 100.0) -> Signal:
    return Signal(symbol=symbol, side=side, source="orb",  # type: ignore[arg-type]
                  confidence=confidence, bar_time=BAR_TIME, price=price)


def _inp(**changes: object) -> DecisionInput:
    data: dict[str, object] = {
        "session_date": DAY, "bar": 30, "decision_time": MORNING, "close_time": CLOSE,
        "signals": [], "marks": {}, "positions": {}, "open_order_symbols": frozenset(),
        "entered_today": frozenset(), "used_cents": 0, "halted": False,
    }
    data.update(changes)
    return DecisionInput(**data)  # type: ignore[arg-type]


def _entries(intents: list[OrderIntent]) -> list[OrderIntent]:
    return [i for i in intents if i.intent == "entry"]


def _exits(intents: list[OrderIntent]) -> list[OrderIntent]:
    return [i for i in intents if i.intent == "exit"]


# --- exit_reason --------------------------------------------------------------------------
def test_long_stop_loss_triggers_exactly_at_the_stop_price() -> None:
    pos = _pos(qty=10, avg="100.00")  # stop at 100 x 0.99 = 99.00
    assert exit_reason(pos, 99.0, 0.01, False, DAY_S) == "stop_loss"
    assert exit_reason(pos, 98.5, 0.01, False, DAY_S) == "stop_loss"
    assert exit_reason(pos, 99.01, 0.01, False, DAY_S) is None
    assert exit_reason(pos, 120.0, 0.01, False, DAY_S) is None


def test_short_stop_loss_triggers_exactly_at_the_stop_price() -> None:
    pos = _pos(qty=-10, avg="100.00")  # stop at 100 x 1.01 = 101.00
    assert exit_reason(pos, 101.0, 0.01, False, DAY_S) == "stop_loss"
    assert exit_reason(pos, 102.0, 0.01, False, DAY_S) == "stop_loss"
    assert exit_reason(pos, 100.99, 0.01, False, DAY_S) is None
    assert exit_reason(pos, 80.0, 0.01, False, DAY_S) is None


def test_stop_boundary_is_exact_decimal_not_float() -> None:
    # 37.45 x 0.98 = 36.701 exactly; in binary floats 37.45 * 0.98 is 36.700999...
    pos = _pos(qty=5, avg="37.45")
    assert exit_reason(pos, 36.701, 0.02, False, DAY_S) == "stop_loss"
    assert exit_reason(pos, 36.7011, 0.02, False, DAY_S) is None
    short = _pos(qty=-5, avg="37.45")  # 37.45 x 1.02 = 38.199
    assert exit_reason(short, 38.199, 0.02, False, DAY_S) == "stop_loss"
    assert exit_reason(short, 38.1989, 0.02, False, DAY_S) is None


def test_eod_window_closes_everything() -> None:
    assert exit_reason(_pos(qty=10), 100.0, 0.01, True, DAY_S) == "eod"
    assert exit_reason(_pos(qty=-10), 100.0, 0.01, True, DAY_S) == "eod"
    assert exit_reason(_pos(qty=10), None, 0.01, True, DAY_S) == "eod"


def test_position_from_another_session_is_stale() -> None:
    old = _pos(session="2025-03-11")
    assert exit_reason(old, 100.0, 0.01, False, DAY_S) == "stale_position"
    assert exit_reason(old, None, 0.01, False, DAY_S) == "stale_position"
    assert exit_reason(old, 50.0, 0.01, True, DAY_S) == "stale_position"


@pytest.mark.parametrize("mark", [None, float("nan"), float("inf"), float("-inf"), 0.0, -5.0])
def test_unusable_mark_gives_no_exit(mark: float | None) -> None:
    assert exit_reason(_pos(qty=10), mark, 0.01, False, DAY_S) is None
    assert exit_reason(_pos(qty=-10), mark, 0.01, False, DAY_S) is None


# --- in_eod_window ----------------------------------------------------------------------------
def test_eod_window_boundary_regular_close() -> None:
    assert in_eod_window(dt.datetime(2025, 3, 12, 15, 50, tzinfo=NY), CLOSE, 10)
    assert not in_eod_window(dt.datetime(2025, 3, 12, 15, 49, 59, tzinfo=NY), CLOSE, 10)
    assert in_eod_window(CLOSE, CLOSE, 10)
    assert in_eod_window(CLOSE + dt.timedelta(minutes=1), CLOSE, 10)


def test_eod_window_boundary_early_close() -> None:
    close = dt.datetime(2025, 11, 28, 13, 0, tzinfo=NY)  # day after Thanksgiving
    assert in_eod_window(dt.datetime(2025, 11, 28, 12, 50, tzinfo=NY), close, 10)
    assert not in_eod_window(dt.datetime(2025, 11, 28, 12, 49, tzinfo=NY), close, 10)
    assert not in_eod_window(dt.datetime(2025, 11, 28, 15, 50, tzinfo=NY) - dt.timedelta(
        hours=3, minutes=1), close, 10)


def test_eod_window_compares_instants_across_timezones() -> None:
    decision_utc = dt.datetime(2025, 3, 12, 19, 50, tzinfo=dt.UTC)  # 15:50 EDT
    assert in_eod_window(decision_utc, CLOSE, 10)
    assert not in_eod_window(decision_utc - dt.timedelta(seconds=1), CLOSE, 10)


# --- decide: exits ------------------------------------------------------------------------------
def test_exits_come_before_entries() -> None:
    intents = decide(_inp(
        positions={"ZZZ": _pos("ZZZ", qty=10, avg="100.00")},
        marks={"ZZZ": 98.0},
        signals=[_sig("AAA", confidence=0.99, price=50.0)],
    ), PARAMS)
    assert [(i.intent, i.symbol) for i in intents] == [("exit", "ZZZ"), ("entry", "AAA")]
    ex = intents[0]
    assert ex.client_order_id == "orb-ZZZ-20250312-0949-L-x1"
    assert (ex.side, ex.qty, ex.reason, ex.ref_price) == ("sell", 10, "stop_loss", "98.0")
    assert ex.limit_price is None
    assert ex.session_date == DAY and ex.bar == 30


def test_short_exit_buys_back_the_whole_position() -> None:
    intents = decide(_inp(positions={"AAA": _pos("AAA", qty=-7, avg="50")},
                          marks={"AAA": 50.5}, decision_time=CLOSE - dt.timedelta(minutes=5)),
                     PARAMS)
    assert [(i.side, i.qty, i.reason) for i in intents] == [("buy", 7, "eod")]


def test_exit_attempt_number_follows_previous_attempts() -> None:
    intents = decide(_inp(positions={"AAA": _pos("AAA")}, marks={"AAA": 90.0},
                          exit_attempts={"AAA": 2}), PARAMS)
    assert [i.client_order_id for i in intents] == ["orb-AAA-20250312-0949-L-x3"]


def test_exit_without_mark_uses_average_price_as_reference() -> None:
    intents = decide(_inp(positions={"AAA": _pos("AAA", avg="100.00")},
                          decision_time=CLOSE - dt.timedelta(minutes=1)), PARAMS)
    assert [(i.reason, i.ref_price) for i in intents] == [("eod", "100.00")]


def test_position_with_open_order_gets_no_second_exit() -> None:
    intents = decide(_inp(
        positions={"AAA": _pos("AAA"), "BBB": _pos("BBB")},
        marks={"AAA": 90.0, "BBB": 90.0},
        open_order_symbols=frozenset({"AAA"}),
    ), PARAMS)
    assert [i.symbol for i in intents] == ["BBB"]


def test_exits_are_sorted_by_symbol() -> None:
    positions = {s: _pos(s, session="2025-03-11") for s in ("CCC", "AAA", "BBB")}
    intents = decide(_inp(positions=positions), PARAMS)
    assert [(i.symbol, i.reason) for i in intents] == [
        ("AAA", "stale_position"), ("BBB", "stale_position"), ("CCC", "stale_position")]


def test_held_position_without_exit_reason_blocks_new_entry_on_same_symbol() -> None:
    intents = decide(_inp(positions={"AAA": _pos("AAA")}, marks={"AAA": 100.5},
                          signals=[_sig("AAA"), _sig("AAA", side="sell")]), PARAMS)
    assert intents == []


# --- decide: entries ----------------------------------------------------------------------------
def test_entry_fields_and_sizing() -> None:
    (intent,) = decide(_inp(signals=[_sig("AAA", confidence=0.8, price=100.0)]), PARAMS)
    assert intent.intent == "entry"
    assert intent.client_order_id == "orb-AAA-20250312-0959-L"
    assert (intent.symbol, intent.side, intent.qty) == ("AAA", "buy", 10)
    assert Decimal(intent.ref_price) == Decimal("100")
    assert intent.limit_price == "100.5000"
    assert (intent.strategy, intent.reason, intent.confidence) == ("orb", "orb", 0.8)
    assert reservation_cents(intent) == 100_500


def test_short_entry_limit_below_reference() -> None:
    (intent,) = decide(_inp(signals=[_sig("AAA", side="sell", price=100.0)]), PARAMS)
    assert intent.side == "sell"
    assert intent.client_order_id.endswith("-S")
    assert intent.limit_price == "99.5000"
    # value bounded by the mirror of the collar above the reference: 10 x 100.50
    assert reservation_cents(intent) == 100_500


def test_entries_sorted_by_confidence_then_symbol() -> None:
    signals = [_sig("AAA", confidence=0.6), _sig("BBB", confidence=0.9),
               _sig("CCC", confidence=0.75), _sig("ABC", confidence=0.75)]
    intents = decide(_inp(signals=signals), PARAMS)
    assert [i.symbol for i in intents] == ["BBB", "ABC", "CCC", "AAA"]


def test_halted_gives_exits_but_no_entries() -> None:
    intents = decide(_inp(halted=True, positions={"ZZZ": _pos("ZZZ")}, marks={"ZZZ": 90.0},
                          signals=[_sig("AAA")]), PARAMS)
    assert [(i.intent, i.symbol) for i in intents] == [("exit", "ZZZ")]


def test_no_entries_inside_no_entry_window() -> None:
    signals = [_sig("AAA")]
    at_boundary = CLOSE - dt.timedelta(minutes=30)
    assert decide(_inp(signals=signals, decision_time=at_boundary), PARAMS) == []
    just_before = at_boundary - dt.timedelta(minutes=1)
    assert [i.symbol for i in decide(_inp(signals=signals, decision_time=just_before),
                                     PARAMS)] == ["AAA"]


def test_no_entry_window_uses_early_close() -> None:
    close = dt.datetime(2025, 11, 28, 13, 0, tzinfo=NY)
    signals = [_sig("AAA")]
    day = dt.date(2025, 11, 28)
    assert decide(_inp(session_date=day, signals=signals, close_time=close,
                       decision_time=dt.datetime(2025, 11, 28, 12, 30, tzinfo=NY)), PARAMS) == []
    got = decide(_inp(session_date=day, signals=signals, close_time=close,
                      decision_time=dt.datetime(2025, 11, 28, 12, 29, tzinfo=NY)), PARAMS)
    assert [i.symbol for i in got] == ["AAA"]


def test_no_entries_inside_eod_window_even_if_no_entry_window_is_zero() -> None:
    params = DecisionParams(limits=LIMITS, eod_close_minutes_before=10,
                            no_entry_minutes_before_close=0)
    signals = [_sig("AAA")]
    assert decide(_inp(signals=signals, decision_time=CLOSE - dt.timedelta(minutes=10)),
                  params) == []
    assert len(decide(_inp(signals=signals, decision_time=CLOSE - dt.timedelta(minutes=11)),
                      params)) == 1


def test_max_open_positions_counts_held_positions() -> None:
    limits = RiskLimits(500_000, 0.002, 0.01, max_open_positions=3, entry_collar_pct=0.005)
    params = DecisionParams(limits=limits)
    signals = [_sig(s, confidence=c) for s, c in
               (("AAA", 0.9), ("BBB", 0.8), ("CCC", 0.7), ("DDD", 0.6), ("EEE", 0.5))]
    intents = decide(_inp(positions={"ZZZ": _pos("ZZZ")}, marks={"ZZZ": 100.0},
                          signals=signals), params)
    assert [i.symbol for i in intents] == ["AAA", "BBB"]


def test_max_open_positions_full_gives_no_entries() -> None:
    limits = RiskLimits(500_000, 0.002, 0.01, max_open_positions=2, entry_collar_pct=0.005)
    positions = {"YYY": _pos("YYY"), "ZZZ": _pos("ZZZ")}
    intents = decide(_inp(positions=positions, marks={"YYY": 100.0, "ZZZ": 100.0},
                          signals=[_sig("AAA")]), DecisionParams(limits=limits))
    assert intents == []


def test_max_open_positions_counts_pending_entry_orders() -> None:
    # Two entry orders are still working (no position yet); when they fill there will be two
    # positions, so only one more entry fits under a cap of 3.
    limits = RiskLimits(500_000, 0.002, 0.01, max_open_positions=3, entry_collar_pct=0.005)
    signals = [_sig("AAA", confidence=0.9), _sig("BBB", confidence=0.8),
               _sig("CCC", confidence=0.7)]
    intents = decide(_inp(open_order_symbols=frozenset({"XXX", "YYY"}), signals=signals),
                     DecisionParams(limits=limits))
    assert [i.symbol for i in intents] == ["AAA"]


def test_already_entered_symbol_side_is_skipped() -> None:
    signals = [_sig("AAA", side="buy", confidence=0.9), _sig("BBB", side="sell", confidence=0.8)]
    intents = decide(_inp(signals=signals, entered_today=frozenset({"AAA:buy", "BBB:buy"})),
                     PARAMS)
    assert [(i.symbol, i.side) for i in intents] == [("BBB", "sell")]


def test_open_order_symbol_gets_no_entry() -> None:
    intents = decide(_inp(signals=[_sig("AAA"), _sig("BBB")],
                          open_order_symbols=frozenset({"AAA"})), PARAMS)
    assert [i.symbol for i in intents] == ["BBB"]


def test_one_entry_per_symbol_per_bar() -> None:
    signals = [_sig("AAA", side="buy", confidence=0.6), _sig("AAA", side="sell", confidence=0.9)]
    intents = decide(_inp(signals=signals), PARAMS)
    assert [(i.symbol, i.side) for i in intents] == [("AAA", "sell")]


def test_unsizeable_signal_is_skipped_not_fatal() -> None:
    signals = [_sig("AAA", confidence=0.9, price=5000.0),  # $10 budget / $50 risk -> 0
               _sig("BBB", confidence=0.8, price=float("nan")),
               _sig("CCC", confidence=0.7, price=50.0)]
    intents = decide(_inp(signals=signals), PARAMS)
    assert [(i.symbol, i.qty) for i in intents] == [("CCC", 20)]


def test_remaining_capital_shrinks_across_entries_in_one_bar() -> None:
    # limit $1,000, budget 5 % = $50, stop 1 %:
    #  AAA @100: risk 50 sh, value cap 1000/100.50 -> 9 sh, reserve $904.50 -> $95.50 left
    #  BBB @50 : collar 50.25 -> 95.50/50.25 -> 1 sh, reserve $50.25 -> $45.25 left
    #  CCC @100: 45.25/100.50 -> 0 sh (skipped)
    #  DDD @20 : collar 20.10 -> 45.25/20.10 -> 2 sh, reserve $40.20 -> $5.05 left
    limits = RiskLimits(100_000, 0.05, 0.01, max_open_positions=10, entry_collar_pct=0.005)
    signals = [_sig("AAA", confidence=0.9, price=100.0), _sig("BBB", confidence=0.8, price=50.0),
               _sig("CCC", confidence=0.7, price=100.0), _sig("DDD", confidence=0.6, price=20.0)]
    intents = decide(_inp(signals=signals), DecisionParams(limits=limits))
    assert [(i.symbol, i.qty) for i in intents] == [("AAA", 9), ("BBB", 1), ("DDD", 2)]
    assert [reservation_cents(i) for i in intents] == [90_450, 5_025, 4_020]
    assert sum(reservation_cents(i) for i in intents) <= 100_000


def test_used_capital_limits_entries() -> None:
    intents = decide(_inp(signals=[_sig("AAA", price=100.0)], used_cents=500_000 - 50_000),
                     PARAMS)
    assert [(i.symbol, i.qty) for i in intents] == [("AAA", 4)]  # 500 / 100.50
    assert decide(_inp(signals=[_sig("AAA")], used_cents=500_000), PARAMS) == []
    assert decide(_inp(signals=[_sig("AAA")], used_cents=600_000), PARAMS) == []


def test_reservation_for_exit_without_limit_uses_reference() -> None:
    intent = OrderIntent(client_order_id="x-1", symbol="AAA", side="sell", qty=3,
                         intent="exit", reason="eod", ref_price="10.005", session_date=DAY,
                         bar=1)
    assert reservation_cents(intent) == 3002  # 30.015 -> 3001.5 cents -> up to 3002


# --- property: reservations never exceed what is left ----------------------------------------
SYMBOLS = ("AAA", "BBB", "CCC", "DDD", "EEE", "FFF", "GGG", "HHH")
signal_lists = st.lists(
    st.builds(
        _sig,
        symbol=st.sampled_from(SYMBOLS),
        side=st.sampled_from(["buy", "sell"]),
        confidence=st.floats(min_value=0.5, max_value=0.9999),
        price=st.floats(min_value=0.5, max_value=2000.0),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    signals=signal_lists,
    daily=st.integers(min_value=1_000, max_value=2_000_000),
    used_frac=st.floats(min_value=0.0, max_value=1.2),
    risk=st.floats(min_value=0.001, max_value=1.0),
    stop=st.floats(min_value=0.001, max_value=0.2),
    collar=st.floats(min_value=0.0001, max_value=0.05),
    max_open=st.integers(min_value=1, max_value=12),
)
def test_entries_never_reserve_more_than_remaining(
    signals: list[Signal], daily: int, used_frac: float, risk: float, stop: float,
    collar: float, max_open: int,
) -> None:
    used = int(daily * used_frac)
    limits = RiskLimits(daily, risk, stop, max_open_positions=max_open, entry_collar_pct=collar)
    intents = decide(_inp(signals=signals, used_cents=used), DecisionParams(limits=limits))
    entries = _entries(intents)
    assert len(entries) == len(intents)
    assert sum(reservation_cents(i) for i in entries) <= max(0, daily - used)
    assert len(entries) <= max_open
    assert len({i.symbol for i in entries}) == len(entries)
    assert all(i.qty > 0 for i in entries)
    for i in entries:
        assert Decimal(i.limit_price or "0") > 0
        # the buy limit is above the reference, the sell limit below it
        assert (Decimal(i.limit_price or "0") >= Decimal(i.ref_price)) == (i.side == "buy") or (
            Decimal(i.limit_price or "0") == Decimal(i.ref_price))


@settings(max_examples=200, deadline=None)
@example(price=4.22156, side="sell", collar=0.0123, remaining=982_907)
@example(price=5.5252488, side="sell", collar=0.002, remaining=794_467)
@given(
    price=st.floats(min_value=0.5, max_value=500.0),
    side=st.sampled_from(["buy", "sell"]),
    collar=st.floats(min_value=0.0001, max_value=0.05),
    remaining=st.integers(min_value=1_000, max_value=10_000_000),
)
def test_single_value_capped_entry_reserves_at_most_remaining(
    price: float, side: str, collar: float, remaining: int
) -> None:
    # Risk budget far above the remaining value, so the value cap decides the size.
    daily = 10**9
    limits = RiskLimits(daily, 1.0, 0.001, max_open_positions=10, entry_collar_pct=collar)
    intents = decide(_inp(signals=[_sig("AAA", side=side, price=price)],
                          used_cents=daily - remaining), DecisionParams(limits=limits))
    assert sum(reservation_cents(i) for i in intents) <= remaining


def test_short_entry_at_sub_tick_price_reserves_at_most_remaining() -> None:
    # Reference $4.22156 (5 decimals), collar 1.23 %: sized with the buy collar $4.2735
    # -> 2300 shares ($9,829.05); the short's reservation uses ref + (ref - $4.1696)
    # = $4.27352 -> $9,829.10, 3 cents more than was left.
    limits = RiskLimits(10**9, 1.0, 0.001, max_open_positions=10, entry_collar_pct=0.0123)
    remaining = 982_907
    intents = decide(_inp(signals=[_sig("AAA", side="sell", price=4.22156)],
                          used_cents=10**9 - remaining), DecisionParams(limits=limits))
    assert len(intents) == 1
    assert reservation_cents(intents[0]) <= remaining
