"""ORB over the real development bars: it fires on some symbol-days and not on others."""

from __future__ import annotations

from core.market.files import load_days
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
