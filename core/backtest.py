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
from dataclasses import dataclass
from typing import Any

from core import engine, execution
from core.config import Settings
from core.decision import in_eod_window
from core.models import DayBars
from core.runtime import Runtime

log = logging.getLogger(__name__)


class InlineDispatcher:
    """Runs each next step at once, in this process, in the order the queues would."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def score(self, payload: dict[str, Any]) -> None:
        result = engine.compute_scores(self._rt, payload)
        engine.decide_bar(self._rt, self, result)

    def submit_order(self, intent: dict[str, Any]) -> None:
        execution.submit_order(self._rt, intent)

    def close_position(self, intent: dict[str, Any]) -> None:
        execution.close_position(self._rt, intent)


@dataclass
class BacktestRun:
    """What a backtest produced (same shapes as a simulated run's)."""

    trades: list[dict[str, Any]]
    day_stats: list[dict[str, Any]]
    order_log: list[str]
    bars: int
    symbol_bars: int
    seconds: float


def run_backtest(rt: Runtime, settings: Settings, days: list[DayBars],
                 progress: Callable[[int, int, str], None] | None = None) -> BacktestRun:
    """Replay ``days`` through the engine inline; ``rt`` must use a fresh run namespace."""
    from core.sim import prepare_replay

    started = time.perf_counter()
    prepare_replay(rt, settings, days)
    dispatcher = InlineDispatcher(rt)
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
                       symbol_bars=bars * n_symbols, seconds=time.perf_counter() - started)


def progress_line(done: int, total: int, label: str) -> None:
    """A one-line progress bar on stderr over days."""
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} days {label:12}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
