"""The cluster's steps as plain functions over a ``Runtime``: tick, score, decide, submit,
close, end of day and the kill switch. Tasks call exactly one of these.

Enqueueing the next step goes through a ``Dispatcher`` so this module never imports Celery;
the backtester can pass one that runs the steps inline. Wall times are Unix seconds; market
times America/New_York; money in cents.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time
from typing import Any, Protocol

from core.brokers.base import FillEvent
from core.calendar import exchange_date
from core.decision import DecisionInput, decide
from core.execution import apply_fill_events, reconcile, release_orphans
from core.runtime import Runtime
from core.scoring import log_skips, score_bar
from core.signals import Signal
from ml.predictor import exit_model, score_signals

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
    if rt.live_clock:
        return live_tick(rt, dispatcher, now_wall)
    replay = rt.replay
    st = replay.state()
    if st.status == "empty":
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
            dispatcher.score({"date": meta.date.isoformat(), "bar": st.bar, "t0": now_wall})
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
    dispatcher.score({"date": meta.date.isoformat(), "bar": adv.bar, "t0": now_wall})
    return {"status": "advanced", "date": meta.date.isoformat(), "bar": adv.bar,
            "fills": len(fills)}


def live_tick(rt: Runtime, dispatcher: Dispatcher, now_wall: float) -> dict[str, Any]:
    """On the exchange clock: hand the newest bar the feed published to scoring, once per
    bar (a Redis guard), and record the day once its last bar is in. Fills come from the
    trade_updates consumer, not from bars. Beat calls this every few seconds."""
    day = exchange_date(rt.now_fn())
    meta = rt.bar_store.meta(day)
    if meta is None:
        return {"status": "no_session", "date": day.isoformat()}
    bar = rt.bar_store.count(day) - 1
    if bar < 0:
        return {"status": "waiting", "date": day.isoformat(), "bar": bar}
    if not rt.redis.set(rt.keys.tick_guard(day, bar), "1", nx=True, ex=4 * 24 * 3600):
        return {"status": "duplicate", "date": day.isoformat(), "bar": bar}
    if bar == meta.n_bars - 1 and rt.redis.set(rt.keys.k(f"eod_stats:{day.isoformat()}"), "1",
                                               nx=True, ex=4 * 24 * 3600):
        _end_of_day(rt, meta)
    dispatcher.score({"date": day.isoformat(), "bar": bar, "t0": now_wall})
    return {"status": "advanced", "date": day.isoformat(), "bar": bar}


def _process_fills(rt: Runtime, meta: Any, bar: int, row: Any) -> list[FillEvent]:
    events = rt.broker.process_bar(meta, bar, row)
    apply_fill_events(rt, events)
    return events


def _end_of_day(rt: Runtime, meta: Any) -> None:
    """Expire working orders of the finished session, release orphan reservations and record
    the day's end-of-day figures."""
    apply_fill_events(rt, rt.broker.expire_session_orders(meta.date))
    release_orphans(rt, meta.date)
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
    """Rule signals and marks for the whole universe at one bar.

    The full result goes to Redis under ``scored:<date>:<bar>``; the returned message carries
    only that key (messages carry keys, not payloads).
    """
    started = time.time()
    result = compute_scores(rt, payload)
    key = rt.keys.k(f"scored:{result['date']}:{result['bar']}")
    rt.redis.set(key, json.dumps(result, separators=(",", ":")), ex=3600)
    # wall times (Unix s) of the tick, the start and the end of scoring: decide records them
    return {"date": result["date"], "bar": result["bar"], "scored_key": key,
            "signals": len(result["signals"]), "model": result.get("model"),
            "t": [payload.get("t0"), round(started, 6), round(time.time(), 6)]}


def compute_scores(rt: Runtime, payload: dict[str, Any], entries: bool = True) -> dict[str, Any]:
    """Signals, marks (this bar's close of every symbol that has a usable one) and the exits
    of held positions, as JSON data. ``entries=False`` (the backtester, on a bar where the
    decision can open nothing) leaves the rule strategies and the entry model out.

    With a current model, the entry model's probability becomes each signal's confidence and
    signals below ``ML_ENTRY_THRESHOLD`` are dropped, and the exit model scores the held
    positions. A model that is configured but unusable (corrupted, wrong features or
    version) stops new entries; exits and the end of day go on.
    """
    day = dt.date.fromisoformat(str(payload["date"]))
    bar = int(payload["bar"])
    meta, window = rt.window.get(day, bar)
    positions = rt.broker.positions_cached()
    predictor = rt.models.get() if rt.models is not None else None
    problem = rt.models.problem if rt.models is not None else None
    exit_fn = exit_model(predictor, meta.bar_seconds) if predictor is not None else None
    params = rt.scoring_params(meta.bar_seconds)
    if not entries:
        params = dataclasses.replace(params, strategies=())
    scored = score_bar(window, meta.symbols, meta.open_time, meta.bar_seconds, positions,
                       params, exit_model=exit_fn, tracker=rt.extremes)
    if scored.skipped:
        log_skips(day, scored.skipped, rt.skip_log_seen)
    signals = scored.signals
    if problem is not None:
        signals = []  # logged by the model holder when the state changed
        if rt.alerts is not None:
            rt.alerts.send("error", f"no new entries: {problem}",
                           once_key=f"model:{day}:{abs(hash(problem))}")
    elif predictor is not None and signals:
        signals = _model_scored(rt, predictor, window, meta, signals)
    return {"date": day.isoformat(), "bar": bar,
            "signals": [s.to_dict() for s in signals], "marks": scored.marks,
            "exits": {sym: list(v) for sym, v in scored.exits.items()},
            "model": predictor.version if predictor is not None else None}


