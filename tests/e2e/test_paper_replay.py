"""Paper mode end to end against a local Alpaca-speaking server: a replayed day (the replay
clock, TRADING_CLOCK=replay) decided by the engine's own steps, orders sent through the real
alpaca-py to the local server, flat before the close."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from core import engine, execution
from core.backtest import InlineDispatcher
from core.config import Settings
from core.decision import in_eod_window
from core.market.synthetic import generate_days
from core.runtime import build_runtime
from core.sim import prepare_replay
from tests.fakes.alpaca_server import FakeAlpaca, ReplayPrices

pytestmark = pytest.mark.e2e


def test_a_replayed_day_in_paper_mode_against_a_local_alpaca(redis_client, redis_url) -> None:
    # the 13:00 early close of 2025-11-28: 210 bars, and the EOD window before 13:00
    days = generate_days([dt.date(2025, 11, 28)], 12, seed=4)
    with FakeAlpaca(key="PKTESTKEY", secret="test-secret", stream=False) as fake:
        settings = Settings(mode="paper", clock="replay", redis_url=redis_url,
                            alpaca_api_key="PKTESTKEY", alpaca_secret_key="test-secret",
                            alpaca_base_url=fake.base_url, model_dir="/nonexistent",
                            broker_timeout_s=5.0, alpaca_rate_per_minute=10000,
                            alpaca_rate_burst=1000)  # a replay runs far faster than 1x
        rt = build_runtime(settings)
        assert type(rt.broker).__name__ == "AlpacaBroker" and rt.keys.prefix == ""
        # the server's clock and prices follow the replay: market and marketable limit
        # orders fill at the close of the bar being decided
        prices = ReplayPrices(rt.replay)
        fake.now, fake.price_source = prices.now, prices
        prepare_replay(rt, settings, days)
        dispatcher = InlineDispatcher(rt)
        day = days[0]
        saw_positions = False
        while True:
            result = engine.tick(rt, dispatcher, now_wall=0.0)
            if result["status"] == "finished":
                break
            if result["status"] == "advanced":
                saw_positions = saw_positions or any(q for q, _ in fake.positions.values())
                decided = day.bar_time(int(result["bar"])) + dt.timedelta(minutes=1)
                if in_eod_window(decided, day.close_time, settings.eod_close_minutes_before):
                    execution.eod_close(rt)
        orders = list(fake.orders.values())
        ids = [o["client_order_id"] for o in orders]
        assert len(ids) == len(set(ids))  # exactly once per client_order_id
        entries = [o for o in orders if o["client_order_id"].endswith(("-L", "-S"))]
        exits = [o for o in orders if "-x" in o["client_order_id"]]
        assert entries and exits and saw_positions
        assert all(o["status"] in ("filled", "canceled", "expired", "rejected")
                   for o in orders)
        # flat before the close: every position closed, the last fill inside the EOD window
        assert not any(q for q, _ in fake.positions.values())
        last = max(dt.datetime.fromisoformat(o["filled_at"].replace("Z", "+00:00"))
                   for o in orders if o["filled_at"])
        assert last <= day.close_time
        # the daily limit held: filled entry value never above the limit
        value = sum(Decimal(o["filled_avg_price"]) * int(o["filled_qty"])
                    for o in entries if o["filled_avg_price"])
        assert value <= Decimal(settings.daily_limit_cents) / 100
        assert rt.broker.get_positions() == {}
        # the day's round trips read back from the orders, in the simulated broker's format
        trades = rt.broker.trades(day.date)
        assert len(trades) == len([o for o in exits if o["filled_qty"] != "0"])
        assert {t["client_order_id"] for t in trades} <= {o["client_order_id"] for o in entries}
        for t in trades:
            sign = 1 if t["side"] == "buy" else -1
            want = (Decimal(t["exit_price"]) - Decimal(t["entry_price"])) * t["qty"] * sign
            assert t["pnl_cents"] == round(want * 100) and t["fees_cents"] == 0
        # the reason each close carried comes back with Alpaca's orders (kept by id in Redis)
        reasons = {t["exit_reason"] for t in trades}
        assert reasons and reasons <= {"peak", "trough", "ml_exit", "stop_loss", "take_profit",
                                       "max_hold", "eod", "stale_position"}, reasons
        assert rt.broker.cash_cents() > 0
