"""Running sums of a session (core.signals.sums): kept from bar to bar, they give exactly what
a fresh computation over the whole window gives, whichever way the bars arrived."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.calendar import NY
from core.models import CLOSE, HIGH, LOW, VOLUME
from core.scoring import bar_facts, score_bar
from core.signals.orb import OrbParams, orb_signals
from core.signals.sums import SessionSums
from core.signals.vwap import VwapParams, session_vwap, vwap_signals
from tests.helpers import busy_scoring_params
from tests.helpers import random_walk_window as _walk

BAR_TIME = dt.datetime(2025, 3, 12, 10, 15, tzinfo=NY)
OPEN_TIME = dt.datetime(2025, 3, 12, 9, 30, tzinfo=NY)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@given(seed=st.integers(0, 10_000), steps=st.lists(st.integers(1, 25), min_size=1,
                                                  max_size=12))
@settings(max_examples=40, deadline=None)
def test_running_sums_equal_a_fresh_sum_bit_for_bit(seed: int, steps: list[int]) -> None:
    """Bars one at a time or in jumps (as the backtester scores some bars only): the VWAP
    and the volume totals are those of the whole window summed at once."""
    w = _walk(seed)
    running = SessionSums()
    t = 0
    for step in steps:
        t = min(t + step, w.shape[0])
        view = w[:t]
        running.update(view)
        fresh = SessionSums().update(view)
        assert _bits(running.vwap(0, t)) == _bits(fresh.vwap(0, t))
        for start, stop in ((0, t), (t // 2, t), (max(t - 1, 0), t)):
            if stop > start:
                got, want = running.volume_between(start, stop), fresh.volume_between(start,
                                                                                   stop)
                assert _bits(got[0]) == _bits(want[0]) and _bits(got[1]) == _bits(want[1])
    # and the running VWAP is the cumulative one, by definition
    with np.errstate(invalid="ignore", divide="ignore"):
        typical = (w[:t, :, HIGH] + w[:t, :, LOW] + w[:t, :, CLOSE]) / 3.0
        pv = np.fmax(typical * w[:t, :, VOLUME], 0.0)
        v = np.fmax(w[:t, :, VOLUME], 0.0) * (pv > 0)
        want = np.where(np.cumsum(v, 0) > 0, np.cumsum(pv, 0) / np.cumsum(v, 0), np.nan)
    np.testing.assert_array_equal(running.vwap(0, t), want)


def test_rules_with_running_sums_give_the_same_signals_as_without() -> None:
    w = _walk(3, n_bars=200, n_sym=8)
    symbols = tuple(f"S{i}" for i in range(8))
    vp = VwapParams(band_k=1.0, max_trend_pct=0.05, min_bars=10, std_bars=10)
    op = OrbParams(range_bars=5, volume_ratio=0.5)
    running = SessionSums()
    fired = 0
    for t in range(200):
        view = w[: t + 1]
        for fn, params in ((vwap_signals, vp), (orb_signals, op)):
            with_sums = fn(view, symbols, BAR_TIME, params, sums=running)
            assert with_sums == fn(view, symbols, BAR_TIME, params)
            fired += len(with_sums)
    assert fired > 20  # not vacuous: both rules fire on this walk


def test_other_data_or_another_buffer_starts_the_sums_again() -> None:
    a, b = _walk(1), _walk(2)
    sums = SessionSums()
    sums.update(a[:50])
    assert sums.n == 50
    # another buffer (another session or run) with the same shape: summed from scratch
    sums.update(b[:30])
    assert sums.n == 30
    assert _bits(sums.vwap(0, 30)) == _bits(session_vwap(b[:30]))
    # the same buffer with a bar changed behind our back: started again, not stale
    c = b.copy()
    sums.update(c[:40])
    c[39, :, CLOSE] += 1.0
    sums.update(c[:40])
    assert _bits(sums.vwap(0, 40)) == _bits(session_vwap(c[:40]))
    # a shorter window of the same data keeps the sums, and reads only its own bars
    sums.update(c[:20])
    assert sums.n == 40 and _bits(sums.vwap(0, 20)) == _bits(session_vwap(c[:20]))


def test_the_opening_range_is_kept_once_complete() -> None:
    w = _walk(4, holes=False)
    sums = SessionSums().update(w[:40])
    complete, hi, lo = sums.opening_range(w[:40], 15)
    assert complete.all()
    np.testing.assert_array_equal(hi, w[:15, :, HIGH].max(axis=0))
    np.testing.assert_array_equal(lo, w[:15, :, LOW].min(axis=0))
    assert sums.opening_range(w[:41], 15)[1] is hi  # computed once per session


def test_score_bar_with_facts_and_state_equals_plain_score_bar() -> None:
    w = _walk(9, n_bars=150, n_sym=10)
    symbols = tuple(f"S{i}" for i in range(10))
    params = busy_scoring_params()
    running = SessionSums()
    for t in (20, 21, 40, 90, 149):
        view = w[: t + 1]
        facts = bar_facts(view, symbols, params, sums=running)
        got = score_bar(view, symbols, OPEN_TIME, 60, {}, params, sums=running,
                        facts=facts)
        assert got == score_bar(view, symbols, OPEN_TIME, 60, {}, params)


@pytest.mark.parametrize("n_new", [1, 3])
def test_update_adds_only_new_bars(n_new: int) -> None:
    w = _walk(5)
    sums = SessionSums().update(w[:60])
    before = sums.vwap(0, 60).copy()
    sums.update(w[: 60 + n_new])
    assert sums.n == 60 + n_new
    assert _bits(sums.vwap(0, 60)) == _bits(before)
