"""No look-ahead over the real development bars.

For several bars ``t`` per day (always 0 and the last bar), every bar after ``t`` is replaced
with random garbage (NaN and inf included). Series functions must give bit-identical rows
``<= t``; per-tick functions, fed ``window[:t+1]``, must give the same result as on the
original and agree with the series function's row ``t`` where there is one. Windows use the
cluster's field-major layout (core/market/bar_store.py BarWindow); the per-tick functions are
also checked against a C-contiguous copy.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest

from core.brokers.base import Position
from core.exits import REASONS, ExitParams, confirmed_extremes, exit_codes
from core.market.files import load_days
from core.models import CLOSE, DayBars
from core.scoring import ScoringParams, score_bar
from core.signals.orb import OrbParams, orb_signals
from core.signals.vwap import VwapParams, session_vwap, vwap_signals

DAYS = [dt.date(2019, 2, d) for d in range(11, 16)] + [dt.date(2015, 12, 24)]  # + early close
EXITS = ExitParams(take_profit_pct=0.004, max_holding_bars=45)
SCORING = ScoringParams(exits=EXITS)
T_PER_DAY = 25


def _field_major(day: DayBars) -> np.ndarray:
    return np.ascontiguousarray(day.ohlcv.transpose(2, 0, 1)).transpose(1, 2, 0)


def _garbage(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    g = rng.uniform(-50.0, 1e4, shape)
    g[rng.random(shape) < 0.3] = np.nan
    g[rng.random(shape) < 0.02] = np.inf
    g[rng.random(shape) < 0.02] = -np.inf
    return g


def _perturbed(a: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    out = a.copy()  # keeps the field-major strides
    out[t + 1:] = _garbage(rng, out[t + 1:].shape)
    return out


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _held_columns(day: DayBars, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two held columns per symbol (a long and a short), entry bars spread over the day."""
    n_bars, n_sym = day.n_bars, len(day.symbols)
    cols = np.repeat(np.arange(n_sym), 2)
    direction = np.tile([1, -1], n_sym)
    entry = np.linspace(0, n_bars - 1, cols.size).astype(np.int64)
    rng.shuffle(entry)
    close = day.ohlcv[:, :, CLOSE]
    price = close[entry, cols]
    price = np.where(np.isfinite(price), price, np.nanmean(close) if np.isfinite(close).any()
                     else 100.0)
    return cols, entry, direction, price


def _positions(day: DayBars, t: int, entry: dict[str, int], direction: dict[str, int],
               price: dict[str, float]) -> dict[str, Position]:
    """This session's positions filled by bar ``t`` (opened at the open of their entry bar)."""
    return {s: Position(symbol=s, qty=10 * direction[s], avg_price=repr(price[s]),
                        opened_at=day.bar_time(entry[s]).isoformat(),
                        session_date=day.date.isoformat(),
                        entry_client_order_id=f"x-{s}")
            for s in entry if entry[s] <= t}


@pytest.fixture
def days(shared_bars: Path) -> list[DayBars]:
    got = [d for d in load_days(shared_bars, start=DAYS[-1], end=DAYS[-1])
           + load_days(shared_bars, start=DAYS[0], end=DAYS[4]) if d.date in DAYS]
    if not any(d.date.year == 2019 for d in got):
        pytest.skip("the 2019-02-11..15 real bars are not present")
    return got


