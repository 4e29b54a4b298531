"""The exec side: submit and close orders exactly once, end of day, kill switch, reconcile.

Rules that keep real money safe:
- every order has a deterministic client_order_id; before anything is sent the broker is
  asked for that id, so a redelivered or retried task never submits twice;
- capital is reserved atomically before an entry is sent, released on rejection, shrunk to
  the filled value, and orphans (reserved, never sent) are released at the end of the day;
- a per-order token lock keeps two workers from sending the same order at once; a busy lock
  or a broker failure raises a TransientError so Celery retries with backoff, and the retry
  starts with the lookup;
- a shared circuit breaker stops new entries after repeated broker failures; exits and EOD
  closes ignore it.
Money in integer cents; dates are New York session dates.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from core.brokers.base import FillEvent, Order, OrderRequest, Position
from core.decision import in_eod_window, reservation_cents
from core.errors import BrokerUnavailable, DuplicateOrder, OrderInFlight, TransientError
from core.locks import TokenLock
from core.money import cents
from core.orders import OrderIntent, exit_client_order_id
from core.runtime import Runtime

log = logging.getLogger(__name__)
_TTL_S = 4 * 24 * 3600
_FAILED = ("cancelled", "expired", "rejected")


def _acquire(rt: Runtime, coid: str,
             extra: Callable[[Any], Callable[[list[Any]], Any]] | None = None,
             ) -> tuple[TokenLock, Order | None, Callable[[], Any] | None]:
    """Take the order's lock and look the order up under it, in one round trip where the
    broker can answer on our Redis connection (the simulated one); OrderInFlight (transient:
    Celery retries) when another worker holds the lock. ``extra(pipe)`` queues more reads
    on the same round trip and returns the function that turns their replies into its
    result; the third value calls it (only when the caller needs the answer)."""
    lock = TokenLock(rt.redis, rt.keys.order_lock(coid),
                     ttl_ms=int(rt.settings.order_lock_ttl_s * 1000))
    queue_lookup = getattr(rt.broker, "queue_lookup", None)
    pipe = rt.redis.pipeline(transaction=True)  # one consistent view, taken with the lock
    lock.queue_acquire(pipe)
    lookup = queue_lookup(pipe, coid) if queue_lookup is not None else None
    n = len(pipe)
    finish = extra(pipe) if extra is not None else None
    replies = pipe.execute()
    if not lock.taken(replies[0]):
        raise OrderInFlight(coid)
    try:
        order = (lookup(replies[1]) if lookup is not None
                 else rt.broker.get_order_by_client_id(coid))
    except BaseException:
        lock.release()
        raise
    rest = replies[n:]
    return lock, order, (lambda: finish(rest)) if finish is not None else None


def _known(base: dict[str, Any], order: Order | None) -> dict[str, Any] | None:
    """The result for an order the broker already has (found by client_order_id)."""
    if order is None:
        return None
    return {**base, "status": "exists", "order_status": order.status}


def _final(rt: Runtime, intent: OrderIntent, work: Any) -> dict[str, Any]:
    """Run ``work``; complete the bar's ledger unless the outcome is still open (retry)."""
    try:
        result = work()
    except TransientError:
        raise  # Celery retries; the retry starts with the lookup by client_order_id
    except Exception:
        rt.replay.complete_pending(intent.session_date, intent.bar, intent.client_order_id)
        raise
    rt.replay.complete_pending(intent.session_date, intent.bar, intent.client_order_id)
    return result


# --- entries --------------------------------------------------------------------------------
def submit_order(rt: Runtime, payload: dict[str, Any]) -> dict[str, Any]:
    """Reserve capital and submit one entry exactly once."""
    intent = OrderIntent.model_validate(payload)
    return _final(rt, intent, lambda: _submit_entry(rt, intent))


