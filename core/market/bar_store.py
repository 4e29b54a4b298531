"""The Redis bar store: one session's bars for the whole universe under one key.

Each bar is one row of ``S x 5`` little-endian float64 (open, high, low, close, volume; US
dollars and shares; NaN where a symbol has no bar), appended to ``bars:<date>``. A reader
fetches only the bytes it has not seen (one GETRANGE), so a tick costs one round trip
whatever the length of the window. Each appended row is also published
(``<date>:<bar>:<row>`` on ``Keys.bars_channel``): the scoring worker's ``BarListener``
puts it in its window as it arrives, so scoring usually finds its bar already there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from redis import Redis

from core.keys import Keys

log = logging.getLogger(__name__)

_DTYPE = np.dtype("<f8")
_TTL_S = 4 * 24 * 3600

# Append a row only at its own offset, so a repeated publish of the same bar is a no-op.
_APPEND_LUA = """
local len = redis.call('STRLEN', KEYS[1])
local off = tonumber(ARGV[1])
if len == off then
  redis.call('APPEND', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. ':' .. ARGV[6] .. ':' .. ARGV[2])
  return off + string.len(ARGV[2])
end
return -len
"""


@dataclass(frozen=True)
class SessionMeta:
    """Shape and times of one session in the store (America/New_York times)."""

    date: dt.date
    symbols: tuple[str, ...]
    open_time: dt.datetime
    close_time: dt.datetime
    bar_seconds: int

    @property
    def n_bars(self) -> int:
        """Bars in the session."""
        return int((self.close_time - self.open_time).total_seconds()) // self.bar_seconds

    @property
    def row_bytes(self) -> int:
        """Bytes per stored bar row."""
        return len(self.symbols) * 5 * _DTYPE.itemsize

    def bar_time(self, index: int) -> dt.datetime:
        """Start of bar ``index``."""
        return self.open_time + dt.timedelta(seconds=index * self.bar_seconds)

    def to_json(self) -> str:
        """Serialise for storage."""
        return json.dumps({
            "date": self.date.isoformat(), "symbols": list(self.symbols),
            "open_time": self.open_time.isoformat(), "close_time": self.close_time.isoformat(),
            "bar_seconds": self.bar_seconds,
        })

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionMeta:
        """Parse stored metadata."""
        d = json.loads(raw)
        return cls(
            date=dt.date.fromisoformat(d["date"]), symbols=tuple(d["symbols"]),
            open_time=dt.datetime.fromisoformat(d["open_time"]),
            close_time=dt.datetime.fromisoformat(d["close_time"]),
            bar_seconds=int(d["bar_seconds"]),
        )


def row_to_bytes(row: np.ndarray) -> bytes:
    """Encode one ``[S, 5]`` bar row for the store."""
    return np.ascontiguousarray(row, dtype=_DTYPE).tobytes()


def rows_from_bytes(raw: bytes, n_symbols: int) -> np.ndarray:
    """Decode stored rows into ``[n, S, 5]`` float64."""
    arr = np.frombuffer(raw, dtype=_DTYPE)
    return arr.reshape(-1, n_symbols, 5)


class RedisBarStore:
    """Session bars in Redis, appended one bar at a time by the feed (or the replay)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._r = redis
        self._keys = keys
        self._append = redis.register_script(_APPEND_LUA)
        self._meta: dict[dt.date, SessionMeta] = {}

    def start_session(self, meta: SessionMeta) -> None:
        """Record the session's symbols and times (idempotent)."""
        self._r.set(self._keys.bars_meta(meta.date), meta.to_json(), ex=_TTL_S)
        self._meta[meta.date] = meta

    def meta(self, day: dt.date) -> SessionMeta | None:
        """Metadata of a session, or None if it was never started."""
        if day in self._meta:
            return self._meta[day]
        raw = self._r.get(self._keys.bars_meta(day))
        if raw is None:
            return None
        meta = SessionMeta.from_json(raw)
        self._meta[day] = meta
        return meta

    def append(self, day: dt.date, bar: int, row: np.ndarray) -> bool:
        """Store bar ``bar``; True if written, False if it was already there."""
        meta = self.meta(day)
        if meta is None:
            raise ValueError(f"session {day} not started in the bar store")
        data = row_to_bytes(row)
        if len(data) != meta.row_bytes:
            raise ValueError(f"row has {len(data)} bytes, expected {meta.row_bytes}")
        res = int(self._append(keys=[self._keys.bars(day)],
                               args=[bar * meta.row_bytes, data, _TTL_S,
                                     self._keys.bars_channel(), day.isoformat(), bar]))
        if res < 0 and -res < bar * meta.row_bytes:
            raise ValueError(f"bar {bar} of {day} published before bar {-res // meta.row_bytes}")
        return res > 0

    def count(self, day: dt.date) -> int:
        """How many bars of ``day`` are in the store (0 when none or no session)."""
        meta = self.meta(day)
        if meta is None:
            return 0
        return int(self._r.strlen(self._keys.bars(day))) // meta.row_bytes

    def read(self, day: dt.date, start_bar: int = 0) -> np.ndarray:
        """Bars from ``start_bar`` to the newest as ``[n, S, 5]`` (one round trip)."""
        meta = self.meta(day)
        if meta is None:
            raise ValueError(f"session {day} not started in the bar store")
        raw = self._r.getrange(self._keys.bars(day), start_bar * meta.row_bytes, -1)
        usable = len(raw) - len(raw) % meta.row_bytes
        return rows_from_bytes(raw[:usable], len(meta.symbols))


