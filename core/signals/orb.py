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

from core.models import CLOSE, VOLUME
from core.signals import RuleMasks, Signal
from core.signals.sums import SessionSums, sums_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrbParams:
    """ORB settings: range length in bars, breakout buffer (fraction), volume ratio."""

    range_bars: int = 15
    buffer_pct: float = 0.0005
    volume_ratio: float = 1.0


def orb_signals(window: np.ndarray, symbols: tuple[str, ...], bar_time: dt.datetime,
                params: OrbParams, xp: ModuleType = np,
                sums: SessionSums | None = None,
                only: np.ndarray | None = None) -> list[Signal]:
    """Signals at the last bar of ``window`` ([t+1, S, 5]); ``bar_time`` is that bar's start.

    A symbol with a missing opening-range bar or a missing current/previous bar gives no signal.
    ``sums``: the scoring process's running sums of this session (``core.signals.sums``);
    ``only`` ([S] bools): signal on these symbols only.
    """
    masks = orb_masks(window, params, xp, sums)
    return masks.signals(symbols, bar_time, xp, only) if masks is not None else []


def orb_masks(window: np.ndarray, params: OrbParams, xp: ModuleType = np,
              sums: SessionSums | None = None) -> RuleMasks | None:
    """Where ORB fires at the last bar of ``window`` (None before the range is complete)."""
    t = window.shape[0] - 1
    k = params.range_bars
    if t < k:
        return None
    sums = sums_for(window, sums, xp)
    complete, hi, lo = sums.opening_range(window, k)
    close_t = window[t, :, CLOSE]
    close_p = window[t - 1, :, CLOSE]
    vol_t = window[t, :, VOLUME]
    # mean volume of the bars since the range (of the range itself at t == k), NaN bars left out
    total, counts = sums.volume_between(k if t > k else 0, t if t > k else k)
    mean_vol = xp.where(counts > 0, total / xp.maximum(counts, 1), 0.0)
    ok = complete & ~xp.isnan(close_t) & ~xp.isnan(close_p) & ~xp.isnan(vol_t)
    ok &= (vol_t > 0) & (vol_t >= params.volume_ratio * mean_vol)  # mean_vol is never NaN
    up = hi * (1 + params.buffer_pct)
    dn = lo * (1 - params.buffer_pct)
    width = xp.maximum(hi - lo, 1e-9)
    long_ = ok & (close_t > up) & (close_p <= up)
    short = ok & (close_t < dn) & (close_p >= dn)
    strength_l = (close_t - up) / width
    strength_s = (dn - close_t) / width
    # larger breakouts relative to the range score higher
    return RuleMasks("orb", close_t, long_, strength_l, short, strength_s, scale=4.0)
