"""Tests for core.scoring: bad-data skips, per-bar scoring, held-position exits, settings."""

from __future__ import annotations

import datetime as dt
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from core.brokers.base import Position
from core.calendar import NY
from core.config import load_settings
from core.exits import ExitParams
from core.market.synthetic import generate_days
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
from core.scoring import (
    ScoredBar,
    ScoringParams,
    bar_problems,
    bars_for,
    entry_bar_of,
    held_exits,
    log_skips,
    score_bar,
)
from core.signals.orb import OrbParams

NAN = float("nan")
DAY = dt.date(2025, 3, 12)
OPEN_TIME = dt.datetime(2025, 3, 12, 9, 30, tzinfo=NY)
NO_BAR = "no bar (halted or missing data)"
INCOMPLETE = "incomplete bar (NaN field)"
INCONSISTENT = "inconsistent prices (non-positive, infinite or outside high/low)"
ZERO_VOLUME = "zero volume"
GOOD = [100.0, 101.0, 99.0, 100.5, 1000.0]  # open, high, low, close, volume


def _at(minutes: float) -> str:
    return (OPEN_TIME + dt.timedelta(minutes=minutes)).isoformat()


def _pos(symbol: str, qty: int = 10, avg: str = "100.00", opened_at: str | None = None,
         session: str = DAY.isoformat()) -> Position:
    return Position(symbol=symbol, qty=qty, avg_price=avg, opened_at=opened_at or _at(2),
                    session_date=session,
                    entry_client_order_id=f"orb-{symbol}-20250312-0931-{'L' if qty > 0 else 'S'}",
                    strategy="orb")


# --- bar_problems ---------------------------------------------------------------------------
def _with(**fields: float) -> list[float]:
    bar = list(GOOD)
    for name, value in fields.items():
        bar[{"open": OPEN, "high": HIGH, "low": LOW, "close": CLOSE, "volume": VOLUME}[name]] = \
            value
    return bar


@pytest.mark.parametrize("bar, reason", [
    ([NAN] * 5, NO_BAR),
    (_with(high=NAN), INCOMPLETE),
    (_with(open=NAN), INCOMPLETE),
    (_with(volume=NAN), INCOMPLETE),
    (_with(high=98.0, low=99.0, open=98.5, close=98.5), INCONSISTENT),  # high < low
    (_with(close=101.5), INCONSISTENT),  # close above high
    (_with(close=98.5), INCONSISTENT),  # close below low
    (_with(open=101.5), INCONSISTENT),  # open above high
    (_with(low=0.0, open=0.5, close=0.5), INCONSISTENT),  # non-positive low
    (_with(open=-1.0, high=-0.5, low=-2.0, close=-1.0), INCONSISTENT),  # all negative
    (_with(close=98.5, volume=NAN), INCONSISTENT),  # bad prices win over a missing volume
    (_with(close=98.5, volume=0.0), INCONSISTENT),  # and over zero volume
    (_with(volume=0.0), ZERO_VOLUME),
    (_with(volume=-5.0), ZERO_VOLUME),
])
def test_bar_problems_reasons(bar: list[float], reason: str) -> None:
    row = np.array([GOOD, bar, GOOD])
    assert bar_problems(row, ("AAA", "BBB", "CCC")) == {"BBB": reason}


def test_bar_problems_accepts_good_and_edge_bars() -> None:
    flat = [100.0] * 4 + [1.0]  # open == high == low == close
    row = np.array([GOOD, flat, _with(close=101.0), _with(close=99.0)])
    assert bar_problems(row, ("A", "B", "C", "D")) == {}
    assert bar_problems(np.empty((0, 5)), ()) == {}


# --- score_bar ------------------------------------------------------------------------------
DEFAULTS = ScoringParams()
ORB_ONLY = ScoringParams(strategies=("orb",), orb=OrbParams(range_bars=3))


def _breakout_window(n_sym: int = 3) -> np.ndarray:
    """Every symbol: range 99-101 over bars 0-2, 100.5 at bars 3-4, breaks out to 102 at 5."""
    w = np.empty((6, n_sym, 5))
    w[:] = GOOD
    w[3:5, :, CLOSE] = 100.5
    w[5] = [101.0, 102.5, 100.8, 102.0, 2000.0]
    return w


