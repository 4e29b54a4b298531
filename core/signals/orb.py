"""Opening Range Breakout, computed for every symbol at once (pure; numpy or cupy).

The opening range is the high/low of the first ``range_bars`` bars. A long signal fires on
the bar whose close first crosses above ``range_high * (1 + buffer)`` with volume at least
``volume_ratio`` x the mean volume of the bars since the range; a short mirrors it below the
range low. Uses bars ``<= t`` only.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from core.models import CLOSE, HIGH, LOW, VOLUME
from core.signals import Signal, signals_from_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrbParams:
    """ORB settings: range length in bars, breakout buffer (fraction), volume ratio."""

    range_bars: int = 15
    buffer_pct: float = 0.0005
    volume_ratio: float = 1.0


def orb_signals(window: np.ndarray, symbols: tuple[str, ...], bar_time: dt.datetime,
                params: OrbParams, xp: ModuleType = np) -> list[Signal]:
    """Signals at the last bar of ``window`` ([t+1, S, 5]); ``bar_time`` is that bar's start.

    A symbol with a missing opening-range bar or a missing current/previous bar gives no signal.
    """
    t = window.shape[0] - 1
    k = params.range_bars
    if t < k:
        return []
    rng = window[:k]
    complete = ~xp.isnan(rng[:, :, CLOSE]).any(axis=0)
    hi = xp.max(xp.where(xp.isnan(rng[:, :, HIGH]), -xp.inf, rng[:, :, HIGH]), axis=0)
    lo = xp.min(xp.where(xp.isnan(rng[:, :, LOW]), xp.inf, rng[:, :, LOW]), axis=0)
    close_t = window[t, :, CLOSE]
    close_p = window[t - 1, :, CLOSE]
    vol_t = window[t, :, VOLUME]
    since = window[k:t, :, VOLUME] if t > k else window[:k, :, VOLUME]
    counts = (~xp.isnan(since)).sum(axis=0)
    mean_vol = xp.where(counts > 0, xp.nansum(since, axis=0) / xp.maximum(counts, 1), 0.0)
    ok = complete & ~xp.isnan(close_t) & ~xp.isnan(close_p) & ~xp.isnan(vol_t)
    ok &= (vol_t > 0) & (vol_t >= params.volume_ratio * xp.nan_to_num(mean_vol))
    up = hi * (1 + params.buffer_pct)
    dn = lo * (1 - params.buffer_pct)
    width = xp.maximum(hi - lo, 1e-9)
    long_ = ok & (close_t > up) & (close_p <= up)
    short = ok & (close_t < dn) & (close_p >= dn)
    strength_l = (close_t - up) / width
    strength_s = (dn - close_t) / width
    # larger breakouts relative to the range score higher
    return signals_from_masks(symbols, "orb", bar_time, close_t, long_, strength_l, short,
                              strength_s, xp, scale=4.0)
