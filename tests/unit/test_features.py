"""Tests for ml.features on hand-built [T, S, 5] windows and on the real development bars."""

from __future__ import annotations

import datetime as dt
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.market.files import load_days
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
from ml.features import (
    EXIT_FEATURE_NAMES,
    FEATURE_NAMES,
    FEATURE_VERSION,
    entry_features,
    entry_features_all,
    exit_features,
    exit_features_all,
)

COL = {name: i for i, name in enumerate(EXIT_FEATURE_NAMES)}


def _bar(c: float, h: float | None = None, lo: float | None = None, v: float = 1000.0,
         o: float | None = None) -> list[float]:
    return [c if o is None else o, c + 0.5 if h is None else h, c - 0.5 if lo is None else lo,
            c, v]


def _window(bars: list[list[float]]) -> np.ndarray:
    """One symbol: [T, 1, 5] from a list of [o, h, l, c, v] bars."""
    return np.array(bars, dtype=np.float64)[:, None, :]


def _closes(closes: list[float], volume: float = 1000.0) -> np.ndarray:
    return _window([_bar(c, v=volume) for c in closes])


def _feature(w: np.ndarray, name: str, bar_seconds: int = 60) -> np.ndarray:
    """One feature at every bar of symbol 0, through entry_features_all."""
    return entry_features_all(w, bar_seconds)[:, 0, COL[name]]


