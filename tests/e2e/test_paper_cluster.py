"""Paper mode through the real cluster against a local Alpaca-speaking server: a replayed day
(TRADING_CLOCK=replay) driven by real ``celery`` processes (a gpu worker ``-Q gpu -c 1``, an
exec worker and beat), every order sent by the workers through the real alpaca-py to the
local server, whose clock and prices follow the replay; flat before the close."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.brokers.alpaca_mapping import ENTRY_ID, EXIT_ID
from core.cluster import Cluster
from core.config import Settings
from core.decision import in_eod_window
from core.market.synthetic import generate_days
from core.runtime import build_runtime
from core.sim import prepare_replay
from tests.fakes.alpaca_server import FakeAlpaca, ReplayPrices

pytestmark = pytest.mark.e2e

KEY, SECRET = "PKTESTKEY", "test-secret"
# every reason the decision step gives an exit (core.exits, core.decision, core.execution)
REASONS = {"peak", "trough", "ml_exit", "stop_loss", "take_profit", "max_hold", "eod",
           "stale_position", "flatten"}
FINISH_TIMEOUT_S = 150.0


def _paper_settings(redis_url: str, base_url: str, model_dir: Path) -> dict[str, str]:
    """The TRADING_* settings of every process: paper mode on the replay clock, Alpaca at the
    local server, a rate limit a replay faster than real time does not trip, no model."""
    return {
        "TRADING_MODE": "paper", "TRADING_CLOCK": "replay", "TRADING_REDIS_URL": redis_url,
        "TRADING_ALPACA_API_KEY": KEY, "TRADING_ALPACA_SECRET_KEY": SECRET,
        "TRADING_ALPACA_BASE_URL": base_url, "TRADING_MODEL_DIR": str(model_dir),
        "TRADING_BROKER_TIMEOUT_S": "5", "TRADING_ALPACA_RATE_PER_MINUTE": "10000",
        "TRADING_ALPACA_RATE_BURST": "1000",
        "TRADING_SIM_SPEED": "3000",  # beat ticks every 0.02 s; a bar waits for settlement
    }


def _logs(log_dir: Path, chars: int = 4000) -> str:
    """The tail of each process's log, for a failure message."""
    out = []
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace")
        out.append(f"--- {path.name} (last {chars} chars) ---\n{text[-chars:]}")
    return "\n".join(out) or "(no logs)"


