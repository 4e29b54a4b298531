"""The simulated market's fill model: slippage, fees, latency and the volume cap (pure).

Prices are Decimal US dollars with 4 decimals; fees are integer cents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

_TICK = Decimal("0.0001")
_CENT = Decimal("0.01")


def dec(value: float) -> Decimal:
    """A float price or volume as the Decimal of its shortest repr."""
    return Decimal(repr(float(value)))


@dataclass(frozen=True)
class FillModel:
    """Costs and delays of the simulated market."""

    slippage_bps: float = 2.0
    fee_per_share: Decimal = Decimal("0.0035")
    fee_min: Decimal = Decimal("0.35")
    latency_bars: int = 1
    max_participation: float | None = None  # fraction of a bar's volume one order may fill

    def __post_init__(self) -> None:
        p = self.max_participation
        if p is not None and not (math.isfinite(p) and 0 < p <= 1):
            raise ValueError(f"max_participation must be in (0, 1], got {p!r}")

    def fill_price(self, open_price: float, side: str) -> Decimal:
        """Open price moved against the order by the slippage (US dollars, 4 decimals)."""
        return self.slipped(dec(open_price), side)

    def slipped(self, base: Decimal, side: str) -> Decimal:
        """A price moved against an order on ``side`` by the slippage (4 decimals)."""
        factor = Decimal(1) + Decimal(repr(self.slippage_bps)) / Decimal(10000) * (
            1 if side == "buy" else -1)
        return (base * factor).quantize(_TICK, rounding=ROUND_HALF_UP)

    def volume_cap(self, volume: float) -> int | None:
        """Most shares one order may fill in a bar of ``volume`` shares (None: no cap)."""
        if self.max_participation is None:
            return None
        if not (math.isfinite(volume) and volume > 0):
            return 0
        cap = dec(volume) * Decimal(repr(float(self.max_participation)))
        return int(cap.to_integral_value(rounding=ROUND_FLOOR))

    def fees_cents(self, qty: int) -> int:
        """Fees of one fill in cents."""
        fee = max(self.fee_min, self.fee_per_share * qty)
        return int((fee / _CENT).to_integral_value(rounding=ROUND_HALF_UP))
