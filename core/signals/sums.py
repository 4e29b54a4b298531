"""Running sums of one session's bars for the rule strategies (pure; numpy or cupy).

The rules need, at bar ``t``, sums over bars ``0..t``: the VWAP's cumulative typical price x
volume and volume, and ORB's volume since the opening range. Recomputing them over the whole
window costs ``O(t x S)`` per bar; ``SessionSums`` keeps them per bar and adds only the bars
that arrived since the last call, so the scoring process spends ``O(S)`` per new bar.

Every sum is sequential (each bar added to the previous total), the order ``xp.cumsum``
adds in, so the value at bar ``t`` is bit-identical however the bars arrived: all at once,
one per tick, or in jumps (the backtester scores some bars only). A fresh ``SessionSums``
on a window is what the rules use when no running one is passed. Prices US dollars, volume
shares.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from core.models import CLOSE, HIGH, LOW, VOLUME

_FIELDS = 4  # per bar, cumulative: typical x volume, VWAP volume, volume (NaN as 0), volume
# bars (the VWAP itself, cumulative pv / v, is kept beside them)


def _root(array: np.ndarray) -> object:
    """The array that owns ``array``'s memory (a window is usually a view of a buffer)."""
    while getattr(array, "base", None) is not None:
        array = array.base  # type: ignore[assignment]
    return array


def _bar_terms(rows: np.ndarray, xp: ModuleType) -> np.ndarray:
    """Per bar and symbol ``[n, S, 4]``: typical x volume and volume of a bar usable for the
    VWAP (0 otherwise), volume with NaN as 0, and 1 where volume is present."""
    typical = (rows[:, :, HIGH] + rows[:, :, LOW] + rows[:, :, CLOSE]) / 3.0
    vol = rows[:, :, VOLUME]
    out = xp.zeros((*rows.shape[:2], _FIELDS))
    # prices are positive, so a usable bar has pv > 0; fmax turns NaN (and negatives) into 0
    pv = out[:, :, 0]
    xp.fmax(typical * vol, 0.0, out=pv)
    xp.multiply(xp.fmax(vol, 0.0), pv > 0, out=out[:, :, 1])
    present = ~xp.isnan(vol)
    out[:, :, 2] = xp.where(present, vol, 0.0)
    out[:, :, 3] = present
    return out


