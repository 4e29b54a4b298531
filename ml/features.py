"""Model features from one session's bars, for every symbol at once (pure; numpy or cupy).

Input is a session window ``[T, S, 5]`` (``core.models`` field order; prices US dollars,
volume shares; a missing bar is NaN in all five fields). A feature at bar ``t`` uses bars
``<= t`` only. Missing data gives NaN (XGBoost takes NaN as missing), never an exception.

Entry features (``FEATURE_NAMES``, in this order):

- ``ret_1``, ``ret_5``, ``ret_15``, ``ret_30``: LOG returns ``ln(close_t / close_{t-k})``
  over k bars; NaN when either close is missing or ``t < k``.
- ``vol_15``, ``vol_60``: population std of the 1-bar log returns in the last n bars (a
  fraction per bar, not annualised); early in the session the window is partial; NaN with
  fewer than ``ceil(n / 2)`` valid returns.
- ``volume_z``: ``(volume_t - mean) / std`` against the session's EARLIER bars (0..t-1,
  zero-volume bars included, missing bars skipped); NaN with fewer than 5 earlier bars or
  when they all had the same volume.
- ``vwap_dist``: ``close / session VWAP - 1`` (``core.signals.vwap.session_vwap``).
- ``rsi_14``: SIMPLE (Cutler) RSI, 0..100: ``100 * gains / (gains + losses)`` over the last
  14 close-to-close changes; 50 when all were zero; NaN with fewer than 7 valid changes.
- ``atr_14``: SIMPLE mean of the true range over the last 14 bars divided by the close
  (fraction); the true range uses the previous close when there is one, else high - low;
  NaN with fewer than 7 valid bars.
- ``or_pos``: ``(close - lo) / (hi - lo)`` with hi/lo over the present bars among the first
  15 minutes (``ceil(900 / bar_seconds)`` bars); NaN until that range is complete (bar
  index ``>= ceil(900 / bar_seconds) - 1``), when no range bar is present or hi == lo.
- ``time_of_day``: minutes elapsed at the bar's close / 390, ``(t + 1) * bar_seconds /
  23400`` (always /390 minutes, also on early-close days).
- ``dist_high``, ``dist_low``: ``close / session high so far - 1`` (<= 0) and
  ``close / session low so far - 1`` (>= 0), highs/lows of bars 0..t.

A symbol without a usable bar at ``t`` (close missing or <= 0) has NaN in every entry
feature but ``time_of_day``.

Exit features (``EXIT_FEATURE_NAMES``) append, for a position entered at bar ``entry_bar``
(filled within that bar) on ``side`` (+1 long, -1 short) at ``entry_price`` (dollars):
``unrealized_pnl`` ``side * (close / entry_price - 1)``, ``holding_minutes``
``(t - entry_bar) * bar_seconds / 60`` and ``drawdown`` ``side * (close / best - 1)`` where
``best`` is the best close of bars ``entry_bar..t`` (highest for a long, lowest for a short),
so it is <= 0 for both sides. NaN where there is no position (``side`` 0 or NaN,
``entry_bar`` < 0 or > t, ``entry_price`` <= 0 or NaN).
"""

from __future__ import annotations

import hashlib
import math
from types import ModuleType
from typing import Any

import numpy as np

from core.models import CLOSE, HIGH, LOW, VOLUME
from core.signals.vwap import session_vwap

