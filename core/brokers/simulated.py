"""The simulated broker: an account in Redis that every worker process shares.

Fill model: an order decided on bar ``t`` fills at the open of bar ``t + latency`` (at least
one bar later), or of the first later bar where the symbol has data, moved against us by
``slippage_bps``; fees are ``max(fee_min, fee_per_share * qty)``. Limit IOC orders (entries)
fill only if that price is within the limit, otherwise they expire. ``close`` orders close
whatever the position holds at fill time, so two closes never flip a position.
Prices are Decimal US dollars (4 decimals), cash and fees integer cents.

Volume participation (``max_participation``, off when None): one order fills at most
``floor(bar volume x max_participation)`` shares in a bar. The cap is per order: several
orders of one symbol in the same bar each get the whole cap. An IOC entry fills what the cap
allows and the remainder is cancelled at once (status "filled", ``filled_qty < qty``); a DAY
order (exits) stays working as "partially_filled" and fills more on later bars until done or
the session closes. Fees are charged per fill; a partial close allocates the position's entry
fees pro rata to the quantity closed (the last close takes what is left).

Protective stops (``protective_stops``, off by default): an entry may carry a ``stop_price``
(OTO). Once it fills, the position holds that stop, and from the bar after the fill on it is
checked at the start of each processed bar, before due orders fill: a long whose bar low is at
or below the stop (a short: high at or above) is closed whole at the stop, or at the bar's
open when the open already gapped through it, moved by the slippage, with fees, exit reason
"broker_stop" and order id ``<entry id>-s``; working exits of the symbol are then cancelled.
This assumes the stop rests at the broker through the whole bar that is processed (the bar
whose open fills the due orders); it looks at nothing beyond that bar. The stop ignores the
participation cap.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from dataclasses import replace as dc_replace
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
from redis import Redis

from core.brokers.base import FillEvent, Order, OrderRequest, Position
from core.brokers.fill_model import FillModel
from core.brokers.fill_model import dec as _dec
from core.keys import Keys
from core.market.bar_store import SessionMeta
from core.models import HIGH, LOW, OPEN, VOLUME
from core.money import cents
from core.replay import RedisReplay

log = logging.getLogger(__name__)

_TICK = Decimal("0.0001")
_TTL_S = 4 * 24 * 3600
_WORKING = ("accepted", "partially_filled")

# Record a new order once; a known client_order_id returns the stored order.
_SUBMIT_LUA = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, existing} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) end
redis.call('RPUSH', KEYS[3], ARGV[1])
return {1, ARGV[2]}
"""


