"""One bar's scoring for the whole universe (pure; shared by the cluster and the backtester).

Given the session's bars up to bar ``t`` and the open positions: the rule strategies' entry
signals, the marks (each symbol's close at ``t``), the exit reason of every held position
that must close at ``t``, and the symbols skipped for bad data with the reason. Prices US
dollars, times America/New_York.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import compress
from types import ModuleType
from typing import Any

import numpy as np

from core.brokers.base import Position
from core.exits import REASONS, ExitParams, ExtremeTracker, exit_codes
from core.held import HeldColumns, entry_offset
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME, symbol_index
from core.signals import RuleMasks, Signal
from core.signals.orb import OrbParams, orb_masks
from core.signals.random_entry import RandomParams, random_signals
from core.signals.sums import SessionSums
from core.signals.vwap import VwapParams, vwap_masks

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
    """What scoring found at one bar. ``exits`` maps symbol -> (reason, entry order id);
    ``mark_array`` holds the marks in the universe's order, NaN where a symbol has none."""

    signals: list[Signal]
    marks: dict[str, float]
    exits: dict[str, tuple[str, str]]
    skipped: dict[str, str]
    mark_array: np.ndarray | None = field(default=None, compare=False, repr=False)


def _price_checks(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of a bar row ([S, 5]): which fields are NaN ([S, 5]) and which symbols have all four
    prices but inconsistent ones ([S]: non-positive, infinite, or open/close outside
    low..high)."""
    nan = np.isnan(row)
    px = row[:, :4]
    with np.errstate(invalid="ignore"):
        bad_px = ~nan[:, :4].any(axis=1) & (
            (px <= 0).any(axis=1) | ~np.isfinite(px).all(axis=1)
            | (row[:, HIGH] < row[:, LOW])
            | (row[:, CLOSE] > row[:, HIGH]) | (row[:, CLOSE] < row[:, LOW])
            | (row[:, OPEN] > row[:, HIGH]) | (row[:, OPEN] < row[:, LOW]))
    return nan, bad_px


def bar_problems(row: np.ndarray, symbols: tuple[str, ...],
                 checks: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, str]:
    """Symbols whose bar ``row`` ([S, 5]) cannot be traded on, with the reason
    (``checks``: ``_price_checks(row)`` when already computed)."""
    out: dict[str, str] = {}
    nan, bad_px = checks if checks is not None else _price_checks(row)
    none = nan.all(axis=1)
    some = nan.any(axis=1) & ~none
    with np.errstate(invalid="ignore"):
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


def mark_values(row: np.ndarray,
                checks: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """This bar's marks ([S] US dollars) from its row ([S, 5]): each symbol's close where it
    is finite and positive and the bar's prices are consistent (``bar_problems``' test),
    NaN elsewhere (``checks``: ``_price_checks(row)`` when already computed)."""
    closes = row[:, CLOSE]
    _, bad_px = checks if checks is not None else _price_checks(row)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(closes) & (closes > 0) & ~bad_px
    return np.where(usable, closes, np.nan)


def entry_bar_of(position: Position, open_time: dt.datetime, bar_seconds: int,
                 bar: int) -> int | None:
    """Bar index whose open filled ``position`` (None when it opened in another session)."""
    entry = entry_offset(position.opened_at, open_time, bar_seconds)
    return None if entry is None else min(entry, bar)


@dataclass(frozen=True)
class BarFacts:
    """What scoring a bar needs of the bars alone (no position, no order): where the rules
    fire (``masks``), the symbols that cannot be traded and why (``skipped``), and the marks
    (``mark_array``: US dollars in the universe's order, NaN where none; ``marks``: the same
    by symbol, usable ones only)."""

    masks: list[RuleMasks]
    skipped: dict[str, str]
    mark_array: np.ndarray
    marks: dict[str, float]


def bar_facts(window: np.ndarray, symbols: tuple[str, ...], params: ScoringParams,
              xp: ModuleType = np, sums: SessionSums | None = None) -> BarFacts:
    """The ``BarFacts`` of the last bar of ``window`` ([t+1, S, 5])."""
    row = window[window.shape[0] - 1]
    row_np = row.get() if hasattr(row, "get") else np.asarray(row)
    checks = _price_checks(row_np)
    mark_array = mark_values(row_np, checks)
    usable = (~np.isnan(mark_array)).tolist()
    marks = dict(zip(compress(symbols, usable), compress(mark_array.tolist(), usable),
                     strict=True))
    return BarFacts(masks=rule_masks(window, params, xp, sums),
                    skipped=bar_problems(row_np, symbols, checks), mark_array=mark_array,
                    marks=marks)


class FactsCache:
    """The last bar's facts of one scoring process, computed once by whichever thread asks
    first (the bar listener, ahead of the score task, or the task itself); the lock also
    keeps the running sums they extend to one thread at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._value: Any = None
        self.computed = 0  # how many times a value was computed (a gauge for tests)

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The value for ``key``: the cached one when the last key was equal, else
        ``compute()`` (kept for the next call)."""
        with self._lock:
            if self._key != key:
                self._value = compute()
                self._key = key
                self.computed += 1
            return self._value


def rule_masks(window: np.ndarray, params: ScoringParams, xp: ModuleType = np,
               sums: SessionSums | None = None) -> list[RuleMasks]:
    """Where each rule strategy of ``params`` fires at the last bar of ``window`` (the part of
    scoring that needs no positions; ``score_bar`` builds the signals from it)."""
    out = []
    if "orb" in params.strategies and (m := orb_masks(window, params.orb, xp, sums)):
        out.append(m)
    if "vwap" in params.strategies and (m := vwap_masks(window, params.vwap, xp, sums)):
        out.append(m)
    return out


def score_bar(window: np.ndarray, symbols: tuple[str, ...], open_time: dt.datetime,
              bar_seconds: int, positions: dict[str, Position], params: ScoringParams,
              exit_model: ExitModel | None = None, xp: ModuleType = np,
              tracker: ExtremeTracker | None = None,
              sums: SessionSums | None = None, skip_held: bool = False,
              facts: BarFacts | None = None,
              held: HeldColumns | None = None,
              skip_taken: tuple[np.ndarray, np.ndarray] | None = None) -> ScoredBar:
    """Score the last bar of ``window`` ([t+1, S, 5]) for every symbol.

    Signals of symbols whose bar at ``t`` is unusable are dropped (``skipped`` says why);
    exits are evaluated only for positions of this session, with a close at ``t``.
    ``tracker`` and ``sums`` carry the scoring process's state from bar to bar (peaks and
    troughs, running sums); the result is the same without them. ``skip_held``: no signals
    for symbols with an open position (the decision never enters those; the cluster and the
    backtester pass it, which saves building signals nobody takes). ``facts``: this
    window's ``bar_facts``, when already computed; ``held``: the scoring process's
    ``HeldColumns``, synced to ``positions`` (with it the tracker keys its state by column);
    ``skip_taken``: per symbol, entered long / short today: no signal repeats those.
    """
    t = window.shape[0] - 1
    bar_time = open_time + dt.timedelta(seconds=t * bar_seconds)
    if facts is None:
        facts = bar_facts(window, symbols, params, xp, sums)
    skipped = facts.skipped
    index = symbol_index(symbols)
    keyed = held is None  # no columns kept from bar to bar: the tracker keys by order id
    if held is None:
        held = HeldColumns().sync(positions, symbols, open_time, bar_seconds,
                                  _session_date(open_time))
    only = None
    if skip_held or skipped:
        only = np.ones(len(symbols), dtype=bool)
        only[[index[s] for s in skipped]] = False
        if skip_held:
            only[held.held()] = False
    only_long = only_short = only
    if skip_taken is not None:
        base = only if only is not None else np.ones(len(symbols), dtype=bool)
        only_long, only_short = base & ~skip_taken[0], base & ~skip_taken[1]
    signals: list[Signal] = []
    for m in facts.masks:
        signals += m.signals(symbols, bar_time, xp, only_long, only_short)
    if "random" in params.strategies:
        signals += [s for s in random_signals(window, symbols, bar_time, params.random, xp)
                    if (ok := only_long if s.side == "buy" else only_short) is None
                    or ok[index[s.symbol]]]
    usable = ~np.isnan(facts.mark_array)
    exits = _exits(window, held, usable, params.exits, exit_model, xp, tracker, keyed)
    return ScoredBar(signals=signals, marks=dict(facts.marks), exits=exits,
                     skipped=dict(skipped), mark_array=facts.mark_array)


def held_exits(window: np.ndarray, symbols: tuple[str, ...], open_time: dt.datetime,
               bar_seconds: int, positions: dict[str, Position], params: ExitParams,
               marks: dict[str, float], exit_model: ExitModel | None = None,
               xp: ModuleType = np,
               tracker: ExtremeTracker | None = None) -> dict[str, tuple[str, str]]:
    """Exit reason and entry order id of each held position that must close at ``t``
    (positions of this session whose symbol has a mark)."""
    held = HeldColumns().sync(positions, symbols, open_time, bar_seconds,
                              _session_date(open_time))
    usable = np.array([s in marks for s in symbols], dtype=bool)
    return _exits(window, held, usable, params, exit_model, xp, tracker, True)


def _session_date(open_time: dt.datetime) -> str:
    """The exchange date of the session that opens at ``open_time`` (America/New_York)."""
    return open_time.date().isoformat()


def _exits(window: np.ndarray, held: HeldColumns, usable: np.ndarray, params: ExitParams,
           exit_model: ExitModel | None, xp: ModuleType, tracker: ExtremeTracker | None,
           keyed: bool) -> dict[str, tuple[str, str]]:
    """The rule (and exit model) exits at the last bar of ``window`` of the held positions
    of this session whose symbol has a usable mark (``usable``, per column). ``keyed``:
    the tracker keys its state by entry order id (else by column and position id)."""
    cols = np.flatnonzero((held.qty != 0) & held.today & (held.entry >= 0) & usable)
    if not len(cols):
        return {}
    t = window.shape[0] - 1
    idx = xp.asarray(cols)
    entry_bar = xp.minimum(xp.asarray(held.entry[cols]), t)  # the entry bar, as of bar t
    direction = xp.asarray(np.where(held.qty[cols] > 0, 1, -1))
    avg = xp.asarray(held.avg[cols])
    ml_score = None
    if exit_model is not None:
        try:
            ml_score = xp.asarray(exit_model(window, idx, entry_bar, direction, avg),
                                  dtype=float)
        except Exception:  # a broken model must never block the rule exits
            log.exception("exit model failed; rule exits only for this bar")
    closes = window[:, :, CLOSE]  # [T, S]; only the rows each rule needs are gathered
    if tracker is not None:
        d, prom = params.peak_distance_bars, params.peak_prominence_pct
        if keyed:
            levels = tracker.levels(closes, [str(held.coid[c]) for c in cols], entry_bar,
                                    direction, d, prom, xp, cols=idx)
        else:
            levels = tracker.levels_at(closes, cols, held.pid[cols], entry_bar, direction, d,
                                       prom, xp, cols=idx)
        codes = exit_codes(closes[t:, idx], entry_bar, direction, avg, params, ml_score, xp,
                           last_only=True, levels=levels, bar=t)
    else:
        codes = exit_codes(closes[:, idx], entry_bar, direction, avg, params, ml_score, xp,
                           last_only=True)
    codes_np = codes.get() if hasattr(codes, "get") else np.asarray(codes)
    hit = codes_np != 0
    return {held.symbols[c]: (REASONS[code], str(held.coid[c]))
            for c, code in zip(cols[hit].tolist(), codes_np[hit].tolist(), strict=True)}


def log_skips(day: dt.date, skipped: dict[str, str], seen: set[tuple[str, str, str]],
              names: Iterable[str] | None = None) -> None:
    """Log each (symbol, reason) once per session: a skipped symbol is never silent."""
    for sym, reason in sorted(skipped.items()):
        key = (day.isoformat(), sym, reason)
        if key in seen or (names is not None and sym not in names):
            continue
        seen.add(key)
        log.info("symbol skipped: %s", reason, extra={"date": day.isoformat(), "symbol": sym})