def _queue_refusal(rt: Runtime, intent: OrderIntent,
                   pipe: Any) -> Callable[[list[Any]], str | None]:
    """Queue the reads that tell why a new entry must not be sent now (kill switch, loss
    halt, not reconciled, caps, breaker) on ``pipe``; returns the function that takes their
    replies and answers (None: it may be sent)."""
    day = intent.session_date
    pipe.exists(rt.keys.halt())
    pipe.exists(rt.keys.loss_halt(day))
    pipe.exists(rt.keys.reconciled(day))
    queue_allow = getattr(rt.breaker, "queue_allow", None)
    allow = queue_allow(pipe) if queue_allow is not None else None

    def finish(replies: list[Any]) -> str | None:
        halted, loss_halted, reconciled = replies[:3]
        if halted:
            return "halted"
        if loss_halted:
            return "daily_loss_limit"
        if not reconciled:
            return "not_reconciled"
        if reservation_cents(intent) > rt.settings.max_position_value_cents:
            return "max_position_value"
        if not (allow(replies[3]) if allow is not None else rt.breaker.allow()):
            return "breaker_open"
        return None

    return finish


def _submit_entry(rt: Runtime, intent: OrderIntent) -> dict[str, Any]:
    coid = intent.client_order_id
    base = {"client_order_id": coid, "symbol": intent.symbol}
    if intent.intent != "entry" or intent.qty <= 0 or intent.limit_price is None:
        return {**base, "status": "invalid", "reason": "submit_order takes sized entries only"}
    stop = None
    if rt.settings.protective_stop:  # the stop-loss travels with the entry (OTO) to the broker
        from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

        pct = Decimal(repr(float(rt.settings.stop_loss_pct)))
        buy = intent.side == "buy"
        stop = str((Decimal(intent.ref_price) * (1 - pct if buy else 1 + pct)).quantize(
            Decimal("0.0001"), rounding=ROUND_FLOOR if buy else ROUND_CEILING))
    tif = "ioc" if rt.settings.partial_fill_policy == "cancel" else "day"
    request = OrderRequest(
        client_order_id=coid, symbol=intent.symbol, side=intent.side, qty=intent.qty,
        order_type="limit", limit_price=intent.limit_price, time_in_force=tif,
        intent="entry", reason=intent.reason, strategy=intent.strategy,
        confidence=intent.confidence, stop_price=stop)
    # one lookup, under the lock: an order the broker already has (a redelivery or a retry
    # after a lost answer) is reported, never refused or sent again. The refusal checks'
    # reads ride on the same round trip; they are answered only when the order is new.
    # the broker's first read for its check rides along too, when it can (the simulated one)
    queue_check = getattr(rt.broker, "queue_entry_check", None)

    def extra(pipe: Any) -> Callable[[list[Any]], tuple[str | None, Any]]:
        start = len(pipe)
        refusal = _queue_refusal(rt, intent, pipe)
        n = len(pipe) - start  # the refusal's replies come first, then the broker's
        check = queue_check(pipe, request) if queue_check is not None else None
        return lambda replies: (refusal(replies[:n]),
                                (lambda: check(replies[n:])) if check is not None else None)

    lock, order, answers = _acquire(rt, coid, extra)
    try:
        if known := _known(base, order):
            return known
        assert answers is not None  # ``extra`` was given
        refusal, broker_check = answers()
        if refusal:
            log.info("entry refused: %s", refusal, extra=base)
            return {**base, "status": "refused", "reason": refusal}
        broker_says = broker_check() if broker_check is not None else rt.broker.entry_check(
            request)
        if broker_says:
            log.info("entry refused before sending: %s", broker_says, extra=base)
            return {**base, "status": "refused", "reason": broker_says}
        day = intent.session_date
        res = rt.limits.reserve(day, coid, reservation_cents(intent),
                                rt.settings.daily_limit_cents)
        if not res.ok:
            log.info("entry refused by the daily limit", extra={
                **base, "reserve_status": res.status, "used_cents": res.used_cents})
            return {**base, "status": "refused", "reason": res.status}
        order = _send(rt, request)
        if order.status == "rejected":
            rt.limits.adjust(day, coid, 0)
            log.warning("entry rejected by the broker: %s", order.status_reason, extra=base)
            return {**base, "status": "rejected", "reason": order.status_reason}
        pipe = rt.redis.pipeline(transaction=False)
        pipe.sadd(rt.keys.entries(day), f"{intent.symbol}:{intent.side}")
        pipe.expire(rt.keys.entries(day), _TTL_S)
        pipe.execute()
        return {**base, "status": order.status, "qty": order.qty}
    finally:
        lock.release()


