"""Tests for core.exits.exit_codes / confirmed_extremes on hand-built close series.

Every case states the exact bar at which an exit fires. Defaults (ExitParams()): stop-loss 1 %,
peak drop 0.5 %, peak distance 3 bars, prominence 0.2 %, ML threshold 0.7, take-profit and
max-hold off.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.exits import (
    HOLD,
    MAX_HOLD,
    ML_EXIT,
    PEAK,
    REASONS,
    STOP_LOSS,
    TAKE_PROFIT,
    TROUGH,
    ExitParams,
    confirmed_extremes,
    exit_codes,
)

NAN = float("nan")
P = ExitParams()
LONG, SHORT = 1, -1


def _codes(columns: list[list[float]], entry: list[int], direction: list[int],
           price: list[float], params: ExitParams = P, ml: np.ndarray | None = None,
           last_only: bool = False) -> np.ndarray:
    close = np.array(columns, dtype=float).T  # [T, S]
    return exit_codes(close, np.array(entry), np.array(direction), np.array(price, dtype=float),
                      params, ml, last_only=last_only)


def _expected(n: int, at: dict[int, int]) -> list[int]:
    """A code list of length ``n``: HOLD except ``{bar: code}``."""
    return [at.get(t, HOLD) for t in range(n)]


def test_reason_codes_index_reasons() -> None:
    assert REASONS[HOLD] == ""
    assert [REASONS[c] for c in (PEAK, TROUGH, ML_EXIT, STOP_LOSS, TAKE_PROFIT, MAX_HOLD)] == [
        "peak", "trough", "ml_exit", "stop_loss", "take_profit", "max_hold"]


# --- peak (long) and trough (short) ---------------------------------------------------------
def test_peak_long_and_trough_short_fire_at_p_plus_distance() -> None:
    # peak at bar 3 (103), known at bar 6; the close is already 0.5 % below it from bar 4 on
    long_ = [100.0, 101.0, 102.0, 103.0, 102.4, 102.3, 102.2, 102.0]
    # trough at bar 3 (97), known at bar 6; above 97 x 1.005 = 97.485 from bar 4 on
    short = [100.0, 99.0, 98.0, 97.0, 97.6, 97.7, 97.8, 98.0]
    rising = [100.0, 100.5, 101.0, 101.5, 102.0, 102.5, 103.0, 103.5]  # no peak: holds
    codes = _codes([long_, short, rising], [0, 0, 0], [LONG, SHORT, LONG], [100.0] * 3)
    assert codes[:, 0].tolist() == _expected(8, {6: PEAK, 7: PEAK})
    assert codes[:, 1].tolist() == _expected(8, {6: TROUGH, 7: TROUGH})
    assert codes[:, 2].tolist() == [HOLD] * 8

    close = np.array([long_, short, rising]).T
    peak, trough = confirmed_extremes(close, np.zeros(3, dtype=int), 3, 0.002)
    assert np.isnan(peak[:6, 0]).all() and (peak[6:, 0] == 103.0).all()
    assert np.isnan(trough[:6, 1]).all() and (trough[6:, 1] == 97.0).all()
    assert np.isnan(peak[:, 2]).all()


@pytest.mark.parametrize("distance", [1, 2, 3, 5])
def test_peak_is_not_known_before_p_plus_distance(distance: int) -> None:
    p = 4
    # peak 102 at bar 4, then 101 (below 102 x 0.995 = 101.49, above the 99 stop) at once
    series = [100.0, 100.5, 101.0, 101.5, 102.0] + [101.0] * 8
    params = ExitParams(peak_distance_bars=distance)
    codes = _codes([series], [0], [LONG], [100.0], params)[:, 0]
    assert codes.tolist() == [HOLD] * (p + distance) + [PEAK] * (len(series) - p - distance)

    trough_series = [200.0 - c for c in series]  # trough 98 at bar 4, then 99 (> 98.49)
    codes = _codes([trough_series], [0], [SHORT], [100.0], params)[:, 0]
    assert codes.tolist() == [HOLD] * (p + distance) + [TROUGH] * (len(series) - p - distance)


def test_peak_too_small_prominence_is_no_peak() -> None:
    # 100.15 stands only 0.15 above the entry's 100: below 0.2 % x 100.15 = 0.2003
    series = [100.0, 100.1, 100.15, 100.0, 99.99, 99.6, 99.6, 99.6, 99.6]
    mirror = [200.0 - c for c in series]  # trough 99.85, only 0.15 below 100
    both = ([series, mirror], [0, 0], [LONG, SHORT], [100.0, 100.0])
    assert (_codes(*both) == HOLD).all()
    close = np.array([series, mirror]).T
    peak, trough = confirmed_extremes(close, np.zeros(2, dtype=int), 3, 0.002)
    assert np.isnan(peak[:, 0]).all() and np.isnan(trough[:, 1]).all()

    # with a 0.1 % prominence the same peak/trough counts: known at bar 2 + 3 = 5
    codes = _codes(*both, params=ExitParams(peak_prominence_pct=0.001))
    assert codes[:, 0].tolist() == _expected(9, {5: PEAK, 6: PEAK, 7: PEAK, 8: PEAK})
    assert codes[:, 1].tolist() == _expected(9, {5: TROUGH, 6: TROUGH, 7: TROUGH, 8: TROUGH})


def test_higher_later_peak_replaces_the_earlier_one() -> None:
    # peak 102 at bar 2 (known at 5, exit level 101.49), peak 104 at bar 7 (known at 10,
    # exit level 103.48). 103.4 at bar 9 is below the new level but 104 is not known yet.
    series = [100.0, 101.0, 102.0, 101.8, 101.7, 101.6, 103.0, 104.0, 103.8, 103.4, 103.4,
              103.6, 103.0]
    codes = _codes([series], [0], [LONG], [100.0])[:, 0]
    assert codes.tolist() == _expected(len(series), {10: PEAK, 12: PEAK})
    peak, _ = confirmed_extremes(np.array(series)[:, None], np.zeros(1, dtype=int), 3, 0.002)
    np.testing.assert_array_equal(peak[:, 0], [NAN] * 5 + [102.0] * 5 + [104.0] * 3)


def test_lower_later_peak_keeps_the_highest() -> None:
    # peak 104 at bar 2 (known at 5), lower peak 103.5 at bar 7 (known at 10): level stays 104
    series = [100.0, 102.0, 104.0, 103.9, 103.8, 103.7, 103.0, 103.5, 103.2, 103.1, 103.3,
              103.4]
    peak, _ = confirmed_extremes(np.array(series)[:, None], np.zeros(1, dtype=int), 3, 0.002)
    np.testing.assert_array_equal(peak[:, 0], [NAN] * 5 + [104.0] * 7)
    codes = _codes([series], [0], [LONG], [100.0])[:, 0]  # exit level 104 x 0.995 = 103.48
    assert codes.tolist() == _expected(12, {6: PEAK, 8: PEAK, 9: PEAK, 10: PEAK, 11: PEAK})


def test_peak_before_entry_does_not_count() -> None:
    # 103 at bar 3 is a peak of the series, but the position enters at bar 4
    series = [100.0, 101.0, 102.0, 103.0, 102.4, 102.3, 102.2, 102.0, 102.1]
    codes = _codes([series], [4], [LONG], [102.4])[:, 0]
    assert codes.tolist() == [HOLD] * 9
    peak, _ = confirmed_extremes(np.array(series)[:, None], np.array([4]), 3, 0.002)
    assert np.isnan(peak).all()


# --- ML exit --------------------------------------------------------------------------------
def test_ml_exit_with_a_score_per_bar() -> None:
    flat = [100.0] * 6
    ml = np.array([[0.1, 0.9], [0.69, 0.9], [0.7, 0.9], [0.71, 0.2], [NAN, NAN],
                   [0.9, 1.0]])
    codes = _codes([flat, flat], [0, 2], [LONG, SHORT], [100.0, 100.0], ml=ml)
    assert codes[:, 0].tolist() == _expected(6, {2: ML_EXIT, 3: ML_EXIT, 5: ML_EXIT})
    assert codes[:, 1].tolist() == _expected(6, {2: ML_EXIT, 5: ML_EXIT})  # entry at bar 2
    assert (_codes([flat, flat], [0, 2], [LONG, SHORT], [100.0, 100.0]) == HOLD).all()


def test_ml_exit_with_a_last_bar_score() -> None:
    flat = [100.0] * 5
    ml = np.array([0.8, 0.5, NAN])
    args = ([flat] * 3, [0, 0, 4], [LONG, SHORT, LONG], [100.0] * 3)
    codes = _codes(*args, ml=ml)
    assert (codes[:4] == HOLD).all()  # a [S] score is the last bar's only
    assert codes[4].tolist() == [ML_EXIT, HOLD, HOLD]
    assert _codes(*args, ml=ml, last_only=True).tolist() == [ML_EXIT, HOLD, HOLD]


@pytest.mark.parametrize("score, fires", [
    (0.7, True), (float(np.nextafter(0.7, 0.0)), False), (float(np.nextafter(0.7, 1.0)), True),
    (0.0, False), (1.0, True)])
def test_ml_exit_threshold_is_inclusive(score: float, fires: bool) -> None:
    codes = _codes([[100.0, 100.0]], [0], [LONG], [100.0], ml=np.array([score]),
                   last_only=True)
    assert codes.tolist() == [ML_EXIT if fires else HOLD]


# --- stop-loss, take-profit, max-hold -------------------------------------------------------
def test_stop_loss_both_sides_at_the_exact_price() -> None:
    long_ = [100.0, 99.5, 99.01, 99.0, 98.0, 99.5]   # stop 100 x 0.99 = 99
    short = [100.0, 100.5, 100.99, 101.0, 102.0, 100.5]  # stop 100 x 1.01 = 101
    codes = _codes([long_, short], [0, 0], [LONG, SHORT], [100.0, 100.0])
    assert codes[:, 0].tolist() == _expected(6, {3: STOP_LOSS, 4: STOP_LOSS})
    assert codes[:, 1].tolist() == _expected(6, {3: STOP_LOSS, 4: STOP_LOSS})


def test_take_profit_both_sides_and_off_when_zero() -> None:
    long_ = [100.0, 101.0, 101.99, 102.0, 103.0, 101.5]  # target 100 x 1.02 = 102
    short = [100.0, 99.0, 98.01, 98.0, 97.0, 98.5]  # target 100 x 0.98 = 98
    args = ([long_, short], [0, 0], [LONG, SHORT], [100.0, 100.0])
    codes = _codes(*args, params=ExitParams(take_profit_pct=0.02))
    assert codes[:, 0].tolist() == _expected(6, {3: TAKE_PROFIT, 4: TAKE_PROFIT})
    assert codes[:, 1].tolist() == _expected(6, {3: TAKE_PROFIT, 4: TAKE_PROFIT})
    assert (_codes(*args, params=ExitParams(take_profit_pct=0.0)) == HOLD).all()


def test_max_hold_counts_held_bars_including_the_entry_bar() -> None:
    flat = [100.0] * 8
    args = ([flat, flat], [2, 0], [LONG, SHORT], [100.0, 100.0])
    codes = _codes(*args, params=ExitParams(max_holding_bars=3))
    # held t - entry + 1 bars at the close of t: 3 at bar 4 (entry 2) and at bar 2 (entry 0)
    assert codes[:, 0].tolist() == [HOLD] * 4 + [MAX_HOLD] * 4
    assert codes[:, 1].tolist() == [HOLD] * 2 + [MAX_HOLD] * 6
    assert (_codes(*args, params=ExitParams(max_holding_bars=0)) == HOLD).all()
    one = _codes(*args, params=ExitParams(max_holding_bars=1))  # fires on the entry bar
    assert one[:, 0].tolist() == [HOLD] * 2 + [MAX_HOLD] * 6


# --- precedence -----------------------------------------------------------------------------
# Long entered at bar 0 at 100, peak 103 at bar 3 (known at 6); bar 6 closes at ``last``.
_RISE = [100.0, 101.0, 102.0, 103.0, 102.9, 102.8]
_ALL = ExitParams(take_profit_pct=0.05, max_holding_bars=7)  # max-hold fires at bar 6


@pytest.mark.parametrize("last, direction, params, ml, want", [
    (98.0, LONG, _ALL, 0.9, PEAK),  # peak + ML + stop + max-hold
    (98.0, LONG, ExitParams(peak_prominence_pct=0.5, take_profit_pct=0.05,
                            max_holding_bars=7), 0.9, ML_EXIT),  # ML + stop + max-hold
    (98.0, LONG, ExitParams(peak_prominence_pct=0.5, take_profit_pct=0.05,
                            max_holding_bars=7), 0.1, STOP_LOSS),  # stop + max-hold
    (110.0, LONG, _ALL, 0.1, TAKE_PROFIT),  # take-profit + max-hold
    (102.8, LONG, _ALL, NAN, MAX_HOLD),  # max-hold alone
    (102.0, LONG, _ALL, 0.9, PEAK),  # peak + ML + max-hold, above the stop
])
def test_precedence_follows_reasons_order(last: float, direction: int, params: ExitParams,
                                          ml: float, want: int) -> None:
    series = [*_RISE, last]
    codes = _codes([series], [0], [direction], [100.0], params, ml=np.array([ml]))
    assert codes[:6, 0].tolist() == [HOLD] * 6
    assert codes[6, 0] == want
    assert _codes([series], [0], [direction], [100.0], params, ml=np.array([ml]),
                  last_only=True).tolist() == [want]


def test_precedence_peak_before_take_profit() -> None:
    # peak 110 at bar 3 (known at 6); 105 at bar 6 is both 0.5 % below it and +5 % on entry
    series = [100.0, 104.0, 108.0, 110.0, 109.8, 109.7, 105.0]
    codes = _codes([series], [0], [LONG], [100.0], ExitParams(take_profit_pct=0.05))
    assert codes[:, 0].tolist() == _expected(7, {2: TAKE_PROFIT, 3: TAKE_PROFIT,
                                                 4: TAKE_PROFIT, 5: TAKE_PROFIT, 6: PEAK})


def test_precedence_short_trough_first() -> None:
    series = [200.0 - c for c in _RISE] + [102.0]  # trough 97, stop 101, max-hold at bar 6
    codes = _codes([series], [0], [SHORT], [100.0], _ALL, ml=np.array([0.95]))
    assert codes[:, 0].tolist() == _expected(7, {6: TROUGH})
    no_trough = ExitParams(peak_prominence_pct=0.5, max_holding_bars=7)
    assert _codes([series], [0], [SHORT], [100.0], no_trough, ml=np.array([0.95]))[6, 0] == \
        ML_EXIT
    assert _codes([series], [0], [SHORT], [100.0], no_trough)[6, 0] == STOP_LOSS


# --- holds: before entry, missing and zero closes, all-NaN symbols --------------------------
def test_bars_before_entry_and_missing_or_zero_closes_hold() -> None:
    series = [90.0, 90.0, 100.0, NAN, 0.0, 90.0, -1.0, 90.0]
    ml = np.full((8, 1), 0.99)
    codes = _codes([series], [2], [LONG], [100.0], ExitParams(max_holding_bars=1), ml=ml)
    assert codes[:, 0].tolist() == [HOLD, HOLD, ML_EXIT, HOLD, HOLD, ML_EXIT, HOLD, ML_EXIT]
    codes = _codes([series], [2], [LONG], [100.0])  # stop at 99 from the entry on
    assert codes[:, 0].tolist() == _expected(8, {5: STOP_LOSS, 7: STOP_LOSS})


def test_all_nan_symbol_never_exits_and_never_warns() -> None:
    live = [100.0, 101.0, 102.0, 103.0, 102.0, 98.0]
    dead = [NAN] * 6
    params = ExitParams(take_profit_pct=0.01, max_holding_bars=1)
    ml = np.full((6, 3), 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = _codes([dead, live, dead], [0, 0, 3], [LONG, SHORT, SHORT], [100.0] * 3,
                       params, ml=ml)
        last = _codes([dead, live, dead], [0, 0, 3], [LONG, SHORT, SHORT], [100.0] * 3,
                      params, ml=ml, last_only=True)
        only_dead = _codes([dead, dead], [0, 0], [LONG, SHORT], [100.0, 100.0], params,
                           ml=ml[:, :2])
        peak, trough = confirmed_extremes(np.full((6, 2), NAN), np.array([0, 2]), 3, 0.002)
    assert (codes[:, [0, 2]] == HOLD).all() and (codes[:, 1] != HOLD).all()
    assert last.tolist() == [HOLD, codes[-1, 1], HOLD]
    assert (only_dead == HOLD).all()
    assert np.isnan(peak).all() and np.isnan(trough).all()


def test_empty_and_short_inputs() -> None:
    empty = exit_codes(np.empty((5, 0)), np.empty(0, dtype=int), np.empty(0, dtype=int),
                       np.empty(0), P)
    assert empty.shape == (5, 0)
    one_bar = _codes([[95.0]], [0], [LONG], [100.0])  # fewer bars than the peak distance
    assert one_bar.tolist() == [[STOP_LOSS]]
    assert _codes([[95.0]], [0], [LONG], [100.0], last_only=True).tolist() == [STOP_LOSS]


# --- prominence ignores pre-entry and missing bars ------------------------------------------
_SHALLOW = [100.0, 100.1, 100.15, 100.0, 99.99, 99.6, 99.6, 99.6, 99.6]  # holds alone


def test_prominence_does_not_depend_on_other_held_symbols() -> None:
    assert (_codes([_SHALLOW], [0], [LONG], [100.0]) == HOLD).all()
    padded = [100.0] * 5 + _SHALLOW
    codes = _codes([padded, padded], [0, 5], [LONG, LONG], [100.0, 100.0])
    assert (codes[:, 1] == HOLD).all()


def test_prominence_survives_a_missing_bar() -> None:
    gapped = [100.0, NAN, *_SHALLOW[1:]]
    assert (_codes([gapped], [0], [LONG], [100.0]) == HOLD).all()


# --- properties -----------------------------------------------------------------------------
@st.composite
def _inputs(draw: st.DrawFn) -> tuple:
    n_bars = draw(st.integers(1, 30))
    n_sym = draw(st.integers(1, 5))
    steps = draw(hnp.arrays(float, (n_bars, n_sym),
                            elements=st.floats(-0.01, 0.01, allow_nan=False)))
    close = 100.0 * np.exp(np.cumsum(steps, axis=0))
    gaps = draw(hnp.arrays(bool, (n_bars, n_sym), elements=st.booleans()))
    if draw(st.booleans()):
        close[gaps] = NAN
    entry = draw(hnp.arrays(np.int64, n_sym, elements=st.integers(0, n_bars + 1)))
    direction = draw(hnp.arrays(np.int64, n_sym, elements=st.sampled_from([1, -1])))
    price = draw(hnp.arrays(float, n_sym, elements=st.floats(95.0, 105.0)))
    params = ExitParams(
        stop_loss_pct=draw(st.floats(0.001, 0.05)),
        peak_drop_pct=draw(st.floats(0.0005, 0.02)),
        peak_distance_bars=draw(st.integers(1, 6)),
        peak_prominence_pct=draw(st.floats(0.0, 0.01)),
        ml_exit_threshold=draw(st.floats(0.0, 1.0)),
        take_profit_pct=draw(st.sampled_from([0.0, 0.005, 0.02])),
        max_holding_bars=draw(st.integers(0, 10)),
    )
    ml_kind = draw(st.sampled_from(["none", "series", "last"]))
    ml = None
    if ml_kind != "none":
        shape = (n_bars, n_sym) if ml_kind == "series" else (n_sym,)
        ml = draw(hnp.arrays(float, shape, elements=st.floats(0.0, 1.0) | st.just(NAN)))
    return close, entry, direction, price, params, ml


@settings(max_examples=300, deadline=None)
@given(_inputs())
def test_last_only_equals_the_last_row_of_the_series(args: tuple) -> None:
    close, entry, direction, price, params, ml = args
    series = exit_codes(close, entry, direction, price, params, ml)
    last = exit_codes(close, entry, direction, price, params, ml, last_only=True)
    assert series.shape == close.shape and last.shape == close.shape[1:]
    np.testing.assert_array_equal(last, series[-1])
    d, prom = params.peak_distance_bars, params.peak_prominence_pct
    full = confirmed_extremes(close, entry, d, prom)
    tail = confirmed_extremes(close, entry, d, prom, last_only=True)
    for got, want in zip(tail, full, strict=True):
        np.testing.assert_array_equal(got, want[-1])


@settings(max_examples=150, deadline=None)
@given(_inputs())
def test_series_row_t_equals_the_prefix_up_to_t(args: tuple) -> None:
    close, entry, direction, price, params, ml = args
    if ml is not None and ml.ndim == 1:
        ml = None  # a [S] score belongs to the last bar of the call only
    series = exit_codes(close, entry, direction, price, params, ml)
    for t in range(close.shape[0]):
        sub_ml = None if ml is None else ml[: t + 1]
        prefix = exit_codes(close[: t + 1], entry, direction, price, params, sub_ml)
        np.testing.assert_array_equal(prefix, series[: t + 1])


@settings(max_examples=150, deadline=None)
@given(_inputs())
def test_columns_are_independent_of_each_other(args: tuple) -> None:
    # whatever the other held symbols, their entry bars and their gaps
    close, entry, direction, price, params, ml = args
    codes = exit_codes(close, entry, direction, price, params, ml)
    for s in range(close.shape[1]):
        sub_ml = None if ml is None else ml[..., s:s + 1]
        alone = exit_codes(close[:, s:s + 1], entry[s:s + 1], direction[s:s + 1],
                           price[s:s + 1], params, sub_ml)
        np.testing.assert_array_equal(alone[:, 0], codes[:, s])


# numpy seen through another module object: exit_codes takes its generic (cupy) code path,
# e.g. the doubling scan in _cum instead of numpy's row loop / accumulate
_NOT_NUMPY = types.ModuleType("numpy_as_another_module")
_NOT_NUMPY.__getattr__ = lambda name: getattr(np, name)  # type: ignore[method-assign]


@settings(max_examples=150, deadline=None)
@given(_inputs(), st.integers(0, 70))
def test_generic_array_module_path_matches_numpy(args: tuple, extra_symbols: int) -> None:
    close, entry, direction, price, params, ml = args
    if extra_symbols:  # >= 64 columns switches numpy's running max to the row loop
        reps = 1 + extra_symbols // close.shape[1]
        close, entry, direction, price = (np.tile(close, (1, reps)), np.tile(entry, reps),
                                          np.tile(direction, reps), np.tile(price, reps))
        ml = None if ml is None else np.tile(ml, (1, reps) if ml.ndim == 2 else reps)
    for last_only in (False, True):
        want = exit_codes(close, entry, direction, price, params, ml, last_only=last_only)
        got = exit_codes(close, entry, direction, price, params, ml, xp=_NOT_NUMPY,
                         last_only=last_only)
        np.testing.assert_array_equal(got, want)


# --- the incremental tracker equals the full computation ----------------------------------------
@settings(max_examples=120, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(2, 40), st.integers(1, 6))
def test_tracker_matches_full_recompute_tick_by_tick(seed: int, distance: int, n_bars: int,
                                                     n_sym: int) -> None:
    from core.exits import ExtremeTracker, confirmed_extremes

    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 0.3, (n_bars, n_sym)), axis=0)
    close[rng.random(close.shape) < 0.1] = np.nan
    entry = rng.integers(0, n_bars, n_sym)
    direction = np.where(rng.random(n_sym) < 0.5, 1, -1)
    keys = [f"k{j}-{entry[j]}" for j in range(n_sym)]
    tracker = ExtremeTracker()
    for t in range(n_bars):
        held = [j for j in range(n_sym) if entry[j] <= t and rng.random() < 0.9]  # gaps too
        if not held:
            continue
        cols = np.array(held)
        got = tracker.levels(close[: t + 1][:, cols], [keys[j] for j in held], entry[cols],
                             direction[cols], distance, 0.002)
        peak, trough = confirmed_extremes(close[: t + 1][:, cols], entry[cols], distance,
                                          0.002, last_only=True)
        want = np.where(direction[cols] > 0, peak, trough)
        np.testing.assert_array_equal(got, want)
