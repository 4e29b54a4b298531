"""The tick hands a bar to scoring before it applies the bar's fills; scoring waits for them
before it reads positions. Also: how many Redis round trips each step of the tick path makes
(the hot path's budget), counted on a real server."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from core import decide_step, engine, execution
from core.brokers.base import OrderRequest
from core.errors import FillsPending
from core.runtime import build_runtime
from tests.helpers import prepared_runtime


class Recording:
    """A dispatcher that records what would be enqueued (and, with ``concurrent``, lets the
    tick hand on a bar before its fills)."""

    def __init__(self, concurrent: bool, log: list[str] | None = None) -> None:
        self.concurrent = concurrent
        self.log = log if log is not None else []
        self.scored: list[dict[str, Any]] = []
        self.orders: list[tuple[str, dict[str, Any]]] = []

    def score(self, payload: dict[str, Any]) -> None:
        self.log.append("score")
        self.scored.append(payload)

    def submit_order(self, intent: dict[str, Any]) -> None:
        self.orders.append(("submit", intent))

    def close_position(self, intent: dict[str, Any]) -> None:
        self.orders.append(("close", intent))


@pytest.fixture
def rt(redis_client, redis_url):
    return prepared_runtime(redis_url, "early", bars=20)


def _with_order(rt) -> None:
    """An order due at the next bar, so the next tick has a fill to apply."""
    meta, bar = rt.replay.now()
    assert rt.broker.submit_order(OrderRequest("early-1", meta.symbols[0], "buy",
                                               3)).status == "accepted"
    rt.replay.settle(meta.date, bar)


def _spy_fills(rt, log: list[str]) -> None:
    inner = rt.broker.process_bar

    def process_bar(*a: Any, **kw: Any) -> Any:
        log.append("fills")
        return inner(*a, **kw)

    rt.broker.process_bar = process_bar  # type: ignore[method-assign]


@pytest.mark.parametrize("concurrent", [True, False])
def test_the_tick_hands_on_first_only_to_a_concurrent_dispatcher(rt, concurrent) -> None:
    _with_order(rt)
    log: list[str] = []
    _spy_fills(rt, log)
    d = Recording(concurrent, log)
    out = engine.tick(rt, d)
    assert out["status"] == "advanced" and out["fills"] == 1
    assert log == (["score", "fills"] if concurrent else ["fills", "score"])
    assert bool(d.scored[0].get("await_fills")) is concurrent
    meta = rt.replay.days()[0]
    assert int(rt.redis.get(rt.keys.fills_done(meta.date))) == out["bar"]


def test_scoring_waits_for_the_fills_of_its_bar(rt) -> None:
    _with_order(rt)
    symbol = rt.replay.days()[0].symbols[0]
    gate = threading.Event()
    inner = rt.broker.process_bar

    def slow_fills(*a: Any, **kw: Any) -> Any:
        gate.wait(5)  # the tick's fills land only after scoring has started
        return inner(*a, **kw)

    rt.broker.process_bar = slow_fills  # type: ignore[method-assign]
    d = Recording(True)
    ticking = threading.Thread(target=engine.tick, args=(rt, d))
    ticking.start()
    while not d.scored:
        time.sleep(0.001)
    payload = d.scored[0]
    scorer = build_runtime(rt.settings)  # the scoring worker's own view
    got: dict[str, Any] = {}

    def score() -> None:
        got["result"] = engine.compute_scores(scorer, payload)
        got["positions"] = scorer.broker.positions_cached()

    scoring = threading.Thread(target=score)
    scoring.start()
    time.sleep(0.2)
    assert scoring.is_alive() and "result" not in got  # waiting for the fills
    gate.set()
    ticking.join(5)
    scoring.join(5)
    assert got["positions"][symbol].qty == 3  # the bar's fill is in what scoring saw
    assert got["result"]["bar"] == payload["bar"]


def test_scoring_waits_for_the_pushed_mark_instead_of_polling(rt) -> None:
    """With the listener passing on the fills marks, scoring asks Redis for positions once
    the tick's mark arrives (and every ``_MARK_WAIT_S`` meanwhile), not every few ms."""
    from core.market.bar_store import BarListener

    _with_order(rt)
    symbol = rt.replay.days()[0].symbols[0]
    gate = threading.Event()
    inner = rt.broker.process_bar

    def slow_fills(*a: Any, **kw: Any) -> Any:
        gate.wait(5)
        return inner(*a, **kw)

    rt.broker.process_bar = slow_fills  # type: ignore[method-assign]
    scorer = build_runtime(rt.settings)
    listener = BarListener(scorer.redis, scorer.keys, scorer.window,
                           fills=scorer.fills_mark).start()
    try:
        assert listener.subscribed.wait(5)
        deadline = time.monotonic() + 5
        while not scorer.fills_mark.live and time.monotonic() < deadline:
            time.sleep(0.002)
        d = Recording(True)
        ticking = threading.Thread(target=engine.tick, args=(rt, d))
        ticking.start()
        while not d.scored:
            time.sleep(0.001)
        counter = Counter(scorer.redis)
        got: dict[str, Any] = {}

        def score() -> None:
            got["result"] = engine.compute_scores(scorer, d.scored[0])
            got["at"] = time.monotonic()

        scoring = threading.Thread(target=score)
        scoring.start()
        time.sleep(0.5)
        assert scoring.is_alive()
        asked_while_waiting = counter.n
        released = time.monotonic()
        gate.set()
        ticking.join(5)
        scoring.join(5)
        # a read per 50 ms wait (and the bar's own reads), where polling made ~100
        assert asked_while_waiting <= 0.5 / engine._MARK_WAIT_S + 4
        assert got["at"] - released < engine._MARK_WAIT_S  # woken by the push
        assert scorer.broker.positions_cached()[symbol].qty == 3
    finally:
        listener.stop()
    assert not scorer.fills_mark.live  # without a listener, scoring polls again


