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

import contextlib
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import numpy as np
from redis import Redis

from core.brokers.base import FillEvent, Order, OrderRequest, Position
from core.brokers.fill_model import FillModel
from core.brokers.fill_model import dec as _dec
from core.brokers.positions_book import PositionsBook
from core.errors import BrokerUnavailable
from core.keys import Keys
from core.locks import TokenLock
from core.market.bar_store import SessionMeta
from core.models import HIGH, LOW, OPEN, VOLUME, symbol_index
from core.money import cents
from core.replay import RedisReplay
from core.scripts import queue_script

log = logging.getLogger(__name__)

_TICK = Decimal("0.0001")
_TTL_S = 4 * 24 * 3600
_LOCK_TTL_MS = 30_000  # the broker's lock expires if its holder dies
_LOCK_WAIT_S = 10.0  # how long a writer waits for the lock before giving up (retried)
_WORKING = ("accepted", "partially_filled")

# The working orders and the broker's lock in one step, for the fills of a bar: {0} (no
# lock taken) when no order is open and no position needs its stop checked; {-1} when
# another process holds the lock; else {1, ids, the orders' JSON (nil: gone)}.
# KEYS: open_orders, orders, lock, positions. ARGV: token, ttl_ms, check_positions (0/1).
_TAKE_WORKING_LUA = """
local ids = redis.call('SMEMBERS', KEYS[1])
if #ids == 0 and (ARGV[3] ~= '1' or redis.call('HLEN', KEYS[4]) == 0) then return {0} end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  return {-1}
end
local raws = {}
for i = 1, #ids, 500 do
  local part = redis.call('HMGET', KEYS[2], unpack(ids, i, math.min(i + 499, #ids)))
  for j = 1, #part do raws[#raws + 1] = part[j] end
end
return {1, ids, raws}
"""

# Record a new order once; a known client_order_id returns the stored order.
_SUBMIT_LUA = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {0, existing} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) end
redis.call('RPUSH', KEYS[3], ARGV[1])
return {1, ARGV[2]}
"""


# (the fill events, a transaction) -> the function that reads the replies of what it queued
Also = Callable[[list[FillEvent], Any], Callable[[list[Any]], None]]


@dataclass(frozen=True)
class _Account:
    """What one transaction read: the replay's session and bar (None, -1: no session),
    cash (cents), the working orders' ids (sorted) and the positions."""

    meta: SessionMeta | None
    bar: int
    cash: int
    open_ids: list[str]
    positions: dict[str, Position]


