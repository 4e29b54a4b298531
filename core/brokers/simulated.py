"""The simulated broker: an account in Redis that every worker process shares.

Fill model: an order decided on bar ``t`` fills at the open of bar ``t + latency`` (at least
one bar later), or of the first later bar where the symbol has data, moved against us by
``slippage_bps``; fees are ``max(fee_min, fee_per_share * qty)``. Limit IOC orders (entries)
fill only if that price is within the limit, otherwise they expire. ``close`` orders close
whatever the position holds at fill time, so two closes never flip a position.
Prices are Decimal US dollars (4 decimals), cash and fees integer cents.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal

import numpy as np
from redis import Redis

from core.brokers.base import FillEvent, Order, OrderRequest, Position
from core.keys import Keys
from core.market.bar_store import SessionMeta
from core.models import OPEN
from core.replay import RedisReplay

log = logging.getLogger(__name__)

_TICK = Decimal("0.0001")
_CENT = Decimal("0.01")
_TTL_S = 4 * 24 * 3600

# Record a new order once; a known client_order_id returns the stored order.
_SUBMIT_LUA = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, existing} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) end
redis.call('RPUSH', KEYS[3], ARGV[1])
return {1, ARGV[2]}
"""


@dataclass(frozen=True)
class FillModel:
    """Costs and delays of the simulated market."""

    slippage_bps: float = 2.0
    fee_per_share: Decimal = Decimal("0.0035")
    fee_min: Decimal = Decimal("0.35")
    latency_bars: int = 1

    def fill_price(self, open_price: float, side: str) -> Decimal:
        """Open price moved against the order by the slippage (US dollars, 4 decimals)."""
        base = Decimal(repr(float(open_price)))
        factor = Decimal(1) + Decimal(repr(self.slippage_bps)) / Decimal(10000) * (
            1 if side == "buy" else -1)
        return (base * factor).quantize(_TICK, rounding=ROUND_HALF_UP)

    def fees_cents(self, qty: int) -> int:
        """Fees of one fill in cents."""
        fee = max(self.fee_min, self.fee_per_share * qty)
        return int((fee / _CENT).to_integral_value(rounding=ROUND_HALF_UP))


def cents(amount: Decimal) -> int:
    """Dollars to integer cents (banker's rounding)."""
    return int((amount / _CENT).to_integral_value(rounding=ROUND_HALF_EVEN))


