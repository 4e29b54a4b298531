"""The market-data feed: one process keeps each session's 1-minute bars in the Redis bar store.

The feed is vendor-neutral here; ``core.market.polygon_feed`` and ``core.market.alpaca_data``
supply a *historical source* (REST minute bars) and a *stream session* (live minute bars).
``main_feed`` picks Polygon when ``TRADING_POLYGON_API_KEY`` is set, Alpaca data otherwise.

How a session's bars reach the store (append-only, one ``[S, 5]`` row per bar, in bar order):

- Live minute aggregates are buffered per bar (``MinuteAssembler``). A bar is published when
  every symbol of the universe reported it, or ``grace_s`` after the minute's end (symbols that
  did not report are NaN: no trade that minute, or a halt).
- Minutes the stream did not cover (before the feed started, while the socket was down or
  silent) are asked from the REST source once they are over (``rest_delay_s`` after their end)
  and published from it, NaN where REST has no bar. A REST failure never NaN-fills: it is
  retried with backoff; only when REST has kept failing for ``give_up_s`` are the minutes it
  owes published as they stand (logged as an error), so the tick path is never blocked for
  good.
- The stream is reconnected with exponential backoff. A socket with no message for
  ``silent_s`` seconds while the market is open is dropped and reconnected, and the gap is
  backfilled from REST.
- A symbol without any aggregate in the last ``stale_minutes`` published bars is recorded as
  stale (see the Redis keys below); the decision step should not open positions in it.

Redis keys (under the deployment's ``Keys`` prefix; bare names in paper/live):

- ``bars:<date>`` / ``bars:<date>:meta``: the bar store (``core.market.bar_store``).
- ``stale_symbols:<date>``: hash ``symbol -> ISO-8601 start (New York) of the symbol's last bar
  with an aggregate`` (``"none"`` when it had none today). A field exists exactly while the
  symbol is stale; it is deleted when the symbol reports again. Expires after 4 days.
  Check with ``HEXISTS stale_symbols:<date> <symbol>`` (``stale_symbols_key`` names it).
- ``feed:lock``: one feed per deployment (JSON: token, host, pid, source, started; TTL
  ``lock_ttl_s``, refreshed while the feed runs). A second feed refuses to start.
- ``feed:status``: hash with ``source, date, bars, connected, last_message, updated, pid``.

All times are America/New_York; Unix milliseconds are UTC and mark a bar's START.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from redis import Redis

from core.calendar import NY, exchange_date, is_session, session_bounds
from core.errors import ConfigError, TradingError, TransientError
from core.keys import Keys
from core.locks import ProcessLock
from core.market.bar_store import RedisBarStore, SessionMeta
from core.market.minutes import (
    BAR_SECONDS,
    FeedConfig,
    FetchResult,
    HistoricalSource,
    MinuteAgg,
    MinuteAssembler,
    Published,
    StreamAuthError,
    StreamSession,
    backoff_delays,
    stale_mask,
    to_ms,
)
from core.market.minutes import (
    StreamSink as StreamSink,
)
from core.market.minutes import (
    finite_number as finite_number,
)

log = logging.getLogger(__name__)

_KEY_TTL_S = 4 * 24 * 3600

Clock = Callable[[], dt.datetime]


class MarketDataUnavailable(TransientError):
    """The data vendor could not be reached or answered with an error."""


class FeedAlreadyRunning(ConfigError):
    """Another feed holds the deployment's feed lock."""


class FeedLockLost(TransientError):
    """The feed lock expired and was taken by another process."""


def now_ny() -> dt.datetime:
    """The wall clock in America/New_York."""
    return dt.datetime.now(NY)


def stale_symbols_key(keys: Keys, day: dt.date) -> str:
    """``stale_symbols:<date>``: symbols with no aggregate for ``stale_minutes`` bars."""
    return keys.k(f"stale_symbols:{day.isoformat()}")


def feed_lock_key(keys: Keys) -> str:
    """``feed:lock``: the one-feed-per-deployment lock."""
    return keys.k("feed:lock")


def feed_status_key(keys: Keys) -> str:
    """``feed:status``: a small hash describing the running feed."""
    return keys.k("feed:status")


# --- store helpers -----------------------------------------------------------------------


