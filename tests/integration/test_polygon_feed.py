"""The Polygon feed with the REAL polygon-api-client against local REST and WebSocket fakes.

REST backfill into the Redis bar store (exact OHLCV at the right bar, pagination, missing
minutes NaN only once over, bars outside the session dropped, DST and early closes, 429/5xx,
timeouts); the stream (minutes appended in order, grace for symbols that did not report, a
dropped socket reconnected and its gap backfilled, a silent socket detected, stale symbols
recorded); the one-feed lock. Pure parts (frame parsing, minute assembly) are tested too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time

import numpy as np
import pytest

from core.keys import Keys
from core.market.bar_store import RedisBarStore
from core.market.feed import (
    FeedAlreadyRunning,
    FeedConfig,
    FeedLock,
    MarketDataUnavailable,
    MinuteAgg,
    MinuteAssembler,
    SessionFeed,
    StreamAuthError,
    backfill_store,
    ensure_session,
    feed_lock_key,
    session_meta,
    stale_mask,
    stale_symbols_key,
    to_ms,
)
from core.market.polygon_feed import (
    PolygonHistory,
    PolygonStreamSession,
    parse_frame,
    split_ws_url,
)
from tests.fakes.polygon_server import (
    NY,
    PolygonRestServer,
    PolygonStreamServer,
    am_event,
    rest_bar,
)
from tests.helpers import wait_for

KEY = "test-key"
DAY = dt.date(2024, 6, 3)  # a Monday, EDT
OPEN = dt.datetime(2024, 6, 3, 9, 30, tzinfo=NY)


def at(day: dt.date, hh: int, mm: int, ss: float = 0.0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hh, mm), tzinfo=NY) + dt.timedelta(seconds=ss)


def bar_values(sym_i: int, bar: int) -> tuple[float, float, float, float, float]:
    """Distinct, exactly representable OHLCV for (symbol, bar)."""
    base = 100.0 + 10 * sym_i + bar * 0.25
    return (base, base + 0.5, base - 0.25, base + 0.125, float(1000 + 7 * bar + sym_i))


def rest_bars(sym_i: int, day_open: dt.datetime, bars: range) -> list[dict]:
    return [rest_bar(day_open + dt.timedelta(minutes=b), *bar_values(sym_i, b)) for b in bars]


def am(sym: str, sym_i: int, bar: int) -> dict:
    return am_event(sym, OPEN + dt.timedelta(minutes=bar), *bar_values(sym_i, bar))


class FakeClock:
    """A settable New York clock for the feed."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, now: dt.datetime) -> None:
        self.now = now


class FeedRunner:
    """Runs a SessionFeed's asyncio loop in a thread."""

    def __init__(self, feed: SessionFeed) -> None:
        self.feed = feed
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.feed.run())
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> FeedRunner:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.feed.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "feed did not stop"


@pytest.fixture
def rest():
    with PolygonRestServer(KEY) as server:
        yield server


@pytest.fixture
def ws():
    with PolygonStreamServer(KEY) as server:
        yield server


@pytest.fixture
def store(redis_client) -> RedisBarStore:
    return RedisBarStore(redis_client, Keys())


def stored(store: RedisBarStore, day: dt.date = DAY) -> np.ndarray:
    return store.read(day, 0)


FAST = FeedConfig(grace_s=2.0, silent_s=30.0, stale_minutes=3, rest_delay_s=0.0,
                  give_up_s=60.0, reconnect_min_s=0.1, reconnect_max_s=0.5, rest_retry_s=0.2,
                  rest_retry_max_s=0.5, poll_s=0.05)


def make_feed(redis_client, store, rest, ws, symbols, clock, config=FAST, key=KEY,
              history=None):
    meta = ensure_session(store, DAY, symbols)
    history = history or PolygonHistory(KEY, rest.url, timeout_s=5, workers=2)
    return SessionFeed(redis_client, Keys(), store, meta, history,
                       lambda: PolygonStreamSession(key, symbols, ws.url, 0.1, 0.5),
                       config, clock)


def two_symbols(rest, n_bars: int = 30) -> tuple[tuple[str, str], FakeClock]:
    """AAPL and MSFT with REST bars 0..n_bars-1 of DAY, and a clock at 10:00:30."""
    symbols = ("AAPL", "MSFT")
    for i, s in enumerate(symbols):
        rest.add_bars(s, rest_bars(i, OPEN, range(n_bars)))
    return symbols, FakeClock(at(DAY, 10, 0, 30))


