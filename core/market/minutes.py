"""Market-data value types and the pure minute assembly of the feed: vendor aggregates
(``MinuteAgg``), the feed's settings, the assembler that turns a stream of per-symbol
minute aggregates into one bar row per minute for the universe, stale-symbol masks and the
reconnect backoff. No I/O; used by ``core.market.feed`` and the vendor adapters. Times are
Unix ms (UTC) and America/New_York; prices US dollars, volume shares."""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from core.errors import ConfigError
from core.market.bar_store import RedisBarStore, SessionMeta

log = logging.getLogger(__name__)

BAR_SECONDS = 60  # the feed's minute bars
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_ms(ts: dt.datetime) -> int:
    """Unix milliseconds (UTC) of an aware datetime."""
    if ts.tzinfo is None:
        raise ValueError("to_ms needs an aware datetime")
    return (ts - _EPOCH_UTC) // dt.timedelta(milliseconds=1)


# --- value types -------------------------------------------------------------------------


def finite_number(value: Any) -> float:
    """A finite float from a vendor's JSON number; ValueError for bool, None, NaN or inf."""
    if isinstance(value, bool) or value is None:
        raise ValueError("not a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


@dataclass(frozen=True)
class MinuteAgg:
    """One symbol's 1-minute aggregate; ``start_ms`` is the bar START in Unix ms (UTC)."""

    symbol: str
    start_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float

    def values(self) -> tuple[float, float, float, float, float]:
        return (self.open, self.high, self.low, self.close, self.volume)


@dataclass
class FetchResult:
    """Minute bars from a historical source; ``failed`` maps symbols that failed to a reason."""

    aggs: list[MinuteAgg] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


class HistoricalSource(Protocol):
    """REST minute bars of a vendor."""

    name: str

    def fetch_minutes(self, symbols: Sequence[str], start: dt.datetime,
                      end: dt.datetime) -> FetchResult:
        """Bars whose start is in ``[start, end)``, every symbol; failures per symbol."""
        ...


class StreamSink(Protocol):
    """What a stream session reports to (called from the feed's event loop)."""

    def on_message(self) -> None: ...
    def on_subscribed(self) -> None: ...
    def on_disconnected(self) -> None: ...
    def on_aggs(self, aggs: list[MinuteAgg]) -> None: ...


class StreamSession(Protocol):
    """One live connection attempt; ``run`` returns or raises when it ends; cancel stops it."""

    async def run(self, sink: StreamSink) -> None: ...


class StreamAuthError(ConfigError):
    """The vendor refused the credentials: retrying will not help."""


# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedConfig:
    """Timing of the feed (seconds unless named otherwise)."""

    grace_s: float = 5.0  # wait after a minute's end for symbols the stream has not reported
    silent_s: float = 90.0  # no message for this long while open: reconnect + REST backfill
    stale_minutes: int = 5  # no aggregate in this many published bars: the symbol is stale
    rest_delay_s: float = 3.0  # ask REST for a minute only this long after its end
    give_up_s: float = 120.0  # REST failing this long: publish the minutes it owes as they are
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    rest_retry_s: float = 5.0  # first wait before asking REST again after a failure
    rest_retry_max_s: float = 60.0
    http_timeout_s: float = 10.0
    poll_s: float = 0.25
    lock_ttl_s: float = 30.0
    pre_open_s: float = 300.0  # start a session (and the stream) this long before the open

    @classmethod
    def from_settings(cls, settings: Any) -> FeedConfig:
        """Read ``feed_*`` attributes of the settings when they exist, defaults otherwise."""
        names = {
            "grace_s": "feed_grace_s", "silent_s": "feed_silent_s",
            "stale_minutes": "feed_stale_minutes", "rest_delay_s": "feed_rest_delay_s",
            "give_up_s": "feed_give_up_s", "reconnect_max_s": "feed_reconnect_max_s",
            "http_timeout_s": "feed_http_timeout_s",
        }
        values = {}
        for ours, theirs in names.items():
            value = getattr(settings, theirs, None)
            if value is not None:
                values[ours] = value
        return cls(**values)


# --- pure parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A bar handed to the store: how it was completed and which symbols were NaN."""

    bar: int
    row: np.ndarray  # [S, 5]
    how: str  # complete | rest | grace | give_up
    missing: tuple[str, ...]


class MinuteAssembler:
    """Buffers minute aggregates per bar and releases whole bar rows in bar order (pure).

    ``next_bar`` is the first bar not yet in the store. ``covered_from`` is the first bar the
    live stream covers (None while it is down); bars before it are completed only by REST
    (``resolve``) or by the give-up deadline. Bars at or after it are completed when every
    symbol reported or ``grace`` after their end.
    """

    def __init__(self, symbols: Sequence[str], open_time: dt.datetime, n_bars: int,
                 bar_seconds: int = BAR_SECONDS, next_bar: int = 0,
                 last_seen: np.ndarray | None = None) -> None:
        self.symbols = tuple(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols)}
        self.open_time = open_time
        self.open_ms = to_ms(open_time)
        self.bar_ms = bar_seconds * 1000
        self.n_bars = n_bars
        self.next_bar = next_bar
        self.resolved_to = next_bar
        self.covered_from: int | None = None
        self._rows: dict[int, np.ndarray] = {}
        self._seen: dict[int, np.ndarray] = {}
        self.last_seen = (np.full(len(self.symbols), -1, dtype=np.int64) if last_seen is None
                          else np.asarray(last_seen, dtype=np.int64).copy())
        self.dropped: Counter[str] = Counter()

    @classmethod
    def from_store(cls, store: RedisBarStore, meta: SessionMeta) -> MinuteAssembler:
        """An assembler that continues after the rows already in the store."""
        rows = store.read(meta.date, 0)
        n = min(len(rows), meta.n_bars)
        last_seen = np.full(len(meta.symbols), -1, dtype=np.int64)
        if n:
            has = ~np.isnan(rows[:n, :, 3])  # [n, S] close present
            any_ = has.any(axis=0)
            last = n - 1 - np.argmax(has[::-1], axis=0)
            last_seen = np.where(any_, last, -1).astype(np.int64)
        return cls(meta.symbols, meta.open_time, meta.n_bars, meta.bar_seconds, next_bar=n,
                   last_seen=last_seen)

    # time helpers
    def bar_of(self, start_ms: int) -> int | None:
        """Bar index of a bar starting at ``start_ms``; None when off-grid or off-session."""
        idx, rem = divmod(int(start_ms) - self.open_ms, self.bar_ms)
        if rem or idx < 0 or idx >= self.n_bars:
            return None
        return int(idx)

    def bar_end_ms(self, bar: int) -> int:
        return self.open_ms + (bar + 1) * self.bar_ms

    def bar_start(self, bar: int) -> dt.datetime:
        return self.open_time + dt.timedelta(milliseconds=bar * self.bar_ms)

    def bars_over(self, now_ms: int) -> int:
        """How many bars of the session have ended at ``now_ms``."""
        return int(min(max((now_ms - self.open_ms) // self.bar_ms, 0), self.n_bars))

    @property
    def done(self) -> bool:
        return self.next_bar >= self.n_bars

    # input
    def add(self, agg: MinuteAgg) -> bool:
        """Buffer one aggregate; False (counted in ``dropped``) when it cannot be used."""
        s = self._index.get(agg.symbol)
        if s is None:
            self.dropped["unknown_symbol"] += 1
            return False
        values = agg.values()
        if not all(np.isfinite(v) for v in values):
            self.dropped["bad_value"] += 1
            return False
        bar = self.bar_of(agg.start_ms)
        if bar is None:
            self.dropped["outside_session"] += 1
            return False
        if bar < self.next_bar:
            self.dropped["late"] += 1
            return False
        row = self._rows.get(bar)
        if row is None:
            row = self._rows[bar] = np.full((len(self.symbols), 5), np.nan)
            self._seen[bar] = np.zeros(len(self.symbols), dtype=bool)
        row[s] = values
        self._seen[bar][s] = True
        if bar > self.last_seen[s]:
            self.last_seen[s] = bar
        return True

    def stream_subscribed(self, now_ms: int) -> None:
        """The stream covers the minute in progress at ``now_ms`` and every later one."""
        current = int(np.clip((now_ms - self.open_ms) // self.bar_ms, 0, self.n_bars))
        self.covered_from = max(self.next_bar, current)

    def stream_lost(self) -> None:
        self.covered_from = None

    def resolve(self, upto: int) -> None:
        """REST answered for every symbol for bars ``< upto``: those bars are final."""
        self.resolved_to = max(self.resolved_to, min(upto, self.n_bars))

    def rest_target(self, now_ms: int, rest_delay_ms: int) -> int:
        """Bars below this should come from REST now (over, and not covered by the stream)."""
        hi = self.bars_over(now_ms - rest_delay_ms)
        if self.covered_from is not None:
            hi = min(hi, self.covered_from)
        return hi

    def pop_ready(self, now_ms: int, grace_ms: int, give_up_to: int = 0) -> list[Published]:
        """Release every bar that is complete, in bar order, and advance ``next_bar``.

        Bars below ``give_up_to`` are released as they stand (the caller decides when REST
        has failed for too long).
        """
        out: list[Published] = []
        while self.next_bar < self.n_bars:
            b = self.next_bar
            end = self.bar_end_ms(b)
            seen = self._seen.get(b)
            if seen is not None and seen.all():
                how = "complete"
            elif b < self.resolved_to:
                how = "rest"
            elif (self.covered_from is not None and b >= self.covered_from
                  and now_ms >= end + grace_ms):
                how = "grace"
            elif b < give_up_to and now_ms >= end:
                how = "give_up"
            else:
                break
            row = self._rows.pop(b, None)
            seen = self._seen.pop(b, None)
            if row is None:
                row = np.full((len(self.symbols), 5), np.nan)
                seen = np.zeros(len(self.symbols), dtype=bool)
            missing = tuple(s for s, ok in zip(self.symbols, seen, strict=True) if not ok)
            out.append(Published(b, row, how, missing))
            self.next_bar += 1
        self.resolved_to = max(self.resolved_to, self.next_bar)
        return out


def stale_mask(last_seen: np.ndarray, published: int, stale_bars: int) -> np.ndarray:
    """True for symbols with no aggregate in the last ``stale_bars`` of ``published`` bars."""
    if stale_bars <= 0 or published < stale_bars:
        return np.zeros(len(last_seen), dtype=bool)
    return np.asarray(last_seen) < published - stale_bars


def backoff_delays(min_s: float, max_s: float, factor: float = 2.0):
    """Exponential delays ``min_s, 2*min_s, ...`` capped at ``max_s`` (with 10 % jitter)."""
    delay = min_s
    while True:
        yield delay * (0.9 + 0.2 * secrets.randbelow(1000) / 1000)
        delay = min(delay * factor, max_s)
