"""The backtester's fast path (in-memory Redis stand-in, idle bars settled unscored) gives
exactly the trades, orders and day figures of the cluster's path on a real Redis that
scores every bar."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.backtest import run_backtest
from core.calendar import next_sessions
from core.config import Settings
from core.market.synthetic import generate_days
from core.models import DayBars
from core.runtime import build_memory_runtime, build_runtime


def _both(days: list[DayBars], redis_url: str, **overrides: Any) -> tuple[Any, Any]:
    base = {"mode": "sim", "redis_url": redis_url, "model_dir": "/nonexistent", **overrides}
    slow_settings = Settings(sim_run_id=f"slow-{uuid.uuid4().hex[:8]}", **base)
    slow_rt = build_runtime(slow_settings)
    slow = run_backtest(slow_rt, slow_settings, days, skip_idle=False)
    fast_settings = Settings(sim_run_id=f"fast-{uuid.uuid4().hex[:8]}", **base)
    fast = run_backtest(build_memory_runtime(fast_settings), fast_settings, days)
    return slow, fast


def _same(slow: Any, fast: Any) -> None:
    assert fast.trades == slow.trades
    assert fast.order_log == slow.order_log
    assert fast.day_stats == slow.day_stats
    assert fast.symbol_bars == slow.symbol_bars


CASES = {
    "defaults": {},
    "partial fills, kept entries, protective stops, take-profit, max hold": {
        "sim_max_participation": 0.002, "partial_fill_policy": "keep", "protective_stop": True,
        "take_profit_pct": 0.004, "max_holding_minutes": 30},
    "random entries, 3-bar latency, 3 positions": {
        "strategies": ("random",), "sim_latency_bars": 3, "max_open_positions": 3},
    "a large limit and a small loss limit": {
        "daily_position_limit": 100000, "daily_loss_limit": 30,
        "sim_max_participation": 0.01},
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_equals_the_cluster_path(name: str, redis_client: Any,
                                           redis_url: str) -> None:
    days = generate_days(next_sessions(dt.date(2025, 11, 3), 2), [f"S{i:02d}" for i in range(30)],
                         seed=7)
    slow, fast = _both(days, redis_url, **CASES[name])
    assert slow.trades, "the case must trade to mean anything"
    _same(slow, fast)
    assert slow.plans["idle"] == 0 and slow.plans["full"] == slow.bars
    assert fast.plans["idle"] > 0  # the fast path did skip bars


def test_fast_path_equals_the_cluster_path_on_real_bars(shared_bars: Path, redis_client: Any,
                                                        redis_url: str) -> None:
    from core.market.files import load_days

    days = load_days(shared_bars, None, None, None)[:3]
    slow, fast = _both(days, redis_url, take_profit_pct=0.004)
    assert slow.trades
    _same(slow, fast)


def test_the_planners_window_bars_match_the_decisions_check() -> None:
    from core.backtest import first_bar_in_window
    from core.decision import in_eod_window

    days = generate_days([dt.date(2025, 11, 28), dt.date(2025, 12, 1)], ["A"], seed=1)
    for day in days:  # an early close and a full day
        for minutes in (1, 10, 30, 120, 400):
            scan = next((b for b in range(day.n_bars) if in_eod_window(
                day.bar_time(b) + dt.timedelta(seconds=day.bar_seconds), day.close_time,
                minutes)), day.n_bars)
            assert first_bar_in_window(day, minutes) == scan, (day.date, minutes)


def test_fast_path_equals_the_cluster_path_through_halts_and_an_overnight_position(
        redis_client: Any, redis_url: str) -> None:
    """Every symbol halted for the last hour of day 1 (the EOD exits cannot fill, so a
    position stays overnight and closes as stale the next day) and a mid-day halt."""
    import numpy as np

    days = generate_days(next_sessions(dt.date(2025, 11, 3), 3), [f"S{i:02d}" for i in range(30)],
                         seed=11)
    first = days[0]
    ohlcv = first.ohlcv.copy()
    ohlcv[-60:, :] = np.nan
    ohlcv[100:140, 20:25] = np.nan
    days[0] = DayBars(date=first.date, symbols=first.symbols, open_time=first.open_time,
                      close_time=first.close_time, bar_seconds=first.bar_seconds, ohlcv=ohlcv)
    slow, fast = _both(days, redis_url, daily_position_limit=50000)
    _same(slow, fast)
    assert fast.day_stats[0]["open_positions_at_close"] > 0
    assert "stale_position" in {t["exit_reason"] for t in fast.trades}