# --- pure parts --------------------------------------------------------------------------


def test_parse_frame_reads_documented_am_events_and_statuses() -> None:
    frame = json.dumps([
        {"ev": "status", "status": "success", "message": "subscribed to: AM.AAPL"},
        am_event("AAPL", OPEN, 190.1, 190.5, 189.9, 190.2, 12345),
        {"ev": "AM", "sym": "MSFT", "o": "x", "h": 1, "l": 1, "c": 1, "v": 1, "s": 0},
        {"ev": "T", "sym": "AAPL", "p": 190.0},
    ])
    aggs, statuses, bad = parse_frame(frame)
    assert aggs == [MinuteAgg("AAPL", to_ms(OPEN), 190.1, 190.5, 189.9, 190.2, 12345.0)]
    assert statuses[0]["message"] == "subscribed to: AM.AAPL"
    assert bad == 1
    assert parse_frame("not json") == ([], [], 1)
    assert split_ws_url("wss://socket.polygon.io") == ("socket.polygon.io", True)
    assert split_ws_url("ws://127.0.0.1:8765/") == ("127.0.0.1:8765", False)


def test_assembler_completes_bars_in_order_with_grace_rest_and_give_up() -> None:
    asm = MinuteAssembler(("A", "B"), OPEN, 390)
    ms0 = to_ms(OPEN)
    asm.stream_subscribed(ms0 + 30_000)  # covered from bar 0
    asm.add(MinuteAgg("A", ms0 + 60_000, 1, 1, 1, 1, 1))  # bar 1 before bar 0
    assert asm.pop_ready(ms0 + 61_000, 2_000) == []
    asm.add(MinuteAgg("A", ms0, 1, 2, 0.5, 1.5, 10))
    asm.add(MinuteAgg("B", ms0, 3, 4, 2.5, 3.5, 20))
    out = asm.pop_ready(ms0 + 61_000, 2_000)
    assert [(p.bar, p.how) for p in out] == [(0, "complete")]
    out = asm.pop_ready(ms0 + 122_000, 2_000)  # bar 1 ended at +120 s, grace 2 s
    assert [(p.bar, p.how, p.missing) for p in out] == [(1, "grace", ("B",))]
    assert np.isnan(out[0].row[1]).all()
    assert not asm.add(MinuteAgg("B", ms0 + 60_000, 1, 1, 1, 1, 1))  # late
    assert asm.dropped["late"] == 1
    assert not asm.add(MinuteAgg("A", ms0 - 60_000, 1, 1, 1, 1, 1))  # pre-market
    asm.stream_lost()  # bars 2.. now wait for REST or the give-up deadline
    assert asm.pop_ready(ms0 + 200_000, 2_000) == []
    asm.resolve(4)
    assert [p.how for p in asm.pop_ready(ms0 + 200_000, 2_000)] == ["rest", "rest"]
    assert asm.pop_ready(ms0 + 3600_000, 2_000) == []  # never NaN-filled on its own
    assert [(p.bar, p.how) for p in asm.pop_ready(ms0 + 3600_000, 2_000, give_up_to=5)] == [
        (4, "give_up")]
    assert stale_mask(np.array([5, 1]), 6, 3).tolist() == [False, True]
    assert stale_mask(np.array([-1, -1]), 2, 3).tolist() == [False, False]


# --- REST backfill -----------------------------------------------------------------------