def session_meta(day: dt.date, symbols: Sequence[str]) -> SessionMeta:
    """The bar-store metadata of a regular session (early closes included)."""
    open_time, close_time = session_bounds(day)
    return SessionMeta(day, tuple(symbols), open_time, close_time, BAR_SECONDS)


def ensure_session(store: RedisBarStore, day: dt.date, symbols: Sequence[str]) -> SessionMeta:
    """Start ``day`` in the store, or keep the stored universe when rows already exist."""
    existing = store.meta(day)
    if existing is not None:
        if existing.symbols != tuple(symbols):
            log.warning("bar store for %s already holds %d symbols (%s...); keeping that "
                        "universe for the rest of the session", day, len(existing.symbols),
                        ",".join(existing.symbols[:5]))
        return existing
    meta = session_meta(day, symbols)
    store.start_session(meta)
    return meta


def publish(store: RedisBarStore, meta: SessionMeta, items: Sequence[Published]) -> int:
    """Append released bars; log NaN symbols; return how many were written."""
    n = 0
    for p in items:
        if store.append(meta.date, p.bar, p.row):
            n += 1
        if p.how == "give_up":
            log.error("bar %s of %s published without data for %d symbols: nobody could fill "
                      "it in time", p.bar, meta.date, len(p.missing),
                      extra={"symbols": list(p.missing[:20])})
    return n


def backfill_store(store: RedisBarStore, meta: SessionMeta, history: HistoricalSource,
                   now: dt.datetime, config: FeedConfig | None = None) -> int:
    """Fill the store from REST for every bar of ``meta`` that is over at ``now`` (sync).

    Bars already in the store are kept. Minutes without a REST bar are NaN, but only once
    they are over; bars outside the regular session are dropped. Raises
    MarketDataUnavailable when some symbols could not be fetched (nothing is NaN-filled then,
    the bars fetched before the failure are not published either). Returns bars written.
    """
    config = config or FeedConfig()
    asm = MinuteAssembler.from_store(store, meta)
    now_ms = to_ms(now)
    hi = asm.rest_target(now_ms, int(config.rest_delay_s * 1000))
    if asm.next_bar >= hi:
        return 0
    res = history.fetch_minutes(meta.symbols, asm.bar_start(asm.next_bar), asm.bar_start(hi))
    if not res.ok:
        raise MarketDataUnavailable(
            f"{history.name}: could not fetch {len(res.failed)} symbols: "
            + "; ".join(f"{s}: {r}" for s, r in list(res.failed.items())[:3]))
    for agg in res.aggs:
        if asm.bar_of(agg.start_ms) is not None and asm.bar_of(agg.start_ms) < hi:
            asm.add(agg)
    asm.resolve(hi)
    return publish(store, meta, asm.pop_ready(now_ms, 0))


# --- the live session --------------------------------------------------------------------