class SimulatedBroker:
    """A broker with its account (cash, positions, orders, fills, trades) in Redis."""

    # process_bar takes ``also``: the caller's fill bookkeeping joins its transaction
    fills_in_one_transaction = True

    def __init__(self, redis: Redis, keys: Keys, replay: RedisReplay, model: FillModel,
                 starting_cash_cents: int = 10_000_000, margin_multiplier: int = 4,
                 hard_to_borrow: frozenset[str] = frozenset(),
                 protective_stops: bool = False) -> None:
        self._r = redis
        self._k = keys
        self._replay = replay
        self._model = model
        self._submit = redis.register_script(_SUBMIT_LUA)
        self._take_working = redis.register_script(_TAKE_WORKING_LUA)
        self._starting_cash = starting_cash_cents
        self._margin = margin_multiplier
        self._htb = hard_to_borrow
        self._stops = protective_stops
        # this process's copy of the positions, kept current from the positions log
        self._book = PositionsBook(redis, keys)
        self._exposure_cache: tuple[tuple[bytes | None, int], tuple[int, int]] | None = None
        # the last entry_check: (request, what the account looked like, its answer)
        self._checked: tuple[OrderRequest, tuple[object, ...], str | None] | None = None

    # -- account set-up ---------------------------------------------------------------------
    def open_account(self) -> None:
        """Start a fresh account with the starting cash (idempotent)."""
        self._r.set(self._k.broker("cash"), self._starting_cash, nx=True, ex=_TTL_S)

    def cash_cents(self) -> int:
        """Cash balance in cents."""
        return int(self._r.get(self._k.broker("cash")) or self._starting_cash)

    # -- Broker protocol --------------------------------------------------------------------
    # Every call reads what it needs in one transaction (``_queue_account``): the replay
    # clock, cash, the working orders and the positions that changed since this process
    # last looked; an entry's check adds one more round trip (its quote and the working
    # entries' values).
    def submit_order(self, request: OrderRequest) -> Order:
        """Accept an order for the next fillable bar; duplicates return the first order."""
        return self._submit_with(request, self._read_account())

    def entry_check(self, request: OrderRequest) -> str | None:
        """Why the broker would reject this entry (wash trade, not shortable, halted, buying
        power), or None. Execution asks before reserving capital; two round trips. The
        answer is kept for the submission of the same request that follows: when the
        account reads the same then, the check is not run again."""
        pipe = self._r.pipeline(transaction=True)
        finish = self.queue_entry_check(pipe, request)
        return finish(pipe.execute())

    def queue_entry_check(self, pipe: Any, request: OrderRequest) -> Callable[[list[Any]],
                                                                              str | None]:
        """``entry_check`` whose first read rides on the caller's round trip (``pipe``);
        the returned function takes the replies of what it queued and answers."""
        read = self._queue_account(pipe)

        def finish(replies: list[Any]) -> str | None:
            account = read(replies)
            refusal = self._entry_refusal(request, account)
            self._checked = (request, self._fingerprint(account), refusal)
            return refusal

        return finish

    def _fingerprint(self, account: _Account) -> tuple[object, ...]:
        """What an entry's check depends on besides the request: the session and bar (the
        quote), cash, the working orders (their value) and the positions (their version)."""
        return (account.meta.date if account.meta else None, account.bar, account.cash,
                tuple(account.open_ids), *self._book.version)

    def close_position(self, symbol: str, client_order_id: str, reason: str) -> Order | None:
        """Submit a market order that closes the whole position at fill time (None if flat).
        One round trip before the order is accepted: the clock and this one position."""
        pipe = self._r.pipeline(transaction=True)
        finish = self.queue_close(pipe, symbol)
        return finish(pipe.execute())(client_order_id, reason)

    def queue_close(self, pipe: Any, symbol: str) -> Callable[
            [list[Any]], Callable[[str, str], Order | None]]:
        """``close_position``'s reads on the caller's round trip (``pipe``): the returned
        function takes their replies and gives the close, (client_order_id, reason) ->
        the order (None when flat)."""
        pipe.hmget(self._k.replay_state(), "day", "bar", "status")
        pipe.hget(self._k.broker("positions"), symbol)

        def finish(replies: list[Any]) -> Callable[[str, str], Order | None]:
            state, raw = replies

            def close(client_order_id: str, reason: str) -> Order | None:
                if raw is None:
                    return None
                pos = Position.from_json(raw)
                # an exit needs only the clock: cash and working orders matter to entries
                meta, bar = self._now_from(state)
                account = _Account(meta, bar, 0, [], {symbol: pos})
                return self._submit_with(OrderRequest(
                    client_order_id=client_order_id, symbol=symbol,
                    side="sell" if pos.qty > 0 else "buy", qty=abs(pos.qty), intent="exit",
                    close=True, reason=reason, strategy=pos.strategy), account)

            return close

        return finish

    def queue_lookup(self, pipe: Any, client_order_id: str) -> Callable[[Any], Order | None]:
        """Queue ``get_order_by_client_id`` on ``pipe`` (the caller's round trip); returns
        the function that turns its reply into the order."""
        pipe.hget(self._k.broker("orders"), client_order_id)
        return lambda raw: Order.from_json(raw) if raw else None

    def _read_account(self) -> _Account:
        pipe = self._r.pipeline(transaction=True)
        read = self._queue_account(pipe)
        return read(pipe.execute())

    def _queue_account(self, pipe: Any) -> Callable[[list[Any]], _Account]:
        """Queue the account's reads on ``pipe``: the clock, cash, the working orders and
        the positions that changed; the function returned reads the replies."""
        k = self._k
        pipe.hmget(k.replay_state(), "day", "bar", "status")
        pipe.get(k.broker("cash"))
        pipe.smembers(k.broker("open_orders"))
        start = self._book.queue_read(pipe)

        def read(replies: list[Any]) -> _Account:
            state, cash, open_ids, *book = replies
            meta, bar = self._now_from(state)
            return _Account(meta, bar,
                            int(cash) if cash is not None else self._starting_cash,
                            sorted(x.decode() for x in open_ids),
                            self._book.apply(*book, start))

        return read

    def _now_from(self, state: list[Any]) -> tuple[SessionMeta | None, int]:
        """The replay's session and last bar from an HMGET of day, bar and status (None,
        -1 when no session is running)."""
        day, bar, status = state
        days = self._replay.days()
        if day is None or status in (b"finished", b"empty") or not 0 <= int(day) < len(days):
            return None, -1
        return days[int(day)], int(bar)

    def _submit_with(self, request: OrderRequest, account: _Account) -> Order:
        meta, bar = account.meta, account.bar
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
            memo, self._checked = self._checked, None
            if memo is not None and memo[0] == request and memo[1] == self._fingerprint(
                    account):
                refusal = memo[2]  # checked a moment ago on the very same account
            else:
                refusal = self._entry_refusal(request, account)
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

    def _entry_refusal(self, request: OrderRequest, account: _Account) -> str | None:
        """Why this entry is refused given the account as read (one more round trip for the
        quote and the working entries), or None."""
        k = self._k
        meta, bar = account.meta, account.bar
        if meta is None:
            return "market closed: no replay session is running"
        if request.stop_price is not None and (why := self._stop_refusal(request)):
            return why
        pos = account.positions.get(request.symbol)
        if pos is not None and (pos.qty > 0) != (request.side == "buy"):
            return "opposite-side position open (wash trade)"
        if request.side == "sell" and request.symbol in self._htb:
            return f"{request.symbol} is not shortable (hard to borrow)"
        price = Decimal(request.limit_price) if _positive(request.limit_price) else None
        pipe = self._r.pipeline(transaction=False)
        index = symbol_index(meta.symbols)
        quote = request.symbol in index and bar >= 0
        if quote:
            off = bar * meta.row_bytes + index[request.symbol] * 40
            pipe.getrange(k.replay_data(meta.date), off + 24, off + 31)  # the close
        ids = account.open_ids
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
        exposure, signed_cost = self._exposure(account.positions)
        power = (account.cash + signed_cost) * self._margin - exposure - working
        if cents(price * request.qty) > power:
            return "insufficient buying power"
        return None

    def _exposure(self, positions: dict[str, Position]) -> tuple[int, int]:
        """(gross value, signed cost) of open positions at entry prices in cents, cached for
        the positions this process last read."""
        version = self._book.version
        if self._exposure_cache is not None and self._exposure_cache[0] == version:
            return self._exposure_cache[1]
        gross = sum((p.avg * abs(p.qty) for p in positions.values()), Decimal(0))
        signed = sum((p.avg * p.qty for p in positions.values()), Decimal(0))
        value = (cents(gross), cents(signed))
        self._exposure_cache = (version, value)
        return value

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
        """Positions and open orders; only the positions that changed are read."""
        pipe = self._r.pipeline(transaction=True)
        start = self._book.queue_read(pipe)
        pipe.smembers(self._k.broker("open_orders"))
        *book, open_ids = pipe.execute()
        positions = self._book.apply(*book, start)
        ids = sorted(x.decode() for x in open_ids)
        orders = []
        if ids:
            orders = [Order.from_json(r) for r in self._r.hmget(self._k.broker("orders"), ids)
                      if r]
        return positions, orders

    def queue_snapshot(self, pipe: Any, day: dt.date) -> tuple[int, Callable[
            [list[Any]], tuple[dict[str, Position], list[Order], int]]]:
        """Queue the reads of ``snapshot`` and of ``realized_pnl_cents(day)`` on ``pipe`` (a
        transaction the caller runs with its own reads). Returns how many replies they take
        and the function that turns those replies into (positions, open orders, realized
        cents); it makes one more round trip only when orders are working."""
        start = self._book.queue_read(pipe)
        pipe.smembers(self._k.broker("open_orders"))
        pipe.get(self._k.broker(f"realized:{day.isoformat()}"))

        def finish(replies: list[Any]) -> tuple[dict[str, Position], list[Order], int]:
            epoch, entries, open_ids, realized = replies
            positions = self._book.apply(epoch, entries, start)
            ids = sorted(x.decode() for x in open_ids)
            orders = []
            if ids:
                orders = [Order.from_json(r)
                          for r in self._r.hmget(self._k.broker("orders"), ids) if r]
            return positions, orders, int(realized or 0)

        return 4, finish

    def positions_cached(self) -> dict[str, Position]:
        """Open positions by symbol: one round trip, and only the positions that changed
        since this process last looked are read and parsed."""
        pipe = self._r.pipeline(transaction=True)
        start = self._book.queue_read(pipe)
        return self._book.apply(*pipe.execute(), start)

    def queue_positions(self, pipe: Any) -> tuple[int, Callable[[list[Any]], dict[str,
                                                                          Position]]]:
        """Queue ``positions_cached``'s reads on ``pipe`` (a transaction the caller runs);
        returns how many replies they take and the function that turns them into the
        positions."""
        start = self._book.queue_read(pipe)
        return 2, lambda replies: self._book.apply(*replies, start)

    # The positions log (``core.brokers.positions_book``): this process's copy follows it,
    # and the scoring process's listener is pushed what each fills transaction appends.
    def apply_pushed(self, data: bytes) -> bool:
        """Take one push of the positions log (``PositionsBook.apply_pushed``)."""
        return self._book.apply_pushed(data)

    def pushed_positions(self) -> dict[str, Position] | None:
        """The positions as of the last push, when every push so far continued this copy;
        None: read them (``positions_cached``)."""
        return self._book.pushed()

    def book_changes(self, cursor: tuple[int, int] | None) -> tuple[tuple[int, int],
                                                                     list[str] | None]:
        """The symbols whose position changed in this process's copy since ``cursor``
        (``PositionsBook.changes``), and the cursor to pass next time."""
        return self._book.changes(cursor)

    def compact_positions_log(self) -> None:
        """Empty the positions log (readers reload the hash once): at the end of a session.
        Under the broker's lock, so a reader holding it sees one epoch."""
        with self._lock():
            pipe = self._r.pipeline(transaction=True)
            self._book.queue_compact(pipe)
            pipe.execute()

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
    def process_bar(self, meta: SessionMeta, bar: int, row: np.ndarray,
                    also: Also | None = None) -> list[FillEvent]:
        """Fill the open orders due at bar ``bar`` of the session using its open prices.

        With protective stops on, the positions' stops are checked against this bar first.
        Processing the same bar again fills nothing twice: a partially filled order is next
        due at the following bar, a stopped position is gone. Two round trips: the broker's
        lock with the working orders and the positions that changed (no lock when nothing
        works); the writes with the lock's release, in one transaction. ``also(events,
        pipe)`` queues more commands on that transaction (the caller's bookkeeping of the
        fills) and returns what reads their replies; with nothing working they go in a
        round trip of their own.
        """
        events: list[FillEvent] = []
        k = self._k
        lock = TokenLock(self._r, k.broker("lock"), ttl_ms=_LOCK_TTL_MS)
        pipe = self._r.pipeline(transaction=False)
        queue_script(pipe, self._take_working,
                     [k.broker("open_orders"), k.broker("orders"), k.broker("lock"),
                      k.broker("positions")],
                     [lock.token, _LOCK_TTL_MS, 1 if self._stops else 0])
        start = self._book.queue_read(pipe)
        got, *book = pipe.execute()
        if int(got[0]) == 0:
            if also is not None:  # nothing working: the caller's commands alone
                pipe = self._r.pipeline(transaction=True)
                self._book.queue_push(pipe, [])  # where the log stands at the mark
                finish = also(events, pipe)
                finish(pipe.execute()[1:])
            return events  # the common case: nothing working, no lock
        if lock.taken(int(got[0]) == 1):
            pairs = sorted(zip((x.decode() for x in got[1]), got[2], strict=True))
            raws = [raw for _, raw in pairs]
        else:
            # another process holds the broker: wait for it, then read everything again
            self._acquire(lock)
            pipe = self._r.pipeline(transaction=True)
            pipe.smembers(k.broker("open_orders"))
            start = self._book.queue_read(pipe)
            open_ids, *book = pipe.execute()
            ids = sorted(x.decode() for x in open_ids)
            raws = self._r.hmget(k.broker("orders"), ids) if ids else []
        try:
            positions = self._book.apply(*book, start)
            working = [o for o in (Order.from_json(r) for r in raws if r)
                       if o.status in _WORKING]
            writes = _Coalesced()
            events = self._fill_due(meta, bar, row, working, positions, writes)
            pipe = self._r.pipeline(transaction=True)
            log_entries = writes.take_list(k.broker("positions_log"))
            writes.queue_on(pipe)
            self._book.queue_push(pipe, log_entries)  # and where the log stands at the mark
            n = len(pipe)
            finish = also(events, pipe) if also is not None else None
            m = len(pipe)
            lock.queue_release(pipe)
            replies = pipe.execute()
        except BaseException:
            lock.release()  # the queued release may not have run
            raise
        lock.released()
        if finish is not None:
            finish(replies[n:m])
        return events

    def _fill_due(self, meta: SessionMeta, bar: int, row: np.ndarray, working: list[Order],
                  positions: dict[str, Position], pipe) -> list[FillEvent]:
        """Queue on ``pipe`` the fills of bar ``bar`` (protective stops first, then the
        orders due); ``positions`` is updated as the fills land. Returns the events."""
        events: list[FillEvent] = []
        session = meta.date.isoformat()
        orders = [o for o in working if o.session_date == session and o.fill_after_bar <= bar]
        if not orders and not self._stops:
            return events
        index = symbol_index(meta.symbols)
        when = meta.bar_time(bar).isoformat()
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
                    pipe.hset(self._k.broker("orders"), order.client_order_id, done.to_json())
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
        """Count an exit of ``symbol`` that ended unfilled, so the next one gets a new id
        (queued on ``pipe``, a transaction, or written in one of its own)."""
        raw = self._r.hget(self._k.broker("positions"), symbol)
        if not raw:
            return
        pos = Position.from_json(raw)
        new = dc_replace(pos, **{"exit_attempt": pos.exit_attempt + 1})
        target = pipe if pipe is not None else self._r.pipeline(transaction=True)
        self._book.queue_change(target, symbol, new)
        if pipe is None:
            target.execute()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Hold the broker's lock (one writer of orders and positions at a time)."""
        lock = TokenLock(self._r, self._k.broker("lock"), ttl_ms=_LOCK_TTL_MS)
        self._acquire(lock)
        try:
            yield
        finally:
            lock.release()

    @staticmethod
    def _acquire(lock: TokenLock) -> None:
        """Take ``lock``, waiting up to ``_LOCK_WAIT_S`` for its holder; BrokerUnavailable
        (transient: the task is retried) when it is still held then."""
        deadline = time.monotonic() + _LOCK_WAIT_S
        while not lock.acquire():
            if time.monotonic() > deadline:
                raise BrokerUnavailable("simulated broker busy: its lock is still held")
            time.sleep(0.002)

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
            self._book.queue_change(pipe, order.symbol, new)
        elif (pos.qty > 0) == (signed > 0):
            total = pos.qty + signed
            avg = ((pos.avg * abs(pos.qty) + price * qty) / abs(total)).quantize(_TICK)
            new = dc_replace(pos, **{"qty": total, "avg_price": str(avg),
                              "entry_fees_cents": pos.entry_fees_cents + fees})
            positions[order.symbol] = new
            self._book.queue_change(pipe, order.symbol, new)
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
                self._book.queue_change(pipe, order.symbol, None)
            else:
                new = dc_replace(pos, **{"qty": remaining,
                                  "entry_fees_cents": pos.entry_fees_cents - entry_fees})
                positions[order.symbol] = new
                self._book.queue_change(pipe, order.symbol, new)
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