def _model_scored(rt: Runtime, predictor: Any, window: Any, meta: Any,
                  signals: list[Signal]) -> list[Signal]:
    """Signals with the entry model's probability as confidence, those below the threshold
    dropped; none at all when the model fails on this bar."""
    source = rt.entry_features  # the backtester's features of the whole session, if any
    features = source(meta.date, window.shape[0] - 1) if source is not None else None
    try:
        probs = score_signals(predictor, window, meta.symbols, meta.bar_seconds, signals,
                              features=features)
    except Exception:
        log.exception("entry model failed on this bar: no entries",
                      extra={"model": predictor.version})
        return []
    threshold = rt.settings.ml_entry_threshold
    out = []
    for sig, p in zip(signals, probs, strict=True):
        p = float(p)
        if math.isfinite(p) and p >= threshold:
            out.append(dataclasses.replace(sig, confidence=min(round(p, 4), 0.9999)))
    return out


# --- decide ---------------------------------------------------------------------------------
def decide_bar(rt: Runtime, dispatcher: Dispatcher, scored: dict[str, Any]) -> dict[str, Any]:
    """Order intents for one scored bar; registers them so the bar settles when all are sent.

    ``scored`` is what ``score`` returned (the key of the stored result) or the result itself.
    """
    decide_at = time.time()
    timing = scored.get("t")
    if "scored_key" in scored:
        raw = rt.redis.get(str(scored["scored_key"]))
        if raw is None:
            log.error("scored result missing", extra={"key": scored["scored_key"]})
            return {"status": "missing_scores", "date": scored.get("date"),
                    "bar": scored.get("bar")}
        scored = json.loads(raw)
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
    marks = {k: float(v) for k, v in scored.get("marks", {}).items()}

    def reads() -> list[Any]:
        pipe = rt.redis.pipeline(transaction=False)
        pipe.smembers(rt.keys.entries(day))
        pipe.get(rt.keys.used_capital(day))
        pipe.exists(rt.keys.halt())
        pipe.exists(rt.keys.loss_halt(day))
        pipe.hkeys(rt.keys.k(f"stale_symbols:{day.isoformat()}"))  # written by the feed
        pipe.exists(rt.keys.reconciled(day))
        if timing and len(timing) == 3 and all(isinstance(x, int | float) for x in timing):
            t0, t1, t2 = (float(x) for x in timing)
            # the last tick's stage times (ms) for `daytrader status` and the metrics; rides
            # on this pipeline, so it costs no extra round trip
            pipe.hset(rt.keys.k("tick:last"), mapping={
                "date": day.isoformat(), "bar": bar, "tick_at": t0,
                "score_queue_ms": round((t1 - t0) * 1000, 3),
                "score_ms": round((t2 - t1) * 1000, 3),
                "decide_queue_ms": round((decide_at - t2) * 1000, 3),
                "signals": len(scored.get("signals", [])), "model": scored.get("model") or ""})
        return pipe.execute()

    replies = reads()
    if not replies[5]:
        reconcile(rt, day)  # new day, or Redis lost its data: rebuild before any entry
        replies = reads()
    positions, open_orders = rt.broker.snapshot()
    entered_raw, used_raw, halted, loss_halted, stale_raw = replies[:5]
    if stale_raw:  # stale market data blocks new entries for those symbols
        stale = {x.decode() for x in stale_raw}
        signals = [s for s in signals if s.symbol not in stale]
    halted = bool(halted) or bool(loss_halted) or loss_limit_hit(rt, day, positions, marks)
    inp = DecisionInput(
        session_date=day, bar=bar,
        decision_time=meta.bar_time(bar) + dt.timedelta(seconds=meta.bar_seconds),
        close_time=meta.close_time, signals=signals, marks=marks,
        positions=positions, open_order_symbols=frozenset(o.symbol for o in open_orders),
        entered_today=frozenset(x.decode() for x in entered_raw),
        used_cents=int(used_raw or 0), halted=halted,
        exit_attempts={sym: pos.exit_attempt for sym, pos in positions.items()},
        rule_exits={sym: (str(v[0]), str(v[1])) for sym, v in scored.get("exits", {}).items()},
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


def loss_limit_hit(rt: Runtime, day: dt.date, positions: dict[str, Any],
                    marks: dict[str, float]) -> bool:
    """True (and halts entries for the day) once realized + unrealized P/L <= -limit."""
    if not positions and rt.settings.daily_loss_limit_cents <= 0:
        return False
    pnl = rt.broker.realized_pnl_cents(day)
    for sym, pos in positions.items():
        mark = marks.get(sym)
        if mark is not None and math.isfinite(mark):
            pnl += int((float(mark) - float(pos.avg_price)) * pos.qty * 100)
    if pnl <= -rt.settings.daily_loss_limit_cents:
        if rt.redis.set(rt.keys.loss_halt(day), str(pnl), nx=True, ex=4 * 24 * 3600):
            log.warning("daily loss limit reached: no new entries today",
                        extra={"date": day.isoformat(), "pnl_cents": pnl})
            if rt.alerts is not None:
                rt.alerts.send("halt", f"{day} daily loss limit reached (P/L "
                                       f"${pnl / 100:,.2f}): no new entries today")
        return True
    return False