@pytest.fixture(autouse=True)
def _no_runtime_warnings() -> Iterator[None]:
    """NaN handling must be silent: a divide-by-zero or log(0) warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


# --- names and shapes --------------------------------------------------------------------------
def test_names_version_and_shapes() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == 14
    assert EXIT_FEATURE_NAMES[: len(FEATURE_NAMES)] == FEATURE_NAMES
    assert EXIT_FEATURE_NAMES[len(FEATURE_NAMES):] == (
        "unrealized_pnl", "holding_minutes", "drawdown")
    assert FEATURE_VERSION.startswith("v1-") and len(FEATURE_VERSION) > 5
    w = np.tile(_closes([100.0 + i for i in range(20)]), (1, 3, 1))
    assert entry_features(w, 60).shape == (3, len(FEATURE_NAMES))
    assert entry_features_all(w, 60).shape == (20, 3, len(FEATURE_NAMES))
    ex = exit_features(w, np.zeros(3, dtype=int), np.ones(3), np.full(3, 100.0), 60)
    assert ex.shape == (3, len(EXIT_FEATURE_NAMES))
    assert exit_features_all(w, np.zeros(3, dtype=int), np.ones(3), np.full(3, 100.0),
                             60).shape == (20, 3, len(EXIT_FEATURE_NAMES))
    assert np.isnan(entry_features(np.empty((0, 2, 5)), 60)).all()
    assert entry_features_all(np.empty((0, 2, 5)), 60).shape == (0, 2, len(FEATURE_NAMES))
    with pytest.raises(ValueError):
        entry_features(np.zeros((3, 2)), 60)


# --- hand-computed values ----------------------------------------------------------------------
def test_log_returns() -> None:
    closes = [100.0 * 1.01**i for i in range(40)]
    w = _closes(closes)
    for k in (1, 5, 15, 30):
        got = _feature(w, f"ret_{k}")
        assert np.isnan(got[:k]).all()
        np.testing.assert_allclose(got[k:], k * math.log(1.01), rtol=1e-12)
    assert _feature(w, "ret_5")[7] == pytest.approx(math.log(closes[7] / closes[2]), rel=1e-14)


def test_rolling_volatility_is_population_std_of_log_returns() -> None:
    rng = np.random.default_rng(1)
    closes = list(100.0 * np.exp(np.cumsum(rng.normal(0, 0.002, 80))))
    w = _closes(closes)
    r = np.diff(np.log(closes))  # r[i] is the return of bar i + 1
    vol15 = _feature(w, "vol_15")
    vol60 = _feature(w, "vol_60")
    assert vol15[50] == pytest.approx(np.std(r[50 - 15:50]), rel=1e-9)
    assert vol60[70] == pytest.approx(np.std(r[70 - 60:70]), rel=1e-9)
    # partial window early in the session, NaN with fewer than ceil(n / 2) returns
    assert vol15[8] == pytest.approx(np.std(r[:8]), rel=1e-9)
    assert np.isnan(vol15[7]) and np.isnan(vol60[29])
    assert vol60[30] == pytest.approx(np.std(r[:30]), rel=1e-9)
    assert _feature(_closes([50.0] * 20), "vol_15")[19] == 0.0


def test_rsi_simple_on_a_known_sequence() -> None:
    # 10 up moves of 1.0 and 4 down moves of 0.5 in the last 14 changes; an earlier crash
    # (bar 1) lies outside the window and must not count
    changes = [-30.0, 1.0, -0.5, 1.0, 1.0, 1.0, -0.5, 1.0, 1.0, -0.5, 1.0, 1.0, 1.0, -0.5, 1.0]
    closes = [200.0]
    for c in changes:
        closes.append(closes[-1] + c)
    rsi = _feature(_closes(closes), "rsi_14")
    assert rsi[-1] == pytest.approx(100.0 * 10.0 / (10.0 + 2.0), rel=1e-12)
    # one bar earlier the crash is inside the window
    window_changes = np.array(changes[:14])
    gains = window_changes[window_changes > 0].sum()
    losses = -window_changes[window_changes < 0].sum()
    assert rsi[-2] == pytest.approx(100.0 * gains / (gains + losses), rel=1e-12)
    assert np.isnan(rsi[:7]).all() and not np.isnan(rsi[7])  # 7 changes needed
    assert _feature(_closes([10.0] * 20), "rsi_14")[-1] == 50.0  # no move at all


def test_atr_as_fraction_of_close() -> None:
    bars = [_bar(100.0, 101.0, 99.0) for _ in range(14)]  # true range 2 each
    bars.append(_bar(103.0, 104.0, 102.0))  # gap: range from the previous close 100 -> 4
    atr = _feature(_window(bars), "atr_14")
    assert atr[13] == pytest.approx(2.0 / 100.0, rel=1e-12)
    assert atr[14] == pytest.approx((13 * 2.0 + 4.0) / 14 / 103.0, rel=1e-12)
    assert np.isnan(atr[:6]).all() and atr[6] == pytest.approx(0.02, rel=1e-12)


def test_vwap_distance() -> None:
    w = _window([
        _bar(10.0, 11.0, 9.0, 100.0),   # tp 10 -> vwap 10
        _bar(12.0, 13.0, 11.0, 300.0),  # tp 12 -> vwap 11.5
        _bar(14.0, 15.0, 13.0, 100.0),  # tp 14 -> vwap 12
        _bar(20.0, 21.0, 19.0, 0.0),    # zero volume: vwap stays 12
    ])
    np.testing.assert_allclose(_feature(w, "vwap_dist"), [0.0, 12 / 11.5 - 1, 14 / 12 - 1,
                                                         20 / 12 - 1], rtol=1e-12)


def test_opening_range_position_nan_until_the_range_is_complete() -> None:
    closes = [100.0 + (i % 5) for i in range(20)]  # range bars 0-14: low 99.5, high 104.5
    closes[16] = 109.5
    pos = _feature(_closes(closes), "or_pos", bar_seconds=60)
    assert np.isnan(pos[:14]).all()
    assert pos[14] == pytest.approx((closes[14] - 99.5) / 5.0, rel=1e-12)
    assert pos[16] == pytest.approx(2.0, rel=1e-12)  # above the range
    pos5 = _feature(_closes(closes), "or_pos", bar_seconds=300)  # 3 five-minute bars
    assert np.isnan(pos5[:2]).all()
    assert pos5[2] == pytest.approx((102.0 - 99.5) / (102.5 - 99.5), rel=1e-12)
    # a flat range has no position
    assert np.isnan(_feature(_window([_bar(10.0, 10.0, 10.0)] * 16), "or_pos")).all()


def test_time_of_day_from_bar_index_and_size() -> None:
    w = _closes([100.0] * 390)
    tod = _feature(w, "time_of_day")
    assert tod[0] == pytest.approx(1 / 390) and tod[389] == pytest.approx(1.0)
    assert tod[194] == pytest.approx(0.5)
    assert _feature(w[:3], "time_of_day", bar_seconds=300)[0] == pytest.approx(5 / 390)
    # known even when the symbol has no bar
    w[5] = np.nan
    assert _feature(w, "time_of_day")[5] == pytest.approx(6 / 390)


def test_distance_from_session_high_and_low() -> None:
    w = _window([_bar(100.0, 101.0, 99.0), _bar(104.0, 105.0, 103.0), _bar(102.0, 103.0, 98.0)])
    np.testing.assert_allclose(_feature(w, "dist_high"), [100 / 101 - 1, 104 / 105 - 1,
                                                         102 / 105 - 1], rtol=1e-12)
    np.testing.assert_allclose(_feature(w, "dist_low"), [100 / 99 - 1, 104 / 99 - 1,
                                                        102 / 98 - 1], rtol=1e-12)


def test_volume_z_score_against_earlier_bars() -> None:
    vols = [100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
    z = _feature(_window([_bar(10.0, v=v) for v in vols]), "volume_z")
    assert np.isnan(z[:5]).all()  # fewer than 5 earlier bars
    assert z[5] == pytest.approx((600 - 300) / math.sqrt(20000.0), rel=1e-12)
    # zero-volume bars count as bars; identical earlier volumes give no z-score
    zero = _feature(_window([_bar(10.0, v=0.0)] * 5 + [_bar(10.0, v=50.0)]), "volume_z")
    assert np.isnan(zero).all()
    mixed = _feature(_window([_bar(10.0, v=v) for v in [0, 0, 100, 0, 0, 0]]), "volume_z")
    assert mixed[5] == pytest.approx((0 - 20) / math.sqrt(1600.0), rel=1e-12)


# --- missing data ------------------------------------------------------------------------------
def test_missing_bars_give_nan_not_exceptions() -> None:
    closes = [100.0 + 0.1 * i for i in range(40)]
    w = np.tile(_closes(closes), (1, 3, 1))
    w[20, 0] = np.nan  # one missing bar in symbol 0
    w[:, 1] = np.nan  # symbol 1 has no bar at all
    w[:, 2, VOLUME] = 0.0  # symbol 2 trades no volume
    feats = entry_features_all(w, 60)
    f0 = feats[:, 0]
    assert np.isnan(f0[20, [COL[n] for n in FEATURE_NAMES if n != "time_of_day"]]).all()
    assert np.isnan(f0[21, COL["ret_1"]]) and np.isnan(f0[25, COL["ret_5"]])
    assert not np.isnan(f0[22, COL["ret_1"]]) and not np.isnan(f0[26, COL["ret_5"]])
    assert f0[21, COL["vol_15"]] > 0 and not np.isnan(f0[21, COL["rsi_14"]])
    assert not np.isnan(f0[21, [COL["vwap_dist"], COL["dist_high"], COL["atr_14"]]]).any()
    assert np.isnan(feats[:, 1, [COL[n] for n in FEATURE_NAMES if n != "time_of_day"]]).all()
    # zero volume: no VWAP and no volume z-score, the price features are there
    assert np.isnan(feats[:, 2, [COL["vwap_dist"], COL["volume_z"]]]).all()
    assert not np.isnan(feats[30, 2, [COL["ret_5"], COL["rsi_14"], COL["or_pos"]]]).any()
    # the rolling variance is E[x^2] - E[x]^2: near-constant returns lose a few digits
    np.testing.assert_allclose(entry_features(w, 60), feats[-1], rtol=1e-9, equal_nan=True)


def test_non_positive_prices_count_as_missing() -> None:
    w = _closes([100.0, 0.0, 100.0, 101.0])
    ret1 = _feature(w, "ret_1")
    assert np.isnan(ret1[:3]).all() and ret1[3] == pytest.approx(math.log(1.01))


# --- exit features -----------------------------------------------------------------------------
def test_exit_features_hand_computed() -> None:
    closes = [100.0, 100.0, 101.0, 104.0, 102.0, 103.0]
    w = np.tile(_closes(closes), (1, 4, 1))
    entry_bar = np.array([1, 1, 0, 7])
    side = np.array([1.0, -1.0, 0.0, 1.0])  # long, short, flat, entry after t
    entry_price = np.array([100.0, 100.0, 100.0, 100.0])
    got = exit_features(w, entry_bar, side, entry_price, 60)
    pnl, minutes, dd = (got[:, COL[n]] for n in ("unrealized_pnl", "holding_minutes",
                                                   "drawdown"))
    assert pnl[0] == pytest.approx(0.03) and pnl[1] == pytest.approx(-0.03)
    assert minutes[0] == minutes[1] == 4.0
    assert dd[0] == pytest.approx(103 / 104 - 1)  # long: best close 104
    assert dd[1] == pytest.approx(-(103 / 100 - 1))  # short: best (lowest) close 100
    assert np.isnan(got[2:, len(FEATURE_NAMES):]).all()
    np.testing.assert_array_equal(got[:, : len(FEATURE_NAMES)], entry_features(w, 60))
    assert exit_features(w, entry_bar, side, entry_price, 300)[0, COL["holding_minutes"]] == 20


def test_exit_features_all_rows_match_the_last_bar_variant() -> None:
    rng = np.random.default_rng(3)
    closes = list(100.0 * np.exp(np.cumsum(rng.normal(0, 0.003, 60))))
    w = np.tile(_closes(closes), (1, 2, 1))
    w[30, 1] = np.nan
    entry_bar, side, price = np.array([10, 25]), np.array([1, -1]), np.array([99.0, 101.0])
    allb = exit_features_all(w, entry_bar, side, price, 60)
    assert np.isnan(allb[:10, 0, len(FEATURE_NAMES):]).all()
    for t in range(60):
        np.testing.assert_allclose(exit_features(w[: t + 1], entry_bar, side, price, 60),
                                   allb[t], rtol=1e-12, atol=1e-15, equal_nan=True)


# --- no look-ahead on real bars ----------------------------------------------------------------
def _real_days(shared_bars: Path) -> list:
    days = load_days(shared_bars, symbols=["AAPL", "GLD", "SPY", "TSLA", "VOO"],
                     start=dt.date(2019, 2, 11), end=dt.date(2019, 2, 13))
    days += load_days(shared_bars, symbols=["GOOG", "SPY"], start=dt.date(2015, 12, 23),
                      end=dt.date(2015, 12, 28))  # an early close and gaps
    assert len(days) == 6
    return days


def test_no_look_ahead_on_real_bars(shared_bars: Path) -> None:
    rng = np.random.default_rng(7)
    for day in _real_days(shared_bars):
        w = day.ohlcv
        full = entry_features_all(w, day.bar_seconds)
        n_sym = w.shape[1]
        entry_bar = rng.integers(0, 60, n_sym)
        side = rng.choice([-1.0, 1.0], n_sym)
        price = np.nan_to_num(w[entry_bar, np.arange(n_sym), OPEN], nan=100.0)
        full_exit = exit_features_all(w, entry_bar, side, price, day.bar_seconds)
        assert not np.isnan(full[:, :, COL["rsi_14"]]).all()
        for t in [0, 1, 14, 15, *rng.integers(16, w.shape[0] - 1, 5)]:
            noisy = w.copy()
            n_after = w.shape[0] - t - 1
            noisy[t + 1:] = rng.uniform(1.0, 1000.0, (n_after, n_sym, 5))
            noisy[t + 1:][rng.random((n_after, n_sym)) < 0.1] = np.nan
            np.testing.assert_array_equal(entry_features_all(noisy, day.bar_seconds)[: t + 1],
                                          full[: t + 1])
            np.testing.assert_array_equal(
                exit_features_all(noisy, entry_bar, side, price, day.bar_seconds)[: t + 1],
                full_exit[: t + 1])
            np.testing.assert_allclose(entry_features(w[: t + 1], day.bar_seconds), full[t],
                                       rtol=1e-12, atol=1e-15, equal_nan=True)
            np.testing.assert_allclose(
                exit_features(w[: t + 1], entry_bar, side, price, day.bar_seconds),
                full_exit[t], rtol=1e-12, atol=1e-15, equal_nan=True)


# --- numpy vs cupy -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:  # cupy installed without a usable GPU
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(11)
    closes = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.002, (390, 50)), axis=0))
    w = np.empty((390, 50, 5))
    w[:, :, OPEN] = closes * (1 + rng.normal(0, 0.0005, closes.shape))
    w[:, :, HIGH] = np.maximum(w[:, :, OPEN], closes) * 1.001
    w[:, :, LOW] = np.minimum(w[:, :, OPEN], closes) * 0.999
    w[:, :, CLOSE] = closes
    w[:, :, VOLUME] = rng.integers(0, 5000, closes.shape)
    w[rng.random((390, 50)) < 0.05] = np.nan
    wg = cp.asarray(w)
    entry_bar, side, price = rng.integers(0, 200, 50), rng.choice([-1.0, 1.0], 50), closes[0]
    pairs = [
        (entry_features(w, 60), entry_features(wg, 60, xp=cp)),
        (entry_features_all(w, 60), entry_features_all(wg, 60, xp=cp)),
        (exit_features(w, entry_bar, side, price, 60),
         exit_features(wg, cp.asarray(entry_bar), cp.asarray(side), cp.asarray(price), 60,
                       xp=cp)),
        (exit_features_all(w, entry_bar, side, price, 60),
         exit_features_all(wg, cp.asarray(entry_bar), cp.asarray(side), cp.asarray(price), 60,
                           xp=cp)),
    ]
    for ref, gpu in pairs:
        np.testing.assert_allclose(cp.asnumpy(gpu), ref, rtol=1e-9, atol=1e-12, equal_nan=True)
