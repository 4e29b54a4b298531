"""Paper mode on the exchange clock: the tick hands the feed's newest bar to the engine once
per bar, orders go through the real alpaca-py to a local Alpaca server, the end-of-day
window (by the wall clock) flattens. The feed is stood in for by appending bars to the bar
store as it does; the wall clock is a test clock."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from core import engine, execution
from core.backtest import InlineDispatcher
from core.config import Settings
from core.market.bar_store import SessionMeta
from core.market.synthetic import generate_days
from core.models import CLOSE
from core.runtime import build_runtime
from tests.fakes.alpaca_server import FakeAlpaca


class Recording(InlineDispatcher):
    def __init__(self, rt: Any, fake: FakeAlpaca, day: Any) -> None:
        super().__init__(rt)
        self.bars: list[int] = []
        self._fake = fake
        self._day = day

    def score(self, payload: dict[str, Any]) -> None:
        self.bars.append(int(payload["bar"]))
        row = self._day.ohlcv[int(payload["bar"]), :, CLOSE]
        for sym, px in zip(self._day.symbols, row, strict=True):
            if px == px and px > 0:
                self._fake.set_price(sym, f"{px:.2f}")
        super().score(payload)


def test_exchange_clock_ticks_once_per_published_bar_and_flattens(redis_client,
                                                                   redis_url) -> None:
    day = generate_days([dt.date(2025, 11, 28)], 10, seed=4)[0]  # 13:00 early close
    clock = {"now": day.open_time}
    with FakeAlpaca(key="PKTESTKEY", secret="test-secret", stream=False) as fake:
        settings = Settings(mode="paper", clock="exchange", redis_url=redis_url,
                            alpaca_api_key="PKTESTKEY", alpaca_secret_key="test-secret",
                            alpaca_base_url=fake.base_url, model_dir="/nonexistent",
                            alpaca_rate_per_minute=10000, alpaca_rate_burst=1000)
        rt = build_runtime(settings)
        assert rt.live_clock
        rt.now_fn = lambda: clock["now"]
        rt.broker._now = rt.now_fn
        fake.now = rt.now_fn
        assert engine.tick(rt, Recording(rt, fake, day))["status"] == "no_session"
        rt.bar_store.start_session(SessionMeta(date=day.date, symbols=day.symbols,
                                               open_time=day.open_time,
                                               close_time=day.close_time,
                                               bar_seconds=day.bar_seconds))
        dispatcher = Recording(rt, fake, day)
        assert engine.tick(rt, dispatcher)["status"] == "waiting"
        for bar in range(day.n_bars):
            rt.bar_store.append(day.date, bar, day.ohlcv[bar])  # what the feed does
            clock["now"] = day.bar_time(bar) + dt.timedelta(seconds=62)
            first = engine.tick(rt, dispatcher)
            assert first["status"] == "advanced" and first["bar"] == bar
            assert engine.tick(rt, dispatcher)["status"] == "duplicate"  # beat polls again
            execution.eod_close(rt)  # beat fires it too; it acts only in the window
        assert dispatcher.bars == list(range(day.n_bars))
        entries = [o for o in fake.orders.values() if o["client_order_id"].endswith(("-L", "-S"))]
        assert entries
        assert not any(q for q, _ in fake.positions.values())  # flat before 13:00
        closes = [dt.datetime.fromisoformat(o["filled_at"].replace("Z", "+00:00"))
                  for o in fake.orders.values() if "-x" in o["client_order_id"]
                  and o["filled_at"]]
        assert closes and max(closes) <= day.close_time
        meta, bar = rt.session_now()
        assert meta is not None and meta.date == day.date and bar == day.n_bars - 1
        assert np.isfinite(day.ohlcv[bar, :, CLOSE]).any()