def _wait_finished(rt: Any, cluster: Cluster, log_dir: Path, timeout: float) -> None:
    """Poll the replay state until the day is finished; fail with the logs when a process
    dies or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = rt.replay.state()
        if st.finished:
            return
        dead = cluster.dead()
        if dead:
            raise AssertionError(f"{dead} exited during the day\n{_logs(log_dir)}")
        time.sleep(0.2)
    st = rt.replay.state()
    raise AssertionError(f"the replayed day did not finish in {timeout:g} s (bar {st.bar}, "
                         f"settled {st.settled}, status {st.status})\n{_logs(log_dir)}")


def _ts(raw: str | None) -> dt.datetime:
    assert raw, "a timestamp is missing"
    return dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))


def _fills_leaving_a_position(fake: FakeAlpaca) -> int:
    """How many fills left a position open at the server (from its trade updates)."""
    with fake.lock:
        return sum(1 for e in fake.events if e["data"]["event"] in ("fill", "partial_fill")
                   and int(e["data"]["position_qty"]) != 0)


def test_a_replayed_day_in_paper_mode_through_the_cluster(redis_client, redis_url,
                                                          tmp_path) -> None:
    # the 13:00 early close of 2025-11-28: 210 bars, the EOD window from 12:50
    days = generate_days([dt.date(2025, 11, 28)], 8, seed=4)
    day = days[0]
    log_dir = tmp_path / "logs"
    with FakeAlpaca(key=KEY, secret=SECRET, stream=False) as fake:
        env_settings = _paper_settings(redis_url, fake.base_url, tmp_path / "no-models")
        settings = Settings(**{k.removeprefix("TRADING_").lower(): v
                               for k, v in env_settings.items()})
        rt = build_runtime(settings)  # this process only reads: replay state, Alpaca orders
        assert type(rt.broker).__name__ == "AlpacaBroker" and rt.keys.prefix == ""
        # the server's clock and prices follow the replay the workers drive: an order
        # decided at a bar fills at that bar's close, as in the inline paper test
        prices = ReplayPrices(rt.replay)
        fake.now, fake.price_source = prices.now, prices
        prepare_replay(rt, settings, days)

        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
        env.update(env_settings, PYTHONUNBUFFERED="1")
        cluster = Cluster(env=env, log_dir=log_dir)
        started = time.monotonic()
        try:
            cluster.start_workers(tag=uuid.uuid4().hex[:6])
            cluster.start_beat()
            _wait_finished(rt, cluster, log_dir, FINISH_TIMEOUT_S)
        finally:
            cluster.stop()
        elapsed = time.monotonic() - started

        orders = list(fake.orders.values())
        ids = [o["client_order_id"] for o in orders]
        entries = [o for o in orders if ENTRY_ID.match(o["client_order_id"])]
        exits = [o for o in orders if (m := EXIT_ID.match(o["client_order_id"]))
                 and ENTRY_ID.match(m.group(1))]
        context = f"after {elapsed:.0f} s; orders: {ids}\n{_logs(log_dir, 1500)}"
        # every order came from the workers through alpaca-py, exactly once per id
        assert orders, f"no order reached the server {context}"
        assert len(ids) == len(set(ids)), context
        assert len(entries) + len(exits) == len(orders), context  # all with our ids
        posted = fake.seen("POST", r"^/v2/orders$")
        assert sum(1 for r in posted if r.status == 200) == len(orders)
        # at least one entry filled and a position was open at the server during the day
        assert any(o["status"] == "filled" for o in entries), context
        assert _fills_leaving_a_position(fake) > 0, context
        assert all(o["status"] in ("filled", "canceled", "expired", "rejected")
                   for o in orders), context

        # flat at the server before the close, every exit sent and filled before it
        assert fake.positions == {}, context
        assert rt.broker.get_positions() == {}
        assert exits, context
        for o in exits:
            assert _ts(o["submitted_at"]) < day.close_time, o
            if o["filled_at"]:
                assert _ts(o["filled_at"]) < day.close_time, o
        # nothing filled after the first decision in the EOD window: flat from then on
        eod_start = day.close_time - dt.timedelta(minutes=settings.eod_close_minutes_before)
        assert max(_ts(o["filled_at"]) for o in orders if o["filled_at"]) <= eod_start
        stats = rt.replay.day_stats()
        assert len(stats) == 1 and stats[0]["open_positions_at_close"] == 0, stats
        assert stats[0]["close_time"] == day.close_time.isoformat()

        # the daily limit held: the used-capital peak the Lua script kept, and the value
        # actually filled at the server
        limit = settings.daily_limit_cents
        peak = int(redis_client.get(f"daily_used_capital:{day.date.isoformat()}:peak") or 0)
        assert 0 < peak <= limit and stats[0]["max_used_capital_cents"] <= limit, stats
        filled = sum(Decimal(o["filled_avg_price"]) * int(o["filled_qty"])
                     for o in entries if o["filled_avg_price"])
        assert 0 < filled * 100 <= limit

        # the day's round trips read back from Alpaca keep the reason each close carried
        trades = rt.broker.trades(day.date)
        assert len(trades) == len([o for o in exits if o["filled_qty"] != "0"]), context
        reasons = {str(t["exit_reason"]) for t in trades}
        assert reasons <= REASONS, reasons
        assert "eod" in reasons, reasons  # seed 4 leaves positions open into the window
        for t in trades:
            sent = _ts(fake.order(str(t["exit_client_order_id"]))["submitted_at"])
            if t["exit_reason"] == "eod":  # sent inside the EOD window, before the close
                assert in_eod_window(sent, day.close_time, settings.eod_close_minutes_before)
                assert eod_start <= sent < day.close_time
            else:  # rule exits are decided before the window (inside it every exit is eod)
                assert sent < eod_start, t