def test_score_bar_drops_signals_of_skipped_symbols_only() -> None:
    symbols = ("AAA", "BBB", "CCC", "DDD")
    w = _breakout_window(4)
    clean = score_bar(w, symbols, OPEN_TIME, 60, {}, ORB_ONLY)
    assert sorted((s.symbol, s.side) for s in clean.signals) == [
        (sym, "buy") for sym in symbols]
    assert clean.skipped == {}

    w[5, 1, HIGH] = 101.5  # BBB: close 102 above its high
    w[5, 2, LOW] = NAN  # CCC: incomplete bar
    w[5, 3, VOLUME] = 0.0  # DDD: zero volume
    got = score_bar(w, symbols, OPEN_TIME, 60, {}, ORB_ONLY)
    assert [(s.symbol, s.side, s.source) for s in got.signals] == [("AAA", "buy", "orb")]
    assert got.skipped == {"BBB": INCONSISTENT, "CCC": INCOMPLETE, "DDD": ZERO_VOLUME}
    assert got.marks == {"AAA": 102.0, "CCC": 102.0, "DDD": 102.0}  # no mark from bad prices
    assert all(s.bar_time == OPEN_TIME + dt.timedelta(minutes=5) for s in got.signals)


def test_score_bar_no_exit_on_a_bar_with_inconsistent_prices() -> None:
    symbols = ("AAA", "BBB")
    w = _breakout_window(2)
    w[5, :, CLOSE] = 90.0  # far below the 99 stop of a long entered at 100
    w[5, 0, LOW] = 89.0
    w[5, 1, LOW] = 95.0  # BBB's close is below its low: a bad print, not a stop
    positions = {"AAA": _pos("AAA"), "BBB": _pos("BBB")}
    got = score_bar(w, symbols, OPEN_TIME, 60, positions, ORB_ONLY)
    assert got.exits == {"AAA": ("stop_loss", positions["AAA"].entry_client_order_id)}
    assert got.skipped == {"BBB": INCONSISTENT}


