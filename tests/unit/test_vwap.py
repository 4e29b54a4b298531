"""Tests for core.signals.vwap on hand-built [T, S, 5] windows."""

from __future__ import annotations

import datetime as dt
import math
import warnings

import numpy as np
import pytest

from core.calendar import NY
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
from core.signals import Signal
from core.signals.vwap import VwapParams, session_vwap, vwap_signals

BAR_TIME = dt.datetime(2025, 3, 12, 10, 15, tzinfo=NY)
PARAMS = VwapParams()  # band_k 2, std_bars 30, min_bars 30, trend_bars 60, max_trend 0.4 %
TURN = 37  # the bar where the hand-built long fires


def _window(n_bars: int, n_symbols: int = 1) -> np.ndarray:
    """Closes alternating 100.1 / 99.9, typical price == close, volume 1000."""
    w = np.empty((n_bars, n_symbols, 5), dtype=np.float64)
    close = 100.0 + 0.1 * np.where(np.arange(n_bars) % 2 == 0, 1.0, -1.0)
    for s in range(n_symbols):
        for t in range(n_bars):
            _set_close(w, t, s, float(close[t]))
    w[:, :, VOLUME] = 1000.0
    return w


def _set_close(w: np.ndarray, t: int, s: int, close: float) -> None:
    w[t, s, OPEN] = close
    w[t, s, CLOSE] = close
    w[t, s, HIGH] = close + 0.05
    w[t, s, LOW] = close - 0.05


def _stretch_then_turn(w: np.ndarray, s: int = 0, sign: float = 1.0) -> None:
    """Drop (sign 1) or spike (sign -1) at bars 35-36, turn back at TURN, fade again at 38."""
    for t, move in [(35, -1.0), (36, -1.2), (TURN, -0.8), (38, -0.9)]:
        _set_close(w, t, s, 100.0 + sign * move)


def _signals_at(w: np.ndarray, t: int, symbols: tuple[str, ...] = ("AAA",),
                params: VwapParams = PARAMS) -> list[Signal]:
    return vwap_signals(w[: t + 1], symbols, BAR_TIME, params)


# --- session_vwap ------------------------------------------------------------------------------
def _bar(h: float, lo: float, c: float, v: float) -> list[float]:
    return [c, h, lo, c, v]


def test_session_vwap_hand_computed() -> None:
    w = np.array([
        [_bar(11.0, 9.0, 10.0, 100.0)],   # tp 10 -> 1000 / 100 = 10
        [_bar(13.0, 11.0, 12.0, 300.0)],  # tp 12 -> 4600 / 400 = 11.5
        [_bar(15.0, 13.0, 14.0, 100.0)],  # tp 14 -> 6000 / 500 = 12
    ])
    np.testing.assert_array_equal(session_vwap(w)[:, 0], [10.0, 11.5, 12.0])


def test_session_vwap_nan_bar_carries_and_zero_volume_is_ignored() -> None:
    w = np.array([
        [_bar(11.0, 9.0, 10.0, 0.0)],     # no volume yet -> NaN
        [_bar(11.0, 9.0, 10.0, 100.0)],   # 10
        [_bar(13.0, 11.0, 12.0, 300.0)],  # 11.5
        [[np.nan] * 5],                   # missing bar -> carries 11.5
        [_bar(60.0, 40.0, 50.0, 0.0)],    # zero volume -> carries 11.5
        [_bar(15.0, 13.0, 14.0, np.nan)],  # missing volume -> carries 11.5
        [_bar(15.0, 13.0, 14.0, 100.0)],  # 12
    ])
    got = session_vwap(w)[:, 0]
    assert math.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [10.0, 11.5, 11.5, 11.5, 11.5, 12.0])


def test_session_vwap_per_symbol() -> None:
    w = np.array([
        [_bar(11.0, 9.0, 10.0, 100.0), [np.nan] * 5],
        [_bar(13.0, 11.0, 12.0, 300.0), _bar(21.0, 19.0, 20.0, 50.0)],
    ])
    got = session_vwap(w)
    np.testing.assert_array_equal(got[:, 0], [10.0, 11.5])
    assert math.isnan(got[0, 1])
    assert got[1, 1] == 20.0


