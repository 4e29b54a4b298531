"""Exit rules for held positions (pure; numpy or cupy for the vectorised part).

Two layers:

* ``exit_codes``: the per-bar rules over a ``[T, S]`` close array, vectorised over every held
  symbol, in the design's order: peak (longs) / trough (shorts), ML exit score, stop-loss,
  then the optional take-profit and maximum holding time. Row ``t`` uses bars ``<= t`` only.
* ``exit_reason``: the checks that need no bars at all, done in the decision step for every
  position: a position left from an earlier session, the end-of-day window, and the
  stop-loss again as a safety net when a position has no row in the scored bar.

Peaks and troughs (``confirmed_extremes``): a close at bar ``p`` (``p >= entry``) is a peak
once ``distance`` more bars have closed and none of the closes within ``distance`` bars on
either side (since entry) is higher, and it stands at least ``prominence`` (a fraction of the
peak) above the lowest close between the entry and ``p``. A peak is therefore known only at
bar ``p + distance`` at the earliest: no look-ahead. Troughs mirror it. A long exits at the
close of bar ``t`` when that close is ``drop`` (``PEAK_EXIT_DROP_THRESHOLD``) or more below
the highest confirmed peak since entry; a short when it is that much above the lowest
confirmed trough.

Prices are US dollars, thresholds fractions, bars the session's bar index.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from decimal import Decimal
from types import ModuleType
from typing import Any

import numpy as np

from core.brokers.base import Position

# exit codes of ``exit_codes``; 0 = hold. Their names are the exit reasons in trades.csv.
REASONS: tuple[str, ...] = ("", "peak", "trough", "ml_exit", "stop_loss", "take_profit",
                            "max_hold")
HOLD, PEAK, TROUGH, ML_EXIT, STOP_LOSS, TAKE_PROFIT, MAX_HOLD = range(len(REASONS))


@dataclass(frozen=True)
class ExitParams:
    """Exit settings: fractions of price, bars, and a score threshold in [0, 1].

    ``take_profit_pct`` 0 and ``max_holding_bars`` 0 switch those rules off.
    """

    stop_loss_pct: float = 0.01
    peak_drop_pct: float = 0.005
    peak_distance_bars: int = 3
    peak_prominence_pct: float = 0.002
    ml_exit_threshold: float = 0.7
    take_profit_pct: float = 0.0
    max_holding_bars: int = 0


def _cum(a: np.ndarray, op: str, xp: ModuleType) -> np.ndarray:
    """Running ``op`` (max, min, fmax, fmin) along axis 0: a row loop or accumulate on numpy,
    a doubling scan elsewhere, since not every array module has ``ufunc.accumulate``."""
    fn = getattr(xp, {"max": "maximum", "min": "minimum"}.get(op, op))
    if xp is np:
        if a.ndim == 2 and a.shape[1] >= 64:  # row by row is ~3x faster than accumulate here
            out = np.empty_like(a)
            if a.shape[0]:
                out[0] = a[0]
            for i in range(1, a.shape[0]):
                fn(out[i - 1], a[i], out=out[i])
            return out
        return fn.accumulate(a, axis=0)
    out = a.copy()
    step = 1
    while step < out.shape[0]:
        out[step:] = fn(out[step:], out[:-step].copy())
        step *= 2
    return out


def _nan_unless(a: np.ndarray, keep: np.ndarray, xp: ModuleType) -> np.ndarray:
    """``a`` where ``keep``, NaN elsewhere: ``a + sqrt(keep - 1)`` adds 0 or NaN, which is
    several times cheaper than ``where`` on numpy and the same on cupy."""
    with np.errstate(invalid="ignore"):
        return a + xp.sqrt(keep.astype(a.dtype) - 1.0)


def _window_extreme(a: np.ndarray, width: int, fn: Any, xp: ModuleType) -> np.ndarray:
    """``fn`` (maximum/minimum) over rows ``[i, i + width)`` for each valid start ``i``."""
    out = a
    span = 1
    while span * 2 <= width:  # sparse table: extremes over spans of 1, 2, 4, ...
        out = fn(out[:-span], out[span:])
        span *= 2
    rest = width - span
    return fn(out[: out.shape[0] - rest], out[rest:]) if rest else out


def confirmed_extremes(close: np.ndarray, entry_bar: np.ndarray, distance: int,
                       prominence: float, xp: ModuleType = np,
                       last_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Highest confirmed peak and lowest confirmed trough since entry, known at each bar.

    ``close`` is ``[T, S]`` (NaN where a bar is missing), ``entry_bar`` ``[S]`` ints. Returns
    two ``[T, S]`` arrays (US dollars), NaN where none is confirmed yet; with ``last_only``
    just the last bar's ``[S]`` values. Row ``t`` depends on ``close[: t + 1]`` only.
    """
    return (_confirmed(close, entry_bar, distance, prominence, xp, last_only, True),
            _confirmed(close, entry_bar, distance, prominence, xp, last_only, False))