@pytest.mark.parametrize(("day", "open_utc", "n_bars"), [
    (dt.date(2024, 3, 8), dt.datetime(2024, 3, 8, 14, 30, tzinfo=dt.UTC), 390),  # EST
    (dt.date(2024, 3, 11), dt.datetime(2024, 3, 11, 13, 30, tzinfo=dt.UTC), 390),  # EDT
    (dt.date(2024, 11, 29), dt.datetime(2024, 11, 29, 14, 30, tzinfo=dt.UTC), 210),  # 13:00
])
def test_rest_backfill_lands_exact_bars_at_their_index(store, rest, day, open_utc,
                                                        n_bars) -> None:
    rest.page_size = 7  # many pages: next_url must be followed
    symbols = ("AAPL", "MSFT")
    day_open = open_utc.astimezone(NY)
    aapl = [b for b in range(n_bars) if b != 17]  # 09:47 has no trade
    rest.add_bars("AAPL", rest_bars(0, day_open, range(n_bars)))
    rest.bars["AAPL"] = [r for r in rest.bars["AAPL"] if r["t"] != to_ms(day_open) + 17 * 60_000]
    rest.add_bars("MSFT", rest_bars(1, day_open, range(0, n_bars, 3)))
    # outside the regular session: pre-market, the close itself, after-hours
    for minutes in (-1, -30, n_bars, n_bars + 5):
        rest.add_bars("AAPL", [rest_bar(day_open + dt.timedelta(minutes=minutes),
                                        9, 9, 9, 9, 9)])
    meta = ensure_session(store, day, symbols)
    assert meta.open_time == day_open and meta.n_bars == n_bars
    history = PolygonHistory(KEY, rest.url, timeout_s=5, workers=2)
    written = backfill_store(store, meta, history, meta.close_time + dt.timedelta(hours=1))
    assert written == n_bars
    got = stored(store, day)
    assert got.shape == (n_bars, 2, 5)
    for b in range(n_bars):
        exp_a = bar_values(0, b) if b in aapl else (np.nan,) * 5
        exp_m = bar_values(1, b) if b % 3 == 0 else (np.nan,) * 5
        np.testing.assert_array_equal(got[b, 0], exp_a)
        np.testing.assert_array_equal(got[b, 1], exp_m)
    pages = [q for path, q in rest.requests if "cursor" in q]
    assert len(pages) >= n_bars // 7 - 1  # pagination through next_url
    paths = {path for path, _ in rest.requests}
    for sym in symbols:  # the session's open .. last bar start, in Unix ms
        assert (f"/v2/aggs/ticker/{sym}/range/1/minute/{to_ms(day_open)}/"
                f"{to_ms(meta.close_time) - 1}") in paths


def test_backfill_mid_session_fills_only_minutes_that_are_over(store, rest) -> None:
    rest.add_bars("AAPL", rest_bars(0, OPEN, range(0, 31)))  # bar 30 is in progress
    rest.add_bars("MSFT", rest_bars(1, OPEN, [b for b in range(31) if b != 29]))
    meta = ensure_session(store, DAY, ("AAPL", "MSFT"))
    history = PolygonHistory(KEY, rest.url, timeout_s=5)
    cfg = FeedConfig(rest_delay_s=0)
    assert backfill_store(store, meta, history, at(DAY, 10, 0, 30), cfg) == 30
    got = stored(store)
    assert len(got) == 30
    assert np.isnan(got[29, 1]).all()  # MSFT's missing minute 09:59 is over: NaN
    np.testing.assert_array_equal(got[29, 0], bar_values(0, 29))
    # a second call later appends only the new minutes
    assert backfill_store(store, meta, history, at(DAY, 10, 1, 10), cfg) == 1
    np.testing.assert_array_equal(stored(store)[30, 0], bar_values(0, 30))


def test_rest_429_is_retried_and_persistent_errors_never_nan_fill(store, rest) -> None:
    rest.add_bars("AAPL", rest_bars(0, OPEN, range(10)))
    meta = ensure_session(store, DAY, ("AAPL",))
    history = PolygonHistory(KEY, rest.url, timeout_s=5, retries=3)
    rest.fail_next(429, times=2, retry_after="0")
    assert backfill_store(store, meta, history, at(DAY, 9, 40, 5)) == 10
    np.testing.assert_array_equal(stored(store)[:, 0], [bar_values(0, b) for b in range(10)])
    assert sum(1 for p, _ in rest.requests if p.startswith("/v2/aggs")) == 3

    rest.add_bars("AAPL", rest_bars(0, OPEN, range(10, 20)))
    rest.fail_next(500, times=4)  # more than the client's retries
    with pytest.raises(MarketDataUnavailable, match="AAPL"):
        backfill_store(store, meta, history, at(DAY, 9, 50, 5))
    assert len(stored(store)) == 10  # nothing NaN-filled on failure
    assert backfill_store(store, meta, history, at(DAY, 9, 50, 5)) == 10


def test_rest_timeout_is_enforced(store, rest) -> None:
    rest.add_bars("AAPL", rest_bars(0, OPEN, range(3)))
    rest.delay_s = 2.0
    history = PolygonHistory(KEY, rest.url, timeout_s=0.3, retries=0)
    t0 = time.monotonic()
    res = history.fetch_minutes(["AAPL"], OPEN, OPEN + dt.timedelta(minutes=3))
    assert time.monotonic() - t0 < 1.5
    assert "AAPL" in res.failed and "timed out" in res.failed["AAPL"].lower()
    assert KEY not in res.failed["AAPL"]