class BarWindow:
    """A per-process cache of one session's bars that reads only new rows from the store."""

    def __init__(self, store: RedisBarStore) -> None:
        self._store = store
        self._day: dt.date | None = None
        self._meta: SessionMeta | None = None
        self._buf = np.empty((0, 0, 5))
        self._n = 0
        self._lock = threading.Lock()  # ``deliver`` runs in the listener's thread
        self.delivered = 0  # rows that arrived by ``deliver`` (a gauge for tests and status)
        self.generation = 0  # counts the sessions started: what was derived from a window
        # of an older generation does not describe this one

    def get(self, day: dt.date, upto_bar: int) -> tuple[SessionMeta, np.ndarray]:
        """Bars ``0..upto_bar`` of ``day`` as ``[upto_bar + 1, S, 5]`` (a view; do not modify)."""
        meta = self._store.meta(day)
        if meta is None:
            raise ValueError(f"session {day} not started in the bar store")
        with self._lock:
            if self._day != day:
                self._start(meta)
            if self._n <= upto_bar:
                new = self._store.read(day, self._n)
                take = min(len(new), meta.n_bars - self._n)
                self._buf[self._n:self._n + take] = new[:take]
                self._n += take
            if self._n <= upto_bar:
                raise ValueError(f"bar {upto_bar} of {day} is not in the store yet "
                                 f"(have {self._n})")
            return meta, self._buf[: upto_bar + 1]

    def _start(self, meta: SessionMeta) -> None:
        self._day, self._meta = meta.date, meta
        self.generation += 1
        # field-major storage seen through a [T, S, 5] view: window[:, :, CLOSE] and the
        # other fields are contiguous [T, S] arrays, which the rules read fastest
        self._buf = np.full((5, meta.n_bars, len(meta.symbols)), np.nan).transpose(1, 2, 0)
        self._n = 0

    def deliver(self, day: dt.date, bar: int, raw: bytes) -> bool:
        """Take a published row: kept when it is the next bar of the session this window
        holds (else ignored: ``get`` reads what is missing from the store). True if kept."""
        with self._lock:
            meta = self._meta
            if meta is None or day != self._day or bar != self._n or bar >= meta.n_bars \
                    or len(raw) != meta.row_bytes:
                return False
            self._buf[bar] = rows_from_bytes(raw, len(meta.symbols))[0]
            self._n += 1
            self.delivered += 1
            return True


