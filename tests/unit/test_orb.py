"""Tests for core.signals.orb on hand-built [T, S, 5] windows."""

from __future__ import annotations

import datetime as dt
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.calendar import NY
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
from core.signals import Signal
from core.signals.orb import OrbParams, orb_signals

BAR_TIME = dt.datetime(2025, 3, 12, 9, 45, tzinfo=NY)
PARAMS = OrbParams(range_bars=3, buffer_pct=0.0005, volume_ratio=1.0)
RANGE_HIGH = 101.0
RANGE_LOW = 99.0
UP = RANGE_HIGH * (1 + PARAMS.buffer_pct)  # 101.0505
DOWN = RANGE_LOW * (1 - PARAMS.buffer_pct)  # 98.9505


def _window(n_bars: int, n_symbols: int = 1) -> np.ndarray:
    """Opening range 99-101 (close 100, volume 1000) then flat bars at 100, volume 1000."""
    w = np.empty((n_bars, n_symbols, 5), dtype=np.float64)
    w[:, :, OPEN] = 100.0
    w[:, :, HIGH] = 100.2
    w[:, :, LOW] = 99.8
    w[:, :, CLOSE] = 100.0
    w[:, :, VOLUME] = 1000.0
    w[:3, :, HIGH] = RANGE_HIGH
    w[:3, :, LOW] = RANGE_LOW
    return w


def _set_close(w: np.ndarray, t: int, s: int, close: float) -> None:
    w[t, s, CLOSE] = close
    w[t, s, HIGH] = max(w[t, s, HIGH], close)
    w[t, s, LOW] = min(w[t, s, LOW], close)


def _signals_at(w: np.ndarray, t: int, symbols: tuple[str, ...] = ("AAA",),
                params: OrbParams = PARAMS) -> list[Signal]:
    return orb_signals(w[: t + 1], symbols, BAR_TIME, params)


def test_long_fires_on_first_cross_only() -> None:
    w = _window(7)
    _set_close(w, 3, 0, 100.5)  # inside the range
    _set_close(w, 4, 0, 101.2)  # first close above 101.0505
    _set_close(w, 5, 0, 101.5)  # still above: not a new cross
    _set_close(w, 6, 0, 101.6)
    assert _signals_at(w, 3) == []
    fired = _signals_at(w, 4)
    assert len(fired) == 1
    sig = fired[0]
    assert (sig.symbol, sig.side, sig.source) == ("AAA", "buy", "orb")
    assert sig.price == 101.2
    assert sig.bar_time == BAR_TIME
    assert _signals_at(w, 5) == []
    assert _signals_at(w, 6) == []


def test_long_confidence_matches_breakout_strength() -> None:
    w = _window(5)
    _set_close(w, 4, 0, 101.2)
    (sig,) = _signals_at(w, 4)
    strength = (101.2 - UP) / (RANGE_HIGH - RANGE_LOW)  # 0.07475
    assert sig.confidence == pytest.approx(0.5 + 0.5 * math.tanh(4 * strength), abs=1e-4)
    assert 0.5 <= sig.confidence < 1


def test_long_needs_close_strictly_above_buffered_high() -> None:
    w = _window(5)
    _set_close(w, 4, 0, UP)
    assert _signals_at(w, 4) == []
    _set_close(w, 4, 0, float(np.nextafter(UP, np.inf)))
    assert [s.side for s in _signals_at(w, 4)] == ["buy"]


def test_close_above_range_high_but_within_buffer_does_not_fire() -> None:
    w = _window(5)
    _set_close(w, 4, 0, 101.04)  # above 101 but below 101.0505
    assert _signals_at(w, 4) == []


def test_breakout_on_first_bar_after_range() -> None:
    w = _window(4)
    _set_close(w, 3, 0, 101.3)
    assert [s.side for s in _signals_at(w, 3)] == ["buy"]


def test_short_fires_below_range_low_once() -> None:
    w = _window(6)
    _set_close(w, 3, 0, 99.5)
    _set_close(w, 4, 0, 98.8)  # first close below 98.9505
    _set_close(w, 5, 0, 98.5)
    assert _signals_at(w, 3) == []
    (sig,) = _signals_at(w, 4)
    assert (sig.symbol, sig.side, sig.price) == ("AAA", "sell", 98.8)
    strength = (DOWN - 98.8) / (RANGE_HIGH - RANGE_LOW)
    assert sig.confidence == pytest.approx(0.5 + 0.5 * math.tanh(4 * strength), abs=1e-4)
    assert _signals_at(w, 5) == []