def _send(rt: Runtime, request: OrderRequest) -> Order:
    """Submit; an unknown outcome re-raises (retry looks up), a duplicate id is looked up."""
    try:
        order = rt.broker.submit_order(request)
    except DuplicateOrder:
        found = rt.broker.get_order_by_client_id(request.client_order_id)
        if found is None:
            rt.breaker.record_failure()
            raise BrokerUnavailable(
                f"duplicate reported for {request.client_order_id} but not found") from None
        order = found
    except BrokerUnavailable:
        state = rt.breaker.record_failure()
        log.warning("broker failure (breaker %s)", state,
                    extra={"client_order_id": request.client_order_id})
        if state == "open" and rt.alerts is not None:
            rt.alerts.send("breaker", "circuit breaker open: new entries stop for "
                                      f"{rt.settings.breaker_cooldown_s:g} s",
                           once_key=f"breaker:{int(time.time() // 60)}")
        raise
    if not rt.breaker.clean:
        rt.breaker.record_success()  # only when something is on record: saves a round trip
    return order


# --- exits ----------------------------------------------------------------------------------
def close_position(rt: Runtime, payload: dict[str, Any]) -> dict[str, Any]:
    """Close one position exactly once (exits ignore the breaker and the kill switch)."""
    intent = OrderIntent.model_validate(payload)
    return _final(rt, intent,
                  lambda: close_symbol(rt, intent.symbol, intent.client_order_id, intent.reason))


def close_symbol(rt: Runtime, symbol: str, coid: str, reason: str) -> dict[str, Any]:
    """Send the order that closes ``symbol``'s whole position, once per client_order_id."""
    base = {"client_order_id": coid, "symbol": symbol}
    # the broker's reads for the close ride along, when it can (the simulated one)
    queue_close = getattr(rt.broker, "queue_close", None)
    lock, order, closer = _acquire(
        rt, coid, (lambda pipe: queue_close(pipe, symbol)) if queue_close is not None else None)
    try:  # one lookup, under the lock (see _submit_entry)
        if known := _known(base, order):
            return known
        try:
            order = (closer()(coid, reason) if closer is not None
                     else rt.broker.close_position(symbol, coid, reason))
        except BrokerUnavailable:
            rt.breaker.record_failure()
            raise
        if order is None:
            return {**base, "status": "flat"}
        return {**base, "status": order.status, "reason": order.status_reason or reason}
    finally:
        lock.release()


def exit_attempts(rt: Runtime, pos: Position) -> int:
    """Exit orders already used for this position (a failed exit gets a fresh id)."""
    attempt = 0
    while attempt < 99:
        order = rt.broker.get_order_by_client_id(
            exit_client_order_id(pos.entry_client_order_id, attempt + 1))
        if order is None or order.status in ("accepted", "partially_filled", "filled"):
            return attempt
        attempt += 1
    return attempt


# --- fills and reservations -------------------------------------------------------------------
def apply_fill_events(rt: Runtime, events: list[FillEvent],
                      then: Callable[[Any], None] | None = None) -> None:
    """Make each entry's reservation follow its fill: shrink to the filled value, or release.

    A partial fill (an IOC entry's filled part, or a DAY order that ended with some shares
    filled) keeps the value filled; an order still working ("partially_filled") keeps its
    whole reservation until it ends. One round trip, however many fills; ``then(pipe)``
    queues more commands on it.
    """
    pipe = rt.redis.pipeline(transaction=False)
    finish = queue_fill_events(rt, events, pipe, then)
    finish(pipe.execute() if len(pipe) else [])