class SimulatedBroker:
    """A broker with its account (cash, positions, orders, fills, trades) in Redis."""

    def __init__(self, redis: Redis, keys: Keys, replay: RedisReplay, model: FillModel,
                 starting_cash_cents: int = 10_000_000, margin_multiplier: int = 4,
                 hard_to_borrow: frozenset[str] = frozenset(),
                 protective_stops: bool = False) -> None:
        self._r = redis
        self._k = keys
        self._replay = replay
        self._model = model
        self._submit = redis.register_script(_SUBMIT_LUA)
        self._starting_cash = starting_cash_cents
        self._margin = margin_multiplier
        self._htb = hard_to_borrow
        self._stops = protective_stops
        self._positions_cache: tuple[bytes, dict[str, Position]] | None = None
        self._parsed: dict[str, tuple[bytes, Position]] = {}
        self._exposure_cache: tuple[bytes, tuple[int, int]] | None = None

    # -- account set-up ---------------------------------------------------------------------
    def open_account(self) -> None:
        """Start a fresh account with the starting cash (idempotent)."""
        self._r.set(self._k.broker("cash"), self._starting_cash, nx=True, ex=_TTL_S)

    def cash_cents(self) -> int:
        """Cash balance in cents."""
        return int(self._r.get(self._k.broker("cash")) or self._starting_cash)

    # -- Broker protocol --------------------------------------------------------------------
    def submit_order(self, request: OrderRequest) -> Order:
        """Accept an order for the next fillable bar; duplicates return the first order."""
        meta, bar = self._replay.now()
        status, reason = "accepted", ""
        if request.qty <= 0 or request.qty != int(request.qty):
            status, reason = "rejected", "quantity must be a positive whole number of shares"
        elif meta is None:
            status, reason = "rejected", "market closed: no replay session is running"
        elif request.symbol not in meta.symbols:
            status, reason = "rejected", f"unknown symbol {request.symbol}"
        elif bar + self._model.latency_bars >= meta.n_bars:
            status, reason = "rejected", "market closed: no bar left to fill in this session"
        elif request.order_type == "limit" and not _positive(request.limit_price):
            status, reason = "rejected", "limit order needs a positive limit price"
        elif request.stop_price is not None and (why := self._stop_refusal(request)):
            status, reason = "rejected", why
        elif request.intent == "entry":
            refusal = self.entry_check(request)
            if refusal:
                status, reason = "rejected", refusal
        session = meta.date.isoformat() if meta else ""
        submitted = (meta.bar_time(bar + 1).isoformat() if meta and bar >= 0
                     else meta.open_time.isoformat() if meta else "")
        order = Order(
            client_order_id=request.client_order_id, symbol=request.symbol, side=request.side,
            qty=int(request.qty), order_type=request.order_type,
            limit_price=request.limit_price, time_in_force=request.time_in_force,
            intent=request.intent, close=request.close, reason=request.reason,
            strategy=request.strategy, confidence=request.confidence, status=status,
            session_date=session, submitted_at=submitted,
            fill_after_bar=bar + self._model.latency_bars, status_reason=reason,
            accepted_wall=time.time(), stop_price=request.stop_price,
        )
        new, raw = self._submit(
            keys=[self._k.broker("orders"), self._k.broker("open_orders"),
                  self._k.broker("order_log")],
            args=[order.client_order_id, order.to_json(), "1" if status == "accepted" else "0"],
        )
        stored = Order.from_json(raw)
        if int(new) and stored.status == "rejected" and stored.intent == "exit":
            self._bump_exit_attempt(stored.symbol)
        if int(new):
            log.info("sim order %s", stored.status, extra={
                "client_order_id": stored.client_order_id, "symbol": stored.symbol,
                "reason": stored.status_reason})
        return stored

    def entry_check(self, request: OrderRequest) -> str | None:
        """Why the broker would reject this entry (wash trade, not shortable, halted, buying
        power), or None. Execution asks before reserving capital; two round trips."""
        k = self._k
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(k.replay_state(), "day", "bar", "status")
        pipe.hget(k.broker("positions"), request.symbol)
        pipe.get(k.broker("cash"))
        pipe.get(k.broker("positions_version"))
        pipe.smembers(k.broker("open_orders"))
        (day, bar_raw, status), pos_raw, cash_raw, version, open_ids = pipe.execute()
        days = self._replay.days()
        if day is None or status == b"finished" or not 0 <= int(day) < len(days):
            return "market closed: no replay session is running"
        meta, bar = days[int(day)], int(bar_raw)
        if request.stop_price is not None and (why := self._stop_refusal(request)):
            return why
        if pos_raw and (Position.from_json(pos_raw).qty > 0) != (request.side == "buy"):
            return "opposite-side position open (wash trade)"
        if request.side == "sell" and request.symbol in self._htb:
            return f"{request.symbol} is not shortable (hard to borrow)"
        price = Decimal(request.limit_price) if _positive(request.limit_price) else None
        pipe = self._r.pipeline(transaction=False)
        quote = request.symbol in meta.symbols and bar >= 0
        if quote:
            off = bar * meta.row_bytes + meta.symbols.index(request.symbol) * 40
            pipe.getrange(k.replay_data(meta.date), off + 24, off + 31)  # the close
        ids = sorted(x.decode() for x in open_ids)
        if price is not None and ids:
            pipe.hmget(k.broker("orders"), ids)
        replies = pipe.execute() if (quote or (price is not None and ids)) else []
        if quote:
            raw_close = replies.pop(0)
            close = float(np.frombuffer(raw_close, "<f8")[0]) if len(raw_close) == 8 else math.nan
            if not (math.isfinite(close) and close > 0):
                return f"{request.symbol} is not trading (halted or no quote)"
        if price is None:
            return None
        working = 0
        if ids:
            for raw in replies.pop(0):
                if raw:
                    o = Order.from_json(raw)
                    if o.intent == "entry" and o.limit_price:
                        working += cents(Decimal(o.limit_price) * (o.qty - o.filled_qty))
        exposure, signed_cost = self._exposure(version)
        cash = int(cash_raw) if cash_raw is not None else self._starting_cash
        power = (cash + signed_cost) * self._margin - exposure - working
        if cents(price * request.qty) > power:
            return "insufficient buying power"
        return None

    def _exposure(self, version: bytes | None) -> tuple[int, int]:
        """(gross value, signed cost) of open positions at entry prices, cached by version."""
        if self._exposure_cache is not None and version is not None \
                and self._exposure_cache[0] == version:
            return self._exposure_cache[1]
        positions, _ = self.snapshot()
        gross = sum((p.avg * abs(p.qty) for p in positions.values()), Decimal(0))
        signed = sum((p.avg * p.qty for p in positions.values()), Decimal(0))
        value = (cents(gross), cents(signed))
        if version is not None:
            self._exposure_cache = (version, value)
        return value

    def close_position(self, symbol: str, client_order_id: str, reason: str) -> Order | None:
        """Submit a market order that closes the whole position at fill time (None if flat)."""
        raw = self._r.hget(self._k.broker("positions"), symbol)
        if raw is None:
            return None
        pos = Position.from_json(raw)
        return self.submit_order(OrderRequest(
            client_order_id=client_order_id, symbol=symbol,
            side="sell" if pos.qty > 0 else "buy", qty=abs(pos.qty), intent="exit",
            close=True, reason=reason, strategy=pos.strategy))

    def get_order_by_client_id(self, client_order_id: str) -> Order | None:
        """The order with this client_order_id, or None."""
        raw = self._r.hget(self._k.broker("orders"), client_order_id)
        return Order.from_json(raw) if raw else None

    def cancel_order(self, client_order_id: str) -> Order | None:
        """Cancel an open order; returns the order as it ends up (None if unknown)."""
        with self._lock():
            order = self.get_order_by_client_id(client_order_id)
            if order is None or order.status not in _WORKING:
                return order
            done = order.with_(status="cancelled", status_reason="cancelled by request")
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(self._k.broker("orders"), client_order_id, done.to_json())
            pipe.srem(self._k.broker("open_orders"), client_order_id)
            if order.intent == "exit":
                self._bump_exit_attempt(order.symbol, pipe)
            pipe.execute()
            return done

    def list_open_orders(self) -> list[Order]:
        """Working orders: accepted or partially filled, not yet done (sorted by id)."""
        ids = sorted(x.decode() for x in self._r.smembers(self._k.broker("open_orders")))
        if not ids:
            return []
        raws = self._r.hmget(self._k.broker("orders"), ids)
        return [Order.from_json(raw) for raw in raws if raw]

    def snapshot(self) -> tuple[dict[str, Position], list[Order]]:
        """Positions and open orders; positions are re-read only when they changed."""
        pipe = self._r.pipeline(transaction=False)
        pipe.get(self._k.broker("positions_version"))
        pipe.smembers(self._k.broker("open_orders"))
        version, open_ids = pipe.execute()
        positions = self._positions_at(version)
        ids = sorted(x.decode() for x in open_ids)
        orders = []
        if ids:
            orders = [Order.from_json(r) for r in self._r.hmget(self._k.broker("orders"), ids)
                      if r]
        return positions, orders

    def positions_cached(self) -> dict[str, Position]:
        """Open positions by symbol: one round trip when nothing changed since the last read."""
        return self._positions_at(self._r.get(self._k.broker("positions_version")))

    def _positions_at(self, version: bytes | None) -> dict[str, Position]:
        cached = self._positions_cache
        if cached is not None and version is not None and cached[0] == version:
            return dict(cached[1])
        pipe = self._r.pipeline(transaction=True)
        pipe.get(self._k.broker("positions_version"))
        pipe.hgetall(self._k.broker("positions"))
        version, raw_pos = pipe.execute()
        positions = {}
        parsed = {}
        for key, raw in raw_pos.items():
            sym = key.decode()
            hit = self._parsed.get(sym)
            pos = hit[1] if hit is not None and hit[0] == raw else Position.from_json(raw)
            parsed[sym] = (raw, pos)
            positions[sym] = pos
        self._parsed = parsed  # only positions whose stored JSON changed were parsed
        self._positions_cache = (version, dict(positions))
        return positions

    def get_positions(self) -> dict[str, Position]:
        """Open positions by symbol."""
        raw = self._r.hgetall(self._k.broker("positions"))
        return {k.decode(): Position.from_json(v) for k, v in raw.items()}

    def all_orders(self) -> list[Order]:
        """Every order of the account, in submission order."""
        ids = [x.decode() for x in self._r.lrange(self._k.broker("order_log"), 0, -1)]
        if not ids:
            return []
        raws = self._r.hmget(self._k.broker("orders"), ids)
        return [Order.from_json(raw) for raw in raws if raw]

    def order_log(self) -> list[str]:
        """client_order_ids in the order the broker accepted them (duplicates would show)."""
        return [x.decode() for x in self._r.lrange(self._k.broker("order_log"), 0, -1)]

    def realized_pnl_cents(self, day: dt.date) -> int:
        """Net P/L (cents) of the trades closed by fills in the session of ``day``."""
        return int(self._r.get(self._k.broker(f"realized:{day.isoformat()}")) or 0)

    def trades(self) -> list[dict[str, object]]:
        """Closed round trips, oldest first."""
        return [json.loads(x) for x in self._r.lrange(self._k.broker("trades"), 0, -1)]

    # -- the market moving ------------------------------------------------------------------
    def process_bar(self, meta: SessionMeta, bar: int, row: np.ndarray) -> list[FillEvent]:
        """Fill the open orders due at bar ``bar`` of the session using its open prices.

        With protective stops on, the positions' stops are checked against this bar first.
        Processing the same bar again fills nothing twice: a partially filled order is next
        due at the following bar, a stopped position is gone.
        """
        events: list[FillEvent] = []
        if self._stops:
            pipe = self._r.pipeline(transaction=False)
            pipe.scard(self._k.broker("open_orders"))
            pipe.hlen(self._k.broker("positions"))
            n_open, n_positions = pipe.execute()
            if not n_open and not n_positions:
                return events
        elif not self._r.scard(self._k.broker("open_orders")):
            return events  # the common case: nothing working, no lock, one round trip
        session = meta.date.isoformat()
        with self._lock():
            working = self.list_open_orders()
            orders = [o for o in working
                      if o.session_date == session and o.fill_after_bar <= bar]
            if not orders and not self._stops:
                return events
            if self._stops:
                positions = {k.decode(): Position.from_json(v) for k, v in
                             self._r.hgetall(self._k.broker("positions")).items()}
            else:
                wanted = sorted({o.symbol for o in orders})
                raw = self._r.hmget(self._k.broker("positions"), wanted)
                positions = {sym: Position.from_json(r)
                             for sym, r in zip(wanted, raw, strict=True) if r}
            index = {s: i for i, s in enumerate(meta.symbols)}
            when = meta.bar_time(bar).isoformat()
            pipe = self._r.pipeline(transaction=True)
            cash_delta = 0
            if self._stops:
                stopped: set[str] = set()
                for sym in sorted(positions):
                    hit = self._stop_fill(positions[sym], meta, bar, row, index, positions, pipe)
                    if hit is None:
                        continue
                    event, delta = hit
                    cash_delta += delta
                    stopped.add(sym)
                    events.append(event)
                for order in working:
                    if order.symbol in stopped and order.intent == "exit":
                        done = order.with_(status="cancelled",
                                           status_reason="position closed by protective stop")
                        pipe.hset(self._k.broker("orders"), order.client_order_id,
                                  done.to_json())
                        pipe.srem(self._k.broker("open_orders"), order.client_order_id)
                        events.append(self._event(done))
                orders = [o for o in orders if not (o.symbol in stopped and o.intent == "exit")]
            for order in orders:
                i = index.get(order.symbol)
                px = row[i, OPEN] if i is not None else math.nan
                if not (math.isfinite(px) and px > 0):
                    continue  # no bar for this symbol now: no fill, try the next bar
                cap = self._model.volume_cap(float(row[i, VOLUME]))
                done, event, delta = self._fill(order, px, cap, when, bar, positions, pipe)
                if event is None:
                    continue  # a working order that could not fill in this bar
                cash_delta += delta
                pipe.hset(self._k.broker("orders"), order.client_order_id, done.to_json())
                if done.status not in _WORKING:
                    pipe.srem(self._k.broker("open_orders"), order.client_order_id)
                events.append(event)
            if cash_delta:
                pipe.incrby(self._k.broker("cash"), cash_delta)
            pipe.execute()
        return events

    def expire_session_orders(self, session_date: dt.date) -> list[FillEvent]:
        """Expire DAY orders of a finished session still open at its close (a partially
        filled one keeps what it filled; its position stays open)."""
        events = []
        with self._lock():
            for order in self.list_open_orders():
                if order.session_date > session_date.isoformat():
                    continue
                why = ("session closed" if not order.filled_qty else
                       f"session closed with {order.filled_qty} of {order.qty} filled")
                done = order.with_(status="expired", status_reason=why)
                pipe = self._r.pipeline(transaction=True)
                pipe.hset(self._k.broker("orders"), order.client_order_id, done.to_json())
                pipe.srem(self._k.broker("open_orders"), order.client_order_id)
                if order.intent == "exit":
                    self._bump_exit_attempt(order.symbol, pipe)
                pipe.execute()
                events.append(self._event(done))
        return events

    # -- internals --------------------------------------------------------------------------
    def _bump_exit_attempt(self, symbol: str, pipe=None) -> None:
        """Count an exit of ``symbol`` that ended unfilled, so the next one gets a new id."""
        raw = self._r.hget(self._k.broker("positions"), symbol)
        if not raw:
            return
        pos = Position.from_json(raw)
        new = dc_replace(pos, **{"exit_attempt": pos.exit_attempt + 1})
        target = pipe or self._r
        target.hset(self._k.broker("positions"), symbol, new.to_json())
        target.incr(self._k.broker("positions_version"))

    def _lock(self):
        return self._r.lock(self._k.broker("lock"), timeout=30, blocking_timeout=10)

    def _stop_refusal(self, request: OrderRequest) -> str | None:
        """Why an order carrying a protective stop is refused, or None."""
        if not self._stops:
            return "protective stop orders are not enabled at this broker"
        if request.intent != "entry":
            return "a protective stop rides on an entry order only"
        if not _positive(request.stop_price):
            return "protective stop needs a positive stop price"
        if _positive(request.limit_price):
            stop, limit = Decimal(request.stop_price or "0"), Decimal(request.limit_price or "0")
            if (request.side == "buy" and stop >= limit) or (
                    request.side == "sell" and stop <= limit):
                return "protective stop on the wrong side of the entry price"
        return None

    def _stop_fill(self, pos: Position, meta: SessionMeta, bar: int, row: np.ndarray,
                   index: dict[str, int], positions: dict[str, Position],
                   pipe) -> tuple[FillEvent, int] | None:
        """Close ``pos`` by its protective stop if bar ``bar`` reaches it; else None."""
        i = index.get(pos.symbol)
        if not pos.stop_price or pos.qty == 0 or i is None:
            return None
        open_, high, low = (float(row[i, f]) for f in (OPEN, HIGH, LOW))
        if not all(math.isfinite(x) and x > 0 for x in (open_, high, low)):
            return None  # no bar for the symbol now
        if dt.datetime.fromisoformat(pos.opened_at) >= meta.bar_time(bar):
            return None  # the stop rests from the bar after the entry's fill
        stop = Decimal(pos.stop_price)
        if pos.qty > 0:
            if _dec(low) > stop:
                return None
            base, side = min(_dec(open_), stop), "sell"  # a gap down fills at the open
        else:
            if _dec(high) < stop:
                return None
            base, side = max(_dec(open_), stop), "buy"  # a gap up fills at the open
        order = Order(
            client_order_id=f"{pos.entry_client_order_id}-s", symbol=pos.symbol, side=side,
            qty=abs(pos.qty), order_type="stop", limit_price=None, time_in_force="gtc",
            intent="exit", close=True, reason="broker_stop", strategy=pos.strategy,
            confidence=pos.confidence, status="accepted", session_date=meta.date.isoformat(),
            submitted_at=pos.opened_at, fill_after_bar=bar, accepted_wall=time.time(),
            stop_price=pos.stop_price)
        price = self._model.slipped(base, side)
        done, delta = self._execute(order, price, abs(pos.qty), meta.bar_time(bar).isoformat(),
                                    bar, positions, pipe)
        done = done.with_(status_reason=f"protective stop {stop} triggered")
        pipe.hset(self._k.broker("orders"), done.client_order_id, done.to_json())
        pipe.rpush(self._k.broker("order_log"), done.client_order_id)
        log.info("sim protective stop filled", extra={
            "client_order_id": done.client_order_id, "symbol": done.symbol,
            "price": str(price)})
        return self._event(done), delta

    def _fill(self, order: Order, open_px: float, cap: int | None, when: str, bar: int,
              positions: dict[str, Position], pipe) -> tuple[Order, FillEvent | None, int]:
        """Fill what ``order`` can at this bar's open; the event is None when nothing changed
        (a DAY order that found no volume keeps working)."""
        price = self._model.fill_price(open_px, order.side)
        pos = positions.get(order.symbol)
        if order.close:
            if pos is None or pos.qty == 0:
                done = order.with_(status="cancelled", status_reason="no position to close")
                return done, self._event(done), 0
            want = abs(pos.qty)
        else:
            want = order.qty - order.filled_qty
        if order.order_type == "limit" and order.limit_price is not None:
            limit = Decimal(order.limit_price)
            if (order.side == "buy" and price > limit) or (order.side == "sell" and price < limit):
                done = order.with_(status="expired",
                                   status_reason=f"IOC limit {limit} not reached at {price}")
                return done, self._event(done), 0
        qty = want if cap is None else min(want, cap)
        if qty <= 0:
            if order.time_in_force == "ioc":
                done = order.with_(status="expired", status_reason=(
                    "IOC: no volume to fill against "
                    f"(participation {self._model.max_participation})"))
                return done, self._event(done), 0
            return order, None, 0
        done, delta = self._execute(order, price, qty, when, bar, positions, pipe)
        return done, self._event(done), delta

    def _execute(self, order: Order, price: Decimal, qty: int, when: str, bar: int,
                 positions: dict[str, Position], pipe) -> tuple[Order, int]:
        """Fill ``qty`` shares of ``order`` at ``price``: position, trade, order; cash delta."""
        pos = positions.get(order.symbol)
        fees = self._model.fees_cents(qty)
        notional = cents(price * qty)
        pipe.incr(self._k.broker("positions_version"))
        sign = 1 if order.side == "buy" else -1
        cash_delta = -sign * notional - fees
        signed = sign * qty
        flat = False
        if pos is None or pos.qty == 0:
            new = Position(symbol=order.symbol, qty=signed, avg_price=str(price), opened_at=when,
                           session_date=order.session_date,
                           entry_client_order_id=order.client_order_id,
                           strategy=order.strategy, confidence=order.confidence,
                           entry_fees_cents=fees,
                           stop_price=order.stop_price if order.intent == "entry" else None)
            positions[order.symbol] = new
            pipe.hset(self._k.broker("positions"), order.symbol, new.to_json())
        elif (pos.qty > 0) == (signed > 0):
            total = pos.qty + signed
            avg = ((pos.avg * abs(pos.qty) + price * qty) / abs(total)).quantize(_TICK)
            new = dc_replace(pos, **{"qty": total, "avg_price": str(avg),
                              "entry_fees_cents": pos.entry_fees_cents + fees})
            positions[order.symbol] = new
            pipe.hset(self._k.broker("positions"), order.symbol, new.to_json())
        else:
            held = abs(pos.qty)
            closing = min(qty, held)
            direction = 1 if pos.qty > 0 else -1
            gross = cents((price - pos.avg) * closing * direction)
            # entry fees follow the quantity closed; the last close takes what is left
            entry_fees = (pos.entry_fees_cents if closing == held else
                          (2 * pos.entry_fees_cents * closing + held) // (2 * held))
            trade = {
                "client_order_id": pos.entry_client_order_id,
                "exit_client_order_id": order.client_order_id,
                "date": pos.session_date, "symbol": order.symbol, "side": pos.side,
                "qty": closing, "entry_time": pos.opened_at, "entry_price": pos.avg_price,
                "exit_time": when, "exit_price": str(price), "exit_reason": order.reason,
                "gross_pnl_cents": gross, "fees_cents": entry_fees + fees,
                "pnl_cents": gross - entry_fees - fees, "strategy": pos.strategy,
                "confidence": pos.confidence,
            }
            pipe.rpush(self._k.broker("trades"), json.dumps(trade))
            pipe.incrby(self._k.broker(f"realized:{order.session_date}"), trade["pnl_cents"])
            remaining = pos.qty + signed
            if remaining == 0 or (remaining > 0) != (pos.qty > 0):
                flat = True
                positions.pop(order.symbol, None)
                pipe.hdel(self._k.broker("positions"), order.symbol)
            else:
                new = dc_replace(pos, **{"qty": remaining,
                                  "entry_fees_cents": pos.entry_fees_cents - entry_fees})
                positions[order.symbol] = new
                pipe.hset(self._k.broker("positions"), order.symbol, new.to_json())
        filled = order.filled_qty + qty
        value = Decimal(order.filled_notional or "0") + price * qty
        avg_px = price if not order.filled_qty else (value / filled).quantize(
            _TICK, rounding=ROUND_HALF_UP)
        status, reason, due = "filled", order.status_reason, order.fill_after_bar
        if not (flat if order.close else filled >= order.qty):
            if order.time_in_force == "ioc":
                reason = "partial fill, remainder cancelled (IOC)"
            else:
                status, due = "partially_filled", bar + 1  # next due at the following bar
        done = order.with_(status=status, status_reason=reason, fill_after_bar=due,
                           filled_qty=filled, filled_avg_price=str(avg_px),
                           filled_notional=str(value), filled_at=when,
                           fees_cents=order.fees_cents + fees)
        return done, cash_delta

    @staticmethod
    def _event(order: Order) -> FillEvent:
        """The order's state as an event: status and its fill totals so far."""
        notional = cents(Decimal(order.filled_notional)) if order.filled_notional else 0
        return FillEvent(order.client_order_id, order.symbol, order.intent, order.status,
                         order.filled_qty, notional, order.session_date)


def _positive(value: str | None) -> bool:
    try:
        return value is not None and Decimal(value).is_finite() and Decimal(value) > 0
    except ArithmeticError:
        return False
