"""The scoring and decision steps' fast forms against their plain definitions: vectorised
confidences, the float pre-check of the stop-loss, signals left out for held symbols, and the
simulated broker's merged writes."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.brokers.base import Position
from core.brokers.simulated import _Coalesced
from core.calendar import NY
from core.exits import exit_reason
from core.scoring import score_bar
from core.signals import confidence, signals_from_masks
from tests.helpers import busy_scoring_params
from tests.helpers import random_walk_window as _walk

BAR_TIME = dt.datetime(2025, 3, 12, 10, 15, tzinfo=NY)
OPEN_TIME = dt.datetime(2025, 3, 12, 9, 30, tzinfo=NY)


@given(st.lists(st.floats(-5, 50, allow_nan=False), min_size=1, max_size=30),
       st.sampled_from([1.0, 4.0]))
@settings(max_examples=60, deadline=None)
def test_vectorised_confidence_is_the_scalar_one(strengths: list[float], scale: float) -> None:
    n = len(strengths)
    strength = np.asarray(strengths)
    mask = np.ones(n, dtype=bool)
    price = np.linspace(10, 20, n)
    symbols = tuple(f"S{i}" for i in range(n))
    got = signals_from_masks(symbols, "orb", BAR_TIME, price, mask, strength,
                             np.zeros(n, dtype=bool), strength, scale=scale)
    assert [s.confidence for s in got] == [confidence(x, scale) for x in strengths]
    assert [s.price for s in got] == price.tolist()
    only = np.arange(n) % 2 == 0
    kept = signals_from_masks(symbols, "orb", BAR_TIME, price, mask, strength,
                              np.zeros(n, dtype=bool), strength, scale=scale, only=only)
    assert kept == [s for i, s in enumerate(got) if only[i]]


def _decimal_reason(pos: Position, mark: float, sl: float) -> str | None:
    """The stop-loss check by its definition: exact Decimal comparison."""
    price, stop = Decimal(repr(float(mark))), Decimal(repr(sl))
    if pos.qty > 0 and price <= pos.avg * (1 - stop):
        return "stop_loss"
    if pos.qty < 0 and price >= pos.avg * (1 + stop):
        return "stop_loss"
    return None


@given(avg=st.decimals(min_value=Decimal("0.5"), max_value=Decimal("5000"), places=4),
       sl=st.sampled_from([0.01, 0.005, 0.02, 0.0123]), side=st.sampled_from([1, -1]),
       nudge=st.integers(-3, 3), rel=st.floats(-0.05, 0.05))
@settings(max_examples=300, deadline=None)
def test_stop_loss_float_precheck_matches_the_exact_check(avg: Decimal, sl: float, side: int,
                                                          nudge: int, rel: float) -> None:
    pos = Position("AAA", 100 * side, str(avg), "2025-03-12T10:00:00-04:00", "2025-03-12",
                   "orb-AAA-20250312-1000-L")
    stop = float(avg * (1 - Decimal(repr(sl)) if side > 0 else 1 + Decimal(repr(sl))))
    # marks at the stop to the last bit (either side) and spread around it
    for mark in (stop, math.nextafter(stop, math.inf) if nudge > 0 else
                 math.nextafter(stop, -math.inf), stop * (1 + rel), stop + nudge * 1e-9):
        if mark > 0:
            assert exit_reason(pos, mark, sl, False, "2025-03-12") == _decimal_reason(
                pos, mark, sl), (mark, stop)


def test_score_bar_leaves_out_held_symbols_only_when_asked() -> None:
    w = _walk(21, n_bars=200, n_sym=12)
    symbols = tuple(f"S{i}" for i in range(12))
    params = busy_scoring_params()
    seen = 0
    for t in range(30, 200, 7):
        view = w[: t + 1]
        plain = score_bar(view, symbols, OPEN_TIME, 60, {}, params)
        if not plain.signals:
            continue
        held_sym = plain.signals[0].symbol
        held = {held_sym: Position(held_sym, 10, "100.0", "2025-03-12T09:31:00-04:00",
                                   "2025-03-12", f"orb-{held_sym}-20250312-0931-L")}
        all_sigs = score_bar(view, symbols, OPEN_TIME, 60, held, params).signals
        skipped = score_bar(view, symbols, OPEN_TIME, 60, held, params, skip_held=True)
        assert all_sigs == plain.signals
        assert skipped.signals == [s for s in plain.signals if s.symbol != held_sym]
        assert skipped.marks == plain.marks
        seen += 1
    assert seen > 5


def test_coalesced_writes_keep_the_last_value_and_the_order() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def __getattr__(self, name):
            return lambda *a, **kw: self.calls.append((name, a, kw))

    w = _Coalesced()
    w.hset("pos", "A", "1")
    w.hset("pos", "B", "2")
    w.hdel("pos", "A")  # closed after being written: deleted
    w.hset("pos", "C", "3")
    w.hdel("pos", "C")
    w.hset("pos", "C", "4")  # reopened: kept with its last value
    w.rpush("log", "a")
    w.rpush("log", "b")
    w.srem("open", "x")
    w.srem("open", "y")
    w.incrby("cash", 5)
    w.incrby("cash", -7)
    w.incrby("zero", 3)
    w.incrby("zero", -3)
    w.expire("log", 10)
    rec = Recorder()
    w.queue_on(rec)
    assert rec.calls == [
        ("hset", ("pos",), {"mapping": {"B": "2", "C": "4"}}), ("hdel", ("pos", "A"), {}),
        ("rpush", ("log", "a", "b"), {}), ("srem", ("open", "x", "y"), {}),
        ("incrby", ("cash", -2), {}), ("expire", ("log", 10), {})]


@given(seed=st.integers(0, 5000))
@settings(max_examples=60, deadline=None)
def test_mark_values_are_the_closes_bar_problems_does_not_call_inconsistent(seed: int) -> None:
    from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
    from core.scoring import bar_problems, mark_values

    rng = np.random.default_rng(seed)
    n = 40
    row = np.empty((n, 5))
    row[:, OPEN] = rng.uniform(10, 20, n)
    row[:, CLOSE] = rng.uniform(10, 20, n)
    row[:, HIGH] = np.maximum(row[:, OPEN], row[:, CLOSE]) + rng.uniform(0, 1, n)
    row[:, LOW] = np.minimum(row[:, OPEN], row[:, CLOSE]) - rng.uniform(0, 1, n)
    row[:, VOLUME] = rng.integers(0, 100, n)
    for _ in range(12):  # every kind of bad value, anywhere
        i, f = rng.integers(0, n), rng.integers(0, 5)
        row[i, f] = rng.choice([np.nan, 0.0, -1.0, np.inf, 1e9, 0.5])
    symbols = tuple(f"S{i}" for i in range(n))
    skipped = bar_problems(row, symbols)
    want = [row[i, CLOSE] if (np.isfinite(row[i, CLOSE]) and row[i, CLOSE] > 0
                              and not skipped.get(s, "").startswith("inconsistent"))
            else np.nan for i, s in enumerate(symbols)]
    np.testing.assert_array_equal(mark_values(row), np.asarray(want))


@given(seed=st.integers(0, 10_000), eod=st.booleans())
@settings(max_examples=80, deadline=None)
def test_exit_candidates_hold_every_position_that_exits(seed: int, eod: bool) -> None:
    """The decision looks only at the candidates: none of the positions that
    ``exit_reason`` (or a rule exit) would close may be missing, and the unrealized P/L of
    the arrays is the per-position one."""
    from core.decide_step import unrealized_cents
    from core.decision import exit_candidates

    rng = np.random.default_rng(seed)
    n = 30
    symbols = tuple(f"S{i:02d}" for i in range(n))
    sl = float(rng.choice([0.01, 0.005, 0.0123]))
    positions, marks = {}, {}
    for i in rng.choice(n, 20, replace=False):
        qty = int(rng.choice([-1, 1]) * rng.integers(1, 500))
        avg = Decimal(str(round(float(rng.uniform(5, 500)), 4)))
        day = "2025-03-12" if rng.random() > 0.1 else "2025-03-11"
        sym = symbols[i]
        positions[sym] = Position(sym, qty, str(avg), "2025-03-12T10:00:00-04:00", day,
                                  f"orb-{sym}-20250312-1000-L")
        stop = float(avg) * (1 - sl if qty > 0 else 1 + sl)
        marks[sym] = float(rng.choice([stop, math.nextafter(stop, 0),
                                       math.nextafter(stop, 1e9),
                                       stop * (1 + rng.uniform(-0.05, 0.05)), np.nan, -1.0]))
    rules = {symbols[i] for i in rng.choice(n, 2)}
    syms = list(positions)
    qty = np.array([positions[s].qty for s in syms], dtype=float)
    avg = np.array([positions[s].avg_float for s in syms])
    stale = np.array([positions[s].session_date != "2025-03-12" for s in syms])
    held_marks = np.array([marks[s] for s in syms])
    got = exit_candidates(syms, qty, avg, stale, held_marks, sl, eod, rules)
    must = {s for s in positions if exit_reason(positions[s], marks[s], sl, eod,
                                                "2025-03-12")}
    must |= rules & set(positions)  # the decision looks at held symbols only
    assert must <= got and (not eod or got >= set(positions))
    want = sum(int((marks[s] - p.avg_float) * p.qty * 100)
               for s, p in positions.items() if math.isfinite(marks[s]))
    assert unrealized_cents(qty, avg, held_marks) == want


@given(seed=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_held_columns_kept_from_changes_equal_a_fresh_read(seed: int) -> None:
    """Positions open, change, close and reopen over bars; the columns synced from the
    changes alone always equal columns read from all positions at once."""
    from core.held import HeldColumns

    rng = np.random.default_rng(seed)
    symbols = tuple(f"S{i:02d}" for i in range(12))
    open_time = dt.datetime(2025, 3, 12, 9, 30, tzinfo=NY)
    kept = HeldColumns()
    positions: dict[str, Position] = {}
    kept.sync(positions, symbols, open_time, 60, "2025-03-12")
    for step in range(25):
        changed = set()
        for _ in range(int(rng.integers(0, 5))):
            sym = str(rng.choice([*symbols, "ZZZ"]))  # ZZZ: outside the universe
            changed.add(sym)
            if sym in positions and rng.random() < 0.4:
                del positions[sym]
                continue
            entry = int(rng.integers(0, 50))
            coid = positions[sym].entry_client_order_id if (
                sym in positions and rng.random() < 0.5) else f"e-{sym}-{step}"
            positions[sym] = Position(
                sym, int(rng.choice([-1, 1]) * rng.integers(1, 9)), f"{rng.uniform(1, 99):.4f}",
                (open_time + dt.timedelta(minutes=entry)).isoformat(),
                "2025-03-12" if rng.random() > 0.2 else "2025-03-11", coid)
        kept.sync(positions, symbols, open_time, 60, "2025-03-12", changed)
        fresh = HeldColumns().sync(positions, symbols, open_time, 60, "2025-03-12")
        for name in ("qty", "avg", "entry", "today"):
            np.testing.assert_array_equal(getattr(kept, name), getattr(fresh, name))
        assert kept.coid == fresh.coid and kept.outside == fresh.outside
        # a position id changes exactly when another position takes the column
        for c in kept.held().tolist():
            same = [c2 for c2 in kept.held().tolist() if kept.coid[c2] == kept.coid[c]]
            assert len({int(kept.pid[c2]) for c2 in same}) == 1


def test_score_bar_leaves_out_entries_taken_today_by_side() -> None:
    w = _walk(33, n_bars=200, n_sym=12)
    symbols = tuple(f"S{i}" for i in range(12))
    params = busy_scoring_params()
    seen = 0
    for t in range(30, 200, 5):
        view = w[: t + 1]
        plain = score_bar(view, symbols, OPEN_TIME, 60, {}, params).signals
        if not plain:
            continue
        first = plain[0]
        longs, shorts = np.zeros(12, dtype=bool), np.zeros(12, dtype=bool)
        (longs if first.side == "buy" else shorts)[symbols.index(first.symbol)] = True
        got = score_bar(view, symbols, OPEN_TIME, 60, {}, params,
                        skip_taken=(longs, shorts)).signals
        assert got == [s for s in plain if (s.symbol, s.side) != (first.symbol, first.side)]
        seen += 1
    assert seen > 5


def test_fills_mark_orders_marks_by_day_then_bar() -> None:
    import datetime as dt
    import threading

    from core.market.bar_store import FillsMark

    mark = FillsMark()
    d1, d2 = dt.date(2025, 3, 3), dt.date(2025, 3, 4)
    assert not mark.seen(d1, 0) and not mark.wait(d1, 0, 0.01)
    mark.push(d1, 5)
    assert mark.seen(d1, 5) and mark.seen(d1, 0) and not mark.seen(d1, 6)
    mark.push(d1, 3)  # an older mark (a replayed message) moves nothing back
    assert mark.seen(d1, 5)
    mark.push(d2, 0)  # a later day covers every bar of the earlier ones
    assert mark.seen(d1, 389) and mark.seen(d2, 0) and not mark.seen(d2, 1)
    threading.Timer(0.05, mark.push, args=(d2, 1)).start()
    assert mark.wait(d2, 1, 5.0)  # woken by the push


def test_order_with_is_dataclasses_replace() -> None:
    import dataclasses

    from core.brokers.base import Order

    order = Order("a-1", "AAA", "buy", 10, "limit", "10.50", "ioc", "entry", False, "orb",
                  "orb", 0.7, "accepted", "2025-03-03", "2025-03-03T14:31:00+00:00",
                  fill_after_bar=3)
    for changes in ({}, {"status": "filled", "filled_qty": 10, "filled_avg_price": "10.49"},
                    {"status_reason": "x", "fill_after_bar": 4, "stop_price": None}):
        got = order.with_(**changes)
        assert got == dataclasses.replace(order, **changes) and got is not order
        assert hash(got) == hash(dataclasses.replace(order, **changes))
    assert order.status == "accepted"  # the original is untouched
    with pytest.raises(TypeError, match="no field"):
        order.with_(colour="red")
    with pytest.raises(dataclasses.FrozenInstanceError):
        order.with_(qty=1).qty = 2  # type: ignore[misc]
