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
    exactly that of ``confirmed_extremes``. One tracker per process (the scoring worker, or
    a backtest).

    State lives in slots: ``levels_at`` takes each position's slot (the scoring step uses
    the universe's columns) and an id that changes when another position takes the slot;
    ``levels`` keys positions by their entry order id instead."""

    def __init__(self) -> None:
        # per slot: the position's id, the bar and entry bar of the state, and in
        # x = close x direction the running low at bar - d and the best confirmed extreme
        self._id = np.zeros(0, dtype=np.int64)
        self._bar = np.full(0, -2, dtype=np.int64)
        self._entry = np.zeros(0, dtype=np.int64)
        self._runmin = np.zeros(0)
        self._best = np.zeros(0)
        self._slots: dict[str, int] = {}  # ``levels``: entry order id -> slot
        self._how: str | None = None

    def levels(self, close: np.ndarray, keys: list[str], entry_bar: np.ndarray,
               direction: np.ndarray, distance: int, prominence: float,
               xp: ModuleType = np, cols: np.ndarray | None = None) -> np.ndarray:
        """Peak (long) or trough (short) per held position at the last bar of ``close``
        (US dollars), NaN where none is confirmed; positions keyed by entry order id.
        ``close`` is ``[T, H]`` with one column per position, or ``[T, S]`` with ``cols``
        naming each position's column."""
        self._use("keys")
        slots = np.array([self._slots.setdefault(k, len(self._slots)) for k in keys],
                         dtype=np.int64)
        return self._levels(close, slots, slots + 1, entry_bar, direction, distance,
                            prominence, xp, cols)

    def levels_at(self, close: np.ndarray, slots: np.ndarray, ids: np.ndarray,
                  entry_bar: np.ndarray, direction: np.ndarray, distance: int,
                  prominence: float, xp: ModuleType = np,
                  cols: np.ndarray | None = None) -> np.ndarray:
        """``levels`` with each position's state slot and id given (ids > 0)."""
        self._use("slots")
        return self._levels(close, slots, ids, entry_bar, direction, distance, prominence,
                            xp, cols)

    def _use(self, how: str) -> None:
        """A tracker keys its state one way only (the slots of the two would mix)."""
        if self._how is None:
            self._how = how
        elif self._how != how:
            raise ValueError(f"this ExtremeTracker keys by {self._how}, not by {how}")

    def _levels(self, close: np.ndarray, slots: np.ndarray, ids: np.ndarray,
                entry_bar: np.ndarray, direction: np.ndarray, distance: int,
                prominence: float, xp: ModuleType, cols: np.ndarray | None) -> np.ndarray:
        t = close.shape[0] - 1
        d = max(int(distance), 1)
        n = len(slots)
        entries = np.asarray(entry_bar.get() if hasattr(entry_bar, "get") else entry_bar,
                             dtype=np.int64)
        if n and int(slots.max()) >= len(self._id):
            self._grow(int(slots.max()) + 1)
        inc_mask = (self._id[slots] == ids) & (self._bar[slots] == t - 1) \
            & (self._entry[slots] == entries)
        inc = np.flatnonzero(inc_mask)
        full = np.flatnonzero(~inc_mask)
        best_x = np.full(n, np.nan)
        runmin_x = np.full(n, np.nan)
        sign = direction.astype(float)

        def gather(lo: int, which: np.ndarray) -> np.ndarray:
            picked = xp.asarray(which)
            if cols is None:
                return close[lo:, picked]
            return close[lo:, cols[picked]]

        if len(full):
            got: list[np.ndarray] = []
            fi = xp.asarray(full)
            b = _confirmed(gather(0, full) * sign[fi], entry_bar[fi], d, prominence, xp,
                           True, True, got)
            best_x[full] = b.get() if hasattr(b, "get") else b
            runmin_x[full] = got[0].get() if hasattr(got[0], "get") else got[0]
        if len(inc):
            lo = max(t - 2 * d, 0)
            ii = xp.asarray(inc)
            w = gather(lo, inc) * sign[ii]
            w = _nan_unless(w, xp.arange(lo, t + 1)[:, None] >= entry_bar[ii][None, :], xp)
            prev_runmin = self._runmin[slots[inc]]
            prev_best = self._best[slots[inc]]
            p = t - d
            if p >= lo:
                xp_p = w[p - lo]
                near = _fmax_rows(w, xp)
                xp_p = xp_p.get() if hasattr(xp_p, "get") else np.asarray(xp_p)
                near = near.get() if hasattr(near, "get") else np.asarray(near)
                runmin = np.fmin(prev_runmin, xp_p)
                with np.errstate(invalid="ignore"):
                    ok = (xp_p >= near) & (xp_p - runmin >= prominence * np.abs(xp_p))
                best = np.fmax(prev_best, np.where(ok, xp_p, np.nan))
            else:
                runmin, best = prev_runmin, prev_best
            best_x[inc] = best
            runmin_x[inc] = runmin
        self._id[slots] = ids
        self._bar[slots] = t
        self._entry[slots] = entries
        self._runmin[slots] = runmin_x
        self._best[slots] = best_x
        out = best_x * (direction.get() if hasattr(direction, "get") else direction)
        return xp.asarray(out)

    def _grow(self, size: int) -> None:
        size = max(size, 2 * len(self._id), 64)
        extra = size - len(self._id)
        self._id = np.concatenate([self._id, np.zeros(extra, dtype=np.int64)])
        self._bar = np.concatenate([self._bar, np.full(extra, -2, dtype=np.int64)])
        self._entry = np.concatenate([self._entry, np.zeros(extra, dtype=np.int64)])
        self._runmin = np.concatenate([self._runmin, np.zeros(extra)])
        self._best = np.concatenate([self._best, np.zeros(extra)])