class _Coalesced:
    """Writes queued like a transaction's, sent as few commands as possible: one HSET and
    one HDEL per hash, one RPUSH per list, one SREM per set, one INCRBY per counter. The
    transaction applies them at once, so merging changes nothing as long as a field written
    twice keeps its last value and a list keeps its order (both kept here). Saves the
    client's per-command cost (~20 us each) on bars that fill many orders."""

    _DELETED = object()

    def __init__(self) -> None:
        self._hashes: dict[str, dict[str, object]] = {}
        self._lists: dict[str, list[str]] = {}
        self._srem: dict[str, list[str]] = {}
        self._incr: dict[str, int] = {}
        self._expire: dict[str, int] = {}

    def hset(self, key: str, field: str, value: str) -> None:
        self._hashes.setdefault(key, {})[field] = value

    def hdel(self, key: str, field: str) -> None:
        self._hashes.setdefault(key, {})[field] = self._DELETED

    def rpush(self, key: str, value: str) -> None:
        self._lists.setdefault(key, []).append(value)

    def take_list(self, key: str) -> list[str]:
        """The values pushed to ``key``, which ``queue_on`` then leaves to the caller."""
        return self._lists.pop(key, [])

    def srem(self, key: str, member: str) -> None:
        self._srem.setdefault(key, []).append(member)

    def incrby(self, key: str, amount: int) -> None:
        self._incr[key] = self._incr.get(key, 0) + int(amount)

    def expire(self, key: str, seconds: int) -> None:
        self._expire[key] = seconds

    def queue_on(self, pipe: Any) -> None:
        """Queue the merged writes on ``pipe`` (a transaction)."""
        for key, fields in self._hashes.items():
            kept = {f: v for f, v in fields.items() if v is not self._DELETED}
            gone = [f for f, v in fields.items() if v is self._DELETED]
            if kept:
                pipe.hset(key, mapping=kept)
            if gone:
                pipe.hdel(key, *gone)
        for key, values in self._lists.items():
            pipe.rpush(key, *values)
        for key, members in self._srem.items():
            pipe.srem(key, *members)
        for key, amount in self._incr.items():
            if amount:
                pipe.incrby(key, amount)
        for key, seconds in self._expire.items():
            pipe.expire(key, seconds)


def _positive(value: str | None) -> bool:
    try:
        return value is not None and Decimal(value).is_finite() and Decimal(value) > 0
    except ArithmeticError:
        return False
