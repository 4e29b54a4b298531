"""The cluster survives its parts failing: Redis restarted mid-day, the exec worker down in
the EOD window. Real redis-server, worker and beat processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from redis import Redis

from core.cluster import Cluster, free_port, redis_answers, redis_server_binary
from core.money import cents
from tests.conftest import REPO
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: redis_answers(f"redis://127.0.0.1:{port}/0", 0.2), 10, "redis-server")
    return proc


def test_redis_restarted_mid_day(tmp_path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    env.update(TRADING_REDIS_URL=url)
    sim = subprocess.Popen(
        [str(BIN / "daytrader"), "sim", "--synthetic", "--synthetic-symbols", "30",
         "--speed", "1500", "--out", str(out), "--quiet", "--stall-timeout", "90"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Redis.from_url(url, socket_timeout=2)
    try:
        wait_for(lambda: list(client.scan_iter("sim:*:replay:state")), 60, "the run")
        run = next(client.scan_iter("sim:*:replay:state")).decode().split(":")[1]
        ns = f"sim:{run}:"
        wait_for(lambda: int(client.hget(ns + "replay:state", "bar")) >= 40, 90, "bar 40")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        time.sleep(1.0)  # the workers see the broker vanish
        server = start_redis(port, tmp_path)
        # the risk keys of the day are lost (the broker's account survives): rebuild them
        day = json.loads(json.loads(client.get(ns + "replay:days"))[0])["date"]
        client.delete(ns + f"daily_used_capital:{day}", ns + f"reservations:{day}",
                      ns + f"reconciled:{day}")
        output, _ = sim.communicate(timeout=240)
        assert sim.returncode == 0, output[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["completed"] and summary["open_positions_at_close"] == 0
        assert summary["max_daily_used_capital"] <= summary["daily_limit"]
        assert summary["duplicate_client_order_ids"] == 0
        orders = [json.loads(v) for v in client.hvals(ns + "broker:orders")]
        filled = sum(cents(Decimal(o["filled_avg_price"]) * o["filled_qty"])
                     for o in orders if o["intent"] == "entry" and o["status"] == "filled")
        # rebuilt from the broker after the loss: exactly the value of today's filled entries
        assert int(client.get(ns + f"daily_used_capital:{day}")) == filled
    finally:
        if sim.poll() is None:
            sim.send_signal(signal.SIGINT)
            sim.wait(60)
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize(("start", "close"), [("2025-11-24", "16:00"), ("2025-11-28", "13:00")])
def test_eod_flat_with_exec_worker_down_in_the_window(redis_client, redis_url, tmp_path,
                                                      start, close) -> None:
    run = f"eod-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    env.update(TRADING_REDIS_URL=redis_url, TRADING_SIM_RUN_ID=run, TRADING_SIM_SPEED="6000",
               TRADING_SIM_FROM=start, TRADING_SIM_SYNTHETIC_SYMBOLS="30",
               TRADING_NO_ENTRY_MINUTES_BEFORE_CLOSE="12")
    cluster = Cluster(env=env, log_dir=tmp_path / "logs")
    ns = f"sim:{run}:"
    try:
        cluster.start_workers(tag=run[-6:])
        cluster.start_beat()
        wait_for(lambda: redis_client.exists(ns + "replay:days"), 60, "the replay")
        meta = json.loads(json.loads(redis_client.get(ns + "replay:days"))[0])
        n_bars = int((datetime.fromisoformat(meta["close_time"]) -
                      datetime.fromisoformat(meta["open_time"])).total_seconds() // 60)
        window_start = n_bars - 10  # EOD_CLOSE_MINUTES_BEFORE = 10
        wait_for(lambda: int(redis_client.hget(ns + "replay:state", "bar")) >= window_start - 2,
                 120, "the bars before the EOD window")
        cluster.stop("worker-exec", timeout=0.1)  # SIGTERM then SIGKILL almost at once
        time.sleep(3.0)  # the exec side is down while the EOD window opens
        cluster.restart("worker-exec")
        wait_for(lambda: redis_client.hget(ns + "replay:state", "status") == b"finished",
                 120, "the day to finish")
    finally:
        cluster.stop()
    stats = [json.loads(x) for x in redis_client.lrange(ns + "replay:day_stats", 0, -1)]
    assert stats[0]["open_positions_at_close"] == 0
    assert stats[0]["close_time"].startswith(f"{start}T{close}")
    trades = [json.loads(x) for x in redis_client.lrange(ns + "broker:trades", 0, -1)]
    assert trades, "no trades: the scenario tested nothing"
    assert all(t["exit_time"] < stats[0]["close_time"] for t in trades)
