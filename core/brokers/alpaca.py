"""The Broker role over Alpaca's trading API (paper or live), through alpaca-py's TradingClient.

What this adapter guarantees on top of alpaca-py:
- every HTTP call has a timeout (alpaca-py's ``requests.Session`` has none): connect and each
  read are bounded by ``timeout_s``; a timeout or a dropped connection raises
  ``BrokerUnavailable``;
- exactly one retry layer: alpaca-py's own retry of 429/504 (3 tries, 3 s sleeps, POST too) is
  switched off, so one call here is one HTTP request; Celery retries ``TransientError``s
  with backoff and the retry starts with the lookup by client_order_id;
- every call first takes a token from the shared Redis bucket (``core.ratelimit``); exits,
  closes and cancels take the "exit" kind, which may use the share entries may not touch;
  a 429 empties the bucket for every process for ``penalty_s``;
- Alpaca's answers become the project's errors (``map_api_error``) and types (``Order``,
  ``Position``, ``FillEvent``); business refusals of ``submit_order`` come back as an Order
  with status "rejected" and a clear ``status_reason`` (as the simulated broker does, so the
  execution layer releases the reservation); ``place_order`` raises them instead.

Alpaca does not store our intent, strategy or reason: intent and strategy are read back from
the deterministic client_order_id (``orb-AAPL-20240603-0945-L`` entries, ``…-x1`` exits); any
other id (an OTO stop leg, an order placed by hand) counts as an exit. An exit's reason
(peak, trough, stop_loss, eod, flatten, ...) cannot go into its id (the same id must come
out of every path that closes that position, so the broker refuses a second close), and an
order has no free-text field: it is written to Redis by client_order_id (``ExitReasons``)
just before the close is sent, and read back by ``trades``. A position's entry
order is the latest filled entry of today with the position's side; a position without one
(opened by hand or on an earlier day) gets ``session_date=""``, so the decision step closes
it as stale.

Money: Decimal prices, integer cents, whole shares; times America/New_York.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, TypeVar

import requests
from alpaca.common.enums import Sort
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, QueryOrderStatus, TimeInForce
from alpaca.trading.requests import (
    GetCalendarRequest,
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    StopLossRequest,
    StopOrderRequest,
)
from pydantic import ValidationError
from redis import Redis

from core.brokers.alpaca_ledger import ExitReasons, realized_cents, round_trips
from core.brokers.alpaca_mapping import (
    _FAILED,
    _PAGE,
    ENTRY_ID,
    EXIT_ID,
    AccountInfo,
    MarketClock,
    SessionDay,
    _cents_of,
    _dec,
    _dstr,
    _get,
    _NotFound,
    _val,
    fill_event_of,
    harden_client,
    intent_of,
    map_api_error,
    order_from_alpaca,
)
from core.brokers.base import FillEvent, Order, OrderRequest, Position
from core.calendar import NY
from core.errors import (
    BrokerUnavailable,
    ConfigError,
    DuplicateOrder,
    OrderRejected,
    RateLimited,
    TransientError,
)
from core.money import cents
from core.ratelimit import Kind, RedisTokenBucket

log = logging.getLogger(__name__)
T = TypeVar("T")


# --- the adapter ------------------------------------------------------------------------------
class AlpacaBroker:
    """The Broker protocol over Alpaca (see the module docstring)."""

    def __init__(self, api_key: str, secret_key: str, *, paper: bool = True,
                 url_override: str | None = None, timeout_s: float = 10.0,
                 limiter: RedisTokenBucket | None = None, penalty_s: float = 2.0,
                 cancel_wait_s: float = 3.0, poll_s: float = 0.1,
                 client: TradingClient | None = None,
                 now: Callable[[], dt.datetime] | None = None,
                 reasons: ExitReasons | None = None) -> None:
        self.paper = paper
        self.timeout_s = timeout_s
        self._client = harden_client(
            client or TradingClient(api_key, secret_key, paper=paper, url_override=url_override),
            timeout_s)
        self._limiter = limiter
        self._penalty_s = penalty_s
        self._cancel_wait_s = cancel_wait_s
        self._poll_s = poll_s
        self._now = now or (lambda: dt.datetime.now(NY))
        self._clock: MarketClock | None = None
        self._assets: dict[str, tuple[float, Any]] = {}
        self._reasons = reasons

    @classmethod
    def from_settings(cls, settings: Any, limiter: RedisTokenBucket | None = None,
                      url_override: str | None = None,
                      redis: Redis | None = None) -> AlpacaBroker:
        """The adapter for TRADING_MODE=paper|live (live only with mode == "live"). Exit
        reasons are kept in ``redis`` (default: a client on ``settings.redis_url``)."""
        if settings.mode not in ("paper", "live"):
            raise ConfigError(f"AlpacaBroker needs TRADING_MODE paper or live, not {settings.mode}")
        if settings.alpaca_api_key is None or settings.alpaca_secret_key is None:
            raise ConfigError("TRADING_ALPACA_API_KEY and TRADING_ALPACA_SECRET_KEY are needed")
        if redis is None:
            from core.runtime import connect_redis

            redis = connect_redis(settings.redis_url, str(settings.redis_ca_file)
                                  if getattr(settings, "redis_ca_file", None) else None)
        return cls(settings.alpaca_api_key.get_secret_value(),
                   settings.alpaca_secret_key.get_secret_value(),
                   paper=settings.mode == "paper", url_override=url_override,
                   timeout_s=settings.broker_timeout_s, limiter=limiter,
                   reasons=ExitReasons(redis))

    @property
    def client(self) -> TradingClient:
        """The hardened alpaca-py client (for tests and tools)."""
        return self._client

    # -- one HTTP call ------------------------------------------------------------------------
    def _call(self, kind: Kind, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Take a token, make one request, map its failure."""
        if self._limiter is not None:
            self._limiter.acquire(kind)
        try:
            return fn(*args, **kwargs)
        except APIError as exc:
            err = map_api_error(exc, what)
            if isinstance(err, RateLimited) and self._limiter is not None:
                self._limiter.penalize(self._penalty_s)
            raise err from exc
        except requests.Timeout as exc:
            raise BrokerUnavailable(
                f"{what}: no answer from Alpaca within {self.timeout_s:g}s") from exc
        except requests.RequestException as exc:
            raise BrokerUnavailable(f"{what}: cannot reach Alpaca: {exc}") from exc
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            raise BrokerUnavailable(f"{what}: unreadable answer from Alpaca: {exc}") from exc

    def _maybe(self, kind: Kind, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Like _call, None on 404."""
        try:
            return self._call(kind, what, fn, *args)
        except _NotFound:
            return None

    # -- account, clock, calendar ---------------------------------------------------------------
    def account(self) -> AccountInfo:
        """The account: buying power, equity, PDT state (cents)."""
        a = self._call("entry", "get account", self._client.get_account)
        status = _val(a.status).upper()
        return AccountInfo(
            status=status, buying_power_cents=_cents_of(a.buying_power),
            daytrading_buying_power_cents=_cents_of(a.daytrading_buying_power),
            cash_cents=_cents_of(a.cash), equity_cents=_cents_of(a.equity),
            last_equity_cents=_cents_of(a.last_equity),
            pattern_day_trader=bool(a.pattern_day_trader),
            daytrade_count=int(a.daytrade_count or 0),
            shorting_enabled=bool(a.shorting_enabled),
            blocked=bool(a.trading_blocked or a.account_blocked or a.trade_suspended_by_user)
            or status not in ("ACTIVE", ""),
            multiplier=int(_dec(a.multiplier) or 1))

    def clock(self, fresh: bool = False) -> MarketClock:
        """The broker's clock; reused while its next open/close has not passed."""
        c = self._clock
        now = self._now()
        if c is not None and not fresh and now < (c.next_close if c.is_open else c.next_open):
            return c
        raw = self._call("entry", "get clock", self._client.get_clock)
        c = self._clock = MarketClock(raw.timestamp.astimezone(NY), bool(raw.is_open),
                                      raw.next_open.astimezone(NY),
                                      raw.next_close.astimezone(NY))
        return c

    def calendar(self, start: dt.date, end: dt.date) -> list[SessionDay]:
        """Trading days between start and end (inclusive), early closes included."""
        days = self._call("entry", "get calendar", self._client.get_calendar,
                          GetCalendarRequest(start=start, end=end))
        return [SessionDay(d.date, d.open.replace(tzinfo=NY), d.close.replace(tzinfo=NY))
                for d in days]

    def _asset(self, symbol: str) -> Any | None:
        hit = self._assets.get(symbol)
        if hit is not None and time.monotonic() - hit[0] < 300:
            return hit[1]
        asset = self._maybe("entry", f"get asset {symbol}", self._client.get_asset, symbol)
        self._assets[symbol] = (time.monotonic(), asset)
        return asset

    # -- orders -----------------------------------------------------------------------------
    def _alpaca_request(self, request: OrderRequest) -> Any:
        side = OrderSide.BUY if request.side == "buy" else OrderSide.SELL
        if request.qty <= 0 or int(request.qty) != request.qty:
            raise OrderRejected("quantity must be a positive whole number of shares")
        tif = TimeInForce.IOC if request.time_in_force == "ioc" else TimeInForce.DAY
        common: dict[str, Any] = {"symbol": request.symbol, "qty": int(request.qty),
                                  "side": side, "client_order_id": request.client_order_id}
        order_type = str(request.order_type)
        if order_type == "stop":
            if request.stop_price is None:
                raise OrderRejected("stop order needs a stop price")
            return StopOrderRequest(**common, time_in_force=tif,
                                    stop_price=float(_tick(request.stop_price, request.side)))
        if request.stop_price is not None:  # protective stop attached: OTO entry
            if tif == TimeInForce.IOC:
                # Alpaca takes OTO/bracket orders only as day or gtc
                log.warning("OTO entry sent as DAY (Alpaca refuses IOC with legs)",
                            extra={"client_order_id": request.client_order_id})
                tif = TimeInForce.DAY
            common["order_class"] = OrderClass.OTO
            common["stop_loss"] = StopLossRequest(
                stop_price=float(_tick(request.stop_price, request.side)))
        if order_type == "limit":
            if request.limit_price is None:
                raise OrderRejected("limit order needs a limit price")
            return LimitOrderRequest(**common, time_in_force=tif,
                                     limit_price=float(_tick(request.limit_price, request.side)))
        if order_type != "market":
            raise OrderRejected(f"unsupported order type {order_type}")
        return MarketOrderRequest(**common, time_in_force=tif)

    def place_order(self, request: OrderRequest) -> Order:
        """Submit once; raises the mapped errors (DuplicateOrder, InsufficientBuyingPower,
        OrderRejected, RateLimited, BrokerUnavailable)."""
        data = self._alpaca_request(request)
        kind: Kind = "exit" if request.intent == "exit" or request.close else "entry"
        if kind == "exit" and request.reason and self._reasons is not None:
            # before the send: an answer lost after Alpaca accepted must not lose the reason
            self._reasons.put(request.client_order_id, request.reason)
        raw = self._call(kind, f"submit {request.client_order_id}",
                         self._client.submit_order, data)
        return _with_request(order_from_alpaca(raw), request)

    def submit_order(self, request: OrderRequest) -> Order:
        """Submit once. DuplicateOrder and transient errors raise; other refusals come back as
        an Order with status "rejected" (Alpaca keeps no record of it)."""
        try:
            return self.place_order(request)
        except (DuplicateOrder, TransientError, ConfigError):
            raise
        except OrderRejected as exc:
            log.warning("order refused by Alpaca: %s", exc,
                        extra={"client_order_id": request.client_order_id})
            now = self._now().isoformat()
            return Order(
                client_order_id=request.client_order_id, symbol=request.symbol,
                side=request.side, qty=int(request.qty), order_type=request.order_type,
                limit_price=request.limit_price, time_in_force=request.time_in_force,
                intent=request.intent, close=request.close, reason=request.reason,
                strategy=request.strategy, confidence=request.confidence, status="rejected",
                session_date=now[:10], submitted_at=now, status_reason=str(exc),
                stop_price=request.stop_price)

    def get_order_by_client_id(self, client_order_id: str) -> Order | None:
        """The order with this client_order_id, or None."""
        raw = self._maybe("exit", f"lookup {client_order_id}",
                          self._client.get_order_by_client_id, client_order_id)
        return order_from_alpaca(raw) if raw is not None else None

    def _order_by_id(self, order_id: Any) -> Order | None:
        raw = self._maybe("exit", f"get order {order_id}", self._client.get_order_by_id,
                          order_id)
        return order_from_alpaca(raw) if raw is not None else None

    def _cancel_raw(self, order_id: Any, what: str) -> Order | None:
        """Ask Alpaca to cancel and wait (briefly) until the order is done."""
        try:
            self._call("exit", f"cancel {what}", self._client.cancel_order_by_id, order_id)
        except _NotFound:
            return None
        except OrderRejected as exc:  # 422 "order is not cancelable": it ended meanwhile
            log.info("cancel refused: %s", exc, extra={"order": what})
        deadline = time.monotonic() + self._cancel_wait_s
        while True:
            order = self._order_by_id(order_id)
            if order is None or order.status not in ("accepted", "partially_filled") \
                    or time.monotonic() >= deadline:
                return order
            time.sleep(self._poll_s)

    def cancel_order(self, client_order_id: str) -> Order | None:
        """Cancel a working order; returns the order as it ends up (None if unknown). An order
        whose cancel is still pending after ``cancel_wait_s`` comes back still working."""
        raw = self._maybe("exit", f"lookup {client_order_id}",
                          self._client.get_order_by_client_id, client_order_id)
        if raw is None:
            return None
        order = order_from_alpaca(raw)
        if order.status not in ("accepted", "partially_filled"):
            return order
        return self._cancel_raw(raw.id, client_order_id)

    def cancel_all_orders(self) -> int:
        """Cancel every open order of the account (kill switch); returns how many."""
        out = self._call("exit", "cancel all orders", self._client.cancel_orders)
        return len(out or [])

    def _orders(self, status: QueryOrderStatus, after: dt.datetime | None = None,
                symbols: list[str] | None = None, kind: Kind = "entry") -> list[Any]:
        """Orders (alpaca-py models), legs listed as orders of their own, oldest first, every
        page (Alpaca pages by submission time, 500 at most)."""
        out: list[Any] = []
        seen: set[str] = set()
        cursor = after
        while True:
            req = GetOrdersRequest(status=status, limit=_PAGE, direction=Sort.ASC,
                                   after=cursor, symbols=symbols)
            page = self._call(kind, "list orders", self._client.get_orders, req)
            fresh = 0
            for o in page:
                for x in [o, *(o.legs or [])]:
                    if str(x.id) not in seen:
                        seen.add(str(x.id))
                        out.append(x)
                        fresh += 1
            if len(page) < _PAGE or not fresh:
                return out
            last = page[-1].submitted_at or page[-1].created_at
            cursor = last - dt.timedelta(microseconds=1)

    def _day_start(self, day: dt.date | None = None) -> dt.datetime:
        d = day or self._now().astimezone(NY).date()
        return dt.datetime.combine(d, dt.time(0, 0), tzinfo=NY)

    def list_open_orders(self) -> list[Order]:
        """Our working orders (entries and exits with our ids), oldest first. Protective stop
        legs are not listed: they show on the position as ``stop_price``."""
        raws = self._orders(QueryOrderStatus.OPEN, kind="exit")
        orders = [order_from_alpaca(o) for o in raws]
        return [o for o in orders if o.status in ("accepted", "partially_filled")
                and _ours(o.client_order_id)]

    def orders_since(self, since: dt.datetime) -> list[Order]:
        """Every order submitted after ``since`` (legs included), oldest first."""
        return [order_from_alpaca(raw)
                for raw in self._orders(QueryOrderStatus.ALL, after=since, kind="exit")]

    def all_orders(self, day: dt.date | None = None) -> list[Order]:
        """Every order submitted on ``day`` (New York date; default today), legs included."""
        start = self._day_start(day)
        return [o for o in self.orders_since(start - dt.timedelta(microseconds=1))
                if day is None or o.session_date == day.isoformat()]

    def order_log(self, day: dt.date | None = None) -> list[str]:
        """client_order_ids of the day's orders in submission order."""
        return [o.client_order_id for o in self.all_orders(day) if _ours(o.client_order_id)]

    def trades(self, day: dt.date | None = None) -> list[dict[str, object]]:
        """Round trips of the day (default today) in the simulated broker's trade format:
        each filled entry of ours paired with its filled exits (``<entry id>-x<n>`` and the
        protective stop leg ``-s``). The exit reason is the one recorded when the close was
        sent (``ExitReasons``): "broker_stop" for a stop order, "exit" when none was recorded
        (no store, or an exit sent by hand). No fees (Alpaca charges no commission on
        equities)."""
        orders = self.all_orders(day)
        reasons = self._reasons.get([o.client_order_id for o in orders if o.intent == "exit"
                                     and o.filled_qty > 0]) if self._reasons else {}
        return round_trips(orders, reasons)

    def cash_cents(self) -> int:
        """The account's cash in cents."""
        return self.account().cash_cents

    def expire_session_orders(self, session_date: dt.date) -> list[FillEvent]:
        """Nothing to expire here (Alpaca ends DAY orders itself): the day's entries that
        ended, as events, so reservations follow what really filled."""
        return [fill_event_of(o) for o in self.all_orders(session_date)
                if o.intent == "entry" and o.status in ("filled", *_FAILED)]

    # -- positions ----------------------------------------------------------------------------
    def _raw_positions(self) -> list[Any]:
        return self._call("exit", "list positions", self._client.get_all_positions)

    def _enrich(self, raws: Iterable[Any], today: list[Any]) -> dict[str, Position]:
        """Positions keyed by symbol, with their entry order, exit attempts and stop."""
        flat = [(order_from_alpaca(raw), raw) for raw in today]
        by_id = {o.client_order_id: o for o, _ in flat}
        out: dict[str, Position] = {}
        now = self._now().astimezone(NY)
        for p in raws:
            qty = int(_dec(p.qty) or 0)
            if qty == 0:
                continue
            if _val(p.side) == "short" and qty > 0:
                qty = -qty
            symbol = str(p.symbol)
            side = "buy" if qty > 0 else "sell"
            avg = _dstr(p.avg_entry_price) or "0"
            entry = next((o for o, _ in reversed(flat)
                          if o.symbol == symbol and o.intent == "entry" and o.side == side
                          and o.filled_qty > 0 and ENTRY_ID.match(o.client_order_id)), None)
            stop = next((_dstr(_get(raw, "stop_price")) for o, raw in reversed(flat)
                         if o.symbol == symbol and o.side != side
                         and o.order_type in ("stop", "stop_limit")
                         and o.status in ("accepted", "partially_filled")), None)
            if entry is None:  # opened by hand or on an earlier day: closed as stale
                coid = f"ext-{symbol}-{now:%Y%m%d}-0000-{'L' if qty > 0 else 'S'}"
                out[symbol] = Position(symbol=symbol, qty=qty, avg_price=avg,
                                       opened_at=now.isoformat(), session_date="",
                                       entry_client_order_id=coid, stop_price=stop)
                continue
            attempt = 0
            while attempt < 99:
                x = by_id.get(f"{entry.client_order_id}-x{attempt + 1}")
                if x is None or x.status not in _FAILED:
                    break
                attempt += 1
            out[symbol] = Position(
                symbol=symbol, qty=qty, avg_price=avg,
                opened_at=entry.filled_at or entry.submitted_at,
                session_date=entry.session_date, entry_client_order_id=entry.client_order_id,
                strategy=entry.strategy, exit_attempt=attempt, stop_price=stop)
        return out

    def _today_raw(self) -> list[Any]:
        return self._orders(QueryOrderStatus.ALL,
                            after=self._day_start() - dt.timedelta(microseconds=1),
                            kind="exit")

    def get_positions(self) -> dict[str, Position]:
        """Open positions by symbol (qty signed: negative short)."""
        raws = self._raw_positions()
        if not raws:
            return {}
        return self._enrich(raws, self._today_raw())

    def positions_cached(self) -> dict[str, Position]:
        """Same as get_positions (no cheap change marker at Alpaca)."""
        return self.get_positions()

    def snapshot(self) -> tuple[dict[str, Position], list[Order]]:
        """Positions and our working orders, from two requests."""
        raws = self._raw_positions()
        today = self._today_raw()
        orders = [order_from_alpaca(o) for o in today]
        working = [o for o in orders if o.status in ("accepted", "partially_filled")
                   and _ours(o.client_order_id)]
        return (self._enrich(raws, today) if raws else {}), working

    def realized_pnl_cents(self, day: dt.date) -> int:
        """P/L (cents) realized by the day's fills, average-cost per symbol (no fees: Alpaca
        charges no commission on equities)."""
        return realized_cents(self.all_orders(day))

    def _position(self, symbol: str) -> Any | None:
        return self._maybe("exit", f"get position {symbol}", self._client.get_open_position,
                           symbol)

    def close_position(self, symbol: str, client_order_id: str, reason: str) -> Order | None:
        """Close the whole position at market with ``client_order_id``; None when flat.

        Orders on the closing side resting for the symbol (protective stop legs) hold its
        shares, so they are cancelled first (and awaited); the position is then read again so
        a stop that filled meanwhile never turns the close into a new position. A close with
        this id already working, or known to Alpaca (422 duplicate), is returned as it is.
        """
        pos = self._position(symbol)
        if pos is None:
            return None
        closing_side = "sell" if _val(pos.side) == "long" else "buy"
        working = [(raw, order_from_alpaca(raw)) for raw in self._orders(
            QueryOrderStatus.OPEN, symbols=[symbol], kind="exit")]
        for _, mine in working:
            if mine.client_order_id == client_order_id:
                return mine  # this close is already working (an earlier answer was lost)
        for raw, mine in working:
            if mine.side == closing_side and mine.status in ("accepted", "partially_filled"):
                self._cancel_raw(raw.id, mine.client_order_id)
        pos = self._position(symbol)
        if pos is None:
            return None
        qty = abs(int(_dec(pos.qty) or 0))
        if qty == 0:
            return None
        _, strategy = intent_of(client_order_id)
        request = OrderRequest(
            client_order_id=client_order_id, symbol=symbol,
            side="sell" if _val(pos.side) == "long" else "buy", qty=qty, intent="exit",
            close=True, reason=reason, strategy=strategy)
        try:
            return self.place_order(request)
        except DuplicateOrder:  # sent before (a lost answer): that order is the close
            found = self.get_order_by_client_id(client_order_id)
            if found is None:
                raise BrokerUnavailable(
                    f"duplicate reported for {client_order_id} but not found") from None
            return found
        except OrderRejected as exc:
            if "insufficient qty" in str(exc).lower() or "held" in str(exc).lower():
                # shares still held by an order whose cancel is pending: try again shortly
                raise BrokerUnavailable(f"close {symbol}: shares still held: {exc}") from exc
            now = self._now().isoformat()
            return Order(client_order_id=client_order_id, symbol=symbol, side=request.side,
                         qty=qty, order_type="market", limit_price=None, time_in_force="day",
                         intent="exit", close=True, reason=reason, strategy=strategy,
                         confidence=None, status="rejected", session_date=now[:10],
                         submitted_at=now, status_reason=str(exc))

    def close_all_positions(self, cancel_orders: bool = True) -> list[Order]:
        """Alpaca's own liquidation of every position (DELETE /v2/positions): the kill
        switch's last resort; the orders get Alpaca's ids, not ours."""
        out = self._call("exit", "close all positions", self._client.close_all_positions,
                         cancel_orders)
        orders = []
        for r in out or []:
            body = r.body
            if _get(body, "client_order_id") is not None:
                orders.append(order_from_alpaca(body))
            else:
                log.error("close all: %s not closed: %s", r.symbol, _get(body, "message"))
        return orders

    # -- checks -------------------------------------------------------------------------------
    def entry_check(self, request: OrderRequest) -> str | None:
        """Why Alpaca would reject this entry, from account, asset, position and open-order
        data (no order placed): market closed, blocked account, pattern day trader
        protection, not tradable, not shortable, opposite-side position or order (wash
        trade), buying power."""
        if not self.clock().is_open:
            return "market closed"
        acct = self.account()
        if acct.blocked:
            return f"account blocked (status {acct.status})"
        if (not acct.pattern_day_trader and acct.daytrade_count >= 3
                and acct.last_equity_cents < 2_500_000):
            return (f"pattern day trader protection: {acct.daytrade_count} day trades in 5 "
                    "days with equity under $25,000")
        asset = self._asset(request.symbol)
        if asset is None:
            return f"{request.symbol} is unknown to the broker"
        if not asset.tradable or _val(asset.status) != "active":
            return f"{request.symbol} is not trading (halted or inactive)"
        if request.side == "sell":
            if not acct.shorting_enabled:
                return "account is not allowed to short"
            if not asset.shortable or not asset.easy_to_borrow:
                return f"{request.symbol} is not shortable (hard to borrow)"
        pos = self._position(request.symbol)
        if pos is not None and (_val(pos.side) == "long") != (request.side == "buy"):
            return "opposite-side position open (wash trade)"
        for raw in self._orders(QueryOrderStatus.OPEN, symbols=[request.symbol]):
            mine = order_from_alpaca(raw)
            if mine.side != request.side and mine.status in ("accepted", "partially_filled") \
                    and not (pos is not None and mine.order_type in ("stop", "stop_limit")):
                return "opposite-side order open (wash trade)"
        price = _dec(request.limit_price)
        if price is not None and price > 0:
            power = acct.buying_power_cents
            if acct.pattern_day_trader and acct.daytrading_buying_power_cents > 0:
                power = min(power, acct.daytrading_buying_power_cents)
            if cents(price * request.qty) > power:
                return "insufficient buying power"
        return None

    # -- simulated-mode hooks that mean nothing here ---------------------------------------------
    def open_account(self) -> None:
        """Nothing to open: the account lives at Alpaca."""

    def process_bar(self, *args: Any, **kwargs: Any) -> list[FillEvent]:
        """Fills come from the trade_updates stream (core.streams.trade_updates), not bars."""
        return []


def _ours(client_order_id: str) -> bool:
    return bool(ENTRY_ID.match(client_order_id)) or (
        bool(m := EXIT_ID.match(client_order_id)) and bool(ENTRY_ID.match(m.group(1))))


def _with_request(order: Order, request: OrderRequest) -> Order:
    """Carry what Alpaca does not store (reason, strategy, confidence, stop) from the request."""
    return order.with_(reason=request.reason, strategy=request.strategy or order.strategy,
                       confidence=request.confidence, close=request.close or order.close,
                       stop_price=order.stop_price or request.stop_price)


def _tick(price: str | Decimal, side: str) -> Decimal:
    """A price on Alpaca's grid (cents at or above $1, 1/100 cent below), never worse for us:
    a buy rounds down, a sell up."""
    d = Decimal(str(price))
    if not d.is_finite() or d <= 0:
        raise OrderRejected(f"bad price {price!r}")
    step = Decimal("0.01") if d >= 1 else Decimal("0.0001")
    return d.quantize(step, rounding=ROUND_FLOOR if side == "buy" else ROUND_CEILING)