class SessionFeed:
    """Keeps one session's bars in the store from a stream and a REST source (async)."""

    def __init__(self, redis: Redis, keys: Keys, store: RedisBarStore, meta: SessionMeta,
                 history: HistoricalSource, stream_factory: Callable[[], StreamSession],
                 config: FeedConfig | None = None, clock: Clock = now_ny,
                 heartbeat: Callable[[], bool] | None = None, source: str = "",
                 stop: threading.Event | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.store = store
        self.meta = meta
        self.history = history
        self.stream_factory = stream_factory
        self.config = config or FeedConfig()
        self.clock = clock
        self.heartbeat = heartbeat
        self.source = source or history.name
        self.asm = MinuteAssembler.from_store(store, meta)
        self.stats: Counter[str] = Counter()
        self._stop = stop or threading.Event()
        self._last_msg = time.monotonic()
        self._connected = False
        self._stream_task: asyncio.Task | None = None
        self._dying: set[asyncio.Task] = set()
        self._rest_task: asyncio.Task | None = None
        self._rest_hi = 0
        self._next_connect = 0.0
        self._connect_delays = self._new_connect_delays()
        self._next_rest = 0.0
        self._rest_delays = self._new_rest_delays()
        self._rest_failing_since: float | None = None
        self._give_up_to = 0
        self._stale: set[str] = set()
        self._stale_checked = -1
        self._status_at = 0.0

    def _new_connect_delays(self):
        return backoff_delays(self.config.reconnect_min_s, self.config.reconnect_max_s)

    def _new_rest_delays(self):
        return backoff_delays(self.config.rest_retry_s, self.config.rest_retry_max_s)

    def stop(self) -> None:
        """Ask ``run`` to return (thread-safe)."""
        self._stop.set()

    @property
    def connected(self) -> bool:
        return self._connected

    def _now_ms(self) -> int:
        return to_ms(self.clock())

    # sink --------------------------------------------------------------------------------
    def on_message(self) -> None:
        self._last_msg = time.monotonic()
        self.stats["messages"] += 1

    def on_subscribed(self) -> None:
        self._last_msg = time.monotonic()
        if not self._connected:
            self._connected = True
            self.asm.stream_subscribed(self._now_ms())
            self.stats["subscribed"] += 1
            log.info("%s stream subscribed (%d symbols); live from bar %s of %s", self.source,
                     len(self.meta.symbols), self.asm.covered_from, self.meta.date)

    def on_disconnected(self) -> None:
        if self._connected:
            self._connected = False
            self.stats["disconnected"] += 1
            log.warning("%s stream disconnected at bar %s of %s", self.source,
                        self.asm.next_bar, self.meta.date)
        self.asm.stream_lost()

    def on_aggs(self, aggs: list[MinuteAgg]) -> None:
        self._last_msg = time.monotonic()
        self._connect_delays = self._new_connect_delays()  # data flows: reset the backoff
        for agg in aggs:
            if self.asm.add(agg):
                self.stats["stream_aggs"] += 1

    # loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until every bar of the session is in the store, or ``stop``."""
        log.info("%s feed for %s: %d symbols, %d bars already stored", self.source,
                 self.meta.date, len(self.meta.symbols), self.asm.next_bar)
        try:
            while not self._stop.is_set():
                if self.heartbeat is not None and not self.heartbeat():
                    raise FeedLockLost("the feed lock was lost; another feed may be running")
                self._step_stream()
                await self._step_rest()
                self._publish()
                self._write_status()
                if self.asm.done:
                    log.info("%s feed: all %d bars of %s stored", self.source,
                             self.meta.n_bars, self.meta.date)
                    break
                await asyncio.sleep(self.config.poll_s)
        finally:
            await self._stop_stream()
            if self._rest_task is not None and not self._rest_task.done():
                self._rest_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._rest_task
            for task in list(self._dying):
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, 5)
            self._write_status(force=True)

    def _step_stream(self) -> None:
        now = self.clock()
        mono = time.monotonic()
        task = self._stream_task
        if task is not None and task.done():
            self._stream_task = None
            self.on_disconnected()
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, StreamAuthError):
                raise exc
            if exc is not None:
                log.warning("%s stream ended: %s: %s", self.source, type(exc).__name__, exc)
            else:
                log.warning("%s stream closed by the server", self.source)
            self._next_connect = mono + next(self._connect_delays)
        elif task is not None:
            market_open = self.meta.open_time <= now < self.meta.close_time
            silent = mono - self._last_msg
            if market_open and silent > self.config.silent_s:
                self.stats["silent"] += 1
                log.warning("%s stream silent for %.1f s while the market is open: "
                            "reconnecting and backfilling the gap from REST", self.source,
                            silent)
                task.cancel()
                self._dying.add(task)  # keep a reference until it has unwound
                task.add_done_callback(self._dying.discard)
                self._stream_task = None
                self.on_disconnected()
                self._next_connect = mono + next(self._connect_delays)
        if (self._stream_task is None and mono >= self._next_connect
                and now < self.meta.close_time):
            self._last_msg = mono
            self.stats["connects"] += 1
            self._stream_task = asyncio.get_running_loop().create_task(
                self.stream_factory().run(self))

    async def _stop_stream(self) -> None:
        task, self._stream_task = self._stream_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.on_disconnected()

    async def _step_rest(self) -> None:
        task = self._rest_task
        if task is not None:
            if not task.done():
                return
            self._rest_task = None
            hi = self._rest_hi
            try:
                res: FetchResult = task.result()
            except Exception as exc:  # the source raised instead of reporting failures
                res = FetchResult(failed={"*": f"{type(exc).__name__}: {exc}"})
            for agg in res.aggs:
                bar = self.asm.bar_of(agg.start_ms)
                if bar is not None and bar < hi and self.asm.add(agg):
                    self.stats["rest_aggs"] += 1
            if res.ok:
                self.asm.resolve(hi)
                self._rest_delays = self._new_rest_delays()
                self._next_rest = 0.0
                self._rest_failing_since = None
            else:
                self.stats["rest_failures"] += 1
                mono = time.monotonic()
                if self._rest_failing_since is None:
                    self._rest_failing_since = mono
                elif mono - self._rest_failing_since >= self.config.give_up_s:
                    self._give_up_to = max(self._give_up_to, hi)
                wait = next(self._rest_delays)
                self._next_rest = time.monotonic() + wait
                first = next(iter(res.failed.items()))
                log.warning("%s REST backfill failed for %d symbols (%s: %s); retry in %.1f s",
                            self.source, len(res.failed), first[0], first[1], wait)
            return
        now_ms = self._now_ms()
        hi = self.asm.rest_target(now_ms, int(self.config.rest_delay_s * 1000))
        lo = max(self.asm.next_bar, self.asm.resolved_to)
        if lo < hi and time.monotonic() >= self._next_rest:
            self._rest_hi = hi
            self.stats["rest_calls"] += 1
            log.info("%s REST backfill of bars %d-%d of %s", self.source, lo, hi - 1,
                     self.meta.date)
            self._rest_task = asyncio.get_running_loop().create_task(asyncio.to_thread(
                self.history.fetch_minutes, self.meta.symbols, self.asm.bar_start(lo),
                self.asm.bar_start(hi)))

    def _publish(self) -> None:
        items = self.asm.pop_ready(self._now_ms(), int(self.config.grace_s * 1000),
                                   self._give_up_to)
        if not items:
            return
        for p in items:
            self.stats[f"published_{p.how}"] += 1
        publish(self.store, self.meta, items)
        self._update_stale()

    def _update_stale(self) -> None:
        published = self.asm.next_bar
        if published == self._stale_checked:
            return
        self._stale_checked = published
        mask = stale_mask(self.asm.last_seen, published, self.config.stale_minutes)
        now_stale = {s for s, m in zip(self.meta.symbols, mask, strict=True) if m}
        key = stale_symbols_key(self.keys, self.meta.date)
        added = now_stale - self._stale
        cleared = self._stale - now_stale
        if not added and not cleared:
            return
        pipe = self.redis.pipeline()
        if added:
            mapping = {}
            for s in sorted(added):
                last = int(self.asm.last_seen[self.asm._index[s]])
                mapping[s] = self.asm.bar_start(last).isoformat() if last >= 0 else "none"
            pipe.hset(key, mapping=mapping)
            log.warning("stale symbols on %s (no aggregate for %d minutes): %s",
                        self.meta.date, self.config.stale_minutes, ", ".join(sorted(added)))
        if cleared:
            pipe.hdel(key, *sorted(cleared))
            log.info("symbols reporting again on %s: %s", self.meta.date,
                     ", ".join(sorted(cleared)))
        pipe.expire(key, _KEY_TTL_S)
        pipe.execute()
        self._stale = now_stale

    def _write_status(self, force: bool = False) -> None:
        mono = time.monotonic()
        if not force and mono - self._status_at < 1.0:
            return
        self._status_at = mono
        try:
            self.redis.hset(feed_status_key(self.keys), mapping={
                "source": self.source, "date": self.meta.date.isoformat(),
                "bars": self.asm.next_bar, "connected": int(self._connected),
                "last_message_age_s": round(mono - self._last_msg, 1),
                "updated": now_ny().isoformat(), "pid": os.getpid(),
            })
        except Exception as exc:  # status is informative only
            log.debug("feed status not written: %s", exc)


