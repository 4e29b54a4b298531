"""One bar's scoring for the whole universe (pure; shared by the cluster and the backtester).

Given the session's bars up to bar ``t`` and the open positions: the rule strategies' entry
signals, the marks (each symbol's close at ``t``), the exit reason of every held position
that must close at ``t``, and the symbols skipped for bad data with the reason. Prices US
dollars, times America/New_York.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from core.brokers.base import Position
from core.exits import REASONS, ExitParams, ExtremeTracker, exit_codes
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
from core.signals import Signal
from core.signals.orb import OrbParams, orb_signals
from core.signals.random_entry import RandomParams, random_signals
from core.signals.vwap import VwapParams, vwap_signals

log = logging.getLogger(__name__)

STRATEGIES = ("orb", "vwap")  # the default; "random" is the backtest's baseline

# (window, symbol indexes, entry bars, directions, entry prices) -> exit probability per row
ExitModel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def bars_for(minutes: int, bar_seconds: int) -> int:
    """Whole bars covering ``minutes`` (at least 1)."""
    return max(1, -(-int(minutes) * 60 // int(bar_seconds)))


@dataclass(frozen=True)
class ScoringParams:
    """Which strategies run and every rule's settings, in bars of the session's size."""

    strategies: tuple[str, ...] = STRATEGIES
    orb: OrbParams = field(default_factory=OrbParams)
    vwap: VwapParams = field(default_factory=VwapParams)
    exits: ExitParams = field(default_factory=ExitParams)
    random: RandomParams = field(default_factory=RandomParams)

    @classmethod
    def from_settings(cls, s: Any, bar_seconds: int) -> ScoringParams:
        """The scoring slice of ``Settings`` for bars of ``bar_seconds`` seconds."""
        return cls(
            strategies=tuple(s.strategies),
            orb=OrbParams(range_bars=bars_for(s.orb_minutes, bar_seconds),
                          buffer_pct=s.orb_buffer_pct, volume_ratio=s.orb_volume_ratio),
            vwap=VwapParams(band_k=s.vwap_band_k, std_bars=bars_for(s.vwap_std_minutes,
                                                                    bar_seconds),
                            min_bars=bars_for(s.vwap_min_minutes, bar_seconds),
                            trend_bars=bars_for(s.vwap_trend_minutes, bar_seconds),
                            max_trend_pct=s.vwap_max_trend_pct),
            random=RandomParams(rate=s.random_entry_rate, seed=s.sim_seed),
            exits=ExitParams(
                stop_loss_pct=s.stop_loss_pct, peak_drop_pct=s.peak_exit_drop_threshold,
                peak_distance_bars=bars_for(s.peak_min_distance_minutes, bar_seconds),
                peak_prominence_pct=s.peak_prominence_pct,
                ml_exit_threshold=s.ml_exit_threshold, take_profit_pct=s.take_profit_pct,
                max_holding_bars=(bars_for(s.max_holding_minutes, bar_seconds)
                                  if s.max_holding_minutes > 0 else 0)),
        )


@dataclass
class ScoredBar:
    """What scoring found at one bar. ``exits`` maps symbol -> (reason, entry order id)."""

    signals: list[Signal]
    marks: dict[str, float]
    exits: dict[str, tuple[str, str]]
    skipped: dict[str, str]


def bar_problems(row: np.ndarray, symbols: tuple[str, ...]) -> dict[str, str]:
    """Symbols whose bar ``row`` ([S, 5]) cannot be traded on, with the reason."""
    out: dict[str, str] = {}
    nan = np.isnan(row)
    none = nan.all(axis=1)
    some = nan.any(axis=1) & ~none
    with np.errstate(invalid="ignore"):
        bad_px = ~nan[:, :4].any(axis=1) & (
            (row[:, :4] <= 0).any(axis=1) | ~np.isfinite(row[:, :4]).all(axis=1)
            | (row[:, HIGH] < row[:, LOW])
            | (row[:, CLOSE] > row[:, HIGH]) | (row[:, CLOSE] < row[:, LOW])
            | (row[:, OPEN] > row[:, HIGH]) | (row[:, OPEN] < row[:, LOW]))
        zero_vol = ~nan[:, VOLUME] & (row[:, VOLUME] <= 0)
    for i in np.flatnonzero(none):
        out[symbols[i]] = "no bar (halted or missing data)"
    for i in np.flatnonzero(some):
        out[symbols[i]] = "incomplete bar (NaN field)"
    for i in np.flatnonzero(bad_px):
        out[symbols[i]] = "inconsistent prices (non-positive, infinite or outside high/low)"
    for i in np.flatnonzero(zero_vol & ~bad_px & ~some):
        out[symbols[i]] = "zero volume"
    return out


def entry_bar_of(position: Position, open_time: dt.datetime, bar_seconds: int,
                 bar: int) -> int | None:
    """Bar index whose open filled ``position`` (None when it opened in another session)."""
    try:
        opened = dt.datetime.fromisoformat(position.opened_at)
    except (TypeError, ValueError):
        return None
    if opened.tzinfo is None:
        return None
    offset = (opened - open_time).total_seconds()
    if offset < 0:
        return None
    return min(int(offset // bar_seconds), bar)


def score_bar(window: np.ndarray, symbols: tuple[str, ...], open_time: dt.datetime,
              bar_seconds: int, positions: dict[str, Position], params: ScoringParams,
              exit_model: ExitModel | None = None, xp: ModuleType = np,
              tracker: ExtremeTracker | None = None) -> ScoredBar:
    """Score the last bar of ``window`` ([t+1, S, 5]) for every symbol.

    Signals of symbols whose bar at ``t`` is unusable are dropped (``skipped`` says why);
    exits are evaluated only for positions of this session, with a close at ``t``.
    """
    t = window.shape[0] - 1
    bar_time = open_time + dt.timedelta(seconds=t * bar_seconds)
    row = window[t]
    row_np = row.get() if hasattr(row, "get") else np.asarray(row)
    skipped = bar_problems(row_np, symbols)
    signals: list[Signal] = []
    if "orb" in params.strategies:
        signals += orb_signals(window, symbols, bar_time, params.orb, xp)
    if "vwap" in params.strategies:
        signals += vwap_signals(window, symbols, bar_time, params.vwap, xp)
    if "random" in params.strategies:
        signals += random_signals(window, symbols, bar_time, params.random, xp)
    signals = [s for s in signals if s.symbol not in skipped]
    closes = row_np[:, CLOSE]
    bad = {s for s, why in skipped.items() if why.startswith("inconsistent")}
    marks = {symbols[i]: float(closes[i]) for i in np.flatnonzero(np.isfinite(closes)
                                                                   & (closes > 0))
             if symbols[i] not in bad}
    exits = held_exits(window, symbols, open_time, bar_seconds, positions, params.exits,
                       marks, exit_model, xp, tracker)
    return ScoredBar(signals=signals, marks=marks, exits=exits, skipped=skipped)


def held_exits(window: np.ndarray, symbols: tuple[str, ...], open_time: dt.datetime,
               bar_seconds: int, positions: dict[str, Position], params: ExitParams,
               marks: dict[str, float], exit_model: ExitModel | None = None,
               xp: ModuleType = np,
               tracker: ExtremeTracker | None = None) -> dict[str, tuple[str, str]]:
    """Exit reason and entry order id of each held position that must close at ``t``."""
    t = window.shape[0] - 1
    index = {s: i for i, s in enumerate(symbols)}
    held: list[tuple[str, int, int, int, float, str]] = []
    entry_bars: dict[str, int | None] = {}  # many positions share an entry time
    for sym, pos in sorted(positions.items()):
        i = index.get(sym)
        if i is None or pos.qty == 0 or sym not in marks:
            continue
        entry = entry_bars.get(pos.opened_at, -1)
        if entry == -1:
            entry = entry_bars[pos.opened_at] = entry_bar_of(pos, open_time, bar_seconds, t)
        if entry is None:
            continue  # an earlier session's position: the decision step closes it
        held.append((sym, i, entry, 1 if pos.qty > 0 else -1, float(pos.avg_price),
                     pos.entry_client_order_id))
    if not held:
        return {}
    idx = xp.asarray([h[1] for h in held])
    entry_bar = xp.asarray([h[2] for h in held])
    direction = xp.asarray([h[3] for h in held])
    avg = xp.asarray([h[4] for h in held], dtype=float)
    ml_score = None
    if exit_model is not None:
        try:
            ml_score = xp.asarray(exit_model(window, idx, entry_bar, direction, avg),
                                  dtype=float)
        except Exception:  # a broken model must never block the rule exits
            log.exception("exit model failed; rule exits only for this bar")
    close = window[:, idx, CLOSE]
    levels = None
    if tracker is not None:
        levels = tracker.levels(close, [h[5] for h in held], entry_bar, direction,
                                params.peak_distance_bars, params.peak_prominence_pct, xp)
    codes = exit_codes(close, entry_bar, direction, avg, params, ml_score, xp, last_only=True,
                       levels=levels)
    codes_np = codes.get() if hasattr(codes, "get") else np.asarray(codes)
    return {h[0]: (REASONS[int(c)], h[5]) for h, c in zip(held, codes_np, strict=True)
            if int(c)}


def log_skips(day: dt.date, skipped: dict[str, str], seen: set[tuple[str, str, str]],
              names: Iterable[str] | None = None) -> None:
    """Log each (symbol, reason) once per session: a skipped symbol is never silent."""
    for sym, reason in sorted(skipped.items()):
        key = (day.isoformat(), sym, reason)
        if key in seen or (names is not None and sym not in names):
            continue
        seen.add(key)
        log.info("symbol skipped: %s", reason, extra={"date": day.isoformat(), "symbol": sym})
