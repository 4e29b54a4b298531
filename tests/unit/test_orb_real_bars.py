"""ORB and VWAP over the real development bars: each fires on some symbol-days and not on
others."""

from __future__ import annotations

import numpy as np

from core.market.files import load_days
from core.scoring import ScoringParams, score_bar
from core.signals.orb import OrbParams, orb_signals


def test_orb_fires_on_some_days_and_not_others(shared_bars, capsys) -> None:
    days = load_days(shared_bars)
    params = OrbParams(range_bars=15)
    fired: dict[tuple[str, str], set[str]] = {}
    symbol_days = 0
    for day in days:
        present = [i for i, _ in enumerate(day.symbols)
                   if (day.ohlcv[:, i, 3] == day.ohlcv[:, i, 3]).any()]
        symbol_days += len(present)
        for t in range(params.range_bars, day.n_bars):
            for sig in orb_signals(day.ohlcv[: t + 1], day.symbols, day.bar_time(t), params):
                fired.setdefault((day.date.isoformat(), sig.symbol), set()).add(sig.side)
    longs = sum(1 for sides in fired.values() if "buy" in sides)
    shorts = sum(1 for sides in fired.values() if "sell" in sides)
    with capsys.disabled():
        print(f"\nORB on real bars: {symbol_days} symbol-days, long fired on {longs}, "
              f"short on {shorts}, neither on {symbol_days - len(fired)}")
    assert 0 < longs < symbol_days
    assert 0 < shorts < symbol_days
    assert len(fired) < symbol_days  # some symbol-days never break out


def test_each_rule_fires_on_some_symbol_days_and_not_others(shared_bars, capsys) -> None:
    """ORB and VWAP, long and short, scored bar by bar with the default settings."""
    params = ScoringParams()
    rules = [("orb", "buy"), ("orb", "sell"), ("vwap", "buy"), ("vwap", "sell")]
    fired: dict[tuple[str, str], set[tuple[str, str]]] = {rule: set() for rule in rules}
    symbol_days: set[tuple[str, str]] = set()
    for day in load_days(shared_bars):
        window = np.ascontiguousarray(day.ohlcv.transpose(2, 0, 1)).transpose(1, 2, 0)
        date = day.date.isoformat()
        symbol_days |= {(date, s) for i, s in enumerate(day.symbols)
                        if np.isfinite(day.ohlcv[:, i, 3]).any()}
        for t in range(day.n_bars):
            scored = score_bar(window[: t + 1], day.symbols, day.open_time, day.bar_seconds,
                               {}, params)
            for sig in scored.signals:
                fired[(sig.source, sig.side)].add((date, sig.symbol))
    n = len(symbol_days)
    with capsys.disabled():
        print(f"\nRules on real bars (score_bar, default settings), {n} symbol-days:")
        for (source, side), where in fired.items():
            name = f"{source.upper()} {'long' if side == 'buy' else 'short'}"
            print(f"  {name:<10} fires on {len(where):>3}, never on {n - len(where):>3}")
    for rule, where in fired.items():
        assert where <= symbol_days, rule
        assert 0 < len(where) < n, rule
