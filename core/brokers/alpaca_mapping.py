"""Alpaca's answers as the project's types, and its errors as the project's errors (pure
mapping, plus the plain records of account, clock and calendar and the client hardening).
Used by the adapter in ``core.brokers.alpaca``. Money: Decimal prices, integer cents, whole
shares; times America/New_York."""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import requests
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient

from core.brokers.base import FillEvent, Order
from core.calendar import NY
from core.errors import (
    BrokerUnavailable,
    ConfigError,
    DuplicateOrder,
    InsufficientBuyingPower,
    OrderRejected,
    RateLimited,
    TradingError,
)
from core.money import cents

log = logging.getLogger(__name__)

T = TypeVar("T")

ENTRY_ID = re.compile(r"^([a-z][a-z0-9]{0,11})-([A-Z][A-Z0-9.]{0,9})-(\d{8})-(\d{4})-([LS])$")
EXIT_ID = re.compile(r"^(.+)-x(\d{1,2})$")

_WORKING_ALPACA = frozenset({
    "new", "accepted", "pending_new", "accepted_for_bidding", "pending_review", "held",
    "suspended", "stopped", "pending_cancel", "pending_replace", "partially_filled"})
_FAILED = ("cancelled", "expired", "rejected")
_PAGE = 500


# --- pure mapping ----------------------------------------------------------------------------
def map_status(alpaca_status: str, filled_qty: int, qty: int) -> str:
    """Alpaca's order status -> the project's OrderStatus.

    Working states (new, accepted, pending_new, held, pending_cancel, ...) are "accepted", or
    "partially_filled" once shares filled; canceled -> "cancelled"; replaced -> "cancelled"
    (the replacement is another order); done_for_day -> "expired" (a DAY order is finished);
    calculated -> "filled" when complete, else "expired".
    """
    s = alpaca_status.lower()
    if s == "filled":
        return "filled"
    if s in ("canceled", "cancelled", "replaced"):
        return "cancelled"
    if s in ("expired", "done_for_day"):
        return "expired"
    if s == "rejected":
        return "rejected"
    if s == "calculated":
        return "filled" if qty and filled_qty >= qty else "expired"
    return "partially_filled" if filled_qty > 0 else "accepted"


def intent_of(client_order_id: str) -> tuple[str, str]:
    """(intent, strategy) read from a client_order_id; foreign ids are exits, no strategy."""
    m = ENTRY_ID.match(client_order_id)
    if m:
        return "entry", m.group(1)
    x = EXIT_ID.match(client_order_id)
    if x and (e := ENTRY_ID.match(x.group(1))):
        return "exit", e.group(1)
    return "exit", ""


def _val(v: Any) -> str:
    """An enum or plain value as a lower-case string."""
    v = getattr(v, "value", v)
    return "" if v is None else str(v).lower()


def _dec(v: Any) -> Decimal | None:
    """A price/quantity field (str or float from alpaca-py) as Decimal; None when empty."""
    if v is None or v == "":
        return None
    try:
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(str(v))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _dstr(v: Any) -> str | None:
    d = _dec(v)
    if d is None:
        return None
    return format(d.normalize(), "f") if d == d.to_integral_value() else format(d, "f")


def _ny_iso(ts: dt.datetime | str | None) -> str | None:
    if ts is None or ts == "":
        return None
    if isinstance(ts, str):
        ts = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(NY).isoformat()


def _get(o: Any, name: str) -> Any:
    return o.get(name) if isinstance(o, dict) else getattr(o, name, None)


def order_from_alpaca(o: Any) -> Order:
    """An alpaca-py Order (or its JSON dict) as the project's Order."""
    coid = str(_get(o, "client_order_id"))
    intent, strategy = intent_of(coid)
    qty = int(_dec(_get(o, "qty")) or 0)
    filled_qty = int(_dec(_get(o, "filled_qty")) or 0)
    avg = _dec(_get(o, "filled_avg_price")) if filled_qty > 0 else None
    legs = _get(o, "legs") or []
    stop = None
    for leg in legs:
        if _val(_get(leg, "type") or _get(leg, "order_type")) in ("stop", "stop_limit"):
            stop = _dstr(_get(leg, "stop_price"))
            break
    otype = _val(_get(o, "type") or _get(o, "order_type")) or "market"
    if stop is None and otype in ("stop", "stop_limit") and intent == "entry":
        stop = _dstr(_get(o, "stop_price"))
    submitted = _ny_iso(_get(o, "submitted_at") or _get(o, "created_at")) or ""
    raw_status = _val(_get(o, "status"))
    status = map_status(raw_status, filled_qty, qty)
    reason = "" if status in ("accepted", "partially_filled", "filled") else \
        f"{raw_status} at the broker"
    return Order(
        client_order_id=coid, symbol=str(_get(o, "symbol") or ""),
        side="buy" if _val(_get(o, "side")) == "buy" else "sell", qty=qty, order_type=otype,
        limit_price=_dstr(_get(o, "limit_price")), time_in_force=_val(_get(o, "time_in_force")),
        intent=intent, close=intent == "exit", reason="", strategy=strategy, confidence=None,
        status=status,  # type: ignore[arg-type]
        session_date=submitted[:10], submitted_at=submitted,
        filled_qty=filled_qty, filled_avg_price=_dstr(avg) if avg is not None else None,
        filled_at=_ny_iso(_get(o, "filled_at")), status_reason=reason, stop_price=stop,
        filled_notional=format(avg * filled_qty, "f") if avg is not None else None,
    )


