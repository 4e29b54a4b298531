"""Money helpers: dollars (Decimal) to integer cents."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

_CENT = Decimal("0.01")


def cents(amount: Decimal) -> int:
    """Dollars to integer cents (banker's rounding)."""
    return int((amount / _CENT).to_integral_value(rounding=ROUND_HALF_EVEN))
