"""A seeded random-entry baseline (pure): the same sizing and exits as the real strategies,
with entries drawn at random, so that a report shows what the rules add over chance.

The draw at bar ``t`` of a session depends only on (seed, session date, t, symbol position),
so a simulated cluster and a backtest of the same day draw the same entries.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from core.models import CLOSE
from core.signals import Signal, signals_from_masks


@dataclass(frozen=True)
class RandomParams:
    """``rate``: chance per symbol and bar of an entry signal; ``seed``: the generator seed."""

    rate: float = 0.002
    seed: int = 7


def random_signals(window: np.ndarray, symbols: tuple[str, ...], bar_time: dt.datetime,
                   params: RandomParams, xp: ModuleType = np) -> list[Signal]:
    """Random long/short signals at the last bar of ``window`` ([t+1, S, 5]) for symbols with
    a usable close; confidence 0.5 (a coin flip)."""
    t = window.shape[0] - 1
    day = bar_time.date().toordinal()
    rng = np.random.default_rng([params.seed, day, t])
    draw = rng.random(len(symbols))
    longs = rng.random(len(symbols)) < 0.5
    close = window[t, :, CLOSE]
    close_np = close.get() if hasattr(close, "get") else np.asarray(close)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(close_np) & (close_np > 0) & (draw < params.rate)
    zero = np.zeros(len(symbols))
    return signals_from_masks(symbols, "random", bar_time, close_np, ok & longs, zero,
                              ok & ~longs, zero, np)