def _confirmed(close: np.ndarray, entry_bar: np.ndarray, distance: int, prominence: float,
               xp: ModuleType, last_only: bool, peaks: bool,
               runmin_out: list[np.ndarray] | None = None) -> np.ndarray:
    """Peaks (``peaks``) or troughs of ``confirmed_extremes``, computed on the negated
    series for troughs so that one code path serves both.

    Bars before a column's entry and missing bars are NaN, and every step uses the
    NaN-ignoring ``fmax``/``fmin`` or comparisons (False with NaN), so they never count.
    """
    n_bars, n_sym = close.shape
    d = max(int(distance), 1)
    out_shape = (n_sym,) if last_only else close.shape
    if n_bars <= d or n_sym == 0:
        if runmin_out is not None:
            runmin_out.append(xp.full(n_sym, xp.nan))
        return xp.full(out_shape, xp.nan)
    first = int(entry_bar.min())  # no candidate before the earliest entry: skip those rows
    first = min(max(first, 0), n_bars - 1)
    x = close[first:] if peaks else -close[first:]
    rows = x.shape[0]
    m = rows - d  # candidates p whose neighbourhood [p - d, p + d] is fully known
    if m <= 0:
        if runmin_out is not None:
            runmin_out.append(xp.full(n_sym, xp.nan))
        return xp.full(out_shape, xp.nan)
    hi = _nan_unless(x, xp.arange(first, n_bars)[:, None] >= entry_bar[None, :], xp)
    near = _window_extreme(xp.concatenate([xp.full((d, n_sym), xp.nan), hi]), 2 * d + 1,
                           xp.fmax, xp)[:m]
    hp = hi[:m]
    low_before = _cum(hp, "fmin", xp)  # lowest (highest for troughs) since entry, up to p
    if runmin_out is not None:  # the tracker's state: the running low at p = t - d
        runmin_out.append(low_before[-1])
    # prominence as a fraction of the extreme's price: |peak - lowest before| >= prom x |peak|
    with np.errstate(invalid="ignore"):
        ok = (hp >= near) & (hp - low_before >= prominence * xp.abs(hp))
    cand = _nan_unless(hp, ok, xp)
    sign = 1.0 if peaks else -1.0
    if last_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: no peak
            return sign * xp.nanmax(cand, axis=0)
    # a candidate at p is known at p + d: shift down by d, then keep the running best
    best = xp.full(close.shape, xp.nan)
    best[first + d:] = _cum(cand, "fmax", xp)
    return sign * best


