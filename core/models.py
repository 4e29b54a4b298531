"""Value types shared by the core modules.

Bars of one session live in a dense ``float64`` array shaped ``[T, S, 5]`` (time, symbol,
field) with fields in the order of ``FIELDS``; a symbol without a bar at a time has NaN in
all five fields. Prices are US dollars, volume is shares.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

import numpy as np

FIELDS = ("open", "high", "low", "close", "volume")
OPEN, HIGH, LOW, CLOSE, VOLUME = range(5)


@dataclass(frozen=True)
class DayBars:
    """All bars of one regular session for a universe of symbols.

    ``date`` is the exchange-local (America/New_York) session date; ``open_time`` and
    ``close_time`` are aware datetimes in America/New_York (early closes included).
    Bar ``i`` starts at ``open_time + i * bar_seconds``.
    """

    date: dt.date
    symbols: tuple[str, ...]
    open_time: dt.datetime
    close_time: dt.datetime
    bar_seconds: int
    ohlcv: np.ndarray  # float64 [T, S, 5], NaN where a symbol has no bar

    def __post_init__(self) -> None:
        t, s, f = self.ohlcv.shape
        if f != 5 or s != len(self.symbols):
            raise ValueError(
                f"ohlcv shape {self.ohlcv.shape} does not match {len(self.symbols)} symbols"
            )
        if t != self.n_bars:
            raise ValueError(f"ohlcv has {t} bars, session {self.date} has {self.n_bars}")

    @property
    def n_bars(self) -> int:
        """Number of bars in the session."""
        return int((self.close_time - self.open_time).total_seconds()) // self.bar_seconds

    def bar_time(self, index: int) -> dt.datetime:
        """Start time of bar ``index`` (America/New_York)."""
        return self.open_time + dt.timedelta(seconds=index * self.bar_seconds)


@functools.lru_cache(maxsize=16)
def symbol_index(symbols: tuple[str, ...]) -> dict[str, int]:
    """Symbol -> its column in a session's bars (memoised per universe; do not mutate)."""
    return {s: i for i, s in enumerate(symbols)}