def _quiet_score(window: np.ndarray, symbols: tuple[str, ...],
                 positions: dict[str, Position]) -> ScoredBar:
    """score_bar with the default params; any warning (RuntimeWarning included) fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return score_bar(window, symbols, OPEN_TIME, 60, positions, DEFAULTS)


def test_all_nan_window_scores_nothing_without_error() -> None:
    symbols = ("AAA", "BBB", "CCC")
    positions = {s: _pos(s, qty=10 if i % 2 else -10) for i, s in enumerate(symbols)}
    for t in (0, 1, 14, 15, 40, 389):
        got = _quiet_score(np.full((t + 1, 3, 5), NAN), symbols, positions)
        assert got.signals == [] and got.marks == {} and got.exits == {}
        assert got.skipped == dict.fromkeys(symbols, NO_BAR)


def test_day_shorter_than_the_opening_range_gives_no_orb_signal() -> None:
    day = generate_days([DAY], 5, seed=3)[0]
    w = day.ohlcv[:10]  # 10 bars, range 15
    positions = {"SYN000": _pos("SYN000", opened_at=_at(1))}
    for t in range(10):
        got = _quiet_score(w[: t + 1], day.symbols, positions)
        assert [s for s in got.signals if s.source == "orb"] == []
        assert got.skipped == {}
        assert set(got.marks) == set(day.symbols)


def test_symbol_halted_mid_day() -> None:
    day = generate_days([DAY], 6, seed=11)[0]
    w = day.ohlcv.copy()
    w[120:, 2] = NAN  # SYN002 halted from bar 120 on
    halted = day.symbols[2]
    positions = {halted: _pos(halted, opened_at=_at(100)),
                 day.symbols[0]: _pos(day.symbols[0], qty=-10, opened_at=_at(30))}
    fired_elsewhere = 0
    for t in range(day.n_bars):
        got = _quiet_score(w[: t + 1], day.symbols, positions)
        if t >= 120:
            assert got.skipped == {halted: NO_BAR}
            assert halted not in got.marks and halted not in got.exits
            assert all(s.symbol != halted for s in got.signals)
        else:
            assert got.skipped == {}
        fired_elsewhere += sum(1 for s in got.signals if s.symbol != halted)
    assert fired_elsewhere > 0  # the other symbols keep getting signals


def test_zero_volume_window_scores_without_error() -> None:
    day = generate_days([DAY], 4, seed=5)[0]
    w = day.ohlcv.copy()
    w[:, :, VOLUME] = 0.0
    positions = {day.symbols[1]: _pos(day.symbols[1], opened_at=_at(20))}
    for t in (0, 14, 15, 16, 29, 30, 60, 200, 389):
        got = _quiet_score(w[: t + 1], day.symbols, positions)
        assert got.signals == []
        assert got.skipped == dict.fromkeys(day.symbols, ZERO_VOLUME)
        assert set(got.marks) == set(day.symbols)


# --- held_exits and entry_bar_of ------------------------------------------------------------
def _flat_window(n_bars: int, symbols: int = 3, close: float = 100.0) -> np.ndarray:
    w = np.empty((n_bars, symbols, 5))
    w[:] = [close, close + 0.5, close - 0.5, close, 1000.0]
    return w


def _marks(window: np.ndarray, symbols: tuple[str, ...]) -> dict[str, float]:
    return {s: float(window[-1, i, CLOSE]) for i, s in enumerate(symbols)}


def test_held_exits_maps_position_to_reason_and_entry_order_id() -> None:
    symbols = ("AAA", "BBB", "CCC")
    w = _flat_window(10)
    w[9, 0, CLOSE] = 98.9  # AAA long at 100: below the 99 stop
    w[9, 1, CLOSE] = 101.0  # BBB short at 100: at the 101 stop
    positions = {"AAA": _pos("AAA"), "BBB": _pos("BBB", qty=-5), "CCC": _pos("CCC")}
    got = held_exits(w, symbols, OPEN_TIME, 60, positions, ExitParams(),
                     _marks(w, symbols))
    assert got == {"AAA": ("stop_loss", "orb-AAA-20250312-0931-L"),
                   "BBB": ("stop_loss", "orb-BBB-20250312-0931-S")}


def test_held_exits_ignores_other_sessions_other_symbols_and_flat_positions() -> None:
    symbols = ("AAA", "BBB")
    w = _flat_window(10, 2, close=90.0)  # every long entered at 100 is past its stop
    positions = {
        "AAA": _pos("AAA", opened_at="2025-03-11T15:00:00-04:00", session="2025-03-11"),
        "BBB": _pos("BBB", opened_at=_at(-1)),  # 09:29, before this session's open
        "ZZZ": _pos("ZZZ"),  # not in the universe
    }
    assert held_exits(w, symbols, OPEN_TIME, 60, positions, ExitParams(),
                      _marks(w, symbols)) == {}
    positions["AAA"] = _pos("AAA", qty=0)
    positions["BBB"] = _pos("BBB", opened_at=_at(0))  # at the open: bar 0, this session
    assert held_exits(w, symbols, OPEN_TIME, 60, positions, ExitParams(),
                      _marks(w, symbols)) == {"BBB": ("stop_loss", "orb-BBB-20250312-0931-L")}


def test_held_exits_needs_a_mark() -> None:
    w = _flat_window(10, 1, close=90.0)
    positions = {"AAA": _pos("AAA")}
    assert held_exits(w, ("AAA",), OPEN_TIME, 60, positions, ExitParams(), {}) == {}


@pytest.mark.parametrize("bar_seconds, opened_minutes, t, fires", [
    (60, 5, 7, True),  # entry bar 5: held 3 bars at bar 7
    (60, 5, 6, False),
    (60, 5.5, 7, True),  # a fill inside bar 5 belongs to bar 5
    (300, 10, 4, True),  # 5-minute bars: entry bar 2, held 3 at bar 4
    (300, 10, 3, False),
])
def test_held_exits_entry_bar_from_opened_at(bar_seconds: int, opened_minutes: float, t: int,
                                             fires: bool) -> None:
    w = _flat_window(t + 1, 1)
    positions = {"AAA": _pos("AAA", opened_at=_at(opened_minutes))}
    got = held_exits(w, ("AAA",), OPEN_TIME, bar_seconds, positions,
                     ExitParams(max_holding_bars=3), {"AAA": 100.0})
    assert got == ({"AAA": ("max_hold", "orb-AAA-20250312-0931-L")} if fires else {})


@pytest.mark.parametrize("opened_at, want", [
    (_at(0), 0), (_at(5.99), 5), (_at(9), 9), (_at(30), 9),  # after bar t: clamped to t
    (_at(-0.01), None), ("2025-03-12T09:40:00", None), ("not a time", None),
    ("2025-03-12T13:40:00+00:00", 9),  # UTC offsets are fine
])
def test_entry_bar_of(opened_at: str, want: int | None) -> None:
    assert entry_bar_of(_pos("AAA", opened_at=opened_at), OPEN_TIME, 60, 9) == want


# --- log_skips ------------------------------------------------------------------------------
def test_log_skips_logs_each_symbol_reason_once_per_session(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: set[tuple[str, str, str]] = set()
    other_day = DAY + dt.timedelta(days=1)
    with caplog.at_level(logging.INFO, logger="core.scoring"):
        log_skips(DAY, {"AAA": NO_BAR, "BBB": ZERO_VOLUME}, seen)
        log_skips(DAY, {"AAA": NO_BAR, "BBB": ZERO_VOLUME}, seen)  # repeats: nothing
        log_skips(DAY, {"AAA": INCOMPLETE}, seen)  # a new reason for AAA
        log_skips(other_day, {"AAA": NO_BAR}, seen)  # a new session
        log_skips(DAY, {"CCC": NO_BAR, "DDD": NO_BAR}, seen, names={"DDD"})  # CCC not watched
    got = [(r.date, r.symbol, r.getMessage()) for r in caplog.records
           if r.name == "core.scoring"]
    assert got == [
        (DAY.isoformat(), "AAA", f"symbol skipped: {NO_BAR}"),
        (DAY.isoformat(), "BBB", f"symbol skipped: {ZERO_VOLUME}"),
        (DAY.isoformat(), "AAA", f"symbol skipped: {INCOMPLETE}"),
        (other_day.isoformat(), "AAA", f"symbol skipped: {NO_BAR}"),
        (DAY.isoformat(), "DDD", f"symbol skipped: {NO_BAR}"),
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "core.scoring")


# --- ScoringParams.from_settings ------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("TRADING_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    return monkeypatch


@pytest.mark.parametrize("bar_seconds, want", [
    # orb, vwap std, vwap min, vwap trend, peak distance, max hold
    (60, (15, 30, 30, 60, 3, 45)),
    (300, (3, 6, 6, 12, 1, 9)),
])
def test_from_settings_converts_minutes_to_bars(clean_env: pytest.MonkeyPatch, bar_seconds: int,
                                                want: tuple[int, ...]) -> None:
    for name, value in {"ORB_MINUTES": "15", "VWAP_STD_MINUTES": "30",
                        "VWAP_MIN_MINUTES": "30", "VWAP_TREND_MINUTES": "60",
                        "PEAK_MIN_DISTANCE_MINUTES": "3", "MAX_HOLDING_MINUTES": "45",
                        "STRATEGIES": "vwap", "TAKE_PROFIT_PCT": "0.02",
                        "STOP_LOSS_PCT": "0.015", "PEAK_EXIT_DROP_THRESHOLD": "0.004",
                        "ML_EXIT_THRESHOLD": "0.65", "ORB_BUFFER_PCT": "0.001"}.items():
        clean_env.setenv(f"TRADING_{name}", value)
    p = ScoringParams.from_settings(load_settings(), bar_seconds)
    assert (p.orb.range_bars, p.vwap.std_bars, p.vwap.min_bars, p.vwap.trend_bars,
            p.exits.peak_distance_bars, p.exits.max_holding_bars) == want
    assert p.strategies == ("vwap",)
    assert p.exits.take_profit_pct == 0.02 and p.exits.stop_loss_pct == 0.015
    assert p.exits.peak_drop_pct == 0.004 and p.exits.ml_exit_threshold == 0.65
    assert p.orb.buffer_pct == 0.001


@pytest.mark.parametrize("bar_seconds", [60, 300])
def test_from_settings_defaults_and_rounding(clean_env: pytest.MonkeyPatch,
                                             bar_seconds: int) -> None:
    p = ScoringParams.from_settings(load_settings(), bar_seconds)
    assert p.exits.max_holding_bars == 0  # off stays off
    assert p.strategies == ("orb", "vwap")
    clean_env.setenv("TRADING_ORB_MINUTES", "7")
    clean_env.setenv("TRADING_MAX_HOLDING_MINUTES", "1")
    p = ScoringParams.from_settings(load_settings(), bar_seconds)
    assert p.orb.range_bars == (7 if bar_seconds == 60 else 2)  # 7 min of 5-min bars: 2
    assert p.exits.max_holding_bars == 1  # a minute of 5-minute bars is still one bar


@pytest.mark.parametrize("minutes, bar_seconds, want", [
    (15, 60, 15), (15, 300, 3), (16, 300, 4), (1, 300, 1), (0, 60, 1), (30, 120, 15),
])
def test_bars_for(minutes: int, bar_seconds: int, want: int) -> None:
    assert bars_for(minutes, bar_seconds) == want


def test_non_finite_prices_are_skipped() -> None:
    w = _breakout_window(2)
    w[5, 0, HIGH] = w[5, 0, CLOSE] = np.inf
    got = score_bar(w, ("AAA", "BBB"), OPEN_TIME, 60, {}, ORB_ONLY)
    assert got.skipped == {"AAA": INCONSISTENT}
    assert [s.symbol for s in got.signals] == ["BBB"]
