"""The cluster's steps as plain functions over a ``Runtime``: tick, score and the end of the
day (the decision step is ``core.decide_step``; orders and exits ``core.execution``). Tasks
call exactly one of these.

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

import numpy as np

from core.brokers.base import FillEvent
from core.calendar import exchange_date
from core.errors import FillsPending
from core.execution import apply_fill_events, queue_fill_events, release_orphans
from core.runtime import Runtime
from core.scoring import BarFacts, bar_facts, log_skips, score_bar, symbol_index
from core.signals import Signal
from ml.predictor import exit_model, score_signals

log = logging.getLogger(__name__)
_AWAIT_FILLS_S = 10.0  # longest wait of early scoring for its bar's fills (seconds)
_MARK_WAIT_S = 0.05  # longest wait for a pushed fills mark before Redis is asked (seconds)
_EOD_LEASE_S = 60  # a tick recording the end of a day holds it this long at most (seconds)
INLINE_MAX_BYTES = 8192  # a scored bar's JSON up to this size rides in decide's message


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
    adv = replay.advance_next(now_wall)
    if adv is not None and adv.day is not None:  # the common case, in one round trip
        if adv.status != "advanced" or adv.row is None:
            return {"status": adv.status, "date": adv.day.date.isoformat(), "bar": adv.bar}
        return _advanced(rt, dispatcher, adv.day, adv, now_wall)
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
        # two ticks can get here at once: one records the day, and the day rolls over only
        # once it is recorded (a tick that died recording it is replaced after its lease)
        if not _record_day_once(rt, meta):
            return {"status": "closing", "date": meta.date.isoformat()}
        status = replay.roll_day(st, now_wall)
        return {"status": status, "date": meta.date.isoformat()}
    adv = replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), now_wall)
    if adv.status != "advanced" or adv.row is None:
        return {"status": adv.status, "date": meta.date.isoformat(), "bar": st.bar + 1}
    return _advanced(rt, dispatcher, meta, adv, now_wall)


def _advanced(rt: Runtime, dispatcher: Dispatcher, meta: Any, adv: Any,
              now_wall: float) -> dict[str, Any]:
    """Bar ``adv.bar`` is published: fill what is due and hand the bar to scoring."""
    if adv.bar == 0:
        rt.broker.open_account()
    payload = {"date": meta.date.isoformat(), "bar": adv.bar, "t0": now_wall}
    if getattr(dispatcher, "concurrent", False):
        # Scoring starts at once: its rules need only the bars. It waits for this bar's
        # fills (marked below) before it reads positions, and decide runs after it, so
        # both see the same positions and reservations as if the fills came first.
        dispatcher.score({**payload, "await_fills": True})
        fills = _process_fills(rt, meta, adv.bar, adv.row)
    else:
        fills = _process_fills(rt, meta, adv.bar, adv.row)
        dispatcher.score(payload)
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
    if bar == meta.n_bars - 1:
        _record_day_once(rt, meta)
    dispatcher.score({"date": day.isoformat(), "bar": bar, "t0": now_wall})
    return {"status": "advanced", "date": day.isoformat(), "bar": bar}


def _process_fills(rt: Runtime, meta: Any, bar: int, row: Any) -> list[FillEvent]:
    """Fill what is due at bar ``bar``, make the reservations follow, then mark the bar's
    fills done (scoring that started early waits for the mark)."""
    def mark(pipe: Any) -> None:
        pipe.set(rt.keys.fills_done(meta.date), bar, ex=4 * 24 * 3600)
        # told to whoever waits for it (the scoring process's listener), in the same
        # transaction: no poll of the mark
        pipe.publish(rt.keys.fills_channel(), f"{meta.date.isoformat()}:{bar}")

    if getattr(rt.broker, "fills_in_one_transaction", False):
        # the reservations and the mark ride on the broker's own fills transaction
        return rt.broker.process_bar(meta, bar, row, also=lambda events, pipe: (
            queue_fill_events(rt, events, pipe, mark)))
    events = rt.broker.process_bar(meta, bar, row)
    apply_fill_events(rt, events, then=mark)
    return events


def positions_after_fills(rt: Runtime, day: dt.date, bar: int,
                          timeout_s: float | None = None,
                          entries: list[str] | None = None
                          ) -> tuple[dict[str, Any], set[str]]:
    """The open positions once the tick marked bar ``bar``'s fills done (with
    ``timeout_s``; without it at once), and which of ``entries`` ("SYMBOL:side") were
    taken today: read in one transaction with the mark, so they match. FillsPending after
    ``timeout_s`` (the tick failed: its watchdog dispatches the bar again).

    With the process's listener subscribed (``rt.fills_mark.live``), it waits for the
    pushed mark before each read instead of polling (each wait capped at
    ``_MARK_WAIT_S``, so a push it missed costs that much at most); else it polls. With
    no ``entries`` to look up and the broker's copy of the positions pushed up to the mark
    (``pushed_positions``; the push precedes the mark in the same transaction), it asks
    Redis nothing."""
    queue = getattr(rt.broker, "queue_positions", None)
    pushed_positions = getattr(rt.broker, "pushed_positions", None)
    key = rt.keys.fills_done(day)
    deadline = time.monotonic() + (timeout_s or 0.0)
    delay = 0.0002
    signal = rt.fills_mark
    while True:
        pushed = False  # the listener saw this bar's mark (or waited in vain: False)
        if signal.live:
            pushed = signal.seen(day, bar) or (timeout_s is not None and signal.wait(
                day, bar, max(0.0, min(_MARK_WAIT_S, deadline - time.monotonic()))))
            if pushed and not entries and pushed_positions is not None:
                positions = pushed_positions()
                if positions is not None:
                    return positions, set()
        pipe = rt.redis.pipeline(transaction=True)
        pipe.get(key)
        if entries:
            pipe.smismember(rt.keys.entries(day), entries)
        n, finish = queue(pipe) if queue is not None else (0, None)
        done, *replies = pipe.execute()
        taken = ({k for k, hit in zip(entries, replies.pop(0), strict=True) if hit}
                 if entries else set())
        ready = timeout_s is None or (done is not None and int(done) >= bar)
        if finish is not None:
            positions = finish(replies[:n])
            if ready:
                return positions, taken
        elif ready:  # a broker of its own (Alpaca): asked once the mark is there
            return rt.broker.positions_cached(), taken
        if time.monotonic() > deadline:
            raise FillsPending(f"fills of bar {bar} of {day} not applied within "
                               f"{timeout_s:g} s")
        if pushed or not signal.live:  # no listener (or it disagrees with Redis): poll
            time.sleep(delay)
            delay = min(delay * 2, 0.005)


def _record_day_once(rt: Runtime, meta: Any) -> bool:
    """Run ``_end_of_day`` for ``meta``'s session once: True when the day is recorded (by
    this call or an earlier one), False while another process is recording it. The
    recorder holds a lease of ``_EOD_LEASE_S``; the figures and the "done" mark are written
    in one transaction."""
    guard = rt.keys.k(f"eod_stats:{meta.date.isoformat()}")
    if rt.redis.get(guard) == b"done":
        return True
    if not rt.redis.set(guard, "running", nx=True, ex=_EOD_LEASE_S):
        return rt.redis.get(guard) == b"done"
    _end_of_day(rt, meta, done_key=guard)
    return True


def _end_of_day(rt: Runtime, meta: Any, done_key: str | None = None) -> None:
    """Expire working orders of the finished session, release orphan reservations and record
    the day's end-of-day figures (with ``done_key`` set to "done" in the same transaction)."""
    apply_fill_events(rt, rt.broker.expire_session_orders(meta.date))
    release_orphans(rt, meta.date)
    positions = rt.broker.get_positions()
    if positions:
        log.error("positions open at the close", extra={
            "date": meta.date.isoformat(), "symbols": ",".join(sorted(positions))})
    compact = getattr(rt.broker, "compact_positions_log", None)
    if compact is not None:
        compact()
    rt.replay.record_day_stats({
        "date": meta.date.isoformat(),
        "open_positions_at_close": len(positions),
        "max_used_capital_cents": rt.limits.peak(meta.date),
        "used_capital_cents": rt.limits.used(meta.date),
        "daily_limit_cents": rt.settings.daily_limit_cents,
        "close_time": meta.close_time.isoformat(),
    }, done_key=done_key)


