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


@dataclass(frozen=True)
class RuleMasks:
    """What one rule found at a bar, before any signal object is built: per symbol ([S],
    numpy or cupy) the long and short masks, their strengths and the price (US dollars)."""

    source: str
    price: np.ndarray
    long_mask: np.ndarray
    long_strength: np.ndarray
    short_mask: np.ndarray
    short_strength: np.ndarray
    scale: float = 1.0

    def signals(self, symbols: Sequence[str], bar_time: dt.datetime, xp: ModuleType = np,
                only: np.ndarray | None = None,
                only_short: np.ndarray | None = None) -> list[Signal]:
        """The signals at ``bar_time`` (longs, then shorts), restricted to ``only`` (the
        shorts to ``only_short`` when given)."""
        return signals_from_masks(symbols, self.source, bar_time, self.price, self.long_mask,
                                  self.long_strength, self.short_mask, self.short_strength,
                                  xp, scale=self.scale, only=only, only_short=only_short)


def signals_from_masks(symbols: Sequence[str], source: str, bar_time: dt.datetime,
                       price: np.ndarray, long_mask: np.ndarray, long_strength: np.ndarray,
                       short_mask: np.ndarray, short_strength: np.ndarray,
                       xp: ModuleType = np, scale: float = 1.0,
                       only: np.ndarray | None = None,
                       only_short: np.ndarray | None = None) -> list[Signal]:
    """Longs then shorts for the symbols whose mask is set, priced at ``price`` (US dollars).

    The arrays are per symbol ([S]) on numpy or cupy; confidence comes from the strength.
    ``only`` ([S] bools, numpy or cupy) restricts the signals to those symbols (the shorts
    to ``only_short`` when given).
    """
    out: list[Signal] = []
    for side, mask, strength, allowed in (
            ("buy", long_mask, long_strength, only),
            ("sell", short_mask, short_strength, only if only_short is None else only_short)):
        if allowed is not None:
            mask = mask & xp.asarray(allowed)
        idx = xp.nonzero(mask)[0]
        if not idx.shape[0]:
            continue
        strong = 0.5 + 0.5 * xp.tanh(scale * xp.maximum(strength[idx], 0.0))
        for i, conf, px in zip(_host(idx), _host(strong), _host(price[idx]), strict=True):
            out.append(Signal(symbols[i], side, source,  # type: ignore[arg-type]
                              min(round(conf, 4), 0.9999), bar_time, px))
    return out


def _host(a: np.ndarray) -> list:
    """A numpy or cupy array as a list of Python numbers."""
    return (a.get() if hasattr(a, "get") else a).tolist()