def test_short_needs_close_strictly_below_buffered_low() -> None:
    w = _window(5)
    _set_close(w, 4, 0, DOWN)
    assert _signals_at(w, 4) == []
    _set_close(w, 4, 0, float(np.nextafter(DOWN, -np.inf)))
    assert [s.side for s in _signals_at(w, 4)] == ["sell"]


@pytest.mark.parametrize("t", [0, 1, 2])
def test_no_signal_before_range_completes(t: int) -> None:
    w = _window(3)
    _set_close(w, t, 0, 150.0)  # a huge move inside the opening range
    assert _signals_at(w, t) == []


def test_no_signal_when_opening_range_has_a_missing_bar() -> None:
    w = _window(5, 2)
    w[1, 0, :] = np.nan
    _set_close(w, 4, 0, 101.2)
    _set_close(w, 4, 1, 101.2)
    assert [s.symbol for s in _signals_at(w, 4, ("AAA", "BBB"))] == ["BBB"]


def test_no_signal_when_current_bar_missing() -> None:
    w = _window(5)
    _set_close(w, 3, 0, 101.2)
    w[3, 0, :] = np.nan
    w[4, 0, :] = np.nan
    assert _signals_at(w, 3) == []
    assert _signals_at(w, 4) == []


def test_no_signal_when_previous_bar_missing() -> None:
    w = _window(5)
    w[3, 0, :] = np.nan
    _set_close(w, 4, 0, 101.2)
    assert _signals_at(w, 4) == []


def test_no_signal_on_zero_volume_even_without_volume_filter() -> None:
    w = _window(5)
    _set_close(w, 4, 0, 101.2)
    w[4, 0, VOLUME] = 0.0
    no_filter = OrbParams(range_bars=3, buffer_pct=0.0005, volume_ratio=0.0)
    assert _signals_at(w, 4, params=no_filter) == []
    w[4, 0, VOLUME] = 1.0
    assert len(_signals_at(w, 4, params=no_filter)) == 1


def test_no_signal_on_missing_volume() -> None:
    w = _window(5)
    _set_close(w, 4, 0, 101.2)
    w[4, 0, VOLUME] = np.nan
    assert _signals_at(w, 4, params=OrbParams(3, 0.0005, 0.0)) == []


def test_volume_must_reach_ratio_times_mean_since_range() -> None:
    w = _window(6)
    w[3, 0, VOLUME] = 1000.0
    w[4, 0, VOLUME] = 3000.0  # mean of bars 3..4 = 2000
    _set_close(w, 5, 0, 101.2)
    w[5, 0, VOLUME] = 2999.0
    assert _signals_at(w, 5, params=OrbParams(3, 0.0005, 1.5)) == []  # needs 3000
    w[5, 0, VOLUME] = 3000.0
    assert len(_signals_at(w, 5, params=OrbParams(3, 0.0005, 1.5))) == 1


def test_volume_mean_excludes_the_current_bar() -> None:
    # With the current bar in the mean, a ratio of 1.5 could never be met for 2 bars of
    # 1000 and 2000 -> mean 1500; excluding it, 2000 >= 1.5 x 1000 fires.
    w = _window(5)
    _set_close(w, 4, 0, 101.2)
    w[4, 0, VOLUME] = 1500.0
    assert len(_signals_at(w, 4, params=OrbParams(3, 0.0005, 1.5))) == 1
    w[4, 0, VOLUME] = 1499.0
    assert _signals_at(w, 4, params=OrbParams(3, 0.0005, 1.5)) == []


def test_two_symbols_only_one_fires() -> None:
    w = _window(5, 3)
    _set_close(w, 4, 1, 98.7)  # BBB breaks down, AAA and CCC stay flat
    sigs = _signals_at(w, 4, ("AAA", "BBB", "CCC"))
    assert [(s.symbol, s.side, s.price) for s in sigs] == [("BBB", "sell", 98.7)]


def test_long_and_short_in_same_window() -> None:
    w = _window(5, 2)
    _set_close(w, 4, 0, 98.0)
    _set_close(w, 4, 1, 103.0)
    sigs = _signals_at(w, 4, ("AAA", "BBB"))
    assert sorted((s.symbol, s.side) for s in sigs) == [("AAA", "sell"), ("BBB", "buy")]


