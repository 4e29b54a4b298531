"""The backtester: the cluster's exact steps (tick, score, decide, submit/close, end of day) run
inline in one process over historical bars, against the same simulated broker, daily-limit
store and replay clock (in Redis, as in the cluster), so a backtest and a simulated cluster
run of the same days give the same trades.

Times are America/New_York; money in cents.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core import decide_step, engine, execution
from core.brokers.base import Position
from core.config import Settings
from core.decision import in_eod_window
from core.exits import exit_codes
from core.models import CLOSE, DayBars
from core.runtime import Runtime
from core.scoring import bar_problems, entry_bar_of
from core.signals.candidates import symbol_candidates

log = logging.getLogger(__name__)


class InlineDispatcher:
    """Runs each next step at once, in this process, in the order the queues would.

    With a ``BarPlanner`` (the backtester), a bar whose decision provably sends nothing is
    settled without scoring, and a bar that can open nothing is scored for exits only (see
    ``BarPlanner``). Without one every bar is scored, as in the cluster.
    """

    def __init__(self, rt: Runtime, planner: BarPlanner | None = None) -> None:
        self._rt = rt
        self._planner = planner
        self.plans = {"full": 0, "exits": 0, "idle": 0}

    def score(self, payload: dict[str, Any]) -> None:
        plan = "full" if self._planner is None else self._planner.plan(payload)
        self.plans[plan] += 1
        if plan == "idle":
            self._rt.replay.settle(dt.date.fromisoformat(str(payload["date"])),
                                   int(payload["bar"]))
            return
        result = engine.compute_scores(self._rt, payload, entries=plan == "full")
        decide_step.decide_bar(self._rt, self, result)

    def submit_order(self, intent: dict[str, Any]) -> None:
        execution.submit_order(self._rt, intent)

    def close_position(self, intent: dict[str, Any]) -> None:
        execution.close_position(self._rt, intent)


class BarPlanner:
    """Which bars of a backtest need scoring, decided only from what ``decide`` checks.

    * 'full': an entry may be sized at this bar (or it is the session's first decision,
      which reconciles).
    * 'exits': nothing can be opened (the no-entry window has begun, the position cap is
      reached, or no symbol is left where a rule may signal, the entry model may pass it,
      ``decide`` would not skip it for a position, a working order or both sides entered
      today, and what is left of the daily limit buys one share at its close), but an order
      is working, a position is from an earlier session, the end-of-day window is on, or a
      held position may exit: its rule exits computed over the whole session
      (``exit_codes``, exact row by row), the stop-loss with a 1e-9 margin for the
      decision's Decimal check, or its exit-model score at or above the threshold.
    * 'idle': none of those. The bar settles unscored; the daily loss limit is still
      checked on the held positions' marks, exactly as the decision would.

    Model scores are precomputed for the whole session only where they are reproducible bit
    for bit: XGBoost on the CPU (a row's score does not depend on its batch), fed with the
    all-bars features, whose row ``t`` equals what the scoring step computes at bar ``t``
    (prefix-stable sums; ``ml.predictor`` uses the same form). With any other model every
    held bar is scored. So a backtest's trades are those of scoring every bar; the parity
    tests compare it with a cluster run, which scores every bar. Prices US dollars, money
    cents.
    """

    def __init__(self, rt: Runtime, days: list[DayBars]) -> None:
        self._rt = rt
        self._days = {d.date.isoformat(): d for d in days}
        # where some rule may signal (supersets; see core.signals.candidates): per bar and
        # symbol, and per bar
        self._symbol_signals = {d.date.isoformat(): symbol_candidates(
            d.ohlcv, d.date, rt.scoring_params(d.bar_seconds)) for d in days}
        # with an exactly reproducible model: the candidates that pass the entry model, per
        # (date, model version)
        self._model_entries: dict[tuple[str, str], np.ndarray] = {}
        self._index = {d.date.isoformat(): {s: i for i, s in enumerate(d.symbols)}
                       for d in days}
        self._candidates: dict[tuple[str, str, str, int, str, str], np.ndarray] = {}
        self._p = rt.decision_params
        self._eod = {}  # date -> (no-entry window from bar, EOD window from bar)
        no_entry = max(self._p.no_entry_minutes_before_close, self._p.eod_close_minutes_before)
        for d in days:
            self._eod[d.date.isoformat()] = (
                first_bar_in_window(d, no_entry),
                first_bar_in_window(d, self._p.eod_close_minutes_before))
        self._idle: tuple[str, int, dict[str, Position]] | None = None
        self._features: tuple[str, np.ndarray] | None = None

    def plan(self, payload: dict[str, Any]) -> str:
        """'full', 'exits' or 'idle' for the bar in ``payload`` (the tick's message)."""
        rt = self._rt
        date = str(payload["date"])
        day = dt.date.fromisoformat(date)
        bar = int(payload["bar"])
        self._idle = None
        data = self._days.get(date)
        if data is None or not 0 <= bar < data.n_bars:
            return "full"
        if not rt.redis.exists(rt.keys.reconciled(day)):
            return "full"  # the session's first decision reconciles first
        positions, orders = rt.broker.snapshot()
        if self._can_enter(date, day, bar, positions, orders):
            return "full"
        if orders:
            return "exits"
        if positions:
            if bar >= self._eod[date][1] or self._model_inexact():
                return "exits"
            for pos in positions.values():
                if pos.session_date != date or self._may_exit(data, pos, bar):
                    return "exits"
            self._check_loss_limit(data, day, bar, positions)
        self._idle = (date, bar, positions)
        return "idle"

    def idle_run(self, date: str, bar: int) -> int:
        """How many bars after ``bar`` (which ``plan`` just found idle) are idle too, with
        nothing to change in between: no order, no position stop at the broker, no entry
        possible, no exit candidate, the loss limit out of reach, before the EOD window."""
        if self._idle is None or self._idle[:2] != (date, bar):
            return 0
        positions = self._idle[2]
        rt = self._rt
        data = self._days[date]
        day = data.date
        if positions and (rt.settings.protective_stop or self._model_inexact()):
            return 0  # a resting stop can fill on any bar; an exit model may fire on any
        end = self._eod[date][1]  # the EOD task acts from here: bar by bar again
        if bar + 1 >= end:
            return 0
        rows = slice(bar + 1, end)
        p = self._p
        if len(positions) < p.limits.max_open_positions and bar + 1 < self._eod[date][0]:
            remaining = p.limits.daily_limit_cents - rt.limits.used(day)
            if remaining > 0:
                stop = self._eod[date][0]
                open_ = self._entry_symbols(date)[bar + 1:stop] & ~self._blocked(
                    date, day, positions, [])[None, :]
                with np.errstate(invalid="ignore"):
                    can = (open_ & (remaining + 1 >= (
                        data.ohlcv[bar + 1:stop, :, CLOSE] - 0.0001) * 100)).any(axis=1)
                hit = np.flatnonzero(can)
                if hit.size:
                    end = min(end, bar + 1 + int(hit[0]))
        if positions:
            busy = np.zeros(data.n_bars, dtype=bool)
            for pos in positions.values():
                busy |= self._candidates_of(data, pos)
            busy |= self._loss_reachable(data, day, positions)
            hit = np.flatnonzero(busy[rows])
            if hit.size:
                end = min(end, bar + 1 + int(hit[0]))
        return max(end - (bar + 1), 0)

    def _predictor(self) -> Any:
        models = self._rt.models
        return models.get() if models is not None else None

    def _session_features(self, date: str) -> np.ndarray:
        """Entry features of the whole session ([T, S, F]; the last session's kept)."""
        from ml.features import entry_features_all

        if self._features is None or self._features[0] != date:
            data = self._days[date]
            self._features = (date, entry_features_all(data.ohlcv, data.bar_seconds))
        return self._features[1]

    def entry_features(self, day: dt.date, bar: int) -> np.ndarray | None:
        """Row ``bar`` of the session's entry features ([S, F]): bit-identical to what
        ``score_signals`` computes from the bars up to ``bar`` (prefix-stable sums)."""
        date = day.isoformat()
        if date not in self._days or not 0 <= bar < self._days[date].n_bars:
            return None
        return self._session_features(date)[bar]

    def _model_inexact(self) -> bool:
        """A model is loaded whose scores this planner cannot reproduce exactly ahead of time
        (only XGBoost on the CPU is: each row's score is the same in any batch)."""
        predictor = self._predictor()
        return predictor is not None and not _exact(predictor)

    def _entry_symbols(self, date: str) -> np.ndarray:
        """Per bar and symbol ([T, S]): may an entry signal there survive the model? (the
        rule candidates without a model; none while the configured model is unusable, as in
        ``compute_scores``)."""
        rt = self._rt
        if rt.models is not None and rt.models.problem is not None:
            return np.zeros_like(self._symbol_signals[date])
        predictor = self._predictor()
        if predictor is None or not _exact(predictor):
            return self._symbol_signals[date]
        key = (date, str(predictor.version))
        ok = self._model_entries.get(key)
        if ok is None:
            ok = self._model_entries[key] = self._scored_entry_symbols(date, predictor)
        return ok

    def _scored_entry_symbols(self, date: str, predictor: Any) -> np.ndarray:
        """Candidates (bar, symbol) where some side and strategy scores at or above the entry
        threshold: the same features (``entry_features_all``, bit-identical row by row to
        what ``score_signals`` computes at that bar) and the same model."""
        from ml.dataset import entry_model_rows, strategy_id

        data = self._days[date]
        cand = self._symbol_signals[date]
        ts, ss = np.nonzero(cand)
        out = np.zeros_like(cand)
        if ts.size == 0:
            return out
        feats = self._session_features(date)[ts, ss]
        strategies = [strategy_id(x) for x in self._rt.scoring_params(data.bar_seconds)
                      .strategies]
        combos = [(side, sid) for side in (1, -1) for sid in strategies]
        rows = entry_model_rows(np.concatenate([feats] * len(combos)),
                                np.repeat([c[0] for c in combos], len(ts)),
                                np.repeat([c[1] for c in combos], len(ts)))
        try:
            p = np.asarray(predictor.predict_entry(rows), dtype=float)
        except Exception:  # the bar-by-bar path logs it; here: plan every candidate bar
            log.exception("entry model failed ahead of the backtest; scoring every candidate")
            return cand
        hit = np.isfinite(p) & (p >= self._rt.settings.ml_entry_threshold)
        out[np.tile(ts, len(combos))[hit], np.tile(ss, len(combos))[hit]] = True
        return out

    def _blocked(self, date: str, day: dt.date, positions: dict[str, Position],
                 orders: list[Any]) -> np.ndarray:
        """Per symbol: True where ``decide`` skips every signal (a position or a working
        order in the symbol, or both sides already entered today)."""
        index = self._index[date]
        out = np.zeros(len(index), dtype=bool)
        for sym in {*positions, *(o.symbol for o in orders)}:
            if sym in index:
                out[index[sym]] = True
        sides: dict[str, int] = {}
        for raw in self._rt.redis.smembers(self._rt.keys.entries(day)):
            sym, _, side = raw.decode().rpartition(":")
            if side in ("buy", "sell"):
                sides[sym] = sides.get(sym, 0) + 1
        for sym, n in sides.items():
            if n >= 2 and sym in index:
                out[index[sym]] = True
        return out

    def _can_enter(self, date: str, day: dt.date, bar: int, positions: dict[str, Position],
                   orders: list[Any]) -> bool:
        """False only when ``decide`` cannot size any entry at this bar."""
        p = self._p
        if bar >= self._eod[date][0]:
            return False  # the no-entry window
        cand = self._entry_symbols(date)[bar]
        if not cand.any():
            return False  # no signal can pass at this bar
        if len(set(positions) | {o.symbol for o in orders}) >= p.limits.max_open_positions:
            return False
        remaining = p.limits.daily_limit_cents - self._rt.limits.used(day)
        if remaining <= 0:
            return False
        open_ = cand & ~self._blocked(date, day, positions, orders)
        # an entry's price is its close rounded to 1/100 cent, and the size cap divides the
        # remaining cents by at least that price: below one share of its close, qty is 0
        with np.errstate(invalid="ignore"):
            sizable = remaining + 1 >= (self._days[date].ohlcv[bar, :, CLOSE] - 0.0001) * 100
        return bool((open_ & sizable).any())

    def _loss_reachable(self, data: DayBars, day: dt.date,
                        positions: dict[str, Position]) -> np.ndarray:
        """Per bar: True where the daily loss limit might be reached (a lower bound of
        realized + unrealized P/L at or below the limit); all False once a halt is on."""
        rt = self._rt
        if rt.redis.exists(rt.keys.halt(), rt.keys.loss_halt(day)):
            return np.zeros(data.n_bars, dtype=bool)
        low = np.full(data.n_bars, float(rt.broker.realized_pnl_cents(day) - len(positions) - 1))
        index = self._index[data.date.isoformat()]
        for pos in positions.values():
            i = index.get(pos.symbol)
            if i is None:
                continue
            with np.errstate(invalid="ignore"):
                term = (data.ohlcv[:, i, CLOSE] - float(pos.avg_price)) * pos.qty * 100
            low += np.minimum(np.nan_to_num(term, nan=0.0, posinf=0.0, neginf=-np.inf), 0.0)
        return low <= -rt.settings.daily_loss_limit_cents + 1

    def _may_exit(self, data: DayBars, pos: Position, bar: int) -> bool:
        """May the scoring or the decision close ``pos`` at ``bar``? (never a false no)"""
        return bool(self._candidates_of(data, pos)[bar])

    def _candidates_of(self, data: DayBars, pos: Position) -> np.ndarray:
        predictor = self._predictor()
        key = (data.date.isoformat(), pos.entry_client_order_id, pos.avg_price,
               1 if pos.qty > 0 else -1, pos.opened_at,
               str(predictor.version) if predictor is not None else "")
        cand = self._candidates.get(key)
        if cand is None:
            cand = self._candidates[key] = self._exit_candidates(data, pos)
        return cand

    def _exit_candidates(self, data: DayBars, pos: Position) -> np.ndarray:
        """Per bar of the session: True where an exit of ``pos`` may fire."""
        i = self._index[data.date.isoformat()].get(pos.symbol)
        entry = entry_bar_of(pos, data.open_time, data.bar_seconds, data.n_bars - 1)
        if i is None or entry is None:
            return np.ones(data.n_bars, dtype=bool)
        params = self._rt.scoring_params(data.bar_seconds).exits
        close = data.ohlcv[:, i:i + 1, CLOSE]
        direction = 1 if pos.qty > 0 else -1
        avg = float(pos.avg_price)
        codes = exit_codes(close, np.asarray([entry]), np.asarray([direction]),
                           np.asarray([avg]), params, None, np, last_only=False)[:, 0]
        c = close[:, 0]
        sl = self._rt.settings.stop_loss_pct
        with np.errstate(invalid="ignore"):
            if direction > 0:
                stop = c <= avg * (1 - sl) * (1 + 1e-9)
            else:
                stop = c >= avg * (1 + sl) * (1 - 1e-9)
        cand = (codes != 0) | stop
        predictor = self._predictor()
        if predictor is not None:
            cand |= self._model_exit_bars(data, predictor, i, entry, direction, avg)
        return cand

    def _model_exit_bars(self, data: DayBars, predictor: Any, i: int, entry: int,
                         direction: int, avg: float) -> np.ndarray:
        """Bars where the exit model scores the position at or above its threshold (every
        bar when the model cannot be reproduced exactly here)."""
        if not _exact(predictor):
            return np.ones(data.n_bars, dtype=bool)
        from ml.dataset import exit_model_rows
        from ml.features import exit_features_all

        try:
            feats = exit_features_all(data.ohlcv[:, [i]], np.asarray([entry]),
                                      np.asarray([direction]), np.asarray([avg]),
                                      data.bar_seconds)[:, 0]
            p = np.asarray(predictor.predict_exit(
                exit_model_rows(feats, np.full(data.n_bars, direction))), dtype=float)
        except Exception:
            log.exception("exit model failed ahead of the backtest; scoring every held bar")
            return np.ones(data.n_bars, dtype=bool)
        thr = self._rt.settings.ml_exit_threshold
        return ~np.isnan(p) & (np.nan_to_num(p) >= thr)

    def _check_loss_limit(self, data: DayBars, day: dt.date, bar: int,
                          positions: dict[str, Position]) -> None:
        """The decision's daily-loss check on the held positions' marks at ``bar`` (which it
        skips while the kill switch or the day's loss halt is already on)."""
        rt = self._rt
        if rt.redis.exists(rt.keys.halt(), rt.keys.loss_halt(day)):
            return
        index = self._index[data.date.isoformat()]
        held = sorted(s for s in positions if s in index)
        row = data.ohlcv[bar, [index[s] for s in held]]
        bad = {s for s, why in bar_problems(row, tuple(held)).items()
               if why.startswith("inconsistent")}
        marks = {s: float(row[j, CLOSE]) for j, s in enumerate(held)
                 if s not in bad and np.isfinite(row[j, CLOSE]) and row[j, CLOSE] > 0}
        decide_step.loss_limit_hit(self._rt, day, positions, marks)


@dataclass
class BacktestRun:
    """What a backtest produced (same shapes as a simulated run's)."""

    trades: list[dict[str, Any]]
    day_stats: list[dict[str, Any]]
    order_log: list[str]
    bars: int
    symbol_bars: int
    seconds: float
    # bars scored in full / for exits only / settled unscored (see BarPlanner)
    plans: dict[str, int] = field(default_factory=dict)


def run_backtest(rt: Runtime, settings: Settings, days: list[DayBars],
                 progress: Callable[[int, int, str], None] | None = None,
                 skip_idle: bool = True) -> BacktestRun:
    """Replay ``days`` through the engine inline; ``rt`` must use a fresh run namespace.

    ``skip_idle`` settles bars whose decision provably sends nothing without scoring them
    (see ``InlineDispatcher``); off, every bar is scored as in the cluster."""
    from core.sim import prepare_replay

    started = time.perf_counter()
    prepare_replay(rt, settings, days)
    planner = BarPlanner(rt, days) if skip_idle else None
    if planner is not None:
        rt.entry_features = planner.entry_features
    dispatcher = InlineDispatcher(rt, planner)
    total = len(days)
    by_date = {d.date.isoformat(): i for i, d in enumerate(days)}
    eod_minutes = settings.eod_close_minutes_before
    bars = 0
    last_date = ""
    while True:
        result = engine.tick(rt, dispatcher, now_wall=0.0)
        status = result["status"]
        if status == "finished":
            break
        if status == "advanced":
            bars += 1
            day = days[by_date[result["date"]]]
            decided = day.bar_time(int(result["bar"])) + dt.timedelta(seconds=day.bar_seconds)
            if in_eod_window(decided, day.close_time, eod_minutes):
                # beat fires the EOD task between ticks; it acts only inside the EOD window
                execution.eod_close(rt)
            elif planner is not None:
                skip = planner.idle_run(result["date"], int(result["bar"]))
                if skip:
                    rt.replay.fast_forward(int(result["bar"]) + skip)
                    bars += skip
                    dispatcher.plans["idle"] += skip
        elif status in ("waiting", "redispatched", "stale", "empty"):
            # inline every step finishes before the next tick: this cannot happen
            raise RuntimeError(f"backtest stuck: {result}")
        date = str(result.get("date", ""))
        if progress is not None and date and date != last_date:
            last_date = date
            progress(by_date.get(date, 0), total, date)
    if progress is not None:
        progress(total, total, "done")
    n_symbols = len(days[0].symbols) if days else 0
    return BacktestRun(trades=rt.broker.trades(), day_stats=rt.replay.day_stats(),
                       order_log=rt.broker.order_log(), bars=bars,
                       symbol_bars=bars * n_symbols, seconds=time.perf_counter() - started,
                       plans=dict(dispatcher.plans))


def first_bar_in_window(day: DayBars, minutes: int) -> int:
    """The first bar whose decision (at its close) falls within ``minutes`` of the session's
    close, as ``in_eod_window`` decides it; ``day.n_bars`` when none does."""
    session = int((day.close_time - day.open_time).total_seconds())
    # close - (open + (b + 1) x bar) <= minutes  <=>  b >= ceil((session - minutes) / bar) - 1
    first = -(-(session - int(minutes) * 60) // day.bar_seconds) - 1
    return min(max(first, 0), day.n_bars)


def _exact(predictor: Any) -> bool:
    """Scores this process can reproduce ahead of time bit for bit: XGBoost on the CPU."""
    return (getattr(predictor, "backend", "") == "xgboost"
            and str(getattr(predictor, "device", "")) == "cpu")


def progress_line(done: int, total: int, label: str) -> None:
    """A one-line progress bar on stderr over days."""
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} days {label:12}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