class SimulatedBroker:
    """A broker with its account (cash, positions, orders, fills, trades) in Redis."""

    def __init__(self, redis: Redis, keys: Keys, replay: RedisReplay, model: FillModel,
                 starting_cash_cents: int = 10_000_000, margin_multiplier: int = 4,
                 hard_to_borrow: frozenset[str] = frozenset()) -> None:
        self._r = redis
        self._k = keys
        self._replay = replay
        self._model = model
        self._submit = redis.register_script(_SUBMIT_LUA)
        self._starting_cash = starting_cash_cents
        self._margin = margin_multiplier
        self._htb = hard_to_borrow
        self._positions_cache: tuple[bytes, dict[str, Position]] | None = None
        self._parsed: dict[str, tuple[bytes, Position]] = {}

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
            accepted_wall=time.time(),
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
        power), or None. Execution asks before reserving capital."""
        meta, bar = self._replay.now()
        if meta is None:
            return "market closed: no replay session is running"
        if self._conflicts(request):
            return "opposite-side position open (wash trade)"
        if request.side == "sell" and request.symbol in self._htb:
            return f"{request.symbol} is not shortable (hard to borrow)"
        if request.symbol in meta.symbols and bar >= 0:
            close = self._replay.row(meta, bar)[meta.symbols.index(request.symbol), 3]
            if not (math.isfinite(close) and close > 0):
                return f"{request.symbol} is not trading (halted or no quote)"
        price = Decimal(request.limit_price) if _positive(request.limit_price) else None
        if price is not None and cents(price * request.qty) > self.buying_power_cents():
            return "insufficient buying power"
        return None

    def buying_power_cents(self) -> int:
        """Intraday buying power: equity x margin less what positions and working entries use.

        Equity is approximated by cash plus the cost of open longs less short proceeds
        (positions at their entry price), in cents.
        """
        positions, orders = self.snapshot()
        exposure = sum(cents(p.avg * abs(p.qty)) for p in positions.values())
        signed_cost = sum(cents(p.avg * p.qty) for p in positions.values())
        working = sum(cents(Decimal(o.limit_price) * o.qty) for o in orders
                      if o.intent == "entry" and o.limit_price)
        equity = self.cash_cents() + signed_cost
        return equity * self._margin - exposure - working

    def close_position(self, symbol: str, client_order_id: str, reason: str) -> Order | None:
        """Submit a market order that closes the whole position at fill time (None if flat)."""
        pos = self.get_positions().get(symbol)
        if pos is None:
            return None
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
            if order is None or order.status != "accepted":
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
        """Orders accepted and not yet filled, cancelled or expired (sorted by id)."""
        ids = sorted(x.decode() for x in self._r.smembers(self._k.broker("open_orders")))
        if not ids:
            return []
        raws = self._r.hmget(self._k.broker("orders"), ids)
        return [Order.from_json(raw) for raw in raws if raw]

    def held_symbols(self) -> set[str]:
        """Symbols with an open position (one round trip, nothing parsed)."""
        return {k.decode() for k in self._r.hkeys(self._k.broker("positions"))}

    def snapshot(self) -> tuple[dict[str, Position], list[Order]]:
        """Positions and open orders; positions are re-read only when they changed."""
        pipe = self._r.pipeline(transaction=False)
        pipe.get(self._k.broker("positions_version"))
        pipe.smembers(self._k.broker("open_orders"))
        version, open_ids = pipe.execute()
        cached = self._positions_cache
        if cached is not None and version is not None and cached[0] == version:
            positions = dict(cached[1])
        else:
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
        ids = sorted(x.decode() for x in open_ids)
        orders = []
        if ids:
            orders = [Order.from_json(r) for r in self._r.hmget(self._k.broker("orders"), ids)
                      if r]
        return positions, orders

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
        """Fill the open orders due at bar ``bar`` of the session using its open prices."""
        events: list[FillEvent] = []
        if not self._r.scard(self._k.broker("open_orders")):
            return events  # the common case: nothing working, no lock, one round trip
        with self._lock():
            orders = [o for o in self.list_open_orders()
                      if o.session_date == meta.date.isoformat() and o.fill_after_bar <= bar]
            if not orders:
                return events
            wanted = sorted({o.symbol for o in orders})
            raw = self._r.hmget(self._k.broker("positions"), wanted)
            positions = {sym: Position.from_json(r) for sym, r in zip(wanted, raw, strict=True)
                         if r}
            index = {s: i for i, s in enumerate(meta.symbols)}
            when = meta.bar_time(bar).isoformat()
            pipe = self._r.pipeline(transaction=True)
            cash_delta = 0
            for order in orders:
                px = row[index[order.symbol], OPEN] if order.symbol in index else math.nan
                if not (math.isfinite(px) and px > 0):
                    continue  # no bar for this symbol now: no fill, try the next bar
                done, event, delta = self._fill(order, px, when, positions, pipe)
                cash_delta += delta
                pipe.hset(self._k.broker("orders"), order.client_order_id, done.to_json())
                pipe.srem(self._k.broker("open_orders"), order.client_order_id)
                events.append(event)
            if cash_delta:
                pipe.incrby(self._k.broker("cash"), cash_delta)
            pipe.execute()
        return events

    def expire_session_orders(self, session_date: dt.date) -> list[FillEvent]:
        """Expire DAY orders of a finished session still open at its close."""
        events = []
        with self._lock():
            for order in self.list_open_orders():
                if order.session_date > session_date.isoformat():
                    continue
                done = order.with_(status="expired", status_reason="session closed")
                pipe = self._r.pipeline(transaction=True)
                pipe.hset(self._k.broker("orders"), order.client_order_id, done.to_json())
                pipe.srem(self._k.broker("open_orders"), order.client_order_id)
                if order.intent == "exit":
                    self._bump_exit_attempt(order.symbol, pipe)
                pipe.execute()
                events.append(FillEvent(order.client_order_id, order.symbol, order.intent,
                                        "expired", 0, 0, order.session_date))
        return events

    # -- internals --------------------------------------------------------------------------
    def _bump_exit_attempt(self, symbol: str, pipe=None) -> None:
        """Count an exit of ``symbol`` that ended unfilled, so the next one gets a new id."""
        raw = self._r.hget(self._k.broker("positions"), symbol)
        if not raw:
            return
        pos = Position.from_json(raw)
        new = Position(**{**pos.__dict__, "exit_attempt": pos.exit_attempt + 1})
        target = pipe or self._r
        target.hset(self._k.broker("positions"), symbol, new.to_json())
        target.incr(self._k.broker("positions_version"))

    def _lock(self):
        return self._r.lock(self._k.broker("lock"), timeout=30, blocking_timeout=10)

    def _conflicts(self, request: OrderRequest) -> bool:
        raw = self._r.hget(self._k.broker("positions"), request.symbol)
        if not raw:
            return False
        pos = Position.from_json(raw)
        return (pos.qty > 0) != (request.side == "buy")

    def _fill(self, order: Order, open_px: float, when: str,
              positions: dict[str, Position], pipe) -> tuple[Order, FillEvent, int]:
        price = self._model.fill_price(open_px, order.side)
        pos = positions.get(order.symbol)
        qty = order.qty
        if order.close:
            if pos is None:
                done = order.with_(status="cancelled", status_reason="no position to close")
                return done, self._event(done, 0, 0), 0
            qty = abs(pos.qty)
        if order.order_type == "limit" and order.limit_price is not None:
            limit = Decimal(order.limit_price)
            if (order.side == "buy" and price > limit) or (order.side == "sell" and price < limit):
                done = order.with_(status="expired",
                                   status_reason=f"IOC limit {limit} not reached at {price}")
                return done, self._event(done, 0, 0), 0
        fees = self._model.fees_cents(qty)
        notional = cents(price * qty)
        pipe.incr(self._k.broker("positions_version"))
        sign = 1 if order.side == "buy" else -1
        cash_delta = -sign * notional - fees
        done = order.with_(status="filled", filled_qty=qty, filled_avg_price=str(price),
                           filled_at=when, fees_cents=fees)
        signed = sign * qty
        if pos is None or pos.qty == 0:
            new = Position(symbol=order.symbol, qty=signed, avg_price=str(price), opened_at=when,
                           session_date=order.session_date,
                           entry_client_order_id=order.client_order_id,
                           strategy=order.strategy, confidence=order.confidence,
                           entry_fees_cents=fees)
            positions[order.symbol] = new
            pipe.hset(self._k.broker("positions"), order.symbol, new.to_json())
        elif (pos.qty > 0) == (signed > 0):
            total = pos.qty + signed
            avg = ((pos.avg * abs(pos.qty) + price * qty) / abs(total)).quantize(_TICK)
            new = Position(**{**pos.__dict__, "qty": total, "avg_price": str(avg),
                              "entry_fees_cents": pos.entry_fees_cents + fees})
            positions[order.symbol] = new
            pipe.hset(self._k.broker("positions"), order.symbol, new.to_json())
        else:
            closing = min(qty, abs(pos.qty))
            direction = 1 if pos.qty > 0 else -1
            gross = cents((price - pos.avg) * closing * direction)
            entry_fees = pos.entry_fees_cents
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
                positions.pop(order.symbol, None)
                pipe.hdel(self._k.broker("positions"), order.symbol)
            else:
                new = Position(**{**pos.__dict__, "qty": remaining, "entry_fees_cents": 0})
                positions[order.symbol] = new
                pipe.hset(self._k.broker("positions"), order.symbol, new.to_json())
        return done, self._event(done, qty, notional), cash_delta

    @staticmethod
    def _event(order: Order, qty: int, notional_cents: int) -> FillEvent:
        return FillEvent(order.client_order_id, order.symbol, order.intent, order.status, qty,
                         notional_cents, order.session_date)


def _positive(value: str | None) -> bool:
    try:
        return value is not None and Decimal(value).is_finite() and Decimal(value) > 0
    except ArithmeticError:
        return False