# --- score (gpu queue) ----------------------------------------------------------------------
def score(rt: Runtime, payload: dict[str, Any]) -> dict[str, Any]:
    """Rule signals and exits for the whole universe at one bar, handed to ``decide``.

    A small result (``INLINE_MAX_BYTES`` of JSON at most: the usual case) rides in the
    message; a larger one goes to Redis under ``scored:<date>:<bar>`` and the message
    carries that key (messages stay small). The marks are not sent: decide reads them from
    the bar itself (``core.scoring.mark_values``).
    """
    started = time.time()
    result = compute_scores(rt, payload)
    result.pop("marks")
    out: dict[str, Any] = {"date": result["date"], "bar": result["bar"],
                           "signals": len(result["signals"]), "model": result.get("model")}
    body = {"signals": result["signals"], "exits": result["exits"]}
    blob = json.dumps(body, separators=(",", ":"))
    if len(blob) <= INLINE_MAX_BYTES:
        out["scored"] = body
    else:
        key = rt.keys.k(f"scored:{result['date']}:{result['bar']}")
        rt.redis.set(key, blob, ex=3600)
        out["scored_key"] = key
    # wall times (Unix s) of the tick, the start and the end of scoring: decide records them
    out["t"] = [payload.get("t0"), round(started, 6), round(time.time(), 6)]
    return out