def _vwap(cum: np.ndarray, xp: ModuleType) -> np.ndarray:
    """VWAP from cumulative sums ``[..., 4]``: pv / v where v > 0, else NaN."""
    pv, v = cum[..., 0], cum[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.where(v > 0, pv / xp.where(v > 0, v, 1.0), xp.nan)


class SessionSums:
    """Cumulative sums per bar of one session's window ``[T, S, 5]``, extended as it grows.

    ``update(window)`` brings the sums up to the window's last bar. A window of other data
    (another buffer, another universe, or bars that differ from those already summed)
    starts the sums again, so a stale state never leaks into a new session or run. Also
    kept: the opening range of ORB (it never changes once its bars are in).
    """

    def __init__(self, xp: ModuleType = np) -> None:
        self._xp = xp
        self._owner: object | None = None
        self._first: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self._checked: np.ndarray | None = None  # the last window seen to hold our data
        self._cum = xp.zeros((0, 0, _FIELDS))
        self._vwap = xp.zeros((0, 0))  # [T, S]: the VWAP of each bar, contiguous per bar
        self._ranges: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.n = 0  # bars summed

    def update(self, window: np.ndarray) -> SessionSums:
        """Sum the bars of ``window`` not summed yet; returns self."""
        xp = self._xp
        n_new = window.shape[0]
        if window is self._checked and n_new <= self.n:
            return self  # the same window again (each rule asks): nothing to check or add
        if n_new == 0:
            self._reset(window)
            return self
        if not self._same_data(window):
            self._reset(window)
        self._checked = window
        if n_new <= self.n:
            return self
        terms = _bar_terms(window[self.n:n_new], xp)
        if self._cum.shape[0] < n_new:
            size = max(n_new, 2 * self._cum.shape[0], 64)
            grown = xp.zeros((size, window.shape[1], _FIELDS))
            grown[: self.n] = self._cum[: self.n]
            self._cum = grown
            grown_vwap = xp.zeros((size, window.shape[1]))
            grown_vwap[: self.n] = self._vwap[: self.n]
            self._vwap = grown_vwap
        if self.n:
            terms[0] += self._cum[self.n - 1]  # the running total enters first, as in cumsum
        new = self._cum[self.n:n_new]
        if n_new - self.n == 1:
            new[...] = terms  # one bar (each tick): its total is the running one plus it
        else:
            new[...] = xp.cumsum(terms, axis=0)
        self._vwap[self.n:n_new] = _vwap(new, xp)
        self.n = n_new
        self._last = xp.array(window[n_new - 1].T, copy=True)
        return self

    def _same_data(self, window: np.ndarray) -> bool:
        if self._owner is None or self.n == 0 or _root(window) is not self._owner:
            return False
        if window.shape[1] != self._cum.shape[1]:
            return False
        last = min(self.n, window.shape[0]) - 1
        # rows compared field by field ([5, S]): each field of a row is contiguous in the
        # window's buffer, a row across fields is not
        return bool(_equal(window[0].T, self._first, self._xp)) and (
            last != self.n - 1 or bool(_equal(window[last].T, self._last, self._xp)))

    def _reset(self, window: np.ndarray) -> None:
        xp = self._xp
        self._owner = _root(window)
        self._first = xp.array(window[0].T, copy=True) if window.shape[0] else None
        self._last = None
        self._checked = None
        self._cum = xp.zeros((0, window.shape[1], _FIELDS))
        self._vwap = xp.zeros((0, window.shape[1]))
        self._ranges = {}
        self.n = 0

    def vwap(self, start: int, stop: int) -> np.ndarray:
        """Session VWAP of bars ``start..stop-1`` ``[stop-start, S]``: cumulative typical
        price x volume over cumulative volume, NaN until the first bar with volume."""
        return self._vwap[start:stop]

    def volume_between(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Total volume (NaN bars as 0) and the number of bars with a volume over bars
        ``start..stop-1`` per symbol ``[S]``, as differences of the running totals."""
        xp = self._xp
        hi = self._cum[stop - 1, :, 2:]
        lo = self._cum[start - 1, :, 2:] if start > 0 else xp.zeros_like(hi)
        diff = hi - lo
        return diff[:, 0], diff[:, 1]

    def opening_range(self, window: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
        """ORB's range over the first ``k`` bars: (complete: no missing close, highest
        high, lowest low) per symbol, NaN highs and lows left out; ``window`` must hold
        at least ``k`` bars and be the one last passed to ``update``."""
        got = self._ranges.get(k)
        if got is None:
            xp = self._xp
            rng = window[:k]
            complete = ~xp.isnan(rng[:, :, CLOSE]).any(axis=0)
            hi = xp.max(xp.where(xp.isnan(rng[:, :, HIGH]), -xp.inf, rng[:, :, HIGH]), axis=0)
            lo = xp.min(xp.where(xp.isnan(rng[:, :, LOW]), xp.inf, rng[:, :, LOW]), axis=0)
            got = self._ranges[k] = (complete, hi, lo)
        return got


def _equal(a: np.ndarray, b: np.ndarray | None, xp: ModuleType) -> bool:
    """Bitwise equality of two bar rows, NaN equal to NaN."""
    if b is None or a.shape != b.shape:
        return False
    return bool(xp.all((a == b) | (xp.isnan(a) & xp.isnan(b))))


def sums_for(window: np.ndarray, sums: SessionSums | None, xp: ModuleType) -> SessionSums:
    """``sums`` brought up to ``window``'s last bar, or fresh sums of ``window``."""
    return (sums if sums is not None else SessionSums(xp)).update(window)