def test_a_pushed_bar_is_scored_ahead_and_the_task_finds_it_done(rt) -> None:
    """The scoring process's listener computes the bar's facts when the tick publishes the
    bar; the score task then computes none itself, and scores as a process without a
    listener does."""
    from core.market.bar_store import BarListener

    scorer = build_runtime(rt.settings)  # the gpu worker's runtime, with its listener
    plain = build_runtime(rt.settings)  # one that computes everything in the task
    listener = BarListener(scorer.redis, scorer.keys, scorer.window,
                           on_bar=lambda day, bar: engine.prepare_bar(scorer, day, bar))
    listener.start()
    try:
        assert listener.subscribed.wait(5)
        meta, bar = rt.replay.now()
        scorer.window.get(meta.date, bar)  # the window holds the session (as after a tick)
        for i in range(3):
            rt.replay.settle(meta.date, bar)
            d = Recording(True)
            assert engine.tick(rt, d)["status"] == "advanced"
            payload = d.scored[0]
            deadline = time.monotonic() + 5
            while scorer.facts.computed < 1 + i and time.monotonic() < deadline:
                time.sleep(0.002)
            before = scorer.facts.computed
            got = engine.compute_scores(scorer, payload)
            assert scorer.facts.computed == before == 1 + i  # nothing left for the task
            want = engine.compute_scores(plain, payload)
            assert got["signals"] == want["signals"] and got["exits"] == want["exits"]
            assert np.array_equal(got["marks"], want["marks"], equal_nan=True)
            bar = payload["bar"]
    finally:
        listener.stop()
    # a bar the listener did not see is computed by the task itself
    rt.replay.settle(meta.date, bar)
    d = Recording(True)
    engine.tick(rt, d)
    before = scorer.facts.computed
    engine.compute_scores(scorer, d.scored[0])
    assert scorer.facts.computed == before + 1