def test_bad_key_is_a_failure_not_an_empty_day(store, rest) -> None:
    rest.add_bars("AAPL", rest_bars(0, OPEN, range(3)))
    res = PolygonHistory("wrong", rest.url, timeout_s=5).fetch_minutes(
        ["AAPL"], OPEN, OPEN + dt.timedelta(minutes=3))
    assert "AAPL" in res.failed and "Unknown API Key" in res.failed["AAPL"]


# --- the stream --------------------------------------------------------------------------


def test_stream_minutes_are_appended_in_order_with_grace(redis_client, store, rest, ws) -> None:
    symbols, clock = two_symbols(rest)
    feed = make_feed(redis_client, store, rest, ws, symbols, clock)
    with FeedRunner(feed) as run:
        wait_for(lambda: len(stored(store)) == 30 and feed.connected, 10, "backfill + subscribe")
        assert ws.subscribed_symbols() == {"AM.AAPL", "AM.MSFT"}
        clock.set(at(DAY, 10, 1, 0.2))
        ws.send([am("AAPL", 0, 30), am("MSFT", 1, 30)])
        wait_for(lambda: len(stored(store)) == 31, 5, "bar 30 from the stream")
        clock.set(at(DAY, 10, 2, 0.2))
        ws.send([am("AAPL", 0, 31)])  # MSFT does not trade in 10:01
        time.sleep(0.4)
        assert len(stored(store)) == 31  # waiting for MSFT within the grace period
        clock.set(at(DAY, 10, 2, 2.5))
        wait_for(lambda: len(stored(store)) == 32, 5, "bar 31 after the grace period")
        ws.send([am("MSFT", 1, 31)])  # too late: the bar is published, append-only
        clock.set(at(DAY, 10, 3, 0.1))
        ws.send([am("MSFT", 1, 32)])
        ws.send([am("AAPL", 0, 32)])
        wait_for(lambda: len(stored(store)) == 33, 5, "bar 32 from two frames")
        assert run.error is None
    got = stored(store)
    for b in range(33):
        np.testing.assert_array_equal(got[b, 0], bar_values(0, b))
        if b == 31:
            assert np.isnan(got[b, 1]).all()
        else:
            np.testing.assert_array_equal(got[b, 1], bar_values(1, b))
    assert feed.stats["rest_calls"] == 1
    assert feed.stats["published_grace"] == 1
    assert feed.asm.dropped["late"] == 1


def test_dropped_socket_reconnects_and_the_gap_is_backfilled(redis_client, store, rest,
                                                             ws) -> None:
    symbols, clock = two_symbols(rest)
    feed = make_feed(redis_client, store, rest, ws, symbols, clock)
    with FeedRunner(feed) as run:
        wait_for(lambda: len(stored(store)) == 30 and feed.connected, 10, "start")
        clock.set(at(DAY, 10, 1, 0.2))
        ws.send([am("AAPL", 0, 30), am("MSFT", 1, 30)])
        wait_for(lambda: len(stored(store)) == 31, 5, "bar 30")
        # minute 10:01 (bar 31) ends while the socket is down; only REST has it
        for i, s in enumerate(symbols):
            rest.add_bars(s, rest_bars(i, OPEN, range(31, 32)))
        clock.set(at(DAY, 10, 2, 0.5))
        ws.drop()
        wait_for(lambda: ws.connections_total >= 2 and feed.connected, 10, "reconnect")
        wait_for(lambda: len(stored(store)) == 32, 5, "gap backfilled from REST")
        clock.set(at(DAY, 10, 3, 0.3))
        ws.send([am("AAPL", 0, 32), am("MSFT", 1, 32)])
        wait_for(lambda: len(stored(store)) == 33, 5, "bar 32 after the reconnect")
        assert run.error is None
    got = stored(store)
    for b in range(33):
        for i in range(2):
            np.testing.assert_array_equal(got[b, i], bar_values(i, b))
    assert feed.stats["disconnected"] >= 1
    assert feed.stats["rest_calls"] == 2


