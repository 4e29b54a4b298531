"""What Alpaca does not keep for us, and the day's book read back from its orders.

``ExitReasons``: why each exit order was sent, by client_order_id, in Redis. Alpaca orders
have no free-text field, and a reason cannot go into the id (see ``core.brokers.alpaca``).
``round_trips`` and ``realized_cents`` are pure: the day's orders in, the simulated broker's
trade records and the realized P/L out. Money: Decimal prices, integer cents; no fees
(Alpaca charges no commission on equities).
"""

from __future__ import annotations

import logging
from decimal import Decimal

from redis import Redis
from redis.exceptions import RedisError

from core.brokers.alpaca_mapping import ENTRY_ID
from core.brokers.base import Order
from core.money import cents

log = logging.getLogger(__name__)
_REASON_TTL_S = 4 * 24 * 3600


class ExitReasons:
    """Why each exit order was sent, by its client_order_id, in Redis (Alpaca keeps no note
    on an order). Best effort: a Redis failure is logged and never stops an exit."""

    def __init__(self, redis: Redis, prefix: str = "") -> None:
        self._r = redis
        self._prefix = prefix

    def _key(self, client_order_id: str) -> str:
        return f"{self._prefix}alpaca:exit_reason:{client_order_id}"

    def put(self, client_order_id: str, reason: str) -> None:
        """Record the reason of the exit about to be sent with ``client_order_id``."""
        try:
            self._r.set(self._key(client_order_id), reason, ex=_REASON_TTL_S)
        except RedisError as exc:
            log.warning("exit reason not recorded: %s", exc,
                        extra={"client_order_id": client_order_id, "reason": reason})

    def get(self, client_order_ids: list[str]) -> dict[str, str]:
        """The recorded reasons of these ids (ids without one are left out)."""
        if not client_order_ids:
            return {}
        try:
            raw = self._r.mget([self._key(c) for c in client_order_ids])
        except RedisError as exc:
            log.warning("exit reasons not read: %s", exc)
            return {}
        return {c: (v.decode() if isinstance(v, bytes) else str(v))
                for c, v in zip(client_order_ids, raw, strict=True) if v is not None}


def round_trips(orders: list[Order], reasons: dict[str, str]) -> list[dict[str, object]]:
    """Each filled entry of ours paired with its filled exits (``<entry id>-x<n>`` and the
    protective stop leg ``-s``), in the simulated broker's trade format. The exit reason is
    ``reasons``' (recorded when the close was sent): "broker_stop" for a stop order, "exit"
    when none was recorded."""
    out: list[dict[str, object]] = []
    for entry in orders:
        if not (ENTRY_ID.match(entry.client_order_id) and entry.filled_qty > 0
                and entry.filled_avg_price):
            continue
        direction = 1 if entry.side == "buy" else -1
        entry_px = Decimal(entry.filled_avg_price)
        for x in orders:
            if not (x.client_order_id.startswith(entry.client_order_id + "-")
                    and x.filled_qty > 0 and x.filled_avg_price):
                continue
            exit_px = Decimal(x.filled_avg_price)
            gross = cents((exit_px - entry_px) * x.filled_qty * direction)
            out.append({
                "client_order_id": entry.client_order_id,
                "exit_client_order_id": x.client_order_id, "date": entry.session_date,
                "symbol": entry.symbol, "side": entry.side, "qty": x.filled_qty,
                "entry_time": entry.filled_at or entry.submitted_at,
                "entry_price": str(entry_px), "exit_time": x.filled_at or x.submitted_at,
                "exit_price": str(exit_px),
                "exit_reason": "broker_stop" if x.order_type in ("stop", "stop_limit")
                else reasons.get(x.client_order_id, "exit"),
                "gross_pnl_cents": gross, "fees_cents": 0, "pnl_cents": gross,
                "strategy": entry.strategy, "confidence": entry.confidence})
    return out


def realized_cents(orders: list[Order]) -> int:
    """P/L (cents) realized by the fills of ``orders``, average cost per symbol."""
    fills = sorted((o for o in orders if o.filled_qty > 0
                    and o.filled_avg_price), key=lambda o: o.filled_at or o.submitted_at)
    pos: dict[str, tuple[int, Decimal]] = {}
    realized = Decimal(0)
    for o in fills:
        q = o.filled_qty if o.side == "buy" else -o.filled_qty
        px = Decimal(o.filled_avg_price or "0")
        have, avg = pos.get(o.symbol, (0, Decimal(0)))
        if have == 0 or (have > 0) == (q > 0):
            total = have + q
            avg = (avg * abs(have) + px * abs(q)) / abs(total)
            pos[o.symbol] = (total, avg)
            continue
        closing = min(abs(q), abs(have))
        realized += (px - avg) * closing * (1 if have > 0 else -1)
        left = have + q
        if left == 0:
            pos[o.symbol] = (0, Decimal(0))
        elif (left > 0) == (have > 0):
            pos[o.symbol] = (left, avg)
        else:
            pos[o.symbol] = (left, px)  # flipped: the rest opened at this price
    return cents(realized)
