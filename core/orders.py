"""Order intents and deterministic client order ids.

An id is derived from (strategy, symbol, signal bar, leg), so a redelivered task or a second
worker produces the same id and the broker can refuse the duplicate. Alpaca allows at most
48 characters.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.calendar import NY

MAX_CLIENT_ORDER_ID = 48
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9.]{0,9}$")
_STRATEGY = re.compile(r"^[a-z][a-z0-9]{0,11}$")


def entry_client_order_id(strategy: str, symbol: str, signal_bar: dt.datetime,
                          side: Literal["buy", "sell"]) -> str:
    """Id of the entry leg for a signal on the bar starting at ``signal_bar`` (any tz)."""
    if signal_bar.tzinfo is None:
        raise ValueError("signal_bar must be timezone-aware")
    if not _STRATEGY.match(strategy):
        raise ValueError(f"bad strategy tag {strategy!r}")
    if not _SYMBOL.match(symbol):
        raise ValueError(f"bad symbol {symbol!r}")
    stamp = signal_bar.astimezone(NY).strftime("%Y%m%d-%H%M")
    coid = f"{strategy}-{symbol}-{stamp}-{'L' if side == 'buy' else 'S'}"
    if len(coid) > MAX_CLIENT_ORDER_ID:  # pragma: no cover - bounded by the patterns above
        raise ValueError(f"client_order_id too long: {coid}")
    return coid


def exit_client_order_id(entry_id: str, attempt: int = 1) -> str:
    """Id of the exit leg of the position opened by ``entry_id`` (attempt >= 1)."""
    if attempt < 1 or attempt > 99:
        raise ValueError(f"bad exit attempt {attempt}")
    coid = f"{entry_id}-x{attempt}"
    if len(coid) > MAX_CLIENT_ORDER_ID:
        raise ValueError(f"client_order_id too long: {coid}")
    return coid


class OrderIntent(BaseModel):
    """One order the decision step wants; the JSON message of submit/close tasks.

    Prices are decimal strings in US dollars; ``session_date`` is the exchange date; ``bar`` is
    the index of the bar whose close produced the decision.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_order_id: str = Field(min_length=1, max_length=MAX_CLIENT_ORDER_ID)
    symbol: str
    side: Literal["buy", "sell"]
    qty: int = Field(ge=0)
    intent: Literal["entry", "exit"]
    reason: str
    strategy: str = ""
    confidence: float | None = None
    ref_price: str
    limit_price: str | None = None
    session_date: dt.date
    bar: int = Field(ge=-1)

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, value: str) -> str:
        if not _SYMBOL.match(value):
            raise ValueError(f"bad symbol {value!r}")
        return value