class ExtremeTracker:
    """The last bar's confirmed peak (longs) / trough (shorts) of held positions, updated
    incrementally from one tick to the next: a position seen at bar ``t - 1`` needs only the
    bars ``t - 2d .. t``; any other is computed in full. Only max/min enter, so the result is
    exactly that of ``confirmed_extremes``. State is per entry order id; one tracker per
    process (the scoring worker, or a backtest)."""

    def __init__(self) -> None:
        # entry id -> (bar, entry bar, running low at bar - d, best) in x = close x direction
        self._state: dict[str, tuple[int, int, float, float]] = {}

    def levels(self, close: np.ndarray, keys: list[str], entry_bar: np.ndarray,
               direction: np.ndarray, distance: int, prominence: float,
               xp: ModuleType = np) -> np.ndarray:
        """Peak (long) or trough (short) per column at the last bar of ``close`` ([T, H],
        US dollars), NaN where none is confirmed."""
        t = close.shape[0] - 1
        d = max(int(distance), 1)
        entries = [int(e) for e in (entry_bar.get() if hasattr(entry_bar, "get")
                                    else entry_bar)]
        inc = [j for j, k in enumerate(keys)
               if (st := self._state.get(k)) is not None and st[0] == t - 1
               and st[1] == entries[j]]
        inc_set = set(inc)
        full = [j for j in range(len(keys)) if j not in inc_set]
        best_x = np.full(len(keys), np.nan)
        runmin_x = np.full(len(keys), np.nan)
        sign = direction.astype(float)
        if full:
            cols = xp.asarray(full)
            got: list[np.ndarray] = []
            b = _confirmed(close[:, cols] * sign[cols], entry_bar[cols], d, prominence, xp,
                           True, True, got)
            best_x[full] = b.get() if hasattr(b, "get") else b
            runmin_x[full] = got[0].get() if hasattr(got[0], "get") else got[0]
        if inc:
            cols = xp.asarray(inc)
            lo = max(t - 2 * d, 0)
            w = close[lo:, cols] * sign[cols]
            rows = xp.arange(lo, t + 1)[:, None]
            w = _nan_unless(w, rows >= entry_bar[cols][None, :], xp)
            prev = np.array([[self._state[keys[j]][2], self._state[keys[j]][3]] for j in inc])
            p = t - d
            if p >= lo:
                xp_p = w[p - lo]
                near = w[0]
                for k in range(1, w.shape[0]):
                    near = xp.fmax(near, w[k])
                xp_p = xp_p.get() if hasattr(xp_p, "get") else np.asarray(xp_p)
                near = near.get() if hasattr(near, "get") else np.asarray(near)
                runmin = np.fmin(prev[:, 0], xp_p)
                with np.errstate(invalid="ignore"):
                    ok = (xp_p >= near) & (xp_p - runmin >= prominence * np.abs(xp_p))
                best = np.fmax(prev[:, 1], np.where(ok, xp_p, np.nan))
            else:
                runmin, best = prev[:, 0], prev[:, 1]
            best_x[inc] = best
            runmin_x[inc] = runmin
        self._state = {k: (t, entries[j], float(runmin_x[j]), float(best_x[j]))
                       for j, k in enumerate(keys)}
        out = best_x * (direction.get() if hasattr(direction, "get") else direction)
        return xp.asarray(out)


