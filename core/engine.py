"""The cluster's steps as plain functions over a ``Runtime``: tick, score, decide, submit,
close, end of day and the kill switch. Tasks call exactly one of these.

Enqueueing the next step goes through a ``Dispatcher`` so this module never imports Celery;
the backtester can pass one that runs the steps inline. Wall times are Unix seconds; market
times America/New_York; money in cents.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from typing import Any, Protocol

from core.brokers.base import FillEvent, OrderRequest, Position
from core.decision import DecisionInput, decide, in_eod_window, reservation_cents
from core.models import CLOSE
from core.orders import OrderIntent, exit_client_order_id
from core.runtime import Runtime
from core.signals import Signal
from core.signals.orb import orb_signals

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    """How one step hands work to the next (queues in the cluster, calls in a backtest)."""

    def score(self, payload: dict[str, Any]) -> None: ...

    def submit_order(self, intent: dict[str, Any]) -> None: ...

    def close_position(self, intent: dict[str, Any]) -> None: ...


# --- tick ---------------------------------------------------------------------------------
def tick(rt: Runtime, dispatcher: Dispatcher, now_wall: float | None = None) -> dict[str, Any]:
    """Advance the replay by one bar if the previous bar is settled, fill due orders and
    hand the new bar to scoring. Safe to call any number of times per bar."""
    now_wall = time.time() if now_wall is None else now_wall
    replay = rt.replay
    if not replay.is_prepared():
        from core.sim import prepare_replay

        prepare_replay(rt, rt.settings)
    st = replay.state()
    if st.finished:
        return {"status": "finished"}
    days = replay.days()
    meta = days[st.day]
    if st.bar >= 0 and st.settled < st.bar:
        if now_wall - st.dispatched_at > rt.settings.sim_settle_timeout_s:
            log.warning("bar not settled in time; dispatching it again",
                        extra={"date": meta.date.isoformat(), "bar": st.bar})
            _process_fills(rt, meta, st.bar, replay.row(meta, st.bar))
            replay.touch_dispatch(now_wall)
            dispatcher.score({"date": meta.date.isoformat(), "bar": st.bar})
            return {"status": "redispatched", "date": meta.date.isoformat(), "bar": st.bar}
        return {"status": "waiting", "date": meta.date.isoformat(), "bar": st.bar}
    if st.bar == meta.n_bars - 1:
        # two ticks can get here at once: only the one that takes the guard records the day
        if rt.redis.set(rt.keys.k(f"eod_stats:{meta.date.isoformat()}"), "1", nx=True,
                        ex=4 * 24 * 3600):
            _end_of_day(rt, meta)
        status = replay.roll_day(st, now_wall)
        return {"status": status, "date": meta.date.isoformat()}
    adv = replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), now_wall)
    if adv.status != "advanced" or adv.row is None:
        return {"status": adv.status, "date": meta.date.isoformat(), "bar": st.bar + 1}
    if adv.bar == 0:
        rt.broker.open_account()
    fills = _process_fills(rt, meta, adv.bar, adv.row)
    dispatcher.score({"date": meta.date.isoformat(), "bar": adv.bar})
    return {"status": "advanced", "date": meta.date.isoformat(), "bar": adv.bar,
            "fills": len(fills)}


def _process_fills(rt: Runtime, meta: Any, bar: int, row: Any) -> list[FillEvent]:
    events = rt.broker.process_bar(meta, bar, row)
    apply_fill_events(rt, events)
    return events


def apply_fill_events(rt: Runtime, events: list[FillEvent]) -> None:
    """Make each entry's reservation follow its fill: shrink to the filled value, or release."""
    for ev in events:
        if ev.intent != "entry":
            continue
        day = dt.date.fromisoformat(ev.session_date)
        reserved = rt.limits.reservations(day).get(ev.client_order_id)
        if reserved is None:
            log.error("fill without reservation", extra={"client_order_id": ev.client_order_id})
            continue
        target = min(ev.notional_cents, reserved) if ev.status == "filled" else 0
        if ev.status == "filled" and ev.notional_cents > reserved:
            log.error("fill value above its reservation", extra={
                "client_order_id": ev.client_order_id, "filled_cents": ev.notional_cents,
                "reserved_cents": reserved})
        if target < reserved:
            rt.limits.adjust(day, ev.client_order_id, target)


def _end_of_day(rt: Runtime, meta: Any) -> None:
    """Expire working orders of the finished session and record its end-of-day figures."""
    apply_fill_events(rt, rt.broker.expire_session_orders(meta.date))
    positions = rt.broker.get_positions()
    if positions:
        log.error("positions open at the close", extra={
            "date": meta.date.isoformat(), "symbols": ",".join(sorted(positions))})
    rt.replay.record_day_stats({
        "date": meta.date.isoformat(),
        "open_positions_at_close": len(positions),
        "max_used_capital_cents": rt.limits.peak(meta.date),
        "used_capital_cents": rt.limits.used(meta.date),
        "daily_limit_cents": rt.settings.daily_limit_cents,
        "close_time": meta.close_time.isoformat(),
    })


