"""The decision step: a scored bar becomes order intents, handed on through a ``Dispatcher``
(the first order before the others are built), and the bar's ledger of orders.

Wall times are Unix seconds; market times America/New_York; money in cents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import time
from typing import Any

import numpy as np

from core.decision import (
    DecisionInput,
    decide_entries,
    exit_candidates,
    in_eod_window,
    iter_exits,
)
from core.engine import Dispatcher
from core.execution import reconcile
from core.market.bar_store import rows_from_bytes
from core.runtime import Runtime
from core.scoring import mark_values, symbol_index
from core.signals import Signal

log = logging.getLogger(__name__)

def scored_signals(scored: dict[str, Any], meta: Any) -> list[Signal]:
    """The signals of a scored bar: compact rows (``compute_scores``) or one dict per signal
    (``Signal.to_dict``, as older messages and hand-built ones carry them)."""
    out = []
    bar_time = None
    for s in scored.get("signals", []):
        if isinstance(s, dict):
            out.append(Signal(symbol=s["symbol"], side=s["side"], source=s["source"],
                              confidence=float(s["confidence"]),
                              bar_time=dt.datetime.fromisoformat(s["bar_time"]),
                              price=float(s["price"])))
            continue
        if bar_time is None:
            bar_time = meta.bar_time(int(scored["bar"]))
        symbol, side, source, conf, price = s
        out.append(Signal(symbol=symbol, side=side, source=source, confidence=float(conf),
                          bar_time=bar_time, price=float(price)))
    return out


def scored_mark_array(scored: dict[str, Any], meta: Any) -> np.ndarray:
    """A scored bar's marks as an array in the session's symbol order (NaN: none)."""
    raw = scored.get("marks", {})
    if isinstance(raw, np.ndarray):
        return raw.astype(float, copy=False)
    if isinstance(raw, dict):
        index = symbol_index(meta.symbols)
        out = np.full(len(meta.symbols), np.nan)
        for sym, v in raw.items():
            if sym in index:
                out[index[sym]] = float(v)
        return out
    if len(raw) != len(meta.symbols):
        raise ValueError(f"marks for {len(raw)} symbols, the session has {len(meta.symbols)}")
    return np.array([np.nan if v is None else float(v) for v in raw], dtype=float)


def decide_bar(rt: Runtime, dispatcher: Dispatcher, scored: dict[str, Any]) -> dict[str, Any]:
    """Order intents for one scored bar; registers them so the bar settles when all are sent.

    ``scored`` is what ``score`` returned (the key of the stored result) or the result itself.
    Everything the decision reads (the scored result, today's entries and used capital, the
    halts, stale symbols, the reconciliation marker, and with the simulated broker its
    positions, working orders and realized P/L) comes in one transaction; the first order
    is handed on before the others are built.
    """
    decide_at = time.time()
    timing = scored.get("t")
    key = scored.get("scored_key")
    day = dt.date.fromisoformat(str(scored["date"]))
    bar = int(scored["bar"])
    meta = rt.bar_store.meta(day)
    if meta is None:
        log.error("decide for an unknown session", extra={"date": day.isoformat()})
        return {"status": "unknown_session", "date": day.isoformat(), "bar": bar}
    queue_snapshot = getattr(rt.broker, "queue_snapshot", None)
    n_signals = scored.get("signals", 0)
    n_signals = n_signals if isinstance(n_signals, int) else len(n_signals)
    if "scored" in scored:  # the result rode in the message
        scored = {**scored, **scored["scored"]}
    # the marks: the scored bar's own (a backtest, a hand-built result), else the bar's row
    row_range = None
    if "marks" not in scored:
        rb = meta.row_bytes
        row_range = (rt.keys.bars(day), bar * rb, (bar + 1) * rb - 1)
    # the entries taken today that the signals may repeat ("SYMBOL:side"): asked for
    # those keys only when the signals are known before the reads (the day's set is long)
    wanted_entries = None
    if "signals" in scored and not isinstance(scored["signals"], int):
        wanted_entries = sorted({f"{s['symbol']}:{s['side']}" if isinstance(s, dict)
                                 else f"{s[0]}:{s[1]}" for s in scored["signals"]})

    def reads() -> tuple[dict[str, Any], Any]:
        pipe = rt.redis.pipeline(transaction=True)
        names = ["entered", "used", "halted", "loss_halted", "stale", "reconciled"]
        if wanted_entries is None:
            pipe.smembers(rt.keys.entries(day))
        elif wanted_entries:
            pipe.smismember(rt.keys.entries(day), wanted_entries)
        else:
            pipe.exists(rt.keys.entries(day))  # no signal: nothing to look up
        pipe.get(rt.keys.used_capital(day))
        pipe.exists(rt.keys.halt())
        pipe.exists(rt.keys.loss_halt(day))
        pipe.hkeys(rt.keys.k(f"stale_symbols:{day.isoformat()}"))  # written by the feed
        pipe.exists(rt.keys.reconciled(day))
        if key is not None:
            names.append("scored")
            pipe.get(str(key))
        if row_range is not None:
            names.append("row")
            pipe.getrange(*row_range)
        n_account, finish = queue_snapshot(pipe, day) if queue_snapshot else (0, None)
        if timing and len(timing) == 3 and all(isinstance(x, int | float) for x in timing):
            t0, t1, t2 = (float(x) for x in timing)
            # the last tick's stage times (ms) for `daytrader status` and the metrics; rides
            # on this transaction, so it costs no extra round trip
            pipe.hset(rt.keys.k("tick:last"), mapping={
                "date": day.isoformat(), "bar": bar, "tick_at": t0,
                "score_queue_ms": round((t1 - t0) * 1000, 3),
                "score_ms": round((t2 - t1) * 1000, 3),
                "decide_queue_ms": round((decide_at - t2) * 1000, 3),
                "signals": n_signals, "model": scored.get("model") or ""})
        replies = pipe.execute()
        got = dict(zip(names, replies, strict=False))
        n = len(names)
        account = finish(replies[n:n + n_account]) if finish is not None else None
        return got, account

    got, account = reads()
    if key is not None:
        if got["scored"] is None:
            log.error("scored result missing", extra={"key": key})
            return {"status": "missing_scores", "date": day.isoformat(), "bar": bar}
        scored = {**scored, **json.loads(got["scored"])}
    row = None
    if row_range is not None:
        raw_row = got["row"]
        if len(raw_row) != meta.row_bytes:
            log.error("decide for a bar not in the store", extra={
                "date": day.isoformat(), "bar": bar})
            return {"status": "missing_bar", "date": day.isoformat(), "bar": bar}
        row = rows_from_bytes(raw_row, len(meta.symbols))[0]
    if not got["reconciled"]:
        reconcile(rt, day)  # new day, or Redis lost its data: rebuild before any entry
        got, account = reads()
    if account is not None:
        positions, open_orders, realized = account
    else:
        (positions, open_orders), realized = rt.broker.snapshot(), None
    signals = scored_signals(scored, meta)  # parsed first: a malformed result sends nothing
    rule_exits = {sym: (str(v[0]), str(v[1])) for sym, v in scored.get("exits", {}).items()}
    decision_time = meta.bar_time(bar) + dt.timedelta(seconds=meta.bar_seconds)
    params = rt.decision_params
    # the held positions as arrays: their marks, unrealized P/L and which may exit, without
    # a Python step per position (hundreds of them at a large universe)
    held = rt.held.sync_from(rt.broker, positions, meta.symbols, meta.open_time,
                             meta.bar_seconds, day.isoformat())
    cols = held.held()
    outside = list(held.outside.values())  # held symbols not in today's universe
    syms = list(map(meta.symbols.__getitem__, cols.tolist())) + [p.symbol for p in outside]
    qty = np.concatenate([held.qty[cols], [float(p.qty) for p in outside]])
    avg = np.concatenate([held.avg[cols], [p.avg_float for p in outside]])
    stale_pos = np.concatenate([~held.today[cols], [p.session_date != day.isoformat()
                                                     for p in outside]]).astype(bool)
    # the held symbols' marks: from the bar's row (only their columns), or the scored bar's
    in_universe = mark_values(row[cols]) if row is not None else scored_mark_array(
        scored, meta)[cols]
    held_marks = np.concatenate([in_universe, np.full(len(outside), np.nan)])
    candidates = exit_candidates(
        syms, qty, avg, stale_pos, held_marks, params.limits.stop_loss_pct,
        in_eod_window(decision_time, meta.close_time, params.eod_close_minutes_before),
        rule_exits)
    by_symbol = dict(zip(syms, held_marks.tolist(), strict=True))
    marks = {sym: m for sym in candidates if (m := by_symbol.get(sym)) is not None and m == m}
    # The first order goes out as soon as it is known: the first exit, built from the
    # positions, their marks and the working orders alone, before anything only the
    # entries need (signals, entries taken, capital used, halts) and before the entries
    # are sized. The bar's ledger takes all the orders afterwards (an order already done
    # then counts as done).
    inp = DecisionInput(
        session_date=day, bar=bar, decision_time=decision_time,
        close_time=meta.close_time, signals=[], marks=marks,
        positions=positions, open_order_symbols=frozenset(o.symbol for o in open_orders),
        entered_today=frozenset(), used_cents=0, rule_exits=rule_exits,
        exit_candidates=candidates,
    )
    pending = iter_exits(inp, params)
    first = next(pending, None)
    sent = 0
    if first is not None:
        _dispatch(dispatcher, first)
        sent = 1
    exits = [first, *pending] if first is not None else []
    if wanted_entries is None:
        entered = {x.decode() for x in got["entered"]}
    elif wanted_entries:
        entered = {k for k, hit in zip(wanted_entries, got["entered"], strict=True) if hit}
    else:
        entered = set()
    if got["stale"]:  # stale market data blocks new entries for those symbols
        stale = {x.decode() for x in got["stale"]}
        signals = [s for s in signals if s.symbol not in stale]
    halted = bool(got["halted"]) or bool(got["loss_halted"]) or loss_limit_hit(
        rt, day, positions, marks, realized, unrealized_cents(qty, avg, held_marks))
    inp = dataclasses.replace(
        inp, signals=signals, used_cents=int(got["used"] or 0), halted=halted,
        # only the signals' entries matter to the decision
        entered_today=frozenset(k for k in {f"{s.symbol}:{s.side}" for s in signals}
                                if k in entered))
    intents = exits + decide_entries(inp, params)
    if not intents:
        rt.replay.settle(day, bar)
        return {"status": "settled", "date": day.isoformat(), "bar": bar, "orders": 0}
    if not sent:
        _dispatch(dispatcher, intents[0])
        sent = 1
    if len(intents) > sent:
        batch = getattr(dispatcher, "batch", None)
        with batch() if batch is not None else contextlib.nullcontext():
            for intent in intents[sent:]:
                _dispatch(dispatcher, intent)
    rt.replay.register_pending(day, bar, [i.client_order_id for i in intents])
    return {"status": "dispatched", "date": day.isoformat(), "bar": bar,
            "orders": len(intents)}


def _dispatch(dispatcher: Dispatcher, intent: Any) -> None:
    payload = intent.model_dump(mode="json")
    if intent.intent == "exit":
        dispatcher.close_position(payload)
    else:
        dispatcher.submit_order(payload)


def unrealized_cents(qty: np.ndarray, avg: np.ndarray, marks: np.ndarray) -> int:
    """Unrealized P/L in cents of held positions (signed quantities, average prices and
    marks in US dollars, NaN: no mark, left out), each truncated to whole cents as
    ``loss_limit_hit`` does."""
    with np.errstate(invalid="ignore"):
        each = np.trunc((marks - avg) * qty * 100)
    return int(each[np.isfinite(each)].sum())


def loss_limit_hit(rt: Runtime, day: dt.date, positions: dict[str, Any],
                   marks: dict[str, float], realized_cents: int | None = None,
                   unrealized: int | None = None) -> bool:
    """True (and halts entries for the day) once realized + unrealized P/L <= -limit.
    ``realized_cents``: the day's realized P/L when already read (else asked here);
    ``unrealized``: the positions' unrealized P/L in cents when already computed (else
    from ``marks``)."""
    if not positions and rt.settings.daily_loss_limit_cents <= 0:
        return False
    pnl = rt.broker.realized_pnl_cents(day) if realized_cents is None else realized_cents
    if unrealized is not None:
        pnl += unrealized
    else:
        for sym, pos in positions.items():
            mark = marks.get(sym)
            if mark is not None and math.isfinite(mark):
                pnl += int((float(mark) - pos.avg_float) * pos.qty * 100)
    if pnl <= -rt.settings.daily_loss_limit_cents:
        if rt.redis.set(rt.keys.loss_halt(day), str(pnl), nx=True, ex=4 * 24 * 3600):
            log.warning("daily loss limit reached: no new entries today",
                        extra={"date": day.isoformat(), "pnl_cents": pnl})
            if rt.alerts is not None:
                rt.alerts.send("halt", f"{day} daily loss limit reached (P/L "
                                       f"${pnl / 100:,.2f}): no new entries today")
        return True
    return False

