"""Seeded generator of realistic intraday bars for tests, demos and benchmarks.

The model, per symbol (all vectorised over symbols):

* a base price of 10-500 USD that carries over from day to day: a day opens at the prior
  close times an overnight gap drawn from a fat-tailed Student-t(3) (usually a few tenths of a
  percent, on some days 2-4 % or more);
* GARCH(1,1) returns with Student-t(5) shocks, so |returns| cluster, scaled by a U-shaped
  intraday volatility profile (busy open, livelier close);
* a regime-switching drift: each symbol-day is a trend day (drift that occasionally reverses),
  a mean-reverting day (pulled back to the day's open) or a plain random-walk day, so opening
  ranges are broken on some symbol-days and not on others;
* U-shaped volume (first and last 30 minutes well above midday), higher on volatile bars;
* valid OHLC: low <= open, close <= high, prices rounded to 0.01 USD, volume positive integer
  shares.

Each symbol draws from its own ``numpy`` generator seeded by (seed, symbol, bar size), so the
same inputs give identical arrays and adding or removing symbols leaves the others unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from core.calendar import session_bounds
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME, DayBars

_REGULAR_SESSION_S = 23_400  # 09:30-16:00
_CHUNK_DAYS = 8  # days drawn per generator call (bounds memory for long date ranges)

# GARCH(1,1) on unit-variance shocks: h' = omega + alpha * e^2 + beta * h (long-run h = 1).
_ALPHA, _BETA = 0.10, 0.86
_OMEGA = 1.0 - _ALPHA - _BETA
_T_DF = 5.0  # Student-t shocks, rescaled to unit variance
_GAP_DF = 3.0  # Student-t for overnight gaps (fat tails)

# Day regimes: probabilities of a trend day and of a mean-reverting day (the rest: random walk).
_P_TREND, _P_REVERT = 0.35, 0.35
_FLIP_PER_MINUTE = 1.0 / 450.0  # hazard of a trend reversal on trend days


def _vol_profile(minute: np.ndarray, length: float) -> np.ndarray:
    """U-shaped relative volatility at ``minute`` after the open of a ``length``-minute day."""
    return 0.75 + 1.3 * np.exp(-minute / 25.0) + 0.35 * np.exp(-(length - minute) / 20.0)


_VOL_PROFILE_MEAN = float(_vol_profile(np.arange(390.0), 390.0).mean())


def _symbol_rng(seed: int, symbol: str, bar_seconds: int) -> np.random.Generator:
    """Generator for one symbol; depends only on (seed, symbol, bar_seconds)."""
    digest = hashlib.blake2b(symbol.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little"), bar_seconds])


def _tickers(symbols: Sequence[str] | int) -> tuple[str, ...]:
    if isinstance(symbols, int):
        if symbols < 1:
            raise ValueError(f"need at least one symbol, got {symbols}")
        width = max(3, len(str(symbols - 1)))
        return tuple(f"SYN{i:0{width}d}" for i in range(symbols))
    names = tuple(symbols)
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"symbols must be unique non-empty names, got {names!r}")
    return names


def generate_days(
    dates: Sequence[dt.date],
    symbols: Sequence[str] | int,
    seed: int = 7,
    bar_seconds: int = 60,
    missing_prob: float = 0.0,
) -> list[DayBars]:
    """Generate one DayBars per NYSE session in ``dates`` (sorted, duplicates removed).

    ``symbols`` is a list of tickers or a count (``SYN000``, ``SYN001``, ...). Bars start at the
    session open in America/New_York and last ``bar_seconds``; early closes give fewer bars.
    Prices are USD rounded to 0.01, volume is integer shares. ``missing_prob`` drops each bar
    independently (all five fields NaN) to exercise gap handling; 0.0 gives dense days.
    Deterministic in (dates, symbols, seed, bar_seconds, missing_prob).
    """
    if bar_seconds <= 0:
        raise ValueError(f"bar_seconds must be positive, got {bar_seconds}")
    if not 0.0 <= missing_prob < 1.0:
        raise ValueError(f"missing_prob must be in [0, 1), got {missing_prob}")
    names = _tickers(symbols)
    days = sorted(set(dates))
    if not days:
        return []
    bounds = [session_bounds(d) for d in days]  # ConfigError for a non-session date
    n_bars = [int((c - o).total_seconds()) // bar_seconds for o, c in bounds]
    t_max = max(max(n_bars), _REGULAR_SESSION_S // bar_seconds)
    bar_min = bar_seconds / 60.0
    n_sym = len(names)

    rngs = [_symbol_rng(seed, s, bar_seconds) for s in names]
    # Static per-symbol parameters.
    static = np.array(
        [
            [
                r.uniform(math.log(12.0), math.log(450.0)),  # log base price
                r.uniform(0.12, 0.45),  # annualised volatility
                r.uniform(math.log(2e3), math.log(2e5)),  # log shares per minute at midday
                r.uniform(0.004, 0.009),  # overnight gap scale (log return units)
            ]
            for r in rngs
        ]
    )
    log_price = static[:, 0].copy()  # prior close, log USD
    sigma_bar = static[:, 1] / math.sqrt(252.0 * _REGULAR_SESSION_S / bar_seconds)
    vol_level = np.exp(static[:, 2]) * bar_min
    gap_scale = static[:, 3]
    h = np.ones(n_sym)  # GARCH variance state, carried across days

    out: list[DayBars] = []
    for c0 in range(0, len(days), _CHUNK_DAYS):
        chunk = range(c0, min(c0 + _CHUNK_DAYS, len(days)))
        draws = _draw_chunk(rngs, len(chunk), t_max, missing_prob > 0.0)
        for k, i in enumerate(chunk):
            ohlcv, log_price, h = _simulate_day(
                {name: arr[:, k] for name, arr in draws.items()},
                n_bars[i],
                bar_min,
                log_price,
                h,
                sigma_bar,
                vol_level,
                gap_scale,
                missing_prob,
                first_day=(i == 0),
            )
            open_time, close_time = bounds[i]
            out.append(
                DayBars(
                    date=days[i],
                    symbols=names,
                    open_time=open_time,
                    close_time=close_time,
                    bar_seconds=bar_seconds,
                    ohlcv=ohlcv,
                )
            )
    return out


def _draw_chunk(
    rngs: list[np.random.Generator], n_days: int, t_max: int, with_missing: bool
) -> dict[str, np.ndarray]:
    """All random numbers for ``n_days`` days, stacked as [S, n_days, ...] per name."""
    per_symbol: dict[str, list[np.ndarray]] = {}
    t_scale = math.sqrt((_T_DF - 2.0) / _T_DF)
    for r in rngs:
        parts = {
            "day": r.random((n_days, 6)),  # regime, trend sign, trend size, kappa, vol, volume
            "gap": r.standard_t(_GAP_DF, n_days),
            "shock": r.standard_t(_T_DF, (n_days, t_max)) * t_scale,
            "flip": r.random((n_days, t_max)),
            "wick": r.standard_exponential((n_days, t_max, 2)),
            "vnoise": r.standard_normal((n_days, t_max)),
        }
        if with_missing:
            parts["missing"] = r.random((n_days, t_max))
        for name, arr in parts.items():
            per_symbol.setdefault(name, []).append(arr)
    return {name: np.stack(arrs) for name, arrs in per_symbol.items()}


def _simulate_day(
    draw: dict[str, np.ndarray],
    n_bars: int,
    bar_min: float,
    prev_close: np.ndarray,
    h_prev: np.ndarray,
    sigma_bar: np.ndarray,
    vol_level: np.ndarray,
    gap_scale: np.ndarray,
    missing_prob: float,
    first_day: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One session for all symbols; returns (ohlcv [T, S, 5], last log close, GARCH state)."""
    n_sym = prev_close.shape[0]
    t = n_bars
    u_day = draw["day"]  # [S, 6]
    minute = np.arange(t) * bar_min  # bar start, minutes after the open
    length = t * bar_min
    # U-shaped intraday volatility and volume profiles (early closes keep the closing bump).
    vol_shape = _vol_profile(minute, length) / _VOL_PROFILE_MEAN
    volu_shape = 0.55 + 2.2 * np.exp(-minute / 20.0) + 1.8 * np.exp(-(length - minute) / 22.0)

    day_sigma = sigma_bar * np.exp(0.25 * (u_day[:, 4] - 0.5) * 2.0)  # +-25 % day to day
    sig = day_sigma[:, None] * vol_shape[None, :]  # [S, T]

    # Overnight gap; a big gap also raises the opening volatility state.
    gap = np.zeros(n_sym) if first_day else np.clip(gap_scale * draw["gap"], -0.12, 0.12)
    x_open = prev_close + gap
    gap_z2 = np.minimum((gap / (day_sigma * math.sqrt(390.0 / bar_min))) ** 2, 9.0)
    h = np.clip(0.5 * h_prev + 0.5 + 0.2 * gap_z2, 0.2, 6.0)

    # Regimes: trend (drift with occasional reversals), revert (pull to the open), random.
    regime = u_day[:, 0]
    trend = regime < _P_TREND
    revert = (regime >= _P_TREND) & (regime < _P_TREND + _P_REVERT)
    sign0 = np.where(u_day[:, 1] < 0.5, -1.0, 1.0)
    flips = np.cumsum(draw["flip"][:, :t] < _FLIP_PER_MINUTE * bar_min, axis=1)
    sign = sign0[:, None] * np.where(flips % 2 == 1, -1.0, 1.0)
    trend_size = (0.04 + 0.08 * u_day[:, 2]) * day_sigma * math.sqrt(bar_min)
    drift = np.where(trend[:, None], sign * trend_size[:, None], 0.0)  # [S, T]
    kappa = np.where(revert, np.minimum((0.01 + 0.03 * u_day[:, 3]) * bar_min, 0.5), 0.0)

    shock = draw["shock"][:, :t]
    eps = np.empty((n_sym, t))
    x = np.empty((n_sym, t))  # log close of each bar
    level = x_open.copy()
    for k in range(t):
        e = np.sqrt(h) * shock[:, k]
        eps[:, k] = e
        level = level + drift[:, k] + kappa * (x_open - level) + sig[:, k] * e
        x[:, k] = level
        h = np.clip(_OMEGA + _ALPHA * e * e + _BETA * h, 0.05, 25.0)

    close = np.exp(x)
    open_ = np.exp(np.concatenate([x_open[:, None], x[:, :-1]], axis=1))
    wick_scale = 0.6 * sig * np.sqrt(np.clip(np.abs(eps), 0.3, None))
    wick = draw["wick"][:, :t, :]
    high = np.maximum(open_, close) * np.exp(wick_scale * wick[:, :, 0])
    low = np.minimum(open_, close) * np.exp(-wick_scale * wick[:, :, 1])

    volume = (
        vol_level[:, None]
        * volu_shape[None, :]
        * np.exp(0.3 * (u_day[:, 5] - 0.5) * 2.0)[:, None]
        * (0.6 + 0.4 * np.abs(eps))
        * np.exp(0.35 * draw["vnoise"][:, :t])
    )

    ohlcv = np.empty((t, n_sym, 5))
    # Rounding is monotone, so low <= open, close <= high survives it.
    for field, arr in ((OPEN, open_), (HIGH, high), (LOW, low), (CLOSE, close)):
        ohlcv[:, :, field] = np.maximum(np.round(arr, 2), 0.01).T
    ohlcv[:, :, VOLUME] = np.maximum(np.rint(volume), 1.0).T
    if missing_prob > 0.0:
        ohlcv[(draw["missing"][:, :t] < missing_prob).T, :] = np.nan
    return ohlcv, x[:, -1].copy(), h