def compute_scores(rt: Runtime, payload: dict[str, Any], entries: bool = True) -> dict[str, Any]:
    """Signals, marks and the exits of held positions at one bar, as compact JSON data.

    ``signals``: ``[symbol, side, source, confidence, price]`` rows, all at the start of bar
    ``bar``; ``marks``: this bar's close per symbol of the session, in the session's symbol
    order (None where the symbol has no usable close); ``exits``: symbol -> [reason, entry
    order id]. ``entries=False`` (the backtester, on a bar where the decision can open
    nothing) leaves the rule strategies and the entry model out.

    With a current model, the entry model's probability becomes each signal's confidence and
    signals below ``ML_ENTRY_THRESHOLD`` are dropped, and the exit model scores the held
    positions. A model that is configured but unusable (corrupted, wrong features or
    version) stops new entries; exits and the end of day go on.
    """
    day = dt.date.fromisoformat(str(payload["date"]))
    bar = int(payload["bar"])
    predictor = rt.models.get() if rt.models is not None else None
    problem = rt.models.problem if rt.models is not None else None
    # the bars-only part: usually done already, when the bar was pushed to this process
    meta, window, prep = facts_at(rt, day, bar, entries)
    facts = prep.facts
    exit_fn = exit_model(predictor, meta.bar_seconds) if predictor is not None else None
    params = rt.scoring_params(meta.bar_seconds)
    if not entries:
        params = dataclasses.replace(params, strategies=())
    wait = (min(rt.settings.sim_settle_timeout_s, _AWAIT_FILLS_S)
            if payload.get("await_fills") else None)
    # today's entries among those the rules would repeat: looked up by the listener with
    # the facts (entries only grow, and none come between a bar's tick and its decision),
    # else in the transaction that reads the positions
    ahead = prep.taken
    positions, taken = positions_after_fills(rt, day, bar, wait,
                                             prep.keys if ahead is None else None)
    taken = taken if ahead is None else ahead
    held = rt.held.sync_from(rt.broker, positions, meta.symbols, meta.open_time,
                             meta.bar_seconds, day.isoformat())
    scored = score_bar(window, meta.symbols, meta.open_time, meta.bar_seconds, positions,
                       params, exit_model=exit_fn, tracker=rt.extremes, sums=rt.sums,
                       skip_held=True, facts=facts, held=held,
                       skip_taken=_taken_masks(meta.symbols, taken) if taken else None)
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
    marks = scored.mark_array
    return {"date": day.isoformat(), "bar": bar,
            "signals": [[s.symbol, s.side, s.source, s.confidence, s.price] for s in signals],
            "marks": marks,
            "exits": {sym: list(v) for sym, v in scored.exits.items()},
            "model": predictor.version if predictor is not None else None}


def facts_at(rt: Runtime, day: dt.date, bar: int, entries: bool = True
             ) -> tuple[Any, np.ndarray, Prepared]:
    """Session meta, window (bars ``0..bar``) and the ``Prepared`` work of bar ``bar`` of
    ``day``, computed once per bar and process (``rt.facts``) by the first thread that
    asks."""
    meta, window = rt.window.get(day, bar)
    params = rt.scoring_params(meta.bar_seconds)
    if not entries:
        params = dataclasses.replace(params, strategies=())

    def compute() -> Prepared:
        facts = bar_facts(window, meta.symbols, params, sums=rt.sums)
        return Prepared(facts, _entry_keys(meta.symbols, facts.masks))

    prep = rt.facts.get((day, bar, rt.window.generation, params.strategies), compute)
    return meta, window, prep


@dataclasses.dataclass
class Prepared:
    """A bar's scoring work that needs no position: its ``BarFacts``, the entry keys
    ("SYMBOL:side") its rules would repeat if taken today (the decision drops those), and
    which of them were taken (None: not looked up yet)."""

    facts: BarFacts
    keys: list[str]
    taken: set[str] | None = None


def prepare_bar(rt: Runtime, day: dt.date, bar: int) -> None:
    """Do bar ``bar``'s scoring work ahead of its score task (the bar listener calls this
    when the bar is pushed): the facts, and today's entries among their keys. The task
    then finds them done. Never raises; the task does what is missing."""
    try:
        _, _, prep = facts_at(rt, day, bar)
        if prep.taken is None:
            keys = prep.keys
            hits = rt.redis.smismember(rt.keys.entries(day), keys) if keys else []
            prep.taken = {k for k, hit in zip(keys, hits, strict=True) if hit}
    except Exception:  # the score task reports its own errors
        log.debug("bar not prepared", extra={"date": day.isoformat(), "bar": bar},
                  exc_info=True)


def _entry_keys(symbols: tuple[str, ...], masks: list[Any]) -> list[str]:
    """"SYMBOL:side" of every symbol some rule fires on at this bar."""
    if not masks:
        return []
    longs = np.logical_or.reduce([np.asarray(m.long_mask) for m in masks])
    shorts = np.logical_or.reduce([np.asarray(m.short_mask) for m in masks])
    return ([f"{symbols[i]}:buy" for i in np.flatnonzero(longs).tolist()]
            + [f"{symbols[i]}:sell" for i in np.flatnonzero(shorts).tolist()])


def _taken_masks(symbols: tuple[str, ...], taken: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per symbol: entered long today, entered short today (from "SYMBOL:side" keys)."""
    index = symbol_index(symbols)
    longs, shorts = np.zeros(len(symbols), dtype=bool), np.zeros(len(symbols), dtype=bool)
    for key in taken:
        sym, _, side = key.rpartition(":")
        (longs if side == "buy" else shorts)[index[sym]] = True
    return longs, shorts


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