_SPEC_VERSION = 1  # bump whenever a formula changes without a name change
RETURN_BARS = (1, 5, 15, 30)
VOL_BARS = (15, 60)
RSI_BARS = 14
ATR_BARS = 14
OPENING_RANGE_SECONDS = 900
SESSION_SECONDS = 23_400  # 390 minutes
_MIN_VOLUME_BARS = 5  # earlier bars needed for a volume z-score
_ZERO_VAR_REL = 1e-12  # a volume variance below this x mean^2 counts as zero (rounding)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"ret_{k}" for k in RETURN_BARS),
    *(f"vol_{n}" for n in VOL_BARS),
    "volume_z",
    "vwap_dist",
    f"rsi_{RSI_BARS}",
    f"atr_{ATR_BARS}",
    "or_pos",
    "time_of_day",
    "dist_high",
    "dist_low",
)
_TIME_COL = FEATURE_NAMES.index("time_of_day")
EXIT_ONLY_NAMES: tuple[str, ...] = ("unrealized_pnl", "holding_minutes", "drawdown")
EXIT_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES + EXIT_ONLY_NAMES
# Compared by the model registry: a model trained on another version must not be served.
FEATURE_VERSION: str = f"v{_SPEC_VERSION}-" + hashlib.sha256(
    "|".join((str(_SPEC_VERSION), *EXIT_FEATURE_NAMES)).encode()
).hexdigest()[:10]

Array = Any  # numpy.ndarray or cupy.ndarray


# --- aggregation back-ends: one formula, evaluated at every bar or at the last bar only ------
class _AllBars:
    """Aggregates as [T, S] arrays: row t covers bars <= t."""

    def __init__(self, xp: ModuleType, n_bars: int) -> None:
        self.xp = xp
        self.n = n_bars

    def cur(self, x: Array) -> Array:
        return x

    def lag(self, x: Array, k: int) -> Array:
        xp = self.xp
        if k <= 0:
            return x
        pad = xp.full((min(k, self.n), *x.shape[1:]), xp.nan, dtype=x.dtype)
        return xp.concatenate([pad, x[: max(self.n - k, 0)]], axis=0)

    def _cum(self, x: Array) -> tuple[Array, Array]:
        xp = self.xp
        valid = ~xp.isnan(x)
        zero = xp.zeros((1, *x.shape[1:]), dtype=xp.float64)
        total = xp.concatenate([zero, xp.cumsum(xp.where(valid, x, 0.0), axis=0)], axis=0)
        count = xp.concatenate([zero, xp.cumsum(valid.astype(xp.float64), axis=0)], axis=0)
        return total, count

    def roll(self, x: Array, n: int) -> tuple[Array, Array]:
        """Sum and count of the non-NaN values in bars max(t-n+1, 0)..t."""
        xp = self.xp
        total, count = self._cum(x)
        lo = xp.maximum(xp.arange(self.n) + 1 - n, 0)
        return total[1:] - total[lo], count[1:] - count[lo]

    def cum(self, x: Array) -> tuple[Array, Array]:
        """Sum and count of the non-NaN values in bars 0..t."""
        total, count = self._cum(x)
        return total[1:], count[1:]

    def cummax(self, x: Array) -> Array:
        """Max of the non-NaN values in bars 0..t, NaN if none (log-step scan, no accumulate)."""
        xp = self.xp
        m = xp.where(xp.isnan(x), -xp.inf, x)
        k = 1
        while k < self.n:
            m = xp.concatenate([m[:k], xp.maximum(m[k:], m[:-k])], axis=0)
            k *= 2
        return xp.where(m == -xp.inf, xp.nan, m)

    def cummin(self, x: Array) -> Array:
        return -self.cummax(-x)

    def first_max(self, x: Array, n: int) -> Array:
        """Max of the non-NaN values in bars 0..n-1, NaN before bar n-1 and if none."""
        xp = self.xp
        if self.n < n:
            return xp.full(x.shape, xp.nan)
        m = self.cummax(x[:n])[n - 1]
        t = xp.arange(self.n).reshape((-1,) + (1,) * (x.ndim - 1))
        return xp.where(t >= n - 1, m, xp.nan)

    def first_min(self, x: Array, n: int) -> Array:
        return -self.first_max(-x, n)

    def bar_index(self) -> Array:
        return self.xp.arange(self.n, dtype=self.xp.float64)[:, None]