# --- entries -----------------------------------------------------------------------------------
def _expected_confidence(w: np.ndarray, t: int, s: int, side: str) -> float:
    """Independent reference: band at t-1 from np.std of the last std_bars deviations."""
    vwap = session_vwap(w[: t + 1])[:, s]
    dev = w[: t, s, CLOSE] - vwap[:t]
    std = float(np.std(dev[max(t - PARAMS.std_bars, 0):]))
    close_p = w[t - 1, s, CLOSE]
    if side == "buy":
        stretch = (vwap[t - 1] - PARAMS.band_k * std - close_p) / std
    else:
        stretch = (close_p - vwap[t - 1] - PARAMS.band_k * std) / std
    assert stretch > 0
    return min(0.5 + 0.5 * math.tanh(stretch), 0.9999)


def test_long_fires_exactly_at_the_turn_bar() -> None:
    w = _window(40)
    _stretch_then_turn(w)
    for t in range(PARAMS.min_bars - 1, TURN):
        assert _signals_at(w, t) == [], t
    (sig,) = _signals_at(w, TURN)
    assert (sig.symbol, sig.side, sig.source) == ("AAA", "buy", "vwap")
    assert sig.price == w[TURN, 0, CLOSE] == 99.2
    assert sig.bar_time == BAR_TIME
    assert sig.confidence == pytest.approx(_expected_confidence(w, TURN, 0, "buy"), abs=1e-4)
    assert 0.5 <= sig.confidence < 1.0
    assert _signals_at(w, TURN + 1) == []  # falls again: no turn


def test_long_needs_close_still_below_vwap() -> None:
    w = _window(40)
    _stretch_then_turn(w)
    _set_close(w, TURN, 0, 100.5)  # turns up all the way through the VWAP
    assert _signals_at(w, TURN) == []


def test_short_mirrors_the_long() -> None:
    w = _window(40)
    _stretch_then_turn(w, sign=-1.0)
    for t in range(PARAMS.min_bars - 1, TURN):
        assert _signals_at(w, t) == [], t
    (sig,) = _signals_at(w, TURN)
    assert (sig.symbol, sig.side, sig.source, sig.price) == ("AAA", "sell", "vwap", 100.8)
    assert sig.confidence == pytest.approx(_expected_confidence(w, TURN, 0, "sell"), abs=1e-4)
    assert _signals_at(w, TURN + 1) == []


def test_long_and_short_and_quiet_symbol_in_one_window() -> None:
    w = _window(40, 3)
    _stretch_then_turn(w, 0)
    _stretch_then_turn(w, 2, sign=-1.0)
    sigs = _signals_at(w, TURN, ("AAA", "BBB", "CCC"))
    assert sorted((s.symbol, s.side) for s in sigs) == [("AAA", "buy"), ("CCC", "sell")]


def _downtrend(n_bars: int = 70) -> np.ndarray:
    """Closes falling 102 -> 99 (plus the +-0.1 wiggle), a stretch at n-4, a turn up at n-3."""
    w = _window(n_bars)
    drift = np.linspace(2.0, -1.0, n_bars)
    for t in range(n_bars):
        _set_close(w, t, 0, float(w[t, 0, CLOSE] + drift[t]))
    _set_close(w, n_bars - 4, 0, 96.5)
    _set_close(w, n_bars - 3, 0, 96.8)
    return w


def test_trend_filter_blocks_a_long_in_a_downtrend() -> None:
    w = _downtrend()
    t = 67
    vwap = session_vwap(w[: t + 1])[:, 0]
    assert (vwap[t] - vwap[t - PARAMS.trend_bars]) / vwap[t] < -PARAMS.max_trend_pct
    assert _signals_at(w, t) == []
    no_filter = VwapParams(max_trend_pct=1.0)
    assert [s.side for s in _signals_at(w, t, params=no_filter)] == ["buy"]


def test_trend_filter_blocks_a_short_in_an_uptrend() -> None:
    w = _downtrend()
    w[:, :, :4] = 200.0 - w[:, :, :4]  # mirror prices: uptrend, spike, turn down
    w[:, :, [HIGH, LOW]] = w[:, :, [LOW, HIGH]]
    assert _signals_at(w, 67) == []
    no_filter = VwapParams(max_trend_pct=1.0)
    assert [s.side for s in _signals_at(w, 67, params=no_filter)] == ["sell"]


def test_no_signal_before_min_bars() -> None:
    w = _window(40)
    _stretch_then_turn(w)
    early = VwapParams(min_bars=TURN + 2)
    assert _signals_at(w, TURN, params=early) == []
    at_limit = VwapParams(min_bars=TURN + 1)  # the window holds exactly min_bars bars
    assert [s.side for s in _signals_at(w, TURN, params=at_limit)] == ["buy"]