def queue_fill_events(rt: Runtime, events: list[FillEvent], pipe: Any,
                      then: Callable[[Any], None] | None = None
                      ) -> Callable[[list[Any]], None]:
    """``apply_fill_events`` queued on ``pipe`` (another round trip, e.g. the simulated
    broker's fills transaction); returns the function that reads the replies and reports
    what does not add up (a fill without a reservation, one above it)."""
    by_day: dict[str, list[FillEvent]] = {}
    for ev in events:
        if ev.intent != "entry" or ev.status == "partially_filled":
            continue
        by_day.setdefault(ev.session_date, []).append(ev)
    readers = []
    for date, evs in by_day.items():
        fills = [(ev.client_order_id, ev.notional_cents, ev.filled_qty > 0) for ev in evs]
        readers.append((evs, rt.limits.settle_fills(dt.date.fromisoformat(date), fills, pipe)))
    if then is not None:
        then(pipe)

    def finish(replies: list[Any]) -> None:
        # the fill alerts once the round trip is done: never for a fill that did not land,
        # and off the way to the fills-done mark (an alert's rate check is a round trip)
        if rt.alerts is not None:
            for ev in events:
                if ev.filled_qty > 0 and ev.status in ("filled", "partially_filled"):
                    rt.alerts.send("fill", f"{ev.intent} {ev.symbol} {ev.status}: "
                                           f"{ev.filled_qty} sh, ${ev.notional_cents / 100:,.2f}"
                                           f" ({ev.client_order_id})")
        for (evs, read), reply in zip(readers, replies, strict=False):
            for ev, held in zip(evs, read(reply), strict=True):
                if held is None:
                    log.error("fill without reservation",
                              extra={"client_order_id": ev.client_order_id})
                elif ev.filled_qty > 0 and ev.notional_cents > held:
                    log.error("fill value above its reservation", extra={
                        "client_order_id": ev.client_order_id,
                        "filled_cents": ev.notional_cents, "reserved_cents": held})

    return finish


def release_orphans(rt: Runtime, day: dt.date) -> list[str]:
    """Release reservations whose order never reached the broker or ended unfilled."""
    released = []
    for coid, amount in rt.limits.reservations(day).items():
        if amount <= 0:
            continue
        order = rt.broker.get_order_by_client_id(coid)
        if order is None or order.status in _FAILED:
            rt.limits.adjust(day, coid, 0)
            released.append(coid)
    if released:
        log.warning("released %d reservations without a filled order", len(released),
                    extra={"date": day.isoformat(), "client_order_ids": ",".join(released)})
    return released


def reconcile(rt: Runtime, day: dt.date) -> dict[str, Any]:
    """Rebuild today's used capital and entries from the broker (the source of truth).

    Adds what the broker knows and Redis lost, and frees reservations of orders that ended
    unfilled; reservations of orders still being sent are left alone.
    """
    orders = [o for o in rt.broker.all_orders()
              if o.session_date == day.isoformat() and o.intent == "entry"]
    current = rt.limits.reservations(day)
    fixes: dict[str, int] = {}
    for o in orders:
        have = current.get(o.client_order_id)
        filled_value = (cents(_decimal(o.filled_notional)) if o.filled_notional
                        else cents(_decimal(o.filled_avg_price) * o.filled_qty))
        if o.status in ("accepted", "partially_filled"):
            want = have if have is not None else _order_value(
                o, rt.settings.entry_collar_pct)
        else:  # terminal: what filled stays counted, the rest is freed
            want = filled_value if have is None else min(have, filled_value)
        if want != have:
            fixes[o.client_order_id] = want
    used = rt.limits.rebuild(day, fixes)
    entered = {f"{o.symbol}:{o.side}" for o in orders if o.status != "rejected"}
    pipe = rt.redis.pipeline(transaction=True)
    if entered:
        pipe.sadd(rt.keys.entries(day), *entered)
        pipe.expire(rt.keys.entries(day), _TTL_S)
    pipe.set(rt.keys.reconciled(day), json.dumps({"at": time.time(), "fixed": len(fixes)}),
             ex=_TTL_S)
    pipe.execute()
    if fixes:
        log.warning("reconcile corrected %d reservations", len(fixes),
                    extra={"date": day.isoformat(), "used_cents": used})
    return {"date": day.isoformat(), "orders": len(orders), "fixed": len(fixes),
            "used_cents": used}


def _decimal(value: str | None):
    from decimal import Decimal

    return Decimal(value or "0")


def _order_value(order: Order, collar_pct: float) -> int:
    """Conservative value (cents) of a working entry whose reservation was lost.

    A buy is capped by its limit. A short's limit sits one collar below the reference price,
    so its value is bounded by the mirror above it: about limit x (1 + c) / (1 - c), with c
    the entry collar; this estimate never undercounts.
    """
    from decimal import ROUND_CEILING, Decimal

    from core.risk import position_value_cents

    price = _decimal(order.limit_price) if order.limit_price else _decimal("0")
    if order.side == "sell":
        collar = Decimal(repr(collar_pct))
        price = (price * (1 + collar) / (1 - collar)).quantize(Decimal("0.0001"),
                                                              rounding=ROUND_CEILING)
    return position_value_cents(order.qty, price)