class _LastBar:
    """Aggregates as [S] arrays at the last bar t = T - 1."""

    def __init__(self, xp: ModuleType, n_bars: int) -> None:
        self.xp = xp
        self.n = n_bars

    def cur(self, x: Array) -> Array:
        return x[-1]

    def lag(self, x: Array, k: int) -> Array:
        if k >= self.n:
            return self.xp.full(x.shape[1:], self.xp.nan, dtype=x.dtype)
        return x[self.n - 1 - k]

    def _sum(self, x: Array) -> tuple[Array, Array]:
        xp = self.xp
        valid = ~xp.isnan(x)
        return xp.where(valid, x, 0.0).sum(axis=0), valid.sum(axis=0).astype(xp.float64)

    def roll(self, x: Array, n: int) -> tuple[Array, Array]:
        return self._sum(x[max(self.n - n, 0):])

    def cum(self, x: Array) -> tuple[Array, Array]:
        return self._sum(x)

    def cummax(self, x: Array) -> Array:
        xp = self.xp
        m = xp.where(xp.isnan(x), -xp.inf, x).max(axis=0)
        return xp.where(m == -xp.inf, xp.nan, m)

    def cummin(self, x: Array) -> Array:
        return -self.cummax(-x)

    def first_max(self, x: Array, n: int) -> Array:
        if self.n < n:
            return self.xp.full(x.shape[1:], self.xp.nan)
        return self.cummax(x[:n])

    def first_min(self, x: Array, n: int) -> Array:
        return -self.first_max(-x, n)

    def bar_index(self) -> Array:
        return self.xp.asarray(float(self.n - 1))


def _min_count(n: int) -> int:
    return math.ceil(n / 2)


def _features(window: Array, bar_seconds: int, xp: ModuleType, agg: Any) -> list[Array]:
    """The entry features in FEATURE_NAMES order, each [T, S] (_AllBars) or [S] (_LastBar)."""
    if bar_seconds <= 0:
        raise ValueError(f"bar_seconds must be positive, got {bar_seconds}")
    high = window[:, :, HIGH]
    low = window[:, :, LOW]
    close = window[:, :, CLOSE]
    volume = window[:, :, VOLUME]
    nan = xp.nan
    out: list[Array] = []
    close_t = agg.cur(close)
    # ln of a non-positive price would be -inf/NaN: such a bar counts as missing
    log_close = xp.log(xp.where(close > 0, close, nan))
    log_t = agg.cur(log_close)
    for k in RETURN_BARS:
        out.append(log_t - agg.lag(log_close, k))

    ret1 = log_close - _lag_all(log_close, xp)  # [T, S] in both back-ends
    for n in VOL_BARS:
        s1, c = agg.roll(ret1, n)
        s2, _ = agg.roll(ret1 * ret1, n)
        cs = xp.maximum(c, 1.0)
        var = xp.maximum(s2 / cs - (s1 / cs) ** 2, 0.0)
        out.append(xp.where(c >= _min_count(n), xp.sqrt(var), nan))

    # volume z-score of bar t against bars 0..t-1
    vol_t = agg.cur(volume)
    earlier = _lag_all(volume, xp)
    v1p, vcp = agg.cum(earlier)
    v2p, _ = agg.cum(earlier * earlier)
    vcs = xp.maximum(vcp, 1.0)
    mean = v1p / vcs
    var = v2p / vcs - mean * mean
    ok = (vcp >= _MIN_VOLUME_BARS) & (var > _ZERO_VAR_REL * mean * mean) & (var > 0)
    out.append(xp.where(ok, (vol_t - mean) / xp.sqrt(xp.where(ok, var, 1.0)), nan))

    vwap_t = agg.cur(session_vwap(window, xp))
    out.append(close_t / vwap_t - 1.0)

    prev_close = _lag_all(close, xp)
    change = close - prev_close
    gain_s, n_chg = agg.roll(xp.where(change > 0, change, xp.where(xp.isnan(change), nan, 0.0)),
                             RSI_BARS)
    loss_s, _ = agg.roll(xp.where(change < 0, -change, xp.where(xp.isnan(change), nan, 0.0)),
                         RSI_BARS)
    moved = gain_s + loss_s
    rsi = xp.where(moved > 0, 100.0 * gain_s / xp.where(moved > 0, moved, 1.0), 50.0)
    out.append(xp.where(n_chg >= _min_count(RSI_BARS), rsi, nan))

    top = xp.where(xp.isnan(prev_close), high, xp.maximum(high, prev_close))
    bottom = xp.where(xp.isnan(prev_close), low, xp.minimum(low, prev_close))
    tr_s, tr_c = agg.roll(top - bottom, ATR_BARS)
    atr = tr_s / xp.maximum(tr_c, 1.0)
    out.append(xp.where(tr_c >= _min_count(ATR_BARS), atr / close_t, nan))

    n_or = math.ceil(OPENING_RANGE_SECONDS / bar_seconds)
    or_hi = agg.first_max(high, n_or)
    or_lo = agg.first_min(low, n_or)
    width = or_hi - or_lo
    out.append(xp.where(width > 0, (close_t - or_lo) / xp.where(width > 0, width, 1.0), nan))

    tod = (agg.bar_index() + 1.0) * (bar_seconds / SESSION_SECONDS)
    out.append(xp.zeros_like(close_t) + tod)

    out.append(close_t / agg.cummax(high) - 1.0)
    out.append(close_t / agg.cummin(low) - 1.0)
    # no usable bar at t: the row describes nothing tradable (time of day stays known)
    no_bar = xp.isnan(log_t)
    return [c if i == _TIME_COL else xp.where(no_bar, nan, c) for i, c in enumerate(out)]