@pytest.mark.parametrize("close", [101.06, 101.2, 102.0, 103.5, 110.0, 500.0])
def test_long_confidence_is_in_half_open_unit_interval(close: float) -> None:
    w = _window(5)
    _set_close(w, 4, 0, close)
    (sig,) = _signals_at(w, 4)
    assert 0.5 <= sig.confidence < 1.0


@pytest.mark.parametrize("close", [98.9, 98.0, 96.5, 90.0, 1.0])
def test_short_confidence_is_in_half_open_unit_interval(close: float) -> None:
    w = _window(5)
    _set_close(w, 4, 0, close)
    (sig,) = _signals_at(w, 4)
    assert 0.5 <= sig.confidence < 1.0


def test_flat_opening_range_confidence_is_below_one() -> None:
    w = _window(5)
    w[:3, 0, HIGH] = 100.0
    w[:3, 0, LOW] = 100.0
    _set_close(w, 4, 0, 100.2)
    (sig,) = _signals_at(w, 4)
    assert sig.side == "buy"
    assert 0.5 <= sig.confidence < 1.0


def test_larger_breakout_scores_at_least_as_high() -> None:
    w = _window(5, 2)
    _set_close(w, 4, 0, 101.1)
    _set_close(w, 4, 1, 101.6)
    by_symbol = {s.symbol: s.confidence for s in _signals_at(w, 4, ("AAA", "BBB"))}
    assert by_symbol["BBB"] > by_symbol["AAA"] >= 0.5


# --- no look-ahead ----------------------------------------------------------------------------
def _random_walk(rng: np.random.Generator, n_bars: int, n_symbols: int) -> np.ndarray:
    steps = rng.normal(0.0, 0.004, size=(n_bars, n_symbols))
    close = 100.0 * np.exp(np.cumsum(steps, axis=0))
    opens = np.vstack([np.full((1, n_symbols), 100.0), close[:-1]])
    w = np.empty((n_bars, n_symbols, 5))
    w[:, :, OPEN] = opens
    w[:, :, CLOSE] = close
    w[:, :, HIGH] = np.maximum(opens, close) * (1 + rng.uniform(0, 0.002, close.shape))
    w[:, :, LOW] = np.minimum(opens, close) * (1 - rng.uniform(0, 0.002, close.shape))
    w[:, :, VOLUME] = rng.integers(100, 5000, size=close.shape).astype(np.float64)
    return w


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(0, 39))
def test_signals_at_t_do_not_depend_on_later_bars(seed: int, t: int) -> None:
    rng = np.random.default_rng(seed)
    symbols = tuple(f"S{i}" for i in range(8))
    a = _random_walk(rng, 40, 8)
    b = a.copy()
    b[t + 1:] = _random_walk(rng, 40, 8)[t + 1:] * 1.5  # arbitrary different future
    if t + 1 < 40:
        b[t + 1, 0, :] = np.nan
    params = OrbParams(range_bars=5, buffer_pct=0.0005, volume_ratio=0.5)
    assert orb_signals(a[: t + 1], symbols, BAR_TIME, params) == orb_signals(
        b[: t + 1], symbols, BAR_TIME, params)


def test_random_walk_prefix_signals_are_stable_and_not_vacuous() -> None:
    rng = np.random.default_rng(12345)
    symbols = tuple(f"S{i}" for i in range(20))
    a = _random_walk(rng, 60, 20)
    params = OrbParams(range_bars=5, buffer_pct=0.0005, volume_ratio=0.5)
    total = 0
    for t in range(60):
        b = a.copy()
        b[t + 1:] = rng.uniform(1, 1000, size=b[t + 1:].shape)
        got_a = orb_signals(a[: t + 1], symbols, BAR_TIME, params)
        got_b = orb_signals(b[: t + 1], symbols, BAR_TIME, params)
        assert got_a == got_b
        assert all(s.price == a[t, symbols.index(s.symbol), CLOSE] for s in got_a)
        total += len(got_a)
    assert total > 0


def test_symbol_without_bars_since_range_is_silent() -> None:
    # A symbol with no bar after its opening range (halted) must neither signal nor warn:
    # the module silences numeric warnings, and a warning per bar would flood the logs.
    w = _window(6, 2)
    w[3:, 0, :] = np.nan
    _set_close(w, 5, 1, 101.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigs = _signals_at(w, 5, ("AAA", "BBB"))
    assert [s.symbol for s in sigs] == ["BBB"]
