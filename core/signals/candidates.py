"""Which bars of a session may carry an entry signal: a cheap superset for the backtester.

``signal_candidates`` looks at a whole session at once and marks, per bar, whether any rule
strategy could fire on any symbol there. It may mark bars where nothing fires, never the
other way round: the backtester scores every marked bar with the real rules
(``core.scoring.score_bar``) and skips the others, so the trades are unchanged.

* ORB: the close crossing the range's level, exactly as ``orb_signals`` computes it (the
  level is a max/min, so it is bit-identical); volume and completeness are not checked.
* VWAP: the turn (``close_t`` vs ``close_t-1``) with the previous close beyond the band and
  the current one on the VWAP's side, with VWAP and band from running sums over the session
  (equal to the rule's own up to rounding) and a tolerance of 1e-7 of the price on every
  comparison, far above that rounding; the trend filter is not checked.
* random: the same seeded draws as ``random_signals``.

Prices US dollars; bars are the session's bar indexes.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import numpy as np

from core.models import CLOSE, HIGH, LOW, VOLUME
from core.signals.orb import OrbParams
from core.signals.random_entry import RandomParams
from core.signals.vwap import VwapParams

if TYPE_CHECKING:
    from core.scoring import ScoringParams

_REL_TOL = 1e-7


def signal_candidates(ohlcv: np.ndarray, session_date: dt.date,
                      params: ScoringParams) -> np.ndarray:
    """``[T]`` bools: True where a signal of ``params.strategies`` may fire (superset).

    ``ohlcv`` is the session's ``[T, S, 5]``; ``params`` a ``core.scoring.ScoringParams``.
    """
    return symbol_candidates(ohlcv, session_date, params).any(axis=1)


def symbol_candidates(ohlcv: np.ndarray, session_date: dt.date,
                      params: ScoringParams) -> np.ndarray:
    """``[T, S]`` bools: True where some strategy may signal on that symbol (superset)."""
    n_bars, n_sym = ohlcv.shape[:2]
    out = np.zeros((n_bars, n_sym), dtype=bool)
    strategies = tuple(params.strategies)
    if n_bars == 0 or n_sym == 0:
        return out
    if "orb" in strategies:
        out |= _orb(ohlcv, params.orb)
    if "vwap" in strategies:
        out |= _vwap(ohlcv, params.vwap)
    if "random" in strategies:
        out |= _random(ohlcv, session_date, params.random)
    unknown = set(strategies) - {"orb", "vwap", "random"}
    if unknown:  # a strategy this module does not know: every bar is a candidate
        out[:] = True
    return out


def _orb(ohlcv: np.ndarray, p: OrbParams) -> np.ndarray:
    k = int(p.range_bars)
    n_bars = ohlcv.shape[0]
    out = np.zeros(ohlcv.shape[:2], dtype=bool)
    if n_bars <= k:
        return out
    rng = ohlcv[:k]
    hi = np.max(np.where(np.isnan(rng[:, :, HIGH]), -np.inf, rng[:, :, HIGH]), axis=0)
    lo = np.min(np.where(np.isnan(rng[:, :, LOW]), np.inf, rng[:, :, LOW]), axis=0)
    buffer = float(p.buffer_pct)
    up = hi * (1 + buffer)
    dn = lo * (1 - buffer)
    close_t = ohlcv[k:, :, CLOSE]
    close_p = ohlcv[k - 1:-1, :, CLOSE]
    with np.errstate(invalid="ignore"):
        hit = ((close_t > up) & (close_p <= up)) | ((close_t < dn) & (close_p >= dn))
    out[k:] = hit
    return out


def _vwap(ohlcv: np.ndarray, p: VwapParams) -> np.ndarray:
    n_bars = ohlcv.shape[0]
    out = np.zeros(ohlcv.shape[:2], dtype=bool)
    min_bars = int(p.min_bars)
    std_bars = int(p.std_bars)
    band_k = float(p.band_k)
    if n_bars < 2:
        return out
    high, low, close, vol = (ohlcv[:, :, f] for f in (HIGH, LOW, CLOSE, VOLUME))
    typical = (high + low + close) / 3.0
    with np.errstate(invalid="ignore"):
        pv = np.fmax(typical * vol, 0.0)
        v = np.fmax(vol, 0.0) * (pv > 0)
        cv = np.cumsum(v, axis=0)
        vwap = np.where(cv > 0, np.cumsum(pv, axis=0) / np.where(cv > 0, cv, 1.0), np.nan)
    # rolling population std of (close - VWAP) over the std_bars bars ending at t-1
    dev = close - vwap
    present = ~np.isnan(dev)
    d0 = np.where(present, dev, 0.0)
    std = np.full(close.shape, np.nan)  # std[t] = std of dev[t - std_bars .. t - 1]
    c1 = np.concatenate([np.zeros((1, close.shape[1])), np.cumsum(d0, axis=0)])
    c2 = np.concatenate([np.zeros((1, close.shape[1])), np.cumsum(d0 * d0, axis=0)])
    cn = np.concatenate([np.zeros((1, close.shape[1])), np.cumsum(present, axis=0)])
    t = np.arange(1, n_bars)
    start = np.maximum(t - std_bars, 0)
    n = (cn[t] - cn[start])
    mean = (c1[t] - c1[start]) / np.maximum(n, 1)
    var = np.maximum((c2[t] - c2[start]) / np.maximum(n, 1) - mean * mean, 0.0)
    std[1:] = np.sqrt(var)
    cp = close[:-1]
    ct = close[1:]
    vp = vwap[:-1]
    vt = vwap[1:]
    s = std[1:]
    with np.errstate(invalid="ignore"):
        tol = _REL_TOL * (np.abs(np.nan_to_num(vp)) + np.abs(np.nan_to_num(cp)) + 1e-9)
        # the std enters through band_k x std: widen by the same tolerance both ways
        lower = vp - band_k * s + tol
        upper = vp + band_k * s - tol
        long_ = (ct > cp) & (cp < lower) & (ct < vt + tol)
        short = (ct < cp) & (cp > upper) & (ct > vt - tol)
        unsure = np.isnan(vp) | np.isnan(vt) | np.isnan(s)  # the rule decides there
        hit = long_ | short | (unsure & ~np.isnan(cp) & ~np.isnan(ct))
    out[1:] = hit
    out[: max(min_bars - 1, 1)] = False  # t + 1 < min_bars: the rule returns nothing
    return out


def _random(ohlcv: np.ndarray, session_date: dt.date, p: RandomParams) -> np.ndarray:
    n_bars, n_sym = ohlcv.shape[:2]
    rate = float(p.rate)
    seed = int(p.seed)
    day = session_date.toordinal()
    out = np.zeros((n_bars, n_sym), dtype=bool)
    for t in range(n_bars):
        out[t] = np.random.default_rng([seed, day, t]).random(n_sym) < rate
    return out