def _side_extremes(close: np.ndarray, entry_bar: np.ndarray, direction: np.ndarray,
                   params: ExitParams, xp: ModuleType,
                   last_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of the long columns and troughs of the short ones (NaN elsewhere)."""
    shape = (close.shape[1],) if last_only else close.shape
    out = []
    for peaks, cols in ((True, direction > 0), (False, direction < 0)):
        level = xp.full(shape, xp.nan)
        idx = xp.nonzero(cols)[0]
        if idx.shape[0]:
            got = _confirmed(close[:, idx], entry_bar[idx], params.peak_distance_bars,
                             params.peak_prominence_pct, xp, last_only, peaks)
            level[..., idx] = got
        out.append(level)
    return out[0], out[1]


def exit_codes(close: np.ndarray, entry_bar: np.ndarray, direction: np.ndarray,
               entry_price: np.ndarray, params: ExitParams,
               ml_score: np.ndarray | None = None, xp: ModuleType = np,
               last_only: bool = False, levels: np.ndarray | None = None) -> np.ndarray:
    """Exit code per bar and held symbol (``[T, S]`` ints, indexes into ``REASONS``; with
    ``last_only`` the last bar's ``[S]``).

    ``direction`` is +1 (long) / -1 (short) per symbol, ``entry_price`` the average entry
    price (US dollars), ``entry_bar`` the bar whose open filled the entry; ``ml_score``
    (``[T, S]``, or ``[S]`` for the last bar; NaN = no score) is the exit model's probability;
    ``levels`` (last bar only) are the peak/trough levels of an ``ExtremeTracker``.
    A bar without a close, or before the entry, holds (0). The first rule that fires, in
    ``REASONS`` order, is the reason.
    """
    n_bars = close.shape[0]
    if levels is not None and last_only:  # from an ExtremeTracker
        peak = xp.where(direction > 0, levels, xp.nan)
        trough = xp.where(direction < 0, levels, xp.nan)
    else:
        peak, trough = _side_extremes(close, entry_bar, direction, params, xp, last_only)
    if last_only:
        close = close[-1:]
        peak, trough = peak[None, :], trough[None, :]
        bars = xp.asarray([[n_bars - 1]])
        if ml_score is not None:
            ml_score = ml_score[-1:] if ml_score.ndim == 2 else ml_score[None, :]
    else:
        bars = xp.arange(n_bars)[:, None]
        if ml_score is not None and ml_score.ndim == 1:  # the last bar's scores only
            full = xp.full(close.shape, xp.nan)
            full[-1] = ml_score
            ml_score = full
    with np.errstate(invalid="ignore"):
        live = (bars >= entry_bar[None, :]) & (close > 0)  # NaN compares False
    c = xp.nan_to_num(close)
    long_ = (direction > 0)[None, :]
    short = (direction < 0)[None, :]
    avg = entry_price[None, :]
    drop = params.peak_drop_pct
    rules: list[tuple[int, np.ndarray]] = [
        (PEAK, long_ & ~xp.isnan(peak) & (c <= xp.nan_to_num(peak) * (1 - drop))),
        (TROUGH, short & ~xp.isnan(trough) & (c >= xp.nan_to_num(trough) * (1 + drop))),
    ]
    if ml_score is not None:
        rules.append((ML_EXIT, ~xp.isnan(ml_score)
                      & (xp.nan_to_num(ml_score) >= params.ml_exit_threshold)))
    sl = params.stop_loss_pct
    rules.append((STOP_LOSS, (long_ & (c <= avg * (1 - sl))) | (short & (c >= avg * (1 + sl)))))
    if params.take_profit_pct > 0:
        tp = params.take_profit_pct
        rules.append((TAKE_PROFIT, (long_ & (c >= avg * (1 + tp)))
                      | (short & (c <= avg * (1 - tp)))))
    if params.max_holding_bars > 0:
        # held for (t - entry + 1) bars at the close of bar t
        rules.append((MAX_HOLD, bars - entry_bar[None, :] + 1 >= params.max_holding_bars))
    codes = xp.zeros(close.shape, dtype=xp.int8)
    for code, hit in reversed(rules):  # earlier rules overwrite later ones
        codes = xp.where(live & hit, code, codes)
    return codes[0] if last_only else codes


def exit_reason(position: Position, mark: float | None, stop_loss_pct: float,
                in_eod_window: bool, session_date: str) -> str | None:
    """Bar-free exit checks for ``position`` at this bar's close ``mark`` (US dollars).

    Stale (an earlier session's) position, then the end-of-day window, then the stop-loss
    from the average entry price (exact Decimal comparison); None: hold.
    """
    if position.session_date != session_date:
        return "stale_position"
    if in_eod_window:
        return "eod"
    if mark is None or not math.isfinite(mark) or mark <= 0:
        return None
    price = Decimal(repr(float(mark)))
    stop = Decimal(repr(stop_loss_pct))
    if position.qty > 0 and price <= position.avg * (1 - stop):
        return "stop_loss"
    if position.qty < 0 and price >= position.avg * (1 + stop):
        return "stop_loss"
    return None