def test_silent_socket_is_detected_within_the_configured_seconds(redis_client, store, rest,
                                                                  ws) -> None:
    symbols, clock = two_symbols(rest, 31)
    cfg = FeedConfig(**{**FAST.__dict__, "silent_s": 1.0})
    feed = make_feed(redis_client, store, rest, ws, symbols, clock, config=cfg)
    with FeedRunner(feed) as run:
        wait_for(lambda: len(stored(store)) == 30 and feed.connected, 10, "start")
        ws.silence()  # connection stays open, nothing arrives any more
        t0 = time.monotonic()
        clock.set(at(DAY, 10, 1, 0.5))  # bar 30 is over; within grace, the stream owes it
        wait_for(lambda: feed.stats["silent"] >= 1, 5, "silence detected")
        elapsed = time.monotonic() - t0
        assert elapsed <= 1.0 + 1.0, elapsed  # silent_s plus polling slack on a busy box
        wait_for(lambda: ws.connections_total >= 2, 5, "reconnected")
        wait_for(lambda: len(stored(store)) == 31, 5, "gap backfilled from REST")
        assert run.error is None
    np.testing.assert_array_equal(stored(store)[30, 1], bar_values(1, 30))


def test_stale_symbol_is_recorded_and_cleared(redis_client, store, rest, ws) -> None:
    symbols = ("AAPL", "MSFT", "TSLA")
    rest.add_bars("AAPL", rest_bars(0, OPEN, range(30)))
    rest.add_bars("MSFT", rest_bars(1, OPEN, range(30)))
    rest.add_bars("TSLA", rest_bars(2, OPEN, range(27)))  # last trade 09:56: 3 minutes ago
    clock = FakeClock(at(DAY, 10, 0, 30))
    feed = make_feed(redis_client, store, rest, ws, symbols, clock)  # stale after 3 minutes
    key = stale_symbols_key(Keys(), DAY)
    assert key == "stale_symbols:2024-06-03"
    with FeedRunner(feed) as run:
        wait_for(lambda: len(stored(store)) == 30 and feed.connected, 10, "start")
        wait_for(lambda: redis_client.hexists(key, "TSLA"), 5, "TSLA stale")
        assert redis_client.hgetall(key) == {b"TSLA": b"2024-06-03T09:56:00-04:00"}
        for bar in (30, 31, 32):
            clock.set(at(DAY, 10, bar - 30 + 1, 0.1))
            ws.send([am("AAPL", 0, bar), am_event("TSLA", OPEN + dt.timedelta(minutes=bar),
                                                  *bar_values(2, bar))])
            clock.set(at(DAY, 10, bar - 30 + 1, 2.5))  # MSFT is silent: grace, NaN
            wait_for(lambda b=bar: len(stored(store)) == b + 1, 5, f"bar {bar}")
        wait_for(lambda: redis_client.hexists(key, "MSFT"), 5, "MSFT stale")
        assert not redis_client.hexists(key, "TSLA")  # reporting again
        assert redis_client.hget(key, "MSFT") == b"2024-06-03T09:59:00-04:00"
        assert redis_client.ttl(key) > 0
        assert run.error is None


def test_wrong_stream_key_stops_the_feed_with_a_clear_error(redis_client, store, rest,
                                                            ws) -> None:
    clock = FakeClock(at(DAY, 10, 0, 30))
    feed = make_feed(redis_client, store, rest, ws, ("AAPL",), clock, key="wrong")
    with FeedRunner(feed) as run:
        run.thread.join(10)
    assert isinstance(run.error, StreamAuthError)
    assert "refused the API key" in str(run.error)
    assert ws.auth_failures == 1


def test_one_feed_per_deployment(redis_client, monkeypatch, capsys, redis_url) -> None:
    first = FeedLock(redis_client, feed_lock_key(Keys()), ttl_s=30, source="polygon")
    first.acquire()
    second = FeedLock(redis_client, feed_lock_key(Keys()), ttl_s=30, source="polygon")
    with pytest.raises(FeedAlreadyRunning, match="another market-data feed is already"):
        second.acquire()
    assert first.refresh()
    # the process entry refuses too, before touching the network
    from core.config import get_settings
    from core.market.feed import main_feed

    monkeypatch.setenv("TRADING_MODE", "paper")
    monkeypatch.setenv("TRADING_REDIS_URL", redis_url)
    monkeypatch.setenv("TRADING_ALPACA_API_KEY", "ak")
    monkeypatch.setenv("TRADING_ALPACA_SECRET_KEY", "as")
    monkeypatch.setenv("TRADING_POLYGON_API_KEY", "pk")
    get_settings.cache_clear()
    assert main_feed() == 2
    err = capsys.readouterr().err
    assert "another market-data feed is already running" in err and "feed:lock" in err
    first.release()
    assert redis_client.get(feed_lock_key(Keys())) is None


