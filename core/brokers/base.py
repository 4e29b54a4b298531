"""The broker role: order and position types and the ``Broker`` protocol.

Quantities are whole shares; prices are Decimal US dollars; money totals are integer cents;
times are ISO-8601 strings with the America/New_York offset.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Literal, Protocol

Side = Literal["buy", "sell"]
OrderStatus = Literal["accepted", "partially_filled", "filled", "cancelled", "expired",
                      "rejected"]
# "partially_filled" is not terminal: the order keeps working for its remaining quantity.
TERMINAL: frozenset[str] = frozenset({"filled", "cancelled", "expired", "rejected"})


@dataclass(frozen=True)
class OrderRequest:
    """What we ask the broker to do. ``close=True`` closes whatever the position holds.

    ``stop_price`` (entries only) attaches a protective stop held at the broker (OTO): once the
    entry fills, a stop order closing the whole position rests at that price.
    """

    client_order_id: str
    symbol: str
    side: Side
    qty: int
    order_type: Literal["market", "limit"] = "market"
    limit_price: str | None = None
    time_in_force: Literal["day", "ioc"] = "day"
    intent: Literal["entry", "exit"] = "entry"
    close: bool = False
    reason: str = ""
    strategy: str = ""
    confidence: float | None = None
    stop_price: str | None = None


def _shallow(obj: object) -> dict[str, object]:
    """A dataclass as a dict of its fields, without ``asdict``'s deep copy (every field here
    is a str, number, None or a flat dict of str, which json.dumps reads as it is)."""
    names = _FIELDS.get(type(obj))
    if names is None:
        names = _FIELDS[type(obj)] = tuple(f.name for f in fields(obj))  # type: ignore[arg-type]
    return {name: getattr(obj, name) for name in names}


_FIELDS: dict[type, tuple[str, ...]] = {}


@dataclass(frozen=True)
class Order:
    """An order as the broker knows it.

    ``filled_qty`` and ``filled_avg_price`` (volume-weighted) accumulate over the fills;
    ``filled_notional`` is their exact value (sum of price x qty, US dollars);
    ``stop_price`` is the protective stop an entry carries (OTO), if any.
    """

    client_order_id: str
    symbol: str
    side: Side
    qty: int
    order_type: str
    limit_price: str | None
    time_in_force: str
    intent: str
    close: bool
    reason: str
    strategy: str
    confidence: float | None
    status: OrderStatus
    session_date: str
    submitted_at: str
    fill_after_bar: int = 0
    filled_qty: int = 0
    filled_avg_price: str | None = None
    filled_at: str | None = None
    fees_cents: int = 0
    status_reason: str = ""
    accepted_wall: float = 0.0
    stop_price: str | None = None
    filled_notional: str | None = None

    def to_json(self) -> str:
        """Serialise for storage (fields in declaration order)."""
        return json.dumps(_shallow(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Order:
        """Parse a stored order."""
        return cls(**json.loads(raw))

    def with_(self, **changes: object) -> Order:
        """A copy with some fields changed (as ``dataclasses.replace``, which costs ~10x
        more on this many fields: the fill path makes two per order). An unknown field
        raises TypeError."""
        unknown = changes.keys() - _ORDER_FIELDS
        if unknown:
            raise TypeError(f"Order has no field(s) {sorted(unknown)}")
        new = object.__new__(Order)
        state = new.__dict__
        state.update(self.__dict__)
        state.update(changes)
        return new


_ORDER_FIELDS = frozenset(f.name for f in fields(Order))


@dataclass(frozen=True)
class Position:
    """An open position. ``qty`` is signed: positive long, negative short.

    ``stop_price`` is the protective stop resting at the broker for it (None: none).
    """

    symbol: str
    qty: int
    avg_price: str
    opened_at: str
    session_date: str
    entry_client_order_id: str
    strategy: str = ""
    confidence: float | None = None
    entry_fees_cents: int = 0
    exit_attempt: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    stop_price: str | None = None

    @property
    def side(self) -> Side:
        """'buy' for a long position, 'sell' for a short one."""
        return "buy" if self.qty > 0 else "sell"

    @functools.cached_property
    def avg(self) -> Decimal:
        """Average entry price (US dollars), parsed once per object."""
        return Decimal(self.avg_price)

    @functools.cached_property
    def avg_float(self) -> float:
        """Average entry price as a float (US dollars), parsed once per object."""
        return float(self.avg_price)

    def to_json(self) -> str:
        """Serialise for storage (fields in declaration order)."""
        return json.dumps(_shallow(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Position:
        """Parse a stored position."""
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class FillEvent:
    """An order reaching a terminal state, or a partial fill of a working order (status
    "partially_filled"). ``filled_qty`` and ``notional_cents`` are the order's totals so far
    (cents, shares)."""

    client_order_id: str
    symbol: str
    intent: str
    status: OrderStatus
    filled_qty: int
    notional_cents: int
    session_date: str


class Broker(Protocol):
    """The broker role shared by the simulated broker and the Alpaca adapter."""

    def submit_order(self, request: OrderRequest) -> Order:
        """Submit once; a known client_order_id returns the existing order unchanged."""
        ...

    def get_order_by_client_id(self, client_order_id: str) -> Order | None: ...

    def cancel_order(self, client_order_id: str) -> Order | None: ...

    def list_open_orders(self) -> list[Order]: ...

    def get_positions(self) -> dict[str, Position]: ...

    def close_position(self, symbol: str, client_order_id: str, reason: str) -> Order | None:
        """Close the whole position at market; None when there is nothing to close."""
        ...

    def entry_check(self, request: OrderRequest) -> str | None:
        """Why the broker would reject this entry (buying power, not shortable, halted, wash
        trade), or None."""
        ...
