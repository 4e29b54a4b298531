"""VWAP reversion, computed for every symbol at once (pure; numpy or cupy).

The session VWAP is the cumulative typical price ``(high + low + close) / 3`` weighted by
volume. The bands are ``VWAP +- band_k x std`` where ``std`` is the rolling (population)
standard deviation of ``close - VWAP`` over the last ``std_bars`` bars. A long signal fires
at bar ``t`` when the close of bar ``t-1`` was below the lower band of bar ``t-1`` (stretched)
and the close of bar ``t`` turns back up while still below the VWAP of bar ``t``; a short
mirrors it above the upper band. A trend filter skips longs when the VWAP fell more than
``max_trend_pct`` (relative) over ``trend_bars`` bars, and shorts when it rose more than that.
Uses bars ``<= t`` only.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from core.models import CLOSE
from core.signals import RuleMasks, Signal
from core.signals.sums import SessionSums, sums_for

log = logging.getLogger(__name__)

_STD_EPS = 1e-9  # a deviation std below this fraction of the VWAP counts as zero


@dataclass(frozen=True)
class VwapParams:
    """VWAP reversion settings.

    ``band_k``: band = VWAP +- band_k x rolling std of (close - VWAP); ``std_bars``: window of
    that rolling deviation (bars); ``min_bars``: no signal until the window holds this many
    bars; ``trend_bars``: trend look-back of the VWAP (bars); ``max_trend_pct``: a relative
    VWAP change over ``trend_bars`` beyond this is a trend, and no reversion entry is taken
    against it.
    """

    band_k: float = 2.0
    std_bars: int = 30
    min_bars: int = 30
    trend_bars: int = 60
    max_trend_pct: float = 0.004


def session_vwap(window: np.ndarray, xp: ModuleType = np, start: int = 0,
                 sums: SessionSums | None = None) -> np.ndarray:
    """Cumulative session VWAP per bar and symbol, [t+1-start, S], from ``window``
    ([t+1, S, 5]), for bars ``start..t`` (the bars before ``start`` still count).

    Typical price (h+l+c)/3 x volume. A bar with any of high/low/close/volume missing, or
    with zero (or negative) volume, contributes nothing: the previous VWAP carries. NaN until
    the first bar with volume. ``sums``: the scoring process's running sums of this session
    (``core.signals.sums``), which give the same values without summing the window again.
    """
    return sums_for(window, sums, xp).vwap(start, window.shape[0])


def vwap_signals(window: np.ndarray, symbols: tuple[str, ...], bar_time: dt.datetime,
                 params: VwapParams, xp: ModuleType = np,
                 sums: SessionSums | None = None,
                 only: np.ndarray | None = None) -> list[Signal]:
    """Signals at the last bar of ``window`` ([t+1, S, 5]); ``bar_time`` is that bar's start.

    A symbol with a missing close at ``t`` or ``t-1``, an undefined VWAP there, or a
    deviation std that is zero (up to rounding) or undefined gives no signal. When the VWAP at
    the start of the trend look-back (``max(t - trend_bars, 0)``) is undefined, the trend
    filter passes. ``sums``: the scoring process's running sums of this session;
    ``only`` ([S] bools): signal on these symbols only.
    """
    masks = vwap_masks(window, params, xp, sums)
    return masks.signals(symbols, bar_time, xp, only) if masks is not None else []


def vwap_masks(window: np.ndarray, params: VwapParams, xp: ModuleType = np,
               sums: SessionSums | None = None) -> RuleMasks | None:
    """Where VWAP reversion fires at the last bar of ``window`` (None before ``min_bars``)."""
    t = window.shape[0] - 1
    if t < 1 or t + 1 < params.min_bars:
        return None
    # only the VWAP of the last bars is needed: the std window and the trend base
    first = max(min(t - params.std_bars, t - params.trend_bars), 0)
    tail = session_vwap(window, xp, first, sums)
    close = window[:, :, CLOSE]
    close_t = close[t]
    close_p = close[t - 1]
    vwap_t = tail[t - first]
    vwap_p = tail[t - 1 - first]

    # Rolling std of (close - VWAP) over the std_bars bars ending at t-1 (NaN bars skipped).
    start = max(t - params.std_bars, 0)
    dev = close[start:t] - tail[start - first:t - first]
    present = ~xp.isnan(dev)
    n = present.sum(axis=0)
    d0 = xp.where(present, dev, 0.0)
    mean = d0.sum(axis=0) / xp.maximum(n, 1)
    var = xp.where(present, (d0 - mean) ** 2, 0.0).sum(axis=0) / xp.maximum(n, 1)
    std = xp.sqrt(var)

    base = tail[max(t - params.trend_bars, 0) - first]
    with np.errstate(divide="ignore", invalid="ignore"):
        trend = (vwap_t - base) / vwap_t
        trend = xp.where(xp.isfinite(trend), trend, 0.0)  # an undefined base passes

    # Comparisons with NaN are False, so a missing close or VWAP never fires (``ok`` says so
    # too); the strengths are read only where a mask is set.
    ok = ~(xp.isnan(close_t) | xp.isnan(close_p) | xp.isnan(vwap_t) | xp.isnan(vwap_p))
    with np.errstate(invalid="ignore"):
        ok &= (n >= 2) & (std > _STD_EPS * xp.abs(vwap_p))  # std 0 up to rounding
        safe_std = xp.where(std > 0, std, 1.0)
        lower_p = vwap_p - params.band_k * std
        upper_p = vwap_p + params.band_k * std
        cp, ct, vt = close_p, close_t, vwap_t
        long_ = ok & (cp < lower_p) & (ct > cp) & (ct < vt) & (trend >= -params.max_trend_pct)
        short = ok & (cp > upper_p) & (ct < cp) & (ct > vt) & (trend <= params.max_trend_pct)
        stretch_l = (lower_p - cp) / safe_std
        stretch_s = (cp - upper_p) / safe_std
    # a larger stretch beyond the band (in stds) scores higher
    return RuleMasks("vwap", close_t, long_, stretch_l, short, stretch_s, scale=1.0)