class FillsMark:
    """The newest fills-done mark pushed to this process (``<date>:<bar>`` on the fills
    channel, published by the tick in the transaction that sets the mark): lets scoring
    wait for its bar's fills without polling Redis. A hint only: the mark in Redis stays
    the authority. ``live``: a listener is subscribed (else nothing arrives here)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._last: tuple[dt.date, int] | None = None
        self.live = False

    def push(self, day: dt.date, bar: int) -> None:
        """Record that bar ``bar`` of ``day`` has its fills applied; wakes the waiters."""
        with self._cond:
            if self._last is None or (day, bar) > self._last:
                self._last = (day, bar)
            self._cond.notify_all()

    def seen(self, day: dt.date, bar: int) -> bool:
        """Whether a mark at or after bar ``bar`` of ``day`` arrived."""
        last = self._last
        return last is not None and last >= (day, bar)

    def wait(self, day: dt.date, bar: int, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for bar ``bar``'s mark; True when it arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: self.seen(day, bar), timeout_s)


class BarListener:
    """A thread that subscribes to the published bars and hands each to a ``BarWindow``
    (the scoring worker starts one after the fork), then calls ``on_bar(day, bar)`` with
    each row it kept (scoring's work on the bars alone starts there, before the score task
    arrives; ``on_bar`` must not raise); with ``fills``, it also passes on the fills-done
    marks as they are set (``FillsMark``), and with ``on_positions`` the simulated broker's
    positions pushes (``SimulatedBroker.apply_pushed``). Best effort: a row it misses, or
    one that comes late, is read from the store by ``BarWindow.get``; a broken connection
    is opened again after a second."""

    def __init__(self, redis: Redis, keys: Keys, window: BarWindow,
                 on_bar: Callable[[dt.date, int], None] | None = None,
                 fills: FillsMark | None = None,
                 on_positions: Callable[[bytes], object] | None = None) -> None:
        self._r = redis
        self._window = window
        self._on_bar = on_bar
        self._fills = fills
        # channel -> handler; the positions pushes come before the fills mark they
        # precede (one connection delivers in publish order)
        self._handlers: dict[str, Callable[[bytes], object]] = {
            keys.bars_channel(): self._take, keys.fills_channel(): self._take_mark}
        if on_positions is not None:
            self._handlers[keys.positions_channel()] = on_positions
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bar-listener", daemon=True)

    def start(self) -> BarListener:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(*self._handlers)
                self.subscribed.set()
                if self._fills is not None:
                    self._fills.live = True
                handlers = {ch.encode(): fn for ch, fn in self._handlers.items()}
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None or msg.get("type") != "message":
                        continue
                    handler = handlers.get(msg["channel"])
                    if handler is None:
                        continue
                    try:
                        handler(msg["data"])
                    except Exception:  # one bad message; the store still has it all
                        log.exception("published message not taken",
                                      extra={"channel": msg["channel"]})
            except Exception:  # the store stays the source: scoring reads what it misses
                log.warning("bar listener lost its connection; subscribing again",
                            exc_info=True)
                self._stop.wait(1.0)
            finally:
                self.subscribed.clear()
                if self._fills is not None:
                    self._fills.live = False  # waiters poll Redis meanwhile
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def _take_mark(self, data: bytes) -> None:
        if self._fills is None:
            return
        got = _day_bar(data, "fills mark")
        if got is not None:
            self._fills.push(*got[:2])

    def _take(self, data: bytes) -> None:
        got = _day_bar(data, "bar")
        if got is None:
            return
        day, bar, raw = got
        if self._window.deliver(day, bar, raw) and self._on_bar is not None:
            self._on_bar(day, bar)


def _day_bar(data: bytes, what: str) -> tuple[dt.date, int, bytes] | None:
    """``<date>:<bar>[:<rest>]`` as published: (day, bar, rest); None (logged) when it is
    not understood."""
    date_s, _, rest = data.partition(b":")
    bar_s, _, raw = rest.partition(b":")
    try:
        return dt.date.fromisoformat(date_s.decode()), int(bar_s), raw
    except ValueError:
        log.warning("published %s not understood", what, extra={"head": data[:32]})
        return None
