"""Training rows for the entry and exit models, built from whole sessions (numpy).

Entry rows (``ENTRY_MODEL_FEATURES``): one per (day, bar ``t``, symbol, side) where a rule
strategy fires at the close of bar ``t`` -- the signals of ``core.scoring.score_bar`` on
``window[:t + 1]``, so exactly what the cluster sees (ORB, VWAP; a symbol with an unusable bar
is skipped). Features are ``entry_features_all(window)[t]`` plus ``side`` (+1 long, -1 short)
and ``strategy`` (``STRATEGY_IDS``; -1 = no rule signal). The label is that side's
triple-barrier label at ``t`` (``ml.labels.entry_labels``: entry at bar ``t + 1``'s open, net
of slippage and fees) and ``pnl`` the trade's net outcome as a fraction: ``+target_pct``,
``-stop_pct`` or the net return at the close of the horizon's last bar. With
``rows="all"`` every ``every_k_bars``-th bar adds a row per symbol and side as well
(strategy -1, ``signal`` False), for when the signals alone are too few.

Exit rows (``EXIT_MODEL_FEATURES``): synthetic positions, one at a time per symbol and day,
entered at bar ``t + 1``'s open after a signal at ``t`` (slippage against the trade), held
until the close crosses ``exit_stop_pct`` against it, ``exit_hold_minutes`` have passed or
the session ends; a row for every ``exit_every_k_bars``-th bar held, with
``exit_features_all`` plus ``side``, labelled by ``ml.labels.exit_labels`` (1 = holding on
loses more than ``exit_loss_pct`` within ``exit_horizon_minutes``).

No look-ahead: features use bars ``<= t``; labels look ahead at most the horizon and never
past the session's last bar (rows whose horizon runs past it have NaN labels and are
dropped). Only bars where an entry is still allowed (before the last
``no_entry_minutes_before_close`` minutes) give entry signals. Prices US dollars, returns
fractions, times America/New_York; every row keeps its session date.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from core.models import CLOSE, HIGH, LOW, OPEN, DayBars
from core.scoring import ScoringParams, bars_for, score_bar
from ml.features import (
    EXIT_FEATURE_NAMES,
    FEATURE_NAMES,
    entry_features_all,
    exit_features_all,
)
from ml.labels import entry_labels, exit_labels

STRATEGY_IDS: dict[str, int] = {"orb": 0, "vwap": 1}
NO_STRATEGY = -1  # a sampled row without a rule signal (rows="all")
ENTRY_MODEL_FEATURES: tuple[str, ...] = (*FEATURE_NAMES, "side", "strategy")
EXIT_MODEL_FEATURES: tuple[str, ...] = (*EXIT_FEATURE_NAMES, "side")
_BPS = 1e-4


@dataclass(frozen=True)
class DatasetParams:
    """How rows and labels are made. Fractions of price, minutes, basis points, US dollars.

    ``target_pct``/``stop_pct``/``horizon_minutes``: the entry triple barrier;
    ``slippage_bps`` and ``fee_per_share`` are paid on each side. ``rows``: ``"signals"``
    (rule signals only) or ``"all"`` (plus every ``every_k_bars``-th bar, both sides).
    """

    target_pct: float = 0.002
    stop_pct: float = 0.002
    horizon_minutes: int = 60
    slippage_bps: float = 2.0
    fee_per_share: float = 0.0035
    no_entry_minutes_before_close: int = 30
    rows: Literal["signals", "all"] = "signals"
    every_k_bars: int = 5
    exit_loss_pct: float = 0.003
    exit_horizon_minutes: int = 30
    exit_hold_minutes: int = 120
    exit_stop_pct: float = 0.01
    exit_every_k_bars: int = 1

    def __post_init__(self) -> None:
        if self.rows not in ("signals", "all"):
            raise ValueError(f"rows must be 'signals' or 'all', got {self.rows!r}")
        for name in ("target_pct", "stop_pct", "exit_loss_pct", "exit_stop_pct"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be a fraction in (0, 1)")
        for name in ("horizon_minutes", "exit_horizon_minutes", "exit_hold_minutes",
                     "every_k_bars", "exit_every_k_bars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def from_settings(cls, s: Any, **overrides: Any) -> DatasetParams:
        """Costs, the entry window and the stop-loss from ``Settings``; the rest default."""
        base: dict[str, Any] = {
            "slippage_bps": float(s.sim_slippage_bps),
            "fee_per_share": float(s.sim_fee_per_share),
            "no_entry_minutes_before_close": int(s.no_entry_minutes_before_close),
            "exit_stop_pct": float(s.stop_loss_pct),
        }
        return cls(**(base | overrides))

    @property
    def break_even(self) -> float:
        """Probability of the target at which a trade breaks even: stop / (target + stop)."""
        return self.stop_pct / (self.target_pct + self.stop_pct)


@dataclass(frozen=True)
class Rows:
    """Training rows: ``X`` [N, F] float32 (NaN = missing), ``y`` [N] 0/1, and per row its
    session date (``day``, datetime64[D], New York), bar index, symbol, side (+1/-1),
    strategy id, whether a rule signal made it, and the entry trade's net outcome ``pnl``
    (fraction; NaN for exit rows)."""

    X: np.ndarray
    y: np.ndarray
    day: np.ndarray
    bar: np.ndarray
    symbol: np.ndarray
    side: np.ndarray
    strategy: np.ndarray
    signal: np.ndarray
    pnl: np.ndarray
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def select(self, mask: np.ndarray) -> Rows:
        """The rows where ``mask`` (bool [N]) is set."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[mask]
                                            for f in dataclasses.fields(self)
                                            if f.name != "feature_names"})

    def on_days(self, days: Sequence[dt.date]) -> Rows:
        """The rows of the given session dates."""
        return self.select(np.isin(self.day, np.array(list(days), dtype="datetime64[D]")))

    @property
    def days(self) -> list[dt.date]:
        """Sorted distinct session dates of the rows."""
        return [d.item() for d in np.unique(self.day)]

    @classmethod
    def concat(cls, parts: Sequence[Rows], feature_names: tuple[str, ...]) -> Rows:
        """All rows of ``parts`` in order (an empty list gives zero rows)."""
        if not parts:
            return _empty(feature_names)
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                      for f in dataclasses.fields(cls) if f.name != "feature_names"},
                   feature_names=feature_names)


