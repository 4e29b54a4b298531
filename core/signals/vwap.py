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

from core.models import CLOSE, HIGH, LOW, VOLUME
from core.signals import Signal, signals_from_masks

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


def session_vwap(window: np.ndarray, xp: ModuleType = np, start: int = 0) -> np.ndarray:
    """Cumulative session VWAP per bar and symbol, [t+1-start, S], from ``window``
    ([t+1, S, 5]), for bars ``start..t`` (the bars before ``start`` still count).

    Typical price (h+l+c)/3 x volume. A bar with any of high/low/close/volume missing, or
    with zero (or negative) volume, contributes nothing: the previous VWAP carries. NaN until
    the first bar with volume.
    """
    typical = (window[:, :, HIGH] + window[:, :, LOW] + window[:, :, CLOSE]) / 3.0
    vol = window[:, :, VOLUME]
    # prices are positive, so a usable bar has pv > 0; fmax turns NaN (and negatives) into 0
    pv = xp.fmax(typical * vol, 0.0)
    v = xp.fmax(vol, 0.0) * (pv > 0)
    pv_c = xp.cumsum(pv[start:], axis=0)
    cv = xp.cumsum(v[start:], axis=0)
    if start > 0:  # the bars before ``start`` enter as one sum: cheaper than a full cumsum
        pv_c += pv[:start].sum(axis=0)
        cv += v[:start].sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.where(cv > 0, pv_c / xp.where(cv > 0, cv, 1.0), xp.nan)


def vwap_signals(window: np.ndarray, symbols: tuple[str, ...], bar_time: dt.datetime,
                 params: VwapParams, xp: ModuleType = np) -> list[Signal]:
    """Signals at the last bar of ``window`` ([t+1, S, 5]); ``bar_time`` is that bar's start.

    A symbol with a missing close at ``t`` or ``t-1``, an undefined VWAP there, or a
    deviation std that is zero (up to rounding) or undefined gives no signal. When the VWAP at
    the start of the trend look-back (``max(t - trend_bars, 0)``) is undefined, the trend
    filter passes.
    """
    t = window.shape[0] - 1
    if t < 1 or t + 1 < params.min_bars:
        return []
    # only the VWAP of the last bars is needed: the std window and the trend base
    first = max(min(t - params.std_bars, t - params.trend_bars), 0)
    tail = session_vwap(window, xp, first)
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
        trend = xp.nan_to_num((vwap_t - base) / vwap_t, nan=0.0, posinf=0.0, neginf=0.0)

    ok = ~(xp.isnan(close_t) | xp.isnan(close_p) | xp.isnan(vwap_t) | xp.isnan(vwap_p))
    ok &= (n >= 2) & (std > _STD_EPS * xp.abs(xp.nan_to_num(vwap_p)))  # std 0 up to rounding
    safe_std = xp.where(std > 0, std, 1.0)
    lower_p = vwap_p - params.band_k * std
    upper_p = vwap_p + params.band_k * std
    cp = xp.nan_to_num(close_p)
    ct = xp.nan_to_num(close_t)
    vt = xp.nan_to_num(vwap_t)
    long_ = ok & (cp < lower_p) & (ct > cp) & (ct < vt) & (trend >= -params.max_trend_pct)
    short = ok & (cp > upper_p) & (ct < cp) & (ct > vt) & (trend <= params.max_trend_pct)
    stretch_l = (lower_p - cp) / safe_std
    stretch_s = (cp - upper_p) / safe_std
    # a larger stretch beyond the band (in stds) scores higher
    return signals_from_masks(symbols, "vwap", bar_time, close_t, long_, stretch_l, short,
                              stretch_s, xp, scale=1.0)
