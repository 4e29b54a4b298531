"""Rule strategies over a [bars x symbols] window, vectorised over the universe (pure)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np


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
        # by hand: dataclasses.asdict deep-copies every field (~50 us a signal)
        return {"symbol": self.symbol, "side": self.side, "source": self.source,
                "confidence": self.confidence, "bar_time": self.bar_time.isoformat(),
                "price": self.price}


def confidence(strength: float, scale: float = 1.0) -> float:
    """Rule confidence in [0.5, 1): 0.5 + 0.5 tanh(scale x strength), negatives count as 0."""
    return min(round(0.5 + 0.5 * float(np.tanh(scale * max(float(strength), 0.0))), 4), 0.9999)


def signals_from_masks(symbols: Sequence[str], source: str, bar_time: dt.datetime,
                       price: np.ndarray, long_mask: np.ndarray, long_strength: np.ndarray,
                       short_mask: np.ndarray, short_strength: np.ndarray,
                       xp: ModuleType = np, scale: float = 1.0) -> list[Signal]:
    """Longs then shorts for the symbols whose mask is set, priced at ``price`` (US dollars).

    The arrays are per symbol ([S]) on numpy or cupy; confidence comes from the strength.
    """
    out: list[Signal] = []
    for side, mask, strength in (("buy", long_mask, long_strength),
                                 ("sell", short_mask, short_strength)):
        for idx in _indices(mask, xp):
            out.append(Signal(symbols[idx], side, source,  # type: ignore[arg-type]
                              confidence(strength[idx], scale), bar_time, float(price[idx])))
    return out


def _indices(mask: np.ndarray, xp: ModuleType) -> list[int]:
    found = xp.nonzero(mask)[0]
    return [int(i) for i in (found.get() if hasattr(found, "get") else found)]
