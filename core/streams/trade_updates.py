"""Alpaca's ``trade_updates`` stream -> FillEvents, one consumer process per account.

- A Redis lock (TTL, renewed by a thread) makes a second consumer for the same account refuse
  to start with ``StreamAlreadyRunning``; a consumer that loses its lock stops.
- Each event (new, fill, partial_fill, canceled, expired, rejected, replaced, ...) updates the
  consumer's view of the order; fills, partial fills and ends become ``FillEvent``s handed to
  ``callback`` (the caller passes ``core.execution.apply_fill_events`` bound to its runtime).
  "new"/"accepted" events produce no FillEvent: ``apply_fill_events`` would release the
  reservation of an order that has not filled yet. ``on_update`` (optional) sees every raw
  event.
- Reconnects use exponential backoff with jitter (``backoff_delay``), through alpaca-py's
  TradingStream loop (its ``_reconnect_delay`` hook): one reconnect layer.
- After every (re)connection the orders are reconciled by REST: Alpaca filters orders by
  submission time only, so the day's orders are listed (``AlpacaBroker.orders_since``) and an
  event is emitted for every order whose state moved since the consumer last saw it (a fill
  during the gap included). The first connection of a process reports today's finished
  orders once; ``apply_fill_events`` is idempotent.

Pure parts (``fill_event_from_update``, ``backoff_delay``, ``OrderStates``) need no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alpaca.trading.stream import TradingStream
from redis import Redis

from core.brokers.alpaca import AlpacaBroker, fill_event_of, order_from_alpaca
from core.brokers.base import TERMINAL, FillEvent, Order
from core.calendar import NY
from core.errors import ConfigError
from core.keys import Keys
from core.locks import ProcessLock

log = logging.getLogger(__name__)

_REPORTED = TERMINAL | {"partially_filled"}


# --- pure parts -------------------------------------------------------------------------------
def backoff_delay(attempt: int, base_s: float = 1.0, cap_s: float = 60.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnect ``attempt`` (1, 2, ...): exponential, capped, with
    "equal jitter": uniformly in [d/2, d] where d = min(cap, base * 2**(attempt-1))."""
    if attempt < 1:
        return 0.0
    d = min(cap_s, base_s * (2.0 ** min(attempt - 1, 62)))
    return d / 2 + rand() * d / 2


def order_of_update(update: Any) -> Order | None:
    """The order carried by a trade update (raw message, its ``data``, or a TradeUpdate)."""
    data = update.get("data", update) if isinstance(update, dict) else update
    raw = data.get("order") if isinstance(data, dict) else getattr(data, "order", None)
    if raw is None:
        return None
    return order_from_alpaca(raw)


def event_name(update: Any) -> str:
    data = update.get("data", update) if isinstance(update, dict) else update
    ev = data.get("event") if isinstance(data, dict) else getattr(data, "event", "")
    return str(getattr(ev, "value", ev) or "")


def fill_event_from_update(update: Any) -> FillEvent | None:
    """The FillEvent a trade update stands for, or None (new/accepted/pending: nothing
    filled or ended). The order in the event carries its totals so far."""
    order = order_of_update(update)
    if order is None or order.status not in _REPORTED:
        return None
    return fill_event_of(order)


@dataclass
class OrderStates:
    """The last (status, filled qty) seen per client_order_id; says which changes are news.

    A change is news when shares filled since, or the order reached an end it had not;
    stale or repeated updates (an event replayed after a reconcile) are not.
    """

    seen: dict[str, tuple[str, int]] = field(default_factory=dict)

    def news(self, order: Order) -> bool:
        before = self.seen.get(order.client_order_id)
        if before is None:
            return True
        status, filled = before
        if status in TERMINAL:
            return False
        return order.filled_qty > filled or (order.status in TERMINAL)

    def record(self, order: Order) -> None:
        before = self.seen.get(order.client_order_id)
        if before is not None and before[0] in TERMINAL:
            return
        if before is not None and order.filled_qty < before[1]:
            return
        self.seen[order.client_order_id] = (order.status, order.filled_qty)


# --- the lock ---------------------------------------------------------------------------------
class StreamAlreadyRunning(ConfigError):
    """Another consumer holds this account's trade_updates lock."""