# --- lock and process entry --------------------------------------------------------------

class FeedLock(ProcessLock):
    """The one-feed-per-deployment lock, refreshed by its owner."""

    def __init__(self, redis: Redis, key: str, ttl_s: float = 30.0, source: str = "") -> None:
        super().__init__(redis, key, ttl_s, {
            "source": source, "started": now_ny().isoformat(timespec="seconds")})
        self._refreshed = 0.0

    @property
    def value(self) -> str:
        """The token stored under the key."""
        return self.token

    def acquire(self) -> None:
        """Take the lock or raise FeedAlreadyRunning naming the holder."""
        if self.try_acquire():
            self._refreshed = time.monotonic()
            return
        holder, _ = self.holder()
        raise FeedAlreadyRunning(
            f"another market-data feed is already running for this deployment (pid "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')}, {holder.get('source', '?')}"
            f", since {holder.get('started', '?')}); only one feed may write the bar store. "
            f"Stop it first, or wait {self.ttl_ms // 1000} s after it died "
            f"(Redis key {self.key})")

    def refresh(self) -> bool:
        """Extend the TTL (at most every third of it); False when the lock is no longer ours."""
        if not self.held:
            return False
        mono = time.monotonic()
        if mono - self._refreshed < self.ttl_ms / 3000:
            return True
        self._refreshed = mono
        return self.renew()


