"""Exit rules for held positions, checked in the design's order (pure).

Order: end of day (and positions left from an earlier session), stop-loss from the average
entry price and STOP_LOSS_PCT. Peak/trough and ML exits plug in ahead of the stop-loss.
"""

from __future__ import annotations

import math
from decimal import Decimal

from core.brokers.base import Position


def exit_reason(position: Position, mark: float | None, stop_loss_pct: float,
                in_eod_window: bool, session_date: str) -> str | None:
    """Why ``position`` must be closed at this bar's close ``mark`` (US dollars), or None."""
    if position.session_date != session_date:
        return "stale_position"
    if in_eod_window:
        return "eod"
    if mark is None or not math.isfinite(mark) or mark <= 0:
        return None
    price = Decimal(repr(float(mark)))
    stop = Decimal(repr(stop_loss_pct))
    if position.qty > 0 and price <= position.avg * (1 - stop):
        return "stop_loss"
    if position.qty < 0 and price >= position.avg * (1 + stop):
        return "stop_loss"
    return None