class StreamLock(ProcessLock):
    """The account's consumer lock (one consumer per account)."""

    def acquire(self) -> None:
        """Take the lock or raise StreamAlreadyRunning naming the holder."""
        if self.try_acquire():
            return
        holder, ttl = self.holder()
        raise StreamAlreadyRunning(
            f"a trade_updates consumer for this account is already running "
            f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}; lock {self.key}, "
            f"expires in {ttl / 1000:.0f}s unless renewed): refusing to start a second one")


def account_tag(api_key: str, paper: bool) -> str:
    """A stable, non-secret name for the account behind ``api_key``."""
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:12]
    return f"{'paper' if paper else 'live'}-{digest}"


# --- the consumer -----------------------------------------------------------------------------
class _Stream(TradingStream):
    """alpaca-py's TradingStream with our backoff and a hook after each connection."""

    def __init__(self, owner: TradeUpdatesConsumer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _reconnect_delay(self, retries: int) -> float:
        delay = self._owner.backoff(retries)
        self._owner.reconnect_delays.append(delay)
        return delay

    async def _start_ws(self) -> None:
        await super()._start_ws()
        await self._owner._connected()


class TradeUpdatesConsumer:
    """Consume one account's trade_updates; see the module docstring."""

    def __init__(self, redis: Redis, keys: Keys, broker: AlpacaBroker, api_key: str,
                 secret_key: str, callback: Callable[[list[FillEvent]], None], *,
                 paper: bool = True, url_override: str | None = None,
                 lock_ttl_s: float = 30.0, backoff_base_s: float = 1.0,
                 backoff_cap_s: float = 60.0,
                 on_update: Callable[[dict[str, Any]], None] | None = None,
                 now: Callable[[], dt.datetime] | None = None) -> None:
        self.broker = broker
        self.callback = callback
        self.on_update = on_update
        self.lock = StreamLock(redis, keys.k(
            f"lock:stream:trade_updates:{account_tag(api_key, paper)}"), lock_ttl_s)
        self._stream = _Stream(self, api_key, secret_key, paper=paper, raw_data=True,
                               url_override=url_override)
        self._stream.subscribe_trade_updates(self._on_message)
        self._base = backoff_base_s
        self._cap = backoff_cap_s
        self._now = now or (lambda: dt.datetime.now(NY))
        self.states = OrderStates()
        self.last_event_at: dt.datetime | None = None
        self.connections = 0
        self.reconciles = 0
        self.reconnect_delays: list[float] = []
        self.emitted: list[FillEvent] = []
        self._dirty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewer: threading.Thread | None = None
        self.lost_lock = False
        self.error: BaseException | None = None

    @classmethod
    def from_settings(cls, settings: Any, redis: Redis, keys: Keys, broker: AlpacaBroker,
                      callback: Callable[[list[FillEvent]], None],
                      url_override: str | None = None) -> TradeUpdatesConsumer:
        if settings.alpaca_api_key is None or settings.alpaca_secret_key is None:
            raise ConfigError("TRADING_ALPACA_API_KEY and TRADING_ALPACA_SECRET_KEY are needed")
        return cls(redis, keys, broker, settings.alpaca_api_key.get_secret_value(),
                   settings.alpaca_secret_key.get_secret_value(), callback,
                   paper=settings.mode != "live", url_override=url_override)

    def backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._base, self._cap)

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> None:
        """Take the lock and consume until stopped (blocks; the process's main loop)."""
        self.lock.acquire()
        self._start_renewer()
        try:
            self._stream.run()
        finally:
            self._stop.set()
            self.lock.release()

    def start(self) -> None:
        """Take the lock (raising StreamAlreadyRunning) and consume in a background thread."""
        self.lock.acquire()
        self._start_renewer()

        def body() -> None:
            try:
                self._stream.run()
            except BaseException as exc:  # surfaced to the owner through .error
                self.error = exc
                log.exception("trade_updates consumer crashed")
            finally:
                self._stop.set()
                self.lock.release()

        self._thread = threading.Thread(target=body, name="trade-updates", daemon=True)
        self._thread.start()

    def _halt(self, timeout: float | None) -> None:
        """Tell the stream loop to end and close its socket (wakes a pending recv at once)."""
        s = self._stream
        loop = s._loop
        if loop is None or not loop.is_running():
            return

        async def halt() -> None:
            await s.stop_ws()
            await s.close()

        fut = asyncio.run_coroutine_threadsafe(halt(), loop)
        if timeout is not None:
            with contextlib.suppress(Exception):
                fut.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming and release the lock."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        # TradingStream resets its stop flag while it starts: ask until the thread is gone
        while True:
            self._halt(min(1.0, timeout))
            if self._thread is None:
                break
            self._thread.join(0.2)
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                break
        if self._renewer is not None:
            self._renewer.join(timeout)
        self.lock.release()

    def _start_renewer(self) -> None:
        period = max(self.lock.ttl_ms / 3000.0, 0.05)

        def renew() -> None:
            while not self._stop.wait(period):
                try:
                    ok = self.lock.renew()
                except Exception:
                    log.exception("cannot renew the trade_updates lock")
                    continue
                if not ok:
                    self.lost_lock = True
                    log.error("trade_updates lock lost: stopping this consumer",
                              extra={"lock": self.lock.key})
                    self._stop.set()
                    self._halt(None)
                    return

        self._renewer = threading.Thread(target=renew, name="trade-updates-lock", daemon=True)
        self._renewer.start()

    # -- events -----------------------------------------------------------------------------
    async def _connected(self) -> None:
        self.connections += 1
        log.info("trade_updates connected", extra={"connections": self.connections})
        await asyncio.to_thread(self._reconcile_safely)

    async def _on_message(self, msg: dict[str, Any]) -> None:
        await asyncio.to_thread(self.handle_update, msg)

    def handle_update(self, msg: dict[str, Any]) -> list[FillEvent]:
        """Process one raw trade_updates message (runs off the event loop)."""
        if self._dirty:
            self._reconcile_safely()
        if self.on_update is not None:
            try:
                self.on_update(msg)
            except Exception:
                log.exception("on_update failed")
        order = order_of_update(msg)
        if order is None:
            return []
        data = msg.get("data", msg)
        ts = data.get("timestamp") if isinstance(data, dict) else None
        if ts:
            with contextlib.suppress(ValueError):
                self.last_event_at = dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
        events = []
        if order.status in _REPORTED and self.states.news(order):
            events.append(fill_event_of(order))
        if not self._deliver(events):
            return []
        self.states.record(order)
        return events

    def _deliver(self, events: list[FillEvent]) -> bool:
        if not events:
            return True
        try:
            self.callback(events)
        except Exception:
            log.exception("fill callback failed; the next event or connection reconciles")
            self._dirty = True
            return False
        self.emitted.extend(events)
        return True

    def _reconcile_safely(self) -> None:
        try:
            self.reconcile()
        except Exception:
            log.exception("reconcile by REST failed; retried with the next event")
            self._dirty = True

    def reconcile(self) -> list[FillEvent]:
        """Emit what changed since last seen, from the day's orders (REST)."""
        day_start = dt.datetime.combine(self._now().astimezone(NY).date(), dt.time(0),
                                        tzinfo=NY)
        orders = self.broker.orders_since(day_start - dt.timedelta(microseconds=1))
        news = [o for o in orders if o.status in _REPORTED and self.states.news(o)]
        events = [fill_event_of(o) for o in news]
        if not self._deliver(events):
            return []
        for o in orders:
            self.states.record(o)
        self._dirty = False
        self.reconciles += 1
        if events:
            log.info("reconcile reported %d order changes", len(events))
        return events


def main() -> int:
    """The ``stream`` process (paper/live): Alpaca's trade_updates applied to the limit store
    (reservations follow what really filled). Exits 2 with a clear message in sim mode or
    when another consumer holds the account."""
    import sys

    from core.config import load_settings
    from core.execution import apply_fill_events
    from core.runtime import build_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        settings = load_settings()
        if settings.mode == "sim":
            raise ConfigError("the trade_updates stream runs in paper/live mode only "
                              "(TRADING_MODE=sim fills orders in the simulated broker)")
        rt = build_runtime(settings)
        consumer = TradeUpdatesConsumer.from_settings(
            settings, rt.redis, rt.keys, rt.broker,  # type: ignore[arg-type]
            lambda events: apply_fill_events(rt, events),
            url_override=settings.alpaca_trading_stream_url)
        consumer.run()
    except ConfigError as exc:
        print(f"daytrader stream: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