def test_a_listening_scorer_asks_redis_nothing_and_scores_the_same(rt) -> None:
    """With the bars, the fills marks and the broker's positions pushed to the scoring
    process, a score task makes no round trip of its own, and scores what a process that
    reads everything scores, while positions open and close."""
    from core.market.bar_store import BarListener

    scorer = build_runtime(rt.settings)
    plain = build_runtime(rt.settings)
    listener = BarListener(scorer.redis, scorer.keys, scorer.window,
                           on_bar=lambda day, bar: engine.prepare_bar(scorer, day, bar),
                           fills=scorer.fills_mark,
                           on_positions=scorer.broker.apply_pushed).start()
    main = threading.get_ident()
    counter = Counter(scorer.redis, only_thread=main)
    try:
        assert listener.subscribed.wait(5)
        meta, bar = rt.replay.now()
        symbols = meta.symbols
        scorer.window.get(meta.date, bar)
        scorer.broker.positions_cached()  # the copy the pushes continue
        rounds, held = [], []
        for i in range(8):
            if i % 2 == 0:  # an entry, then its exit two bars later
                sym = symbols[(i // 2) % len(symbols)]
                req = (OrderRequest(f"e{i}", sym, "buy", 2) if i % 4 == 0 else
                       OrderRequest(f"x{i}", symbols[((i - 2) // 2) % len(symbols)],
                                    "sell", 2, intent="exit", close=True))
                assert rt.broker.submit_order(req).status == "accepted", req
            rt.replay.settle(meta.date, bar)
            d = Recording(True)
            assert engine.tick(rt, d)["status"] == "advanced"
            payload = d.scored[0]
            bar = payload["bar"]
            deadline = time.monotonic() + 5
            while not scorer.fills_mark.seen(meta.date, bar) and time.monotonic() < deadline:
                time.sleep(0.002)
            n0 = counter.n
            got = engine.compute_scores(scorer, payload)
            rounds.append(counter.n - n0)
            want = engine.compute_scores(plain, payload)
            assert got["signals"] == want["signals"] and got["exits"] == want["exits"]
            assert np.array_equal(got["marks"], want["marks"], equal_nan=True)
            assert scorer.broker.pushed_positions() == rt.broker.get_positions()
            held.append(len(rt.broker.get_positions()))
        assert rounds[1:] == [0] * (len(rounds) - 1), rounds
        assert held == [1, 1, 0, 0, 1, 1, 0, 0], held  # opened and closed along the way
    finally:
        listener.stop()


def test_scoring_gives_up_when_the_fills_never_come(rt) -> None:
    meta, bar = rt.replay.now()
    rt.redis.delete(rt.keys.fills_done(meta.date))
    started = time.monotonic()
    with pytest.raises(FillsPending):
        engine.positions_after_fills(rt, meta.date, bar + 1, timeout_s=0.3)
    assert 0.25 < time.monotonic() - started < 2.0
    rt.redis.set(rt.keys.fills_done(meta.date), bar + 1)
    assert engine.positions_after_fills(rt, meta.date, bar + 1, timeout_s=0.3) == ({}, set())


class Counter:
    """Counts round trips of a redis-py client: each command sent alone, and each
    pipeline or transaction once (with ``only_thread``, those of that thread alone)."""

    def __init__(self, client: Any, only_thread: int | None = None) -> None:
        self.n = 0
        orig_exec, orig_pipe = client.execute_command, client.pipeline

        def count(k: int = 1) -> None:
            if only_thread is None or threading.get_ident() == only_thread:
                self.n += k

        def execute_command(*a: Any, **kw: Any) -> Any:
            count()
            return orig_exec(*a, **kw)

        def pipeline(*a: Any, **kw: Any) -> Any:
            pipe = orig_pipe(*a, **kw)
            inner = pipe.execute

            def execute(*ea: Any, **ekw: Any) -> Any:
                count(1 if len(pipe) else 0)
                return inner(*ea, **ekw)

            pipe.execute = execute
            immediate = pipe.immediate_execute_command

            def immediate_execute_command(*ia: Any, **ikw: Any) -> Any:
                count()  # sent at once, e.g. the SCRIPT EXISTS before a script runs
                return immediate(*ia, **ikw)

            pipe.immediate_execute_command = immediate_execute_command
            return pipe

        client.execute_command = execute_command
        client.pipeline = pipeline


def test_round_trips_of_the_tick_path_stay_within_budget(redis_client, redis_url) -> None:
    """The hot path's budget: the tick 1 to hand a bar on (2 more for its fills), scoring
    2, the decision 1 before its first order (2 with working orders), a close 1 and an
    entry 4 before the broker accepts. A change that adds a round trip on the hot path
    shows up here."""
    rt = prepared_runtime(redis_url, "budget", bars=15, sim_synthetic_symbols=30,
                          risk_pct_per_trade=0.0005)
    d = Recording(True)
    counter = Counter(rt.redis)
    seen_entry = seen_close = False
    for i in range(120):
        warm = i >= 2  # the first bars read what each process keeps (metadata, positions)
        d.scored.clear()
        d.orders.clear()
        n0 = counter.n
        out = engine.tick(rt, d)
        if out["status"] != "advanced":
            break
        # hand-on, then the fills off the hot path (the broker's lock with the working
        # orders; the writes, reservations and fills-done mark in one transaction). The
        # counter also counts what redis-py sends at once (a SCRIPT EXISTS before a script
        # queued the usual way would show up here)
        assert counter.n - n0 <= 1 + 2 or not warm, out
        payload = d.scored[0]
        n0 = counter.n
        result = engine.score(rt, payload)
        # the new bar, positions once the fills are in (a small result rides in the message)
        assert counter.n - n0 <= 2 or not warm
        n0 = counter.n
        first_at = _round_trips_to_first_order(rt, d, counter, result)
        # the reads in one transaction (and the working orders, if any), then the first
        # order; the bar's ledger afterwards
        assert counter.n - n0 <= 3 or not warm
        assert not first_at or first_at[0] <= 2 or not warm
        for kind, intent in d.orders:
            accepted = _round_trips_to_accept(rt, counter, kind, intent)
            if accepted and warm:
                if kind == "close":
                    seen_close = True
                    assert accepted[0] <= 1, intent  # lock, lookup and the position at once
                else:
                    seen_entry = True
                    # lock + lookup + refusals + the broker's account, its quote, the
                    # reservation, the account at submission (the check not run twice)
                    assert accepted[0] <= 4, intent
    assert seen_entry and seen_close


def _round_trips_to_accept(rt: Any, counter: Counter, kind: str,
                           intent: dict[str, Any]) -> list[int]:
    """Send one order; the round trips made before the broker accepted it (empty when it
    never got there: refused or already known)."""
    n0 = counter.n
    accepted: list[int] = []
    inner = rt.broker._submit_with

    def spy(*a: Any, **kw: Any) -> Any:
        accepted.append(counter.n - n0)
        return inner(*a, **kw)

    rt.broker._submit_with = spy
    try:
        fn = execution.close_position if kind == "close" else execution.submit_order
        fn(rt, intent)
    finally:
        rt.broker._submit_with = inner
    return accepted


def test_the_day_rolls_over_only_once_its_figures_are_recorded(redis_client,
                                                                redis_url) -> None:
    """Two ticks at the day's last bar: the one recording the day's figures holds the day;
    the other waits ('closing') instead of rolling over (a run would end with the figures
    missing)."""
    rt = prepared_runtime(redis_url, "eod", bars=0)
    other = build_runtime(rt.settings)
    d = Recording(False)
    meta = rt.replay.days()[0]
    for _ in range(meta.n_bars):
        out = engine.tick(rt, d)
        assert out["status"] == "advanced", out
        rt.replay.settle(meta.date, out["bar"])
    gate, entered = threading.Event(), threading.Event()
    inner = rt.broker.expire_session_orders

    def slow_expire(*a: Any, **kw: Any) -> Any:
        entered.set()
        gate.wait(5)
        return inner(*a, **kw)

    rt.broker.expire_session_orders = slow_expire  # type: ignore[method-assign]
    first: dict[str, Any] = {}
    recording = threading.Thread(target=lambda: first.update(engine.tick(rt, d)))
    recording.start()
    assert entered.wait(5)
    assert engine.tick(other, d)["status"] == "closing"  # not rolled over meanwhile
    assert not rt.replay.state().finished and rt.replay.day_stats() == []
    gate.set()
    recording.join(5)
    assert first["status"] == "finished"
    assert len(rt.replay.day_stats()) == 1
    assert engine.tick(other, d)["status"] == "finished"
    assert len(rt.replay.day_stats()) == 1  # recorded once


def _round_trips_to_first_order(rt: Any, d: Recording, counter: Counter,
                                result: dict[str, Any]) -> list[int]:
    """Decide one scored bar; the round trips made before each order was handed on."""
    n0 = counter.n
    at: list[int] = []
    inner_close, inner_submit = d.close_position, d.submit_order
    d.close_position = lambda i: (at.append(counter.n - n0), inner_close(i))  # type: ignore
    d.submit_order = lambda i: (at.append(counter.n - n0), inner_submit(i))  # type: ignore
    try:
        decide_step.decide_bar(rt, d, result)
    finally:
        d.close_position, d.submit_order = inner_close, inner_submit  # type: ignore
    return at