def test_series_and_per_tick_functions_never_look_ahead(days: list[DayBars]) -> None:
    checked = 0
    seen = {"exits": 0, "signals": 0}
    for day in days:
        rng = np.random.default_rng(day.date.toordinal())
        w = _field_major(day)
        n_bars = day.n_bars
        cols, entry, direction, price = _held_columns(day, rng)
        close_h = w[:, cols, CLOSE]
        ml = rng.random(close_h.shape)
        ml[rng.random(ml.shape) < 0.1] = np.nan
        d, prom = EXITS.peak_distance_bars, EXITS.peak_prominence_pct

        vwap = session_vwap(w)
        peak, trough = confirmed_extremes(close_h, entry, d, prom)
        codes = exit_codes(close_h, entry, direction, price, EXITS, ml)
        assert (codes != 0).any()  # the rules do fire on these days

        # score_bar positions: one per symbol; the earliest entries (bar 0, long and short)
        # always have a close, so held_exits sees the same earliest entry as the series below
        dense = [i for i in range(len(day.symbols)) if np.isfinite(w[:, i, CLOSE]).all()]
        order = dense + [i for i in range(len(day.symbols)) if i not in dense]
        pos_entry = dict.fromkeys((day.symbols[i] for i in order), 0)
        spread = np.linspace(0, n_bars - 1, len(order)).astype(int)
        for k, i in enumerate(order[2:]):
            pos_entry[day.symbols[i]] = int(spread[k + 2])
        pos_dir = {s: (1 if k % 2 == 0 else -1) for k, s in enumerate(pos_entry)}
        pos_price = {s: float(np.nanmedian(w[:, i, CLOSE])) if np.isfinite(w[:, i, CLOSE]).any()
                     else 100.0 for i, s in enumerate(day.symbols)}
        held_syms = sorted(pos_entry)
        held_idx = np.array([day.symbols.index(s) for s in held_syms])
        pos_codes = exit_codes(w[:, held_idx, CLOSE], np.array([pos_entry[s] for s in held_syms]),
                               np.array([pos_dir[s] for s in held_syms]),
                               np.array([pos_price[s] for s in held_syms]), EXITS)

        ts = {0, n_bars - 1, *rng.choice(n_bars, T_PER_DAY - 2, replace=False).tolist()}
        for t in sorted(ts):
            p = _perturbed(w, t, rng)
            p_close = p[:, cols, CLOSE]
            p_ml = ml.copy()
            p_ml[t + 1:] = _garbage(rng, p_ml[t + 1:].shape)
            where = f"{day.date} t={t}"

            # series: rows <= t bit-identical
            with np.errstate(all="ignore"):
                p_vwap = session_vwap(p)
                p_peak, p_trough = confirmed_extremes(p_close, entry, d, prom)
                p_codes = exit_codes(p_close, entry, direction, price, EXITS, p_ml)
            assert _same_bits(p_vwap[: t + 1], vwap[: t + 1]), where
            assert t == n_bars - 1 or not _same_bits(p_vwap, vwap)  # the garbage did land
            assert _same_bits(p_peak[: t + 1], peak[: t + 1]), where
            assert _same_bits(p_trough[: t + 1], trough[: t + 1]), where
            assert _same_bits(p_codes[: t + 1], codes[: t + 1]), where

            # per tick, from window[:t+1]: same as the original and as the series' row t
            win, orig = p[: t + 1], w[: t + 1]
            compact = np.ascontiguousarray(orig)
            assert _same_bits(session_vwap(win)[-1], vwap[t]), where
            last = exit_codes(p_close[: t + 1], entry, direction, price, EXITS, p_ml[: t + 1],
                              last_only=True)
            assert _same_bits(last, codes[t]), where
            assert _same_bits(exit_codes(close_h[: t + 1], entry, direction, price, EXITS,
                                         ml[t], last_only=True), codes[t]), where
            lp, lt = confirmed_extremes(p_close[: t + 1], entry, d, prom, last_only=True)
            assert _same_bits(lp, peak[t]) and _same_bits(lt, trough[t]), where

            bar_time = day.bar_time(t)
            for fn, params in ((orb_signals, OrbParams()), (vwap_signals, VwapParams())):
                got = fn(win, day.symbols, bar_time, params)
                assert got == fn(orig, day.symbols, bar_time, params), where
                assert got == fn(compact, day.symbols, bar_time, params), where

            positions = _positions(day, t, pos_entry, pos_dir, pos_price)
            scored = score_bar(win, day.symbols, day.open_time, day.bar_seconds, positions,
                               SCORING)
            assert scored == score_bar(orig, day.symbols, day.open_time, day.bar_seconds,
                                       positions, SCORING), where
            assert scored == score_bar(compact, day.symbols, day.open_time, day.bar_seconds,
                                       positions, SCORING), where
            want = {s: (REASONS[int(c)], f"x-{s}") for s, c in zip(held_syms, pos_codes[t],
                                                                     strict=True)
                    if c and s in positions}
            assert scored.exits == want, where
            closes = w[t, :, CLOSE]
            bad = {s for s, why in scored.skipped.items() if why.startswith("inconsistent")}
            assert scored.marks == {s: float(closes[i]) for i, s in enumerate(day.symbols)
                                    if math.isfinite(closes[i]) and s not in bad}, where
            seen["exits"] += len(scored.exits)
            seen["signals"] += len(scored.signals)
            checked += 1
    assert checked >= T_PER_DAY * 5
    assert seen["exits"] > 0 and seen["signals"] > 0, seen
