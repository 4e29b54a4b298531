"""Training labels from one session's bars (pure; numpy or cupy).

Labels look AHEAD by design, but only within ``horizon`` bars and never past the session's
last bar: a row whose horizon would run past the end of the window gets NaN (not 0), as
does a row without the bar it needs. Drop NaN rows before training. Input is a session
window ``[T, S, 5]`` (``core.models`` field order; prices US dollars, volume shares; a
missing bar is NaN in all five fields); outputs are float64 ``[T, S]`` of 1.0 / 0.0 / NaN.
A missing bar inside the horizon touches no barrier.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from core.models import CLOSE, HIGH, LOW, OPEN

Array = Any  # numpy.ndarray or cupy.ndarray
_BPS = 1e-4


def _check(window: Array, horizon: int) -> None:
    if window.ndim != 3 or window.shape[2] != 5:
        raise ValueError(f"window must be [T, S, 5], got shape {window.shape}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 bar, got {horizon}")


def _ahead(x: Array, j: int, xp: ModuleType) -> Array:
    """``x`` shifted ``j`` bars earlier along axis 0: row t holds row t+j (NaN past the end)."""
    n = x.shape[0]
    pad = xp.full((min(j, n), *x.shape[1:]), xp.nan, dtype=xp.float64)
    return xp.concatenate([x[j:], pad], axis=0)


def _first_touch(up_level: Array, down_level: Array, favourable_up: bool, high: Array,
                 low: Array, horizon: int, xp: ModuleType) -> Array:
    """1.0 where the favourable barrier is touched strictly before the adverse one in bars
    t+1..t+horizon, else 0.0 (both in the same bar counts as adverse)."""
    label = xp.zeros(up_level.shape, dtype=xp.float64)
    done = xp.zeros(up_level.shape, dtype=bool)
    for j in range(1, horizon + 1):
        hi = _ahead(high, j, xp)
        lo = _ahead(low, j, xp)
        up = (hi >= up_level) & ~done  # NaN compares False: a missing bar touches nothing
        down = (lo <= down_level) & ~done
        win = up & ~down if favourable_up else down & ~up
        label = xp.where(win, 1.0, label)
        done |= up | down
    return label


def entry_labels(window: Array, target_pct: float, stop_pct: float, horizon: int,
                 slippage_bps: float = 2.0, fee_per_share: float = 0.0,
                 xp: ModuleType = np) -> tuple[Array, Array]:
    """Triple-barrier entry labels ``(long, short)``, each float64 [T, S].

    Row ``t``: a trade entered at bar ``t+1``'s open, paying ``slippage_bps`` (basis points
    of price) on each side and ``fee_per_share`` (US dollars) on each side, is 1.0 when its
    NET return reaches ``+target_pct`` (fraction) before it reaches ``-stop_pct`` within bars
    ``t+1..t+horizon``, using bar highs/lows; 0.0 when the stop comes first, when both are
    touched in the same bar (conservative), or when neither is touched. Both barriers are on
    the net return. Long: cost ``e = open * (1 + slip) + fee``, exit proceeds at price ``p``
    ``p * (1 - slip) - fee``, net return ``proceeds / e - 1``. Short: proceeds
    ``e = open * (1 - slip) - fee``, cover cost ``p * (1 + slip) + fee``, net return
    ``(e - cover) / e``. NaN when bar t+1 is missing (or its open <= 0) and when
    ``t + horizon`` is past the last bar of the window.
    """
    _check(window, horizon)
    if target_pct <= 0 or stop_pct <= 0:
        raise ValueError("target_pct and stop_pct must be positive fractions")
    slip = slippage_bps * _BPS
    fee = fee_per_share
    high = window[:, :, HIGH]
    low = window[:, :, LOW]
    n_bars = window.shape[0]
    entry_open = _ahead(window[:, :, OPEN], 1, xp)
    t = xp.arange(n_bars)[:, None]
    valid = (entry_open > 0) & (t + horizon <= n_bars - 1)
    open_ = xp.where(valid, entry_open, 1.0)
    nan = xp.nan

    cost = open_ * (1.0 + slip) + fee
    long_up = (cost * (1.0 + target_pct) + fee) / (1.0 - slip)
    long_down = (cost * (1.0 - stop_pct) + fee) / (1.0 - slip)
    long_ = _first_touch(long_up, long_down, True, high, low, horizon, xp)

    proceeds = open_ * (1.0 - slip) - fee
    short_down = (proceeds * (1.0 - target_pct) - fee) / (1.0 + slip)
    short_up = (proceeds * (1.0 + stop_pct) - fee) / (1.0 + slip)
    short = _first_touch(short_up, short_down, False, high, low, horizon, xp)
    # a fee eating the whole entry price leaves no tradable short
    short_ok = valid & (proceeds > 0)
    return xp.where(valid, long_, nan), xp.where(short_ok, short, nan)


def exit_labels(window: Array, threshold: float, horizon: int, intrabar: bool = True,
                xp: ModuleType = np) -> tuple[Array, Array]:
    """Exit labels ``(long, short)`` for a position held at bar ``t``, each float64 [T, S].

    1.0 when holding on from the close of bar ``t`` loses MORE than ``threshold`` (fraction
    of that close) at some point in bars ``t+1..t+horizon``, else 0.0. The adverse price is
    the bar's low (long) / high (short) with ``intrabar``, else its close. NaN when the close
    of bar ``t`` is missing (or <= 0) and when ``t + horizon`` is past the last bar.
    """
    _check(window, horizon)
    if threshold <= 0:
        raise ValueError("threshold must be a positive fraction")
    n_bars = window.shape[0]
    close = window[:, :, CLOSE]
    worst_long = window[:, :, LOW] if intrabar else close
    worst_short = window[:, :, HIGH] if intrabar else close
    t = xp.arange(n_bars)[:, None]
    valid = (close > 0) & (t + horizon <= n_bars - 1)
    ref = xp.where(valid, close, 1.0)
    long_hit = xp.zeros(ref.shape, dtype=bool)
    short_hit = xp.zeros(ref.shape, dtype=bool)
    for j in range(1, horizon + 1):
        long_hit |= _ahead(worst_long, j, xp) < ref * (1.0 - threshold)
        short_hit |= _ahead(worst_short, j, xp) > ref * (1.0 + threshold)
    nan = xp.nan
    return (xp.where(valid, long_hit.astype(xp.float64), nan),
            xp.where(valid, short_hit.astype(xp.float64), nan))