def test_session_meta_follows_the_calendar() -> None:
    meta = session_meta(dt.date(2024, 11, 29), ("AAPL",))
    assert meta.n_bars == 210 and meta.close_time.hour == 13


# --- Alpaca data (used when no Polygon key is set) ---------------------------------------


def test_alpaca_stream_and_rest_fill_the_store_and_survive_a_drop(redis_client, store) -> None:
    from core.market.alpaca_data import AlpacaHistory, AlpacaStreamSession
    from tests.fakes.polygon_server import AlpacaDataServer, AlpacaStreamServer

    symbols = ("AAPL", "MSFT")

    with AlpacaDataServer("ak", "as") as rest_srv, AlpacaStreamServer("ak", "as") as ws_srv:
        for i, s in enumerate(symbols):
            rest_srv.add_bars(s, [(OPEN + dt.timedelta(minutes=b), *bar_values(i, b))
                                  for b in range(30)])
        clock = FakeClock(at(DAY, 10, 0, 30))
        meta = ensure_session(store, DAY, symbols)
        feed = SessionFeed(redis_client, Keys(), store, meta,
                           AlpacaHistory("ak", "as", rest_srv.url, timeout_s=5),
                           lambda: AlpacaStreamSession("ak", "as", symbols, ws_srv.url),
                           FAST, clock)
        with FeedRunner(feed) as run:
            wait_for(lambda: len(stored(store)) == 30 and feed.connected, 10, "start")
            assert ws_srv.subscribed() == set(symbols)
            clock.set(at(DAY, 10, 1, 0.2))
            ws_srv.send_bars([(s, OPEN + dt.timedelta(minutes=30), *bar_values(i, 30))
                              for i, s in enumerate(symbols)])
            wait_for(lambda: len(stored(store)) == 31, 5, "bar 30 from the stream")
            for i, s in enumerate(symbols):  # minute 10:01 only reaches REST
                rest_srv.add_bars(s, [(OPEN + dt.timedelta(minutes=31), *bar_values(i, 31))])
            clock.set(at(DAY, 10, 2, 0.5))
            ws_srv.drop()  # StockDataStream reconnects by itself; the hooks tell the feed
            wait_for(lambda: len(stored(store)) == 32, 10, "gap backfilled from REST")
            wait_for(lambda: ws_srv.connections_total >= 2 and feed.connected, 15,
                     "reconnected")
            clock.set(at(DAY, 10, 3, 0.2))
            ws_srv.send_bars([(s, OPEN + dt.timedelta(minutes=32), *bar_values(i, 32))
                              for i, s in enumerate(symbols)])
            wait_for(lambda: len(stored(store)) == 33, 5, "bar 32 after the reconnect")
            assert run.error is None
    got = stored(store)
    for b in range(33):
        for i in range(2):
            np.testing.assert_array_equal(got[b, i], bar_values(i, b))
    assert feed.stats["disconnected"] >= 1


def test_run_feed_forever_feeds_today_under_the_lock(redis_client, store, rest, ws) -> None:
    from core.market.feed import feed_status_key, run_feed_forever

    symbols, clock = two_symbols(rest)
    lock = FeedLock(redis_client, feed_lock_key(Keys()), ttl_s=30, source="polygon")
    lock.acquire()
    stop = threading.Event()
    history = PolygonHistory(KEY, rest.url, timeout_s=5)
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run_feed_forever(
                redis_client, Keys(), symbols, history,
                lambda: PolygonStreamSession(KEY, symbols, ws.url, 0.1, 0.5), FAST,
                lock=lock, clock=clock, stop=stop))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(store.read(DAY, 0)) == 30, 10, "today backfilled")
        wait_for(lambda: ws.subscribed_symbols() == {"AM.AAPL", "AM.MSFT"}, 10, "streaming")
        status = redis_client.hgetall(feed_status_key(Keys()))
        assert status[b"source"] == b"polygon" and status[b"date"] == b"2024-06-03"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and errors == []
    assert store.meta(DAY).symbols == symbols
    lock.release()
