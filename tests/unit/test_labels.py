"""Tests for ml.labels: triple-barrier entry labels and exit labels on hand-built bars."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from core.market.files import load_days
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME
from ml.labels import entry_labels, exit_labels

NAN_BAR = [np.nan] * 5
QUIET = [100.0, 100.2, 99.8, 100.0, 1000.0]  # o h l c v: touches neither 1 % barrier


def _window(*symbols: list[list[float]]) -> np.ndarray:
    """[T, S, 5] from one list of [o, h, l, c, v] bars per symbol (same length)."""
    return np.array(symbols, dtype=np.float64).transpose(1, 0, 2)


def _bar(o: float, h: float, lo: float, c: float) -> list[float]:
    return [o, h, lo, c, 1000.0]


def _labels(w: np.ndarray, **kw: float) -> tuple[np.ndarray, np.ndarray]:
    args = {"target_pct": 0.01, "stop_pct": 0.01, "horizon": 3, "slippage_bps": 0.0,
            "fee_per_share": 0.0} | kw
    return entry_labels(w, **args)


# --- entry labels ------------------------------------------------------------------------------
def test_target_first_stop_first_both_and_neither() -> None:
    # row 0 is the signal bar; the trade enters at bar 1's open (100) with a 3-bar horizon
    target_first = [QUIET, _bar(100.0, 100.5, 99.5, 100.3), _bar(100.3, 101.5, 100.0, 101.2),
                    _bar(101.0, 101.0, 97.0, 97.5), QUIET]
    stop_first = [QUIET, _bar(100.0, 100.5, 99.5, 99.6), _bar(99.6, 99.7, 98.5, 99.0),
                  _bar(99.0, 102.0, 99.0, 101.5), QUIET]
    both = [QUIET, _bar(100.0, 101.5, 98.5, 100.0), QUIET, QUIET, QUIET]
    neither = [QUIET] * 5
    late = [QUIET, QUIET, QUIET, QUIET, _bar(100.0, 103.0, 100.0, 102.0)]  # after the horizon
    long_, short = _labels(_window(target_first, stop_first, both, neither, late))
    np.testing.assert_array_equal(long_[0], [1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(short[0], [0.0, 1.0, 0.0, 0.0, 0.0])
    assert long_[1, 4] == 1.0  # one bar later the spike is inside the horizon


def test_horizon_past_the_session_end_is_nan() -> None:
    w = _window([QUIET] * 10)
    for horizon in (1, 3, 9):
        long_, short = _labels(w, horizon=horizon)
        last_ok = 10 - 1 - horizon
        assert (long_[: last_ok + 1] == 0.0).all() and (short[: last_ok + 1] == 0.0).all()
        assert np.isnan(long_[last_ok + 1:]).all() and np.isnan(short[last_ok + 1:]).all()
    long_, _ = _labels(w, horizon=10)
    assert np.isnan(long_).all()
    with pytest.raises(ValueError):
        _labels(w, horizon=0)


def test_missing_entry_bar_is_nan_and_missing_bars_inside_touch_nothing() -> None:
    gap_entry = [QUIET, NAN_BAR, _bar(100.0, 105.0, 100.0, 104.0), QUIET, QUIET, QUIET]
    gap_inside = [QUIET, QUIET, NAN_BAR, _bar(100.0, 101.5, 100.0, 101.0), QUIET, QUIET]
    long_, short = _labels(_window(gap_entry, gap_inside))
    assert np.isnan(long_[0, 0]) and np.isnan(short[0, 0])
    assert long_[1, 0] == 1.0  # entering at bar 2 is fine
    assert long_[0, 1] == 1.0 and short[0, 1] == 0.0
    assert np.isnan(long_[1, 1])  # bar 2 is the entry bar of row 1


def test_costs_make_a_barely_reached_target_fail() -> None:
    barely = [QUIET, _bar(100.0, 101.02, 99.9, 101.0), QUIET, QUIET, QUIET]
    short_barely = [QUIET, _bar(100.0, 100.1, 98.98, 99.0), QUIET, QUIET, QUIET]
    w = _window(barely, short_barely)
    gross_long, gross_short = _labels(w)
    assert gross_long[0, 0] == 1.0 and gross_short[0, 1] == 1.0
    # 2 bps each side: the long needs 100.02 * 1.01 / 0.9998 = 101.04 to net 1 %
    net_long, net_short = _labels(w, slippage_bps=2.0)
    assert net_long[0, 0] == 0.0 and net_short[0, 1] == 0.0
    # half a cent a share each side: 100.005 * 1.01 + 0.005 = 101.01 is needed (high 101.02);
    # 2 cents: 100.02 * 1.01 + 0.02 = 101.04 is not reached
    fee_long, _ = _labels(w, fee_per_share=0.005)
    assert fee_long[0, 0] == 1.0
    fee_long, fee_short = _labels(w, fee_per_share=0.02)
    assert fee_long[0, 0] == 0.0 and fee_short[0, 1] == 0.0


def test_costs_bring_the_stop_closer() -> None:
    dip = [QUIET, _bar(100.0, 100.1, 99.05, 99.5), QUIET, QUIET, QUIET]
    rise_then = [QUIET, _bar(100.0, 100.1, 99.05, 99.5), _bar(99.5, 101.5, 99.5, 101.4), QUIET,
                 QUIET]
    w = _window(dip, rise_then)
    gross, _ = _labels(w)
    assert gross[0, 1] == 1.0  # the dip to 99.05 is no 1 % loss before costs
    net, _ = _labels(w, slippage_bps=5.0, target_pct=0.001)
    assert net[0, 0] == 0.0 and net[0, 1] == 0.0  # 99.05 after 2 x 5 bps is a 1 % net loss


def test_entry_labels_default_costs_and_real_bars_stay_in_the_session(shared_bars: Path) -> None:
    days = load_days(shared_bars, symbols=["GOOG", "SPY"], start=dt.date(2015, 12, 23),
                     end=dt.date(2015, 12, 28))
    rng = np.random.default_rng(5)
    for day in days:
        w = day.ohlcv
        horizon = 30
        long_, short = entry_labels(w, 0.003, 0.003, horizon)
        assert long_.shape == short.shape == w.shape[:2]
        assert np.isnan(long_[-horizon:]).all()
        n_ok = w.shape[0] - horizon  # rows 0..T-1-horizon keep their horizon in the session
        has_entry = ~np.isnan(w[1: n_ok + 1, :, OPEN])
        assert not np.isnan(long_[:n_ok][has_entry]).any()
        assert np.isnan(long_[:n_ok][~has_entry]).all()
        assert set(np.unique(long_[~np.isnan(long_)])) <= {0.0, 1.0}
        assert 0 < np.nansum(long_) < np.sum(~np.isnan(long_))
        # a label looks at bars t+1..t+horizon only: later bars do not change it
        for t in rng.integers(0, w.shape[0] - horizon - 1, 5):
            noisy = w.copy()
            noisy[t + horizon + 1:] = rng.uniform(1.0, 1000.0, noisy[t + horizon + 1:].shape)
            nl, ns = entry_labels(noisy, 0.003, 0.003, horizon)
            np.testing.assert_array_equal(nl[t], long_[t])
            np.testing.assert_array_equal(ns[t], short[t])


# --- exit labels -------------------------------------------------------------------------------
def test_exit_labels_long_and_short() -> None:
    base = _bar(100.0, 100.3, 99.7, 100.0)
    deep_dip = [base, base, _bar(100.0, 100.2, 98.9, 99.5), base, base]
    small_dip = [base, base, _bar(100.0, 100.2, 99.2, 99.5), base, base]
    spike = [base, _bar(100.0, 101.2, 100.0, 100.5), base, base, base]
    w = _window(deep_dip, small_dip, spike)
    long_, short = exit_labels(w, threshold=0.01, horizon=2)
    np.testing.assert_array_equal(long_[0], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(short[0], [0.0, 0.0, 1.0])
    assert long_[1, 0] == 1.0 and long_[2, 0] == 0.0  # bar 2's own low is not ahead of bar 2
    assert np.isnan(long_[3:]).all() and np.isnan(short[3:]).all()
    # on closes only, none of these bars closes 1 % away
    long_c, short_c = exit_labels(w, threshold=0.01, horizon=2, intrabar=False)
    assert (long_c[:3] == 0.0).all() and (short_c[:3] == 0.0).all()
    long_c, _ = exit_labels(w, threshold=0.004, horizon=2, intrabar=False)
    assert long_c[0, 0] == 1.0 and long_c[0, 1] == 1.0


def test_exit_labels_missing_close_is_nan() -> None:
    w = _window([QUIET, NAN_BAR, QUIET, QUIET])
    long_, short = exit_labels(w, threshold=0.01, horizon=1)
    assert long_[0, 0] == 0.0 and np.isnan(long_[1, 0]) and long_[2, 0] == 0.0
    assert np.isnan(short[3, 0])


# --- numpy vs cupy -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception:  # cupy installed without a usable GPU
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(2)
    closes = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.002, (390, 40)), axis=0))
    w = np.empty((390, 40, 5))
    w[:, :, OPEN] = closes
    w[:, :, HIGH] = closes * 1.002
    w[:, :, LOW] = closes * 0.998
    w[:, :, CLOSE] = closes
    w[:, :, VOLUME] = 1000.0
    w[rng.random((390, 40)) < 0.05] = np.nan
    wg = cp.asarray(w)
    for ref, gpu in zip(entry_labels(w, 0.004, 0.003, 20, 2.0, 0.005),
                        entry_labels(wg, 0.004, 0.003, 20, 2.0, 0.005, xp=cp), strict=True):
        np.testing.assert_array_equal(cp.asnumpy(gpu), ref)
    for ref, gpu in zip(exit_labels(w, 0.003, 15), exit_labels(wg, 0.003, 15, xp=cp),
                        strict=True):
        np.testing.assert_array_equal(cp.asnumpy(gpu), ref)
