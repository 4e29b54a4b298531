"""``signal_candidates`` marks a superset of the bars where the rule strategies signal: the
backtester skips the unmarked bars, so a miss would change trades."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path

import numpy as np
import pytest

from core.calendar import next_sessions
from core.config import Settings
from core.market.synthetic import generate_days
from core.models import CLOSE, DayBars
from core.scoring import ScoringParams, score_bar
from core.signals.candidates import signal_candidates, symbol_candidates


def _check(days: list[DayBars], settings: Settings) -> tuple[int, int]:
    """(bars with a signal, candidate bars); fails on any signal outside the candidates."""
    fired = marked = 0
    for day in days:
        params = ScoringParams.from_settings(settings, day.bar_seconds)
        cand = signal_candidates(day.ohlcv, day.date, params)
        per_symbol = symbol_candidates(day.ohlcv, day.date, params)
        assert cand.shape == (day.n_bars,)
        assert per_symbol.shape == (day.n_bars, len(day.symbols))
        assert np.array_equal(cand, per_symbol.any(axis=1))
        index = {s: i for i, s in enumerate(day.symbols)}
        for t in range(day.n_bars):
            scored = score_bar(day.ohlcv[: t + 1], day.symbols, day.open_time,
                               day.bar_seconds, {}, params)
            marked += bool(cand[t])
            if scored.signals:
                fired += 1
                assert cand[t], (day.date, t, scored.signals[:3])
            for sig in scored.signals:
                assert per_symbol[t, index[sig.symbol]], (day.date, t, sig)
    return fired, marked


@pytest.mark.parametrize("seed", [3, 11])
@pytest.mark.parametrize("overrides", [
    {}, {"strategies": ("orb", "vwap", "random"), "random_entry_rate": 0.01},
    {"vwap_band_k": 1.0, "vwap_std_minutes": 10, "vwap_min_minutes": 5, "orb_minutes": 5,
     "orb_volume_ratio": 0.0},
])
def test_every_signal_falls_on_a_candidate_bar(seed: int, overrides: dict) -> None:
    days = generate_days(next_sessions(dt.date(2025, 11, 3), 2), [f"S{i}" for i in range(12)],
                         seed=seed)
    fired, marked = _check(days, Settings(**overrides))
    assert fired > 0
    assert marked < sum(d.n_bars for d in days)  # it does skip bars
    assert marked <= 1.5 * fired + 10  # and stays close to the signalling bars


def test_gaps_halts_and_five_minute_bars_keep_the_superset() -> None:
    days = generate_days(next_sessions(dt.date(2025, 11, 3), 1), [f"S{i}" for i in range(8)],
                         seed=5)
    day = days[0]
    ohlcv = day.ohlcv.copy()
    ohlcv[40:60, 2] = np.nan  # a halt
    ohlcv[100, :, CLOSE] = np.nan  # a bar missing everywhere
    ohlcv[150:152, 5, 4] = 0.0  # no volume
    gappy = DayBars(date=day.date, symbols=day.symbols, open_time=day.open_time,
                    close_time=day.close_time, bar_seconds=day.bar_seconds, ohlcv=ohlcv)
    five = ohlcv[: (day.n_bars // 5) * 5].reshape(day.n_bars // 5, 5, len(day.symbols), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN bar stays NaN
        agg = np.stack([five[:, 0, :, 0], np.nanmax(five[:, :, :, 1], axis=1),
                        np.nanmin(five[:, :, :, 2], axis=1), five[:, -1, :, 3],
                        np.nansum(five[:, :, :, 4], axis=1)], axis=-1)
    five_min = DayBars(date=day.date, symbols=day.symbols, open_time=day.open_time,
                       close_time=day.close_time, bar_seconds=300, ohlcv=agg)
    for d in (gappy, five_min):
        _check([d], Settings())


def test_real_bars_keep_the_superset(shared_bars: Path) -> None:
    from core.market.files import load_days

    days = load_days(shared_bars, None, None, None)[:3]
    fired, _ = _check(days, Settings())
    assert fired > 0


def test_an_unknown_strategy_marks_every_bar() -> None:
    days = generate_days([dt.date(2025, 11, 3)], ["A"], seed=1)
    params = ScoringParams(strategies=("orb", "someday"))  # type: ignore[arg-type]
    assert signal_candidates(days[0].ohlcv, days[0].date, params).all()