@pytest.mark.parametrize("missing", [TURN, TURN - 1])
def test_missing_current_or_previous_bar_silences_only_that_symbol(missing: int) -> None:
    w = _window(40, 2)
    _stretch_then_turn(w, 0)
    _stretch_then_turn(w, 1)
    w[missing, 0, :] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigs = _signals_at(w, TURN, ("AAA", "BBB"))
    assert [(s.symbol, s.side) for s in sigs] == [("BBB", "buy")]


def test_zero_std_and_never_traded_symbols_are_silent() -> None:
    w = _window(40, 3)
    _stretch_then_turn(w, 2)
    for t in range(40):  # constant close 100 with typical price 100.1333: deviation constant
        w[t, 0, [OPEN, HIGH, LOW, CLOSE]] = [100.0, 100.5, 99.9, 100.0]
    w[TURN, 0, CLOSE] = 100.05  # turns up, still below VWAP, prior close "below the band"
    w[:, 1, :] = np.nan  # never traded
    vwap = session_vwap(w)[:, 0]
    assert w[TURN - 1, 0, CLOSE] < vwap[TURN - 1] and w[TURN, 0, CLOSE] < vwap[TURN]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigs = _signals_at(w, TURN, ("AAA", "BBB", "CCC"))
    assert [s.symbol for s in sigs] == ["CCC"]


@pytest.mark.parametrize("drop", [0.5, 1.0, 3.0, 10.0, 20.0])
def test_confidence_in_half_open_unit_interval_and_monotone(drop: float) -> None:
    w = _window(40, 2)
    _stretch_then_turn(w, 0)
    _stretch_then_turn(w, 1)
    _set_close(w, TURN - 1, 1, 100.0 - 1.2 - drop)
    no_filter = VwapParams(max_trend_pct=1.0)  # a big drop moves the VWAP itself
    sigs = _signals_at(w, TURN, ("AAA", "BBB"), params=no_filter)
    by_symbol = {s.symbol: s.confidence for s in sigs}
    assert set(by_symbol) == {"AAA", "BBB"}
    assert all(0.5 <= c < 1.0 for c in by_symbol.values())
    assert by_symbol["BBB"] >= by_symbol["AAA"]


# --- no look-ahead -----------------------------------------------------------------------------
def _random_walk(rng: np.random.Generator, n_bars: int, n_symbols: int) -> np.ndarray:
    steps = rng.normal(0.0, 0.002, size=(n_bars, n_symbols))
    close = 100.0 * np.exp(np.cumsum(steps, axis=0))
    opens = np.vstack([np.full((1, n_symbols), 100.0), close[:-1]])
    w = np.empty((n_bars, n_symbols, 5))
    w[:, :, OPEN] = opens
    w[:, :, CLOSE] = close
    w[:, :, HIGH] = np.maximum(opens, close) * (1 + rng.uniform(0, 0.001, close.shape))
    w[:, :, LOW] = np.minimum(opens, close) * (1 - rng.uniform(0, 0.001, close.shape))
    w[:, :, VOLUME] = rng.integers(100, 5000, size=close.shape).astype(np.float64)
    return w


def test_session_vwap_prefix_does_not_depend_on_later_bars() -> None:
    rng = np.random.default_rng(7)
    w = _random_walk(rng, 200, 3)
    w[50, 1, :] = np.nan
    full = session_vwap(w)
    for t in [0, 1, 29, 50, 99, 150, 199]:
        np.testing.assert_array_equal(full[: t + 1], session_vwap(w[: t + 1]))


def test_signals_at_t_do_not_depend_on_later_bars_and_are_not_vacuous() -> None:
    rng = np.random.default_rng(2025)
    symbols = ("S0", "S1", "S2")
    w = _random_walk(rng, 200, 3)
    params = VwapParams(band_k=1.5, max_trend_pct=0.02)
    total = 0
    for t in range(200):
        w2 = w.copy()
        w2[t + 1:] = rng.uniform(1, 1000, size=w2[t + 1:].shape)
        if t + 1 < 200:
            w2[t + 1, 0, :] = np.nan
        got = vwap_signals(w[: t + 1], symbols, BAR_TIME, params)
        assert got == vwap_signals(w2[: t + 1], symbols, BAR_TIME, params)
        assert all(s.price == w[t, symbols.index(s.symbol), CLOSE] for s in got)
        assert all(0.5 <= s.confidence < 1.0 for s in got)
        total += len(got)
    assert total > 0
