"""Rule strategies over a [bars x symbols] window, vectorised over the universe (pure)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Signal:
    """An entry signal at the close of one bar: price is that bar's close (US dollars)."""

    symbol: str
    side: Literal["buy", "sell"]
    source: str
    confidence: float
    bar_time: dt.datetime
    price: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (bar_time as ISO-8601 with offset)."""
        d = asdict(self)
        d["bar_time"] = self.bar_time.isoformat()
        return d