def _lag_all(x: Array, xp: ModuleType) -> Array:
    """``x`` shifted one bar later along axis 0 (row t holds row t-1; row 0 is NaN)."""
    return _AllBars(xp, x.shape[0]).lag(x, 1)


def _check_window(window: Array) -> None:
    if window.ndim != 3 or window.shape[2] != 5:
        raise ValueError(f"window must be [T, S, 5], got shape {window.shape}")


def entry_features(window: Array, bar_seconds: int, xp: ModuleType = np) -> Array:
    """Entry features at the last bar of ``window`` ([T, S, 5]) -> float64 [S, F].

    Column order ``FEATURE_NAMES`` (units in the module docstring). An empty window gives NaN.
    Equal (to float rounding) to ``entry_features_all(window)[-1]``.
    """
    _check_window(window)
    n_bars, n_sym = window.shape[0], window.shape[1]
    if n_bars == 0:
        return xp.full((n_sym, len(FEATURE_NAMES)), xp.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols = _features(window, bar_seconds, xp, _LastBar(xp, n_bars))
        return xp.stack([xp.broadcast_to(c, (n_sym,)) for c in cols], axis=1).astype(xp.float64)


def entry_features_all(window: Array, bar_seconds: int, xp: ModuleType = np) -> Array:
    """Entry features at every bar of ``window`` ([T, S, 5]) -> float64 [T, S, F].

    Row ``t`` uses bars ``<= t`` only and equals ``entry_features(window[:t + 1])`` up to float
    rounding. Vectorised over time (cumulative sums and a log-step running max).
    """
    _check_window(window)
    n_bars, n_sym = window.shape[0], window.shape[1]
    if n_bars == 0:
        return xp.full((0, n_sym, len(FEATURE_NAMES)), xp.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols = _features(window, bar_seconds, xp, _AllBars(xp, n_bars))
        return xp.stack([xp.broadcast_to(c, (n_bars, n_sym)) for c in cols], axis=2).astype(
            xp.float64)


def _position_arrays(entry_bar: Array, side: Array, entry_price: Array, n_sym: int,
                     xp: ModuleType) -> tuple[Array, Array, Array]:
    entry_bar = xp.asarray(entry_bar)
    side = xp.asarray(side, dtype=xp.float64)
    entry_price = xp.asarray(entry_price, dtype=xp.float64)
    for name, arr in (("entry_bar", entry_bar), ("side", side), ("entry_price", entry_price)):
        if arr.shape != (n_sym,):
            raise ValueError(f"{name} must have shape ({n_sym},), got {arr.shape}")
    entry_bar = xp.where(xp.isnan(entry_bar.astype(xp.float64)), -1, entry_bar).astype(xp.int64)
    return entry_bar, side, entry_price


def _exit_columns(close_t: Array, best_hi: Array, best_lo: Array, t: Array,
                  entry_bar: Array, side: Array, entry_price: Array, bar_seconds: int,
                  xp: ModuleType) -> list[Array]:
    held = ((side == 1.0) | (side == -1.0)) & (entry_bar >= 0) & (entry_bar <= t)
    held &= entry_price > 0
    nan = xp.nan
    pnl = xp.where(held, side * (close_t / entry_price - 1.0), nan)
    minutes = xp.where(held, (t - entry_bar) * (bar_seconds / 60.0), nan)
    best = xp.where(side > 0, best_hi, best_lo)
    drawdown = xp.where(held, side * (close_t / best - 1.0), nan)
    return [pnl, minutes, drawdown]


def exit_features(window: Array, entry_bar: Array, side: Array, entry_price: Array,
                  bar_seconds: int, xp: ModuleType = np) -> Array:
    """Exit features at the last bar of ``window`` ([T, S, 5]) -> float64 [S, F_exit].

    ``entry_bar`` [S] int: index of the bar the position was filled in; ``side`` [S]: +1 long,
    -1 short (0 or NaN: no position); ``entry_price`` [S]: fill price, US dollars. Columns
    ``EXIT_FEATURE_NAMES``: the entry features, then unrealized P/L (fraction, signed by
    side), holding time (minutes) and drawdown from the best close since entry (fraction,
    <= 0). The three position columns are NaN where there is no position.
    """
    _check_window(window)
    n_bars, n_sym = window.shape[0], window.shape[1]
    entry_bar, side, entry_price = _position_arrays(entry_bar, side, entry_price, n_sym, xp)
    base = entry_features(window, bar_seconds, xp)
    if n_bars == 0:
        return xp.full((n_sym, len(EXIT_FEATURE_NAMES)), xp.nan)
    close = window[:, :, CLOSE]
    since = xp.arange(n_bars)[:, None] >= entry_bar[None, :]
    valid = since & ~xp.isnan(close)
    hi = xp.where(valid, close, -xp.inf).max(axis=0)
    lo = xp.where(valid, close, xp.inf).min(axis=0)
    hi = xp.where(xp.isinf(hi), xp.nan, hi)
    lo = xp.where(xp.isinf(lo), xp.nan, lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols = _exit_columns(close[-1], hi, lo, n_bars - 1, entry_bar, side,
                             entry_price, bar_seconds, xp)
    return xp.concatenate([base, xp.stack(cols, axis=1)], axis=1)


def exit_features_all(window: Array, entry_bar: Array, side: Array, entry_price: Array,
                      bar_seconds: int, xp: ModuleType = np) -> Array:
    """Exit features at every bar for one position per symbol -> float64 [T, S, F_exit].

    Arguments as in ``exit_features``; row ``t`` equals ``exit_features(window[:t + 1], ...)``
    up to float rounding, with NaN position columns before ``entry_bar``.
    """
    _check_window(window)
    n_bars, n_sym = window.shape[0], window.shape[1]
    entry_bar, side, entry_price = _position_arrays(entry_bar, side, entry_price, n_sym, xp)
    base = entry_features_all(window, bar_seconds, xp)
    if n_bars == 0:
        return xp.full((0, n_sym, len(EXIT_FEATURE_NAMES)), xp.nan)
    close = window[:, :, CLOSE]
    agg = _AllBars(xp, n_bars)
    t = xp.arange(n_bars)[:, None]
    since = xp.where(t >= entry_bar[None, :], close, xp.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols = _exit_columns(close, agg.cummax(since), agg.cummin(since), t,
                             entry_bar[None, :], side[None, :], entry_price[None, :],
                             bar_seconds, xp)
    return xp.concatenate([base, xp.stack(cols, axis=2)], axis=2)