def fill_event_of(order: Order) -> FillEvent:
    """The order's state as a FillEvent (its fill totals so far, cents and shares)."""
    notional = cents(Decimal(order.filled_notional)) if order.filled_notional else 0
    return FillEvent(order.client_order_id, order.symbol, order.intent, order.status,  # type: ignore[arg-type]
                     order.filled_qty, notional, order.session_date)


def _rejection(message: str, status: int | None) -> OrderRejected:
    m = message.lower()
    if "client_order_id" in m and ("unique" in m or "duplicate" in m or "exists" in m):
        return DuplicateOrder(f"duplicate client_order_id: {message}")
    if "buying power" in m or "insufficient funds" in m:
        return InsufficientBuyingPower(f"insufficient buying power: {message}")
    if "pattern day" in m or "day trad" in m or "pdt" in m:
        return OrderRejected(f"pattern day trader protection: {message}")
    if "wash trade" in m:
        return OrderRejected(f"opposite-side order or position (wash trade): {message}")
    if ("shortable" in m or "sold short" in m or "not allowed to short" in m
            or "borrow" in m or "short sell" in m):
        return OrderRejected(f"not shortable (hard to borrow): {message}")
    if "market" in m and ("closed" in m or "not open" in m or "hours" in m):
        return OrderRejected(f"market closed: {message}")
    if "not tradable" in m or "halt" in m or "inactive" in m:
        return OrderRejected(f"not tradable (halted or inactive): {message}")
    return OrderRejected(f"rejected by the broker ({status}): {message}")


def map_api_error(exc: APIError, what: str = "request") -> TradingError:
    """An alpaca-py APIError as the project's error.

    429 -> RateLimited; 5xx -> BrokerUnavailable; 401 -> ConfigError (bad keys); 404 ->
    _NotFound (internal: lookups answer None); 403/422 and other 4xx -> OrderRejected or a
    subclass by message: InsufficientBuyingPower, DuplicateOrder ("client_order_id must be
    unique"), pattern day trader, wash trade, not shortable, market closed.
    """
    status = exc.status_code
    body = str(exc)
    try:
        message = str(exc.message)
    except Exception:
        message = body.strip()[:300] or f"HTTP {status}"
    if status == 429:
        return RateLimited(f"{what}: broker rate limit (429): {message}")
    if status is None or status >= 500:
        return BrokerUnavailable(f"{what}: broker error {status}: {message}")
    if status == 401:
        return ConfigError(f"{what}: Alpaca refused the API keys (401): {message}")
    if status == 404:
        return _NotFound(f"{what}: not found: {message}")
    if status == 403 and (message.lower() == "forbidden" or "not authorized" in message.lower()):
        return ConfigError(f"{what}: Alpaca refused the request (403): {message}")
    return _rejection(message, status)


class _NotFound(TradingError):
    """A 404: the order, position or asset does not exist."""


# --- plain records for account, clock, calendar -----------------------------------------------
@dataclass(frozen=True)
class AccountInfo:
    """What entry checks and reports need from the account (money in cents)."""

    status: str
    buying_power_cents: int
    daytrading_buying_power_cents: int
    cash_cents: int
    equity_cents: int
    last_equity_cents: int
    pattern_day_trader: bool
    daytrade_count: int
    shorting_enabled: bool
    blocked: bool
    multiplier: int


@dataclass(frozen=True)
class MarketClock:
    """The broker's clock (America/New_York)."""

    timestamp: dt.datetime
    is_open: bool
    next_open: dt.datetime
    next_close: dt.datetime


@dataclass(frozen=True)
class SessionDay:
    """One trading day of the broker's calendar (America/New_York)."""

    date: dt.date
    open: dt.datetime
    close: dt.datetime


def _cents_of(v: Any) -> int:
    d = _dec(v)
    return cents(d) if d is not None else 0


class _TimeoutSession(requests.Session):
    """A requests Session whose every request has a timeout unless one is given."""

    def __init__(self, timeout: float | tuple[float, float]) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any,  # type: ignore[override]
                **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


def harden_client(client: TradingClient, timeout_s: float) -> TradingClient:
    """Give every request of ``client`` a timeout and switch alpaca-py's retry loop off.

    alpaca-py 0.44 keeps a bare ``requests.Session`` in ``_session`` and retries 429/504 in
    ``RESTClient._request`` while ``_retry`` > 0 (``retry_attempts=0`` in the constructor is
    ignored: it only overrides positive values), so both are set on the instance.
    """
    old = client._session
    session = _TimeoutSession((min(timeout_s, 5.0), timeout_s))
    session.headers.update(old.headers)
    client._session = session
    old.close()
    client._retry = 0
    client._retry_codes = []
    return client