def _fmax_rows(w: np.ndarray, xp: ModuleType) -> np.ndarray:
    """Largest value of each column ignoring NaN (NaN where all are), exact in any order."""
    if xp is np:
        return np.fmax.reduce(w, axis=0)
    near = w[0]
    for k in range(1, w.shape[0]):
        near = xp.fmax(near, w[k])
    return near


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
               last_only: bool = False, levels: np.ndarray | None = None,
               bar: int | None = None) -> np.ndarray:
    """Exit code per bar and held symbol (``[T, S]`` ints, indexes into ``REASONS``; with
    ``last_only`` the last bar's ``[S]``).

    ``direction`` is +1 (long) / -1 (short) per symbol, ``entry_price`` the average entry
    price (US dollars), ``entry_bar`` the bar whose open filled the entry; ``ml_score``
    (``[T, S]``, or ``[S]`` for the last bar; NaN = no score) is the exit model's probability;
    ``levels`` (last bar only) are the peak/trough levels of an ``ExtremeTracker``; with
    them ``close`` may hold the last bar only, and ``bar`` is then its index in the session.
    A bar without a close, or before the entry, holds (0). The first rule that fires, in
    ``REASONS`` order, is the reason.
    """
    n_bars = close.shape[0] if bar is None else bar + 1
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
    # Every comparison with NaN is False: a missing close is not live, a missing level or
    # score never fires (so no NaN needs replacing first).
    with np.errstate(invalid="ignore"):
        live = (bars >= entry_bar[None, :]) & (close > 0)
        long_ = (direction > 0)[None, :]
        short = (direction < 0)[None, :]
        avg = entry_price[None, :]
        drop = params.peak_drop_pct
        c = close
        rules: list[tuple[int, np.ndarray]] = [
            (PEAK, long_ & (c <= peak * (1 - drop))),
            (TROUGH, short & (c >= trough * (1 + drop))),
        ]
        if ml_score is not None:
            rules.append((ML_EXIT, ml_score >= params.ml_exit_threshold))
        sl = params.stop_loss_pct
        rules.append((STOP_LOSS, (long_ & (c <= avg * (1 - sl)))
                      | (short & (c >= avg * (1 + sl)))))
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
    # Far from the stop in floats (a margin of 1e-9, far above their rounding) means far
    # from it in Decimal too: only marks near the stop need the exact check.
    level = position.avg_float * (1 - stop_loss_pct if position.qty > 0 else 1 + stop_loss_pct)
    if (position.qty > 0 and mark > level * (1 + 1e-9)) or (
            position.qty < 0 and mark < level * (1 - 1e-9)) or position.qty == 0:
        return None
    price = Decimal(repr(float(mark)))
    stop = Decimal(repr(stop_loss_pct))
    if position.qty > 0 and price <= position.avg * (1 - stop):
        return "stop_loss"
    if position.qty < 0 and price >= position.avg * (1 + stop):
        return "stop_loss"
    return None