def _empty(names: tuple[str, ...]) -> Rows:
    return Rows(X=np.zeros((0, len(names)), np.float32), y=np.zeros(0), day=np.zeros(0, "M8[D]"),
                bar=np.zeros(0, np.int64), symbol=np.zeros(0, object), side=np.zeros(0, np.int8),
                strategy=np.zeros(0, np.int8), signal=np.zeros(0, bool), pnl=np.zeros(0),
                feature_names=names)


def entry_model_rows(features: np.ndarray, side: np.ndarray, strategy: np.ndarray) -> np.ndarray:
    """Entry model input [N, len(ENTRY_MODEL_FEATURES)] float32 from entry features [N, F]
    (``FEATURE_NAMES`` order), ``side`` [N] (+1/-1) and ``strategy`` ids [N]."""
    features = np.asarray(features, dtype=np.float64)
    return np.column_stack([features, np.asarray(side, np.float64),
                            np.asarray(strategy, np.float64)]).astype(np.float32)


def exit_model_rows(features: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Exit model input [N, len(EXIT_MODEL_FEATURES)] float32 from exit features [N, F_exit]
    (``EXIT_FEATURE_NAMES`` order) and ``side`` [N] (+1/-1)."""
    features = np.asarray(features, dtype=np.float64)
    return np.column_stack([features, np.asarray(side, np.float64)]).astype(np.float32)


def strategy_id(source: str) -> int:
    """Numeric strategy column for a signal source (``NO_STRATEGY`` when unknown)."""
    return STRATEGY_IDS.get(source, NO_STRATEGY)


def trade_returns(window: np.ndarray, t: np.ndarray, s: np.ndarray, side: np.ndarray,
                  target_pct: float, stop_pct: float, horizon: int, slippage_bps: float = 2.0,
                  fee_per_share: float = 0.0) -> np.ndarray:
    """Net outcome (fraction) of trades signalled at bar ``t[i]`` on symbol ``s[i]``.

    Same barriers as ``ml.labels.entry_labels`` (entry at bar ``t + 1``'s open, slippage in
    basis points and US-dollar fees on both sides, highs/lows of bars ``t+1..t+horizon``,
    both barriers in one bar = stop): ``+target_pct`` when the target comes first,
    ``-stop_pct`` when the stop does, else the net return at the last present close of the
    horizon. NaN where the label is NaN (no entry bar, horizon past the session end).
    """
    t = np.asarray(t, np.int64)
    s = np.asarray(s, np.int64)
    side = np.asarray(side, np.float64)
    n_bars = window.shape[0]
    slip = slippage_bps * _BPS
    fee = fee_per_share
    out = np.full(t.shape, np.nan)
    ok = (t + horizon <= n_bars - 1) & (t + 1 <= n_bars - 1)
    open_ = np.where(ok, window[np.minimum(t + 1, n_bars - 1), s, OPEN], np.nan)
    with np.errstate(invalid="ignore"):
        ok &= open_ > 0
    o = np.where(ok, open_, 1.0)
    longs = side > 0
    cost = o * (1.0 + slip) + fee  # long entry cost per share
    proceeds = o * (1.0 - slip) - fee  # short entry proceeds per share
    ok &= longs | (proceeds > 0)
    up = np.where(longs, (cost * (1.0 + target_pct) + fee) / (1.0 - slip),
                  (proceeds * (1.0 + stop_pct) - fee) / (1.0 + slip))
    down = np.where(longs, (cost * (1.0 - stop_pct) + fee) / (1.0 - slip),
                    (proceeds * (1.0 - target_pct) - fee) / (1.0 + slip))
    done = ~ok
    last_close = np.full(t.shape, np.nan)
    for j in range(1, horizon + 1):
        idx = np.minimum(t + j, n_bars - 1)
        hi = window[idx, s, HIGH]
        lo = window[idx, s, LOW]
        with np.errstate(invalid="ignore"):
            hit_up = (hi >= up) & ~done
            hit_down = (lo <= down) & ~done
        win = np.where(longs, hit_up & ~hit_down, hit_down & ~hit_up)
        lose = (hit_up | hit_down) & ~win
        out = np.where(win, target_pct, np.where(lose, -stop_pct, out))
        done |= hit_up | hit_down
        c = window[idx, s, CLOSE]
        last_close = np.where(np.isnan(c), last_close, c)
    open_end = ~done & ok & ~np.isnan(last_close)
    with np.errstate(invalid="ignore", divide="ignore"):
        long_ret = (last_close * (1.0 - slip) - fee) / cost - 1.0
        short_ret = (proceeds - (last_close * (1.0 + slip) + fee)) / proceeds
    out = np.where(open_end, np.where(longs, long_ret, short_ret), out)
    return np.where(ok, out, np.nan)


@dataclass
class DaySignals:
    """The rule signals of one session: bar, symbol index, side (+1/-1), strategy id."""

    bar: np.ndarray
    sym: np.ndarray
    side: np.ndarray
    strategy: np.ndarray


def day_signals(day: DayBars, scoring: ScoringParams, last_bar: int) -> DaySignals:
    """Rule signals at bars ``0..last_bar`` of ``day`` (``score_bar`` on ``window[:t+1]``)."""
    index = {sym: i for i, sym in enumerate(day.symbols)}
    rows: list[tuple[int, int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    for t in range(min(last_bar, day.ohlcv.shape[0] - 1) + 1):
        scored = score_bar(day.ohlcv[: t + 1], day.symbols, day.open_time, day.bar_seconds, {},
                           scoring)
        for sig in scored.signals:
            side = 1 if sig.side == "buy" else -1
            key = (t, index[sig.symbol], side)
            if key in seen:  # two strategies agreeing make one trade: keep the first
                continue
            seen.add(key)
            rows.append((t, index[sig.symbol], side, strategy_id(sig.source)))
    arr = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return DaySignals(bar=arr[:, 0], sym=arr[:, 1], side=arr[:, 2], strategy=arr[:, 3])


def _entry_rows(day: DayBars, sig: DaySignals, params: DatasetParams, horizon: int,
                last_bar: int) -> Rows:
    window = day.ohlcv
    feats = entry_features_all(window, day.bar_seconds)
    long_lab, short_lab = entry_labels(window, params.target_pct, params.stop_pct, horizon,
                                       params.slippage_bps, params.fee_per_share)
    t, s, side, strat = sig.bar, sig.sym, sig.side, sig.strategy
    signal = np.ones(t.shape, bool)
    if params.rows == "all":
        bars = np.arange(0, last_bar + 1, params.every_k_bars)
        tt, ss, dd = (a.ravel() for a in np.meshgrid(bars, np.arange(len(day.symbols)),
                                                     np.array([1, -1]), indexing="ij"))
        with np.errstate(invalid="ignore"):
            present = window[tt, ss, CLOSE] > 0
        taken = set(zip(t.tolist(), s.tolist(), side.tolist(), strict=True))
        extra = present & np.array([(a, b, c) not in taken for a, b, c in
                                    zip(tt.tolist(), ss.tolist(), dd.tolist(), strict=True)],
                                   dtype=bool).reshape(present.shape)
        t = np.concatenate([t, tt[extra]])
        s = np.concatenate([s, ss[extra]])
        side = np.concatenate([side, dd[extra]])
        strat = np.concatenate([strat, np.full(int(extra.sum()), NO_STRATEGY)])
        signal = np.concatenate([signal, np.zeros(int(extra.sum()), bool)])
    y = np.where(side > 0, long_lab[t, s], short_lab[t, s]) if t.size else np.zeros(0)
    keep = ~np.isnan(y)
    t, s, side, strat, signal, y = (a[keep] for a in (t, s, side, strat, signal, y))
    pnl = trade_returns(window, t, s, side, params.target_pct, params.stop_pct, horizon,
                        params.slippage_bps, params.fee_per_share)
    return Rows(X=entry_model_rows(feats[t, s], side, strat), y=y.astype(np.float64),
                day=np.full(t.shape, np.datetime64(day.date, "D")), bar=t,
                symbol=np.array(day.symbols, dtype=object)[s], side=side.astype(np.int8),
                strategy=strat.astype(np.int8), signal=signal, pnl=pnl,
                feature_names=ENTRY_MODEL_FEATURES)


class _Position(NamedTuple):
    sym: int
    side: int  # +1 long, -1 short
    entry: int  # bar filled in (at its open)
    last: int  # last bar held
    price: float  # fill price, US dollars


def _positions(day: DayBars, sig: DaySignals, params: DatasetParams) -> list[_Position]:
    """Synthetic positions, one at a time per symbol: a signal while one is held is ignored."""
    window = day.ohlcv
    n_bars = window.shape[0]
    hold = bars_for(params.exit_hold_minutes, day.bar_seconds)
    slip = params.slippage_bps * _BPS
    free_from: dict[int, int] = {}
    out: list[_Position] = []
    for t, s, side in zip(sig.bar.tolist(), sig.sym.tolist(), sig.side.tolist(), strict=True):
        entry = t + 1
        if entry > n_bars - 1 or entry < free_from.get(s, 0):
            continue
        open_ = window[entry, s, OPEN]
        if not open_ > 0:
            continue
        price = float(open_) * (1.0 + side * slip)
        last = min(entry + hold, n_bars - 1)
        closes = window[entry: last + 1, s, CLOSE]
        with np.errstate(invalid="ignore"):
            stopped = np.flatnonzero(side * (closes / price - 1.0) <= -params.exit_stop_pct)
        if stopped.size:
            last = entry + int(stopped[0])
        out.append(_Position(s, side, entry, last, price))
        free_from[s] = last + 1
    return out


def _exit_rows(day: DayBars, sig: DaySignals, params: DatasetParams) -> Rows:
    window = day.ohlcv
    n_sym = len(day.symbols)
    horizon = bars_for(params.exit_horizon_minutes, day.bar_seconds)
    long_lab, short_lab = exit_labels(window, params.exit_loss_pct, horizon)
    layers: list[list[_Position]] = []
    count: dict[int, int] = {}
    for pos in _positions(day, sig, params):  # layer k: the k-th position of each symbol
        k = count.get(pos.sym, 0)
        count[pos.sym] = k + 1
        if k == len(layers):
            layers.append([])
        layers[k].append(pos)
    parts: list[Rows] = []
    names = np.array(day.symbols, dtype=object)
    for layer in layers:
        entry_bar = np.full(n_sym, -1, np.int64)
        side_arr = np.zeros(n_sym)
        price = np.full(n_sym, np.nan)
        for pos in layer:
            entry_bar[pos.sym], side_arr[pos.sym], price[pos.sym] = pos.entry, pos.side, pos.price
        feats = exit_features_all(window, entry_bar, side_arr, price, day.bar_seconds)
        tt: list[int] = []
        ss: list[int] = []
        for pos in layer:
            bars = list(range(pos.entry, pos.last + 1, params.exit_every_k_bars))
            tt += bars
            ss += [pos.sym] * len(bars)
        t = np.array(tt, np.int64)
        s_idx = np.array(ss, np.int64)
        side = side_arr[s_idx]
        y = np.where(side > 0, long_lab[t, s_idx], short_lab[t, s_idx])
        keep = ~np.isnan(y)
        t, s_idx, side, y = t[keep], s_idx[keep], side[keep], y[keep]
        parts.append(Rows(X=exit_model_rows(feats[t, s_idx], side), y=y,
                          day=np.full(t.shape, np.datetime64(day.date, "D")), bar=t,
                          symbol=names[s_idx], side=side.astype(np.int8),
                          strategy=np.full(t.shape, NO_STRATEGY, np.int8),
                          signal=np.zeros(t.shape, bool), pnl=np.full(t.shape, np.nan),
                          feature_names=EXIT_MODEL_FEATURES))
    return Rows.concat(parts, EXIT_MODEL_FEATURES)


def build_datasets(days: Sequence[DayBars], params: DatasetParams | None = None,
                   scoring: ScoringParams | None = None,
                   on_day: Callable[[DayBars], None] | None = None) -> tuple[Rows, Rows]:
    """(entry rows, exit rows) over ``days`` (see the module docstring).

    ``scoring`` defaults to ``ScoringParams()`` (rules for 1-minute bars); pass
    ``ScoringParams.from_settings(settings, bar_seconds)`` to train on the configured rules.
    ``on_day`` is called after each day (progress).
    """
    params = params or DatasetParams()
    entry_parts: list[Rows] = []
    exit_parts: list[Rows] = []
    for day in days:
        scoring_day = scoring or ScoringParams()
        n_bars = day.ohlcv.shape[0]
        horizon = bars_for(params.horizon_minutes, day.bar_seconds)
        no_entry = bars_for(params.no_entry_minutes_before_close, day.bar_seconds) \
            if params.no_entry_minutes_before_close > 0 else 0
        # entries allowed and the label defined (the calendar gives the session length)
        last_bar = min(n_bars - 1 - no_entry, n_bars - 1 - horizon)
        if last_bar < 0:
            if on_day:
                on_day(day)
            continue
        sig = day_signals(day, scoring_day, last_bar)
        entry_parts.append(_entry_rows(day, sig, params, horizon, last_bar))
        exit_parts.append(_exit_rows(day, sig, params))
        if on_day:
            on_day(day)
    return (Rows.concat(entry_parts, ENTRY_MODEL_FEATURES),
            Rows.concat(exit_parts, EXIT_MODEL_FEATURES))


def data_hash(days: Sequence[DayBars]) -> str:
    """SHA-256 (hex) of the sessions' dates, symbols, bar size and OHLCV values."""
    h = hashlib.sha256()
    for day in days:
        h.update(f"{day.date.isoformat()}|{','.join(day.symbols)}|{day.bar_seconds}|".encode())
        h.update(np.ascontiguousarray(day.ohlcv, dtype="<f8").tobytes())
    return h.hexdigest()


def scoring_dict(scoring: ScoringParams | None) -> dict[str, Any]:
    """JSON-ready form of the rule settings a dataset was built with."""
    return dataclasses.asdict(scoring or ScoringParams())

