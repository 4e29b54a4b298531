"""Position sizing and the risk rules of an entry (pure).

Risk budget = RISK_PCT_PER_TRADE x DAILY_POSITION_LIMIT; risk per share = entry price x
STOP_LOSS_PCT; quantity = floor(budget / risk per share), cut so the position value fits the
remaining daily limit. Money in integer cents, quantities in whole shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal


@dataclass(frozen=True)
class RiskLimits:
    """The risk settings the sizing needs (cents and fractions)."""

    daily_limit_cents: int
    risk_pct_per_trade: float
    stop_loss_pct: float
    max_open_positions: int = 10
    entry_collar_pct: float = 0.005


def position_value_cents(qty: int, price: Decimal) -> int:
    """Value of ``qty`` shares at ``price`` dollars, rounded up to the cent."""
    return int((price * qty * 100).to_integral_value(rounding=ROUND_CEILING))


def size_position(price: Decimal, limits: RiskLimits, remaining_cents: int) -> int:
    """Whole shares to buy or short at ``price`` (US dollars); 0 means no order.

    ``remaining_cents`` is what is left of today's position-value limit; the price used for
    the cap includes the entry collar, so the filled value can never exceed the reservation.
    """
    if not price.is_finite() or price <= 0 or remaining_cents <= 0:
        return 0
    if not (math.isfinite(limits.risk_pct_per_trade) and math.isfinite(limits.stop_loss_pct)):
        return 0
    if limits.risk_pct_per_trade <= 0 or limits.stop_loss_pct <= 0:
        return 0
    budget = Decimal(limits.daily_limit_cents) / 100 * Decimal(repr(limits.risk_pct_per_trade))
    per_share = price * Decimal(repr(limits.stop_loss_pct))
    qty = int((budget / per_share).to_integral_value(rounding=ROUND_FLOOR))
    capped_price = collar_price(price, "buy", limits.entry_collar_pct)
    cap = min(remaining_cents, limits.daily_limit_cents)
    max_by_value = int((Decimal(cap) / 100 / capped_price).to_integral_value(rounding=ROUND_FLOOR))
    return max(0, min(qty, max_by_value))


def collar_price(price: Decimal, side: str, collar_pct: float) -> Decimal:
    """Worst acceptable fill for a marketable limit order (4 decimals, US dollars)."""
    factor = Decimal(1) + Decimal(repr(collar_pct)) * (1 if side == "buy" else -1)
    rounding = ROUND_CEILING if side == "buy" else ROUND_FLOOR
    return (price * factor).quantize(Decimal("0.0001"), rounding=rounding)