# --- score (gpu queue) ----------------------------------------------------------------------
def score(rt: Runtime, payload: dict[str, Any]) -> dict[str, Any]:
    """Rule signals and marks for the whole universe at one bar (small JSON)."""
    day = dt.date.fromisoformat(str(payload["date"]))
    bar = int(payload["bar"])
    meta, window = rt.window.get(day, bar)
    signals = orb_signals(window, meta.symbols, meta.bar_time(bar), rt.orb_params)
    held = set(rt.broker.get_positions())
    wanted = held | {s.symbol for s in signals}
    closes = window[bar, :, CLOSE]
    marks = {sym: float(closes[i]) for i, sym in enumerate(meta.symbols)
             if sym in wanted and math.isfinite(closes[i]) and closes[i] > 0}
    return {"date": day.isoformat(), "bar": bar,
            "signals": [s.to_dict() for s in signals], "marks": marks}


# --- decide ---------------------------------------------------------------------------------
def decide_bar(rt: Runtime, dispatcher: Dispatcher, scored: dict[str, Any]) -> dict[str, Any]:
    """Order intents for one scored bar; registers them so the bar settles when all are sent."""
    day = dt.date.fromisoformat(str(scored["date"]))
    bar = int(scored["bar"])
    meta = rt.bar_store.meta(day)
    if meta is None:
        log.error("decide for an unknown session", extra={"date": day.isoformat()})
        return {"status": "unknown_session", "date": day.isoformat(), "bar": bar}
    signals = [Signal(symbol=s["symbol"], side=s["side"], source=s["source"],
                      confidence=float(s["confidence"]),
                      bar_time=dt.datetime.fromisoformat(s["bar_time"]), price=float(s["price"]))
               for s in scored.get("signals", [])]
    positions = rt.broker.get_positions()
    open_orders = rt.broker.list_open_orders()
    entered = frozenset(x.decode() for x in rt.redis.smembers(rt.keys.entries(day)))
    inp = DecisionInput(
        session_date=day, bar=bar,
        decision_time=meta.bar_time(bar) + dt.timedelta(seconds=meta.bar_seconds),
        close_time=meta.close_time, signals=signals,
        marks={k: float(v) for k, v in scored.get("marks", {}).items()},
        positions=positions, open_order_symbols=frozenset(o.symbol for o in open_orders),
        entered_today=entered, used_cents=rt.limits.used(day), halted=is_halted(rt),
        exit_attempts={sym: _exit_attempts(rt, pos) for sym, pos in positions.items()},
    )
    intents = decide(inp, rt.decision_params)
    if not intents:
        rt.replay.settle(day, bar)
        return {"status": "settled", "date": day.isoformat(), "bar": bar, "orders": 0}
    rt.replay.register_pending(day, bar, [i.client_order_id for i in intents])
    for intent in intents:
        payload = intent.model_dump(mode="json")
        if intent.intent == "exit":
            dispatcher.close_position(payload)
        else:
            dispatcher.submit_order(payload)
    return {"status": "dispatched", "date": day.isoformat(), "bar": bar,
            "orders": len(intents)}


def _exit_attempts(rt: Runtime, pos: Position) -> int:
    """Exit orders already used for this position (a failed exit gets a fresh id)."""
    attempt = 0
    while attempt < 99:
        order = rt.broker.get_order_by_client_id(
            exit_client_order_id(pos.entry_client_order_id, attempt + 1))
        if order is None or order.status in ("accepted", "filled"):
            return attempt
        attempt += 1
    return attempt


# --- orders (exec queue) --------------------------------------------------------------------
def submit_order(rt: Runtime, payload: dict[str, Any]) -> dict[str, Any]:
    """Reserve capital and submit one entry exactly once; always completes the bar's ledger."""
    intent = OrderIntent.model_validate(payload)
    try:
        return _submit_entry(rt, intent)
    finally:
        rt.replay.complete_pending(intent.session_date, intent.bar, intent.client_order_id)