# --- end of day and kill switch ---------------------------------------------------------------
def is_halted(rt: Runtime) -> bool:
    """True while the kill switch is engaged."""
    return bool(rt.redis.exists(rt.keys.halt()))


def close_all(rt: Runtime, reason: str) -> dict[str, Any]:
    """Cancel working entries (releasing their capital) and close every position.

    A symbol whose close fails is tried once more with a fresh exit id; what still fails is
    reported so the caller (beat fires EOD again) keeps trying.
    """
    cancelled = []
    for order in rt.broker.list_open_orders():
        if order.intent == "entry":
            done = rt.broker.cancel_order(order.client_order_id)
            if done is not None and done.status == "cancelled":
                cancelled.append(order.client_order_id)
                # what already filled stays counted; the rest of the reservation is freed
                filled = (cents(_decimal(done.filled_notional)) if done.filled_notional
                          else 0)
                apply_fill_events(rt, [FillEvent(order.client_order_id, order.symbol, "entry",
                                                 "cancelled", done.filled_qty, filled,
                                                 order.session_date)])
    closing: dict[str, str] = {}
    failed: list[str] = []
    for symbol, pos in sorted(rt.broker.get_positions().items()):
        for _ in range(2):
            coid = exit_client_order_id(pos.entry_client_order_id, exit_attempts(rt, pos) + 1)
            try:
                closing[symbol] = close_symbol(rt, symbol, coid, reason)["status"]
                break
            except TransientError as exc:
                log.warning("close failed, escalating: %s", exc, extra={"symbol": symbol})
        else:
            failed.append(symbol)
    return {"cancelled": cancelled, "closing": closing, "failed": failed}


def eod_close(rt: Runtime) -> dict[str, Any]:
    """Inside the EOD window of the session's real close: flatten (idempotent)."""
    meta, bar = rt.session_now()
    if meta is None:
        return {"status": "no_session"}
    decision_time = meta.bar_time(max(bar, 0)) + dt.timedelta(seconds=meta.bar_seconds)
    if rt.live_clock:  # the wall clock decides, whatever the feed has published
        decision_time = max(decision_time, rt.now_fn())
    if decision_time >= meta.close_time:
        return {"status": "closed", "date": meta.date.isoformat()}
    if not in_eod_window(decision_time, meta.close_time, rt.settings.eod_close_minutes_before):
        return {"status": "outside_window", "date": meta.date.isoformat(), "bar": bar}
    result = close_all(rt, "eod")
    flat = not rt.broker.get_positions()
    if flat and rt.alerts is not None:
        pnl = rt.broker.realized_pnl_cents(meta.date) / 100
        rt.alerts.send("eod", f"{meta.date} flat before the close; realized P/L ${pnl:,.2f}",
                       once_key=f"eod:{meta.date.isoformat()}")
    return {"status": "flat" if flat else "closing", "date": meta.date.isoformat(), "bar": bar,
            **result}


def flatten_all(rt: Runtime, reason: str = "flatten") -> dict[str, Any]:
    """Kill switch: halt new entries until resumed, cancel entries, close every position."""
    rt.redis.set(rt.keys.halt(), json.dumps({"reason": reason, "at": time.time()}))
    log.warning("kill switch engaged: flattening", extra={"reason": reason})
    result = close_all(rt, reason)
    left = sorted(rt.broker.get_positions())
    if rt.alerts is not None:
        rt.alerts.send("halt", f"kill switch engaged ({reason}): entries halted, "
                               f"{len(left)} position(s) still closing")
    return {"status": "halted", **result, "positions_left": left}


def resume_trading(rt: Runtime) -> dict[str, Any]:
    """Clear the kill switch so entries may resume."""
    cleared = bool(rt.redis.delete(rt.keys.halt()))
    log.warning("kill switch cleared" if cleared else "resume: was not halted")
    return {"status": "resumed" if cleared else "not_halted"}