def next_session_day(now: dt.datetime) -> dt.date:
    """Today's session while it has not closed, else the next session date."""
    day = exchange_date(now)
    if is_session(day) and now < session_bounds(day)[1]:
        return day
    day += dt.timedelta(days=1)
    while not is_session(day):
        day += dt.timedelta(days=1)
    return day


async def run_feed_forever(redis: Redis, keys: Keys, symbols: Sequence[str],
                           history: HistoricalSource,
                           stream_factory: Callable[[], StreamSession],
                           config: FeedConfig, lock: FeedLock | None = None,
                           clock: Clock = now_ny, stop: threading.Event | None = None) -> None:
    """Feed one session after another: wait for the pre-open, backfill, stream, repeat."""
    stop = stop or threading.Event()
    store = RedisBarStore(redis, keys)

    def heartbeat() -> bool:
        return True if lock is None else lock.refresh()

    async def wait_until(when: dt.datetime) -> None:
        while not stop.is_set() and clock() < when:
            if not heartbeat():
                raise FeedLockLost("the feed lock was lost while waiting")
            await asyncio.sleep(min(1.0, max(0.05, (when - clock()).total_seconds())))

    while not stop.is_set():
        day = next_session_day(clock())
        open_time, close_time = session_bounds(day)
        start_at = open_time - dt.timedelta(seconds=config.pre_open_s)
        if clock() < start_at:
            log.info("next session %s: the feed starts at %s", day, start_at.isoformat())
            await wait_until(start_at)
            continue
        meta = ensure_session(store, day, symbols)
        feed = SessionFeed(redis, keys, store, meta, history, stream_factory, config, clock,
                           heartbeat=heartbeat, source=history.name, stop=stop)
        await feed.run()
        await wait_until(close_time)  # so the next round picks the next session


def build_sources(settings: Any, config: FeedConfig
                  ) -> tuple[HistoricalSource, Callable[[], StreamSession]]:
    """Polygon when ``polygon_api_key`` is set, Alpaca data otherwise."""
    symbols = tuple(settings.symbols)
    if settings.polygon_api_key is not None:
        from core.market import polygon_feed

        return polygon_feed.sources_from_settings(settings, config, symbols)
    if settings.alpaca_api_key is None or settings.alpaca_secret_key is None:
        raise ConfigError("the feed needs TRADING_POLYGON_API_KEY, or TRADING_ALPACA_API_KEY "
                          "and TRADING_ALPACA_SECRET_KEY for Alpaca market data")
    from core.market import alpaca_data

    return alpaca_data.sources_from_settings(settings, config, symbols)


def main_feed(argv: Sequence[str] | None = None) -> int:
    """Entry of the ``feed`` process (Procfile): one per deployment, paper/live modes."""
    import sys

    from core.config import load_settings
    from core.runtime import connect_redis

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # also when a CLI configured logging first
    try:
        settings = load_settings()
        if settings.mode == "sim":
            raise ConfigError("the market-data feed runs in paper/live mode only "
                              "(TRADING_MODE=sim replays bars itself)")
        config = FeedConfig.from_settings(settings)
        history, stream_factory = build_sources(settings, config)
        redis = connect_redis(settings.redis_url)
        keys = Keys.for_mode(settings.mode, settings.sim_run_id)
        lock = FeedLock(redis, feed_lock_key(keys), config.lock_ttl_s, history.name)
        lock.acquire()
    except ConfigError as exc:
        print(f"feed: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        await run_feed_forever(redis, keys, settings.symbols, history, stream_factory,
                               config, lock=lock, stop=stop)

    log.info("feed: %s market data for %d symbols", history.name, len(settings.symbols))
    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        stop.set()
        print("\nfeed: interrupted", file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"feed: error: {exc}", file=sys.stderr)
        return 2
    except TradingError as exc:  # e.g. the lock was lost: let the process manager restart us
        print(f"feed: error: {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main_feed())