def _submit_entry(rt: Runtime, intent: OrderIntent) -> dict[str, Any]:
    from core.locks import TokenLock

    coid = intent.client_order_id
    base = {"client_order_id": coid, "symbol": intent.symbol}
    if intent.intent != "entry" or intent.qty <= 0 or intent.limit_price is None:
        return {**base, "status": "invalid", "reason": "submit_order takes sized entries only"}
    existing = rt.broker.get_order_by_client_id(coid)
    if existing is not None:
        return {**base, "status": "exists", "order_status": existing.status}
    if is_halted(rt):
        return {**base, "status": "refused", "reason": "halted"}
    lock = TokenLock(rt.redis, rt.keys.order_lock(coid))
    if not lock.acquire():
        return {**base, "status": "locked"}
    try:
        existing = rt.broker.get_order_by_client_id(coid)
        if existing is not None:
            return {**base, "status": "exists", "order_status": existing.status}
        day = intent.session_date
        res = rt.limits.reserve(day, coid, reservation_cents(intent),
                                rt.settings.daily_limit_cents)
        if not res.ok:
            log.info("entry refused by the daily limit", extra={
                **base, "reserve_status": res.status, "used_cents": res.used_cents})
            return {**base, "status": "refused", "reason": res.status}
        order = rt.broker.submit_order(OrderRequest(
            client_order_id=coid, symbol=intent.symbol, side=intent.side, qty=intent.qty,
            order_type="limit", limit_price=intent.limit_price, time_in_force="ioc",
            intent="entry", reason=intent.reason, strategy=intent.strategy,
            confidence=intent.confidence))
        if order.status == "rejected":
            rt.limits.adjust(day, coid, 0)
            return {**base, "status": "rejected", "reason": order.status_reason}
        rt.redis.sadd(rt.keys.entries(day), f"{intent.symbol}:{intent.side}")
        rt.redis.expire(rt.keys.entries(day), 4 * 24 * 3600)
        return {**base, "status": order.status, "qty": order.qty}
    finally:
        lock.release()


def close_position(rt: Runtime, payload: dict[str, Any]) -> dict[str, Any]:
    """Close one position exactly once; always completes the bar's ledger."""
    intent = OrderIntent.model_validate(payload)
    try:
        return _close(rt, intent.symbol, intent.client_order_id, intent.reason)
    finally:
        rt.replay.complete_pending(intent.session_date, intent.bar, intent.client_order_id)


def _close(rt: Runtime, symbol: str, coid: str, reason: str) -> dict[str, Any]:
    from core.locks import TokenLock

    base = {"client_order_id": coid, "symbol": symbol}
    existing = rt.broker.get_order_by_client_id(coid)
    if existing is not None:
        return {**base, "status": "exists", "order_status": existing.status}
    lock = TokenLock(rt.redis, rt.keys.order_lock(coid))
    if not lock.acquire():
        return {**base, "status": "locked"}
    try:
        order = rt.broker.close_position(symbol, coid, reason)
        if order is None:
            return {**base, "status": "flat"}
        return {**base, "status": order.status, "reason": order.status_reason or reason}
    finally:
        lock.release()


# --- end of day and kill switch ---------------------------------------------------------------
def is_halted(rt: Runtime) -> bool:
    """True while the kill switch is engaged."""
    return bool(rt.redis.exists(rt.keys.halt()))


def close_all(rt: Runtime, reason: str) -> dict[str, Any]:
    """Cancel working entries (releasing their capital) and close every position."""
    cancelled = []
    for order in rt.broker.list_open_orders():
        if order.intent == "entry":
            done = rt.broker.cancel_order(order.client_order_id)
            if done is not None and done.status == "cancelled":
                cancelled.append(order.client_order_id)
                apply_fill_events(rt, [FillEvent(order.client_order_id, order.symbol, "entry",
                                                 "cancelled", 0, 0, order.session_date)])
    closing = {}
    for symbol, pos in sorted(rt.broker.get_positions().items()):
        coid = exit_client_order_id(pos.entry_client_order_id, _exit_attempts(rt, pos) + 1)
        closing[symbol] = _close(rt, symbol, coid, reason)["status"]
    return {"cancelled": cancelled, "closing": closing}


def eod_close(rt: Runtime, now_wall: float | None = None) -> dict[str, Any]:
    """Inside the EOD window of the session's real close: flatten (idempotent)."""
    meta, bar = rt.replay.now()
    if meta is None:
        return {"status": "no_session"}
    decision_time = meta.bar_time(max(bar, 0)) + dt.timedelta(seconds=meta.bar_seconds)
    if not in_eod_window(decision_time, meta.close_time, rt.settings.eod_close_minutes_before):
        return {"status": "outside_window", "date": meta.date.isoformat(), "bar": bar}
    result = close_all(rt, "eod")
    return {"status": "closing", "date": meta.date.isoformat(), "bar": bar, **result}


def flatten_all(rt: Runtime, reason: str = "flatten") -> dict[str, Any]:
    """Kill switch: halt new entries until resumed, cancel entries, close every position."""
    rt.redis.set(rt.keys.halt(), json.dumps({"reason": reason, "at": time.time()}))
    log.warning("kill switch engaged: flattening", extra={"reason": reason})
    result = close_all(rt, reason)
    return {"status": "halted", **result,
            "positions_left": sorted(rt.broker.get_positions())}


def resume_trading(rt: Runtime) -> dict[str, Any]:
    """Clear the kill switch so entries may resume."""
    cleared = bool(rt.redis.delete(rt.keys.halt()))
    log.warning("kill switch cleared" if cleared else "resume: was not halted")
    return {"status": "resumed" if cleared else "not_halted"}
