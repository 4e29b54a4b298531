"""Tests for core.market.synthetic: determinism and the realism properties it promises."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from core.calendar import NY, sessions_between
from core.errors import ConfigError
from core.market.synthetic import generate_days
from core.models import CLOSE, HIGH, LOW, OPEN, VOLUME

DAY = dt.date(2019, 2, 11)
DATES = sessions_between(dt.date(2019, 2, 1), dt.date(2019, 3, 15))  # 29 sessions


@pytest.fixture(scope="module")
def panel() -> np.ndarray:
    """[D, T, S, 5] for 120 symbols over 29 full sessions."""
    days = generate_days(DATES, 120, seed=11)
    assert all(d.n_bars == 390 for d in days)
    return np.stack([d.ohlcv for d in days])


def test_same_seed_same_arrays_other_seed_differs() -> None:
    a = generate_days(DATES[:3], 20, seed=5)
    b = generate_days(DATES[:3], 20, seed=5)
    c = generate_days(DATES[:3], 20, seed=6)
    for x, y, z in zip(a, b, c, strict=True):
        assert x.date == y.date == z.date
        np.testing.assert_array_equal(x.ohlcv, y.ohlcv)
        assert not np.array_equal(x.ohlcv, z.ohlcv)


def test_adding_symbols_leaves_existing_ones_unchanged() -> None:
    small = generate_days(DATES[:2], ["AAA", "BBB"], seed=3)
    large = generate_days(DATES[:2], ["CCC", "BBB", "AAA", "DDD"], seed=3)
    for s, big in zip(small, large, strict=True):
        np.testing.assert_array_equal(s.ohlcv[:, 0], big.ohlcv[:, 2])
        np.testing.assert_array_equal(s.ohlcv[:, 1], big.ohlcv[:, 1])


def test_integer_symbols_make_tickers_and_day_metadata() -> None:
    (day,) = generate_days([DAY], 3)
    assert day.symbols == ("SYN000", "SYN001", "SYN002")
    assert day.date == DAY and day.bar_seconds == 60
    assert day.open_time == dt.datetime(2019, 2, 11, 9, 30, tzinfo=NY)
    assert day.close_time == dt.datetime(2019, 2, 11, 16, 0, tzinfo=NY)
    assert day.ohlcv.shape == (390, 3, 5)


def test_dates_are_sorted_and_deduplicated() -> None:
    days = generate_days([DATES[2], DATES[0], DATES[2]], 2)
    assert [d.date for d in days] == [DATES[0], DATES[2]]


def test_early_close_day_is_shorter() -> None:
    (day,) = generate_days([dt.date(2015, 12, 24)], 4)
    assert day.n_bars == 210 and day.ohlcv.shape == (210, 4, 5)
    assert day.close_time == dt.datetime(2015, 12, 24, 13, 0, tzinfo=NY)
    assert not np.isnan(day.ohlcv).any()


def test_other_bar_sizes() -> None:
    (day,) = generate_days([DAY], 2, bar_seconds=300)
    assert day.bar_seconds == 300 and day.ohlcv.shape == (78, 2, 5)


def test_non_session_date_is_refused() -> None:
    with pytest.raises(ConfigError):
        generate_days([dt.date(2019, 2, 16)], 2)  # a Saturday


def test_ohlc_valid_rounded_and_dense(panel: np.ndarray) -> None:
    o, h, lo, c, v = (panel[..., f] for f in (OPEN, HIGH, LOW, CLOSE, VOLUME))
    assert not np.isnan(panel).any()
    assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all()
    assert (lo > 0).all()
    prices = panel[..., :4]
    np.testing.assert_allclose(prices, np.round(prices, 2), rtol=0, atol=1e-9)
    assert (v >= 1).all() and (v == np.round(v)).all()
    first_open = o[0, 0, :]
    assert (first_open >= 10).all() and (first_open <= 500).all()
    assert first_open.max() / first_open.min() > 5  # base prices spread over the range


def test_u_shaped_volume(panel: np.ndarray) -> None:
    v = panel[..., VOLUME]
    per_minute = (v / v.mean(axis=1, keepdims=True)).mean(axis=(0, 2))  # [T], level-free
    midday = per_minute[150:240].mean()
    assert per_minute[:30].mean() > 1.8 * midday
    assert per_minute[-30:].mean() > 1.5 * midday
    # and per symbol-day, not only on average
    sym_day = v[:, :30].mean(axis=1) > v[:, 150:240].mean(axis=1)
    assert sym_day.mean() > 0.95


def test_volatility_clustering(panel: np.ndarray) -> None:
    r = np.abs(np.diff(np.log(panel[..., CLOSE]), axis=1))  # [D, T-1, S], within days
    r = r / r.mean(axis=(0, 2), keepdims=True)  # remove the intraday volatility profile
    lag1 = []
    for s in range(r.shape[2]):
        x = r[:, 1:, s].ravel()
        y = r[:, :-1, s].ravel()
        lag1.append(np.corrcoef(x, y)[0, 1])
    lag1 = np.array(lag1)
    assert lag1.mean() > 0.05
    assert (lag1 > 0).mean() > 0.9


def test_prices_carry_over_with_overnight_gaps(panel: np.ndarray) -> None:
    gap = panel[1:, 0, :, OPEN] / panel[:-1, -1, :, CLOSE] - 1.0  # [D-1, S]
    assert np.median(np.abs(gap)) < 0.01  # usually the prior close, give or take
    big = np.abs(gap) > 0.02
    assert 0.01 < big.mean() < 0.2  # some 2 %+ gaps, not every day
    assert (np.abs(gap) < 0.15).all()
    assert (gap[big] > 0).any() and (gap[big] < 0).any()


def test_opening_range_breakouts_on_some_symbol_days(panel: np.ndarray) -> None:
    h, lo = panel[..., HIGH], panel[..., LOW]
    or_high, or_low = h[:, :15].max(axis=1), lo[:, :15].min(axis=1)
    up = h[:, 15:].max(axis=1) > or_high
    down = lo[:, 15:].min(axis=1) < or_low
    assert 0.4 < up.mean() < 0.95
    assert 0.4 < down.mean() < 0.95
    assert 0.2 < (up & down).mean() < 0.8  # choppy days break both sides
    assert (~up & ~down).any() or (up ^ down).mean() > 0.2  # and not every day is the same


def test_some_days_trend_and_some_revert(panel: np.ndarray) -> None:
    o = panel[:, 0, :, OPEN]
    c = panel[:, -1, :, CLOSE]
    day_range = panel[..., HIGH].max(axis=1) - panel[..., LOW].min(axis=1)
    efficiency = np.abs(c - o) / day_range  # 1: closes at an extreme, 0: back where it opened
    assert (efficiency > 0.7).mean() > 0.05  # trend days
    assert (efficiency < 0.1).mean() > 0.05  # reverting days
    # a trend day's move is large against the bar-to-bar noise: strong trends exist
    noise = np.std(np.diff(np.log(panel[..., CLOSE]), axis=1), axis=1) * np.sqrt(389)
    assert (np.abs(np.log(c / o)) > 1.5 * noise).mean() > 0.03


def test_missing_bars_are_nan_and_leave_the_rest_unchanged() -> None:
    dense = generate_days(DATES[:2], 50, seed=9)
    gappy = generate_days(DATES[:2], 50, seed=9, missing_prob=0.1)
    for d, g in zip(dense, gappy, strict=True):
        holes = np.isnan(g.ohlcv[..., CLOSE])
        assert 0.05 < holes.mean() < 0.15
        assert np.isnan(g.ohlcv[holes]).all()  # all five fields
        np.testing.assert_array_equal(g.ohlcv[~holes], d.ohlcv[~holes])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_days([DAY], 0)
    with pytest.raises(ValueError):
        generate_days([DAY], ["A", "A"])
    with pytest.raises(ValueError):
        generate_days([DAY], 2, missing_prob=1.0)
    assert generate_days([], 3) == []
