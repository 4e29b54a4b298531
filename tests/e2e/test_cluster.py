"""End to end: real ``celery`` worker and beat processes over real Redis."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import REPO
from tests.helpers import stop_processes, wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    env.update({"TRADING_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_sim(redis_url: str, out: Path, *args: str, timeout: float = 240,
            env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([str(BIN / "daytrader"), "sim", *args, "--out", str(out), "--quiet"],
                          env=base_env(redis_url, **(env or {})), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def read_trades(out: Path) -> list[dict[str, str]]:
    with (out / "trades.csv").open() as fh:
        return list(csv.DictReader(fh))


def check_invariants(summary: dict, trades: list[dict[str, str]]) -> None:
    assert summary["open_positions_at_close"] == 0
    assert summary["duplicate_client_order_ids"] == 0
    assert summary["max_daily_used_capital"] <= summary["daily_limit"]
    assert len({t["client_order_id"] for t in trades}) == len(trades)
    for day in summary["per_day"]:
        assert day["open_positions_at_close"] == 0
        assert day["max_used_capital"] <= summary["daily_limit"]
        if day["last_exit_time"]:
            assert day["last_exit_time"] < day["close_time"]


# Exits tuned so that every rule exit shows up within five real days: a tight stop below the
# peak drop, a take-profit, a maximum holding time, and a per-position cap so that many
# positions (also late ones, which the end-of-day window closes) are opened.
REAL_BARS_EXITS = {
    "TRADING_DAILY_POSITION_LIMIT": "50000", "TRADING_MAX_POSITION_VALUE": "2000",
    "TRADING_MAX_OPEN_POSITIONS": "20", "TRADING_STOP_LOSS_PCT": "0.004",
    "TRADING_PEAK_EXIT_DROP_THRESHOLD": "0.006", "TRADING_TAKE_PROFIT_PCT": "0.008",
    "TRADING_MAX_HOLDING_MINUTES": "200", "TRADING_NO_ENTRY_MINUTES_BEFORE_CLOSE": "15",
}


def test_sim_over_real_bars_shows_both_strategies_and_every_exit(
        redis_client, redis_url, shared_bars, tmp_path) -> None:
    out = tmp_path / "real"
    summary = run_sim(redis_url, out, "--data", str(shared_bars), "--from", "2019-02-11",
                      "--days", "5", "--speed", "6000", env=REAL_BARS_EXITS, timeout=400)
    trades = read_trades(out)
    assert summary["days"] == 5 and summary["completed"] is True
    assert summary["trades"] == len(trades) > 0
    check_invariants(summary, trades)
    assert {t["strategy"] for t in trades} == {"orb", "vwap"}
    reasons = {t["exit_reason"] for t in trades}
    assert reasons == {"peak", "trough", "stop_loss", "take_profit", "max_hold", "eod"}
    for t in trades:  # each exit agrees with its rule at the exit bar's mark
        entry, exit_ = float(t["entry_price"]), float(t["exit_price"])
        held = (dt.datetime.fromisoformat(t["exit_time"])
                - dt.datetime.fromisoformat(t["entry_time"]))
        if t["exit_reason"] == "max_hold":
            assert held >= dt.timedelta(minutes=200)
        if t["exit_reason"] == "peak":
            assert t["side"] == "buy"
        if t["exit_reason"] == "trough":
            assert t["side"] == "sell"
        assert entry > 0 and exit_ > 0


def test_synthetic_early_close_is_flat_and_deterministic(redis_client, redis_url, tmp_path):
    # 2025-11-28 is a 13:00 early close: 210 bars, EOD window from 12:50
    args = ("--synthetic", "--synthetic-symbols", "30", "--from", "2025-11-28", "--days", "1",
            "--speed", "6000")
    first = run_sim(redis_url, tmp_path / "a", *args)
    second = run_sim(redis_url, tmp_path / "b", *args)
    trades = read_trades(tmp_path / "a")
    check_invariants(first, trades)
    assert first["trades"] > 0
    assert first["per_day"][0]["close_time"].endswith("13:00:00-05:00")
    assert all(t["exit_time"] <= "2025-11-28T12:51:00-05:00" for t in trades)
    assert (tmp_path / "a" / "trades.csv").read_bytes() == (
        tmp_path / "b" / "trades.csv").read_bytes()
    assert first["net_pnl"] == second["net_pnl"]


def _find_run(client: Redis, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = [k.decode() for k in client.scan_iter("sim:*:replay:state")]
        if found:
            return found[0].split(":")[1]
        time.sleep(0.2)
    raise AssertionError("the simulated run never started")


def test_celery_call_flatten_all_from_repo_root(redis_client, redis_url, tmp_path) -> None:
    out = tmp_path / "flat"
    sim = subprocess.Popen(
        [str(BIN / "daytrader"), "sim", "--synthetic", "--synthetic-symbols", "40",
         "--speed", "300", "--out", str(out), "--quiet"],
        env=base_env(redis_url), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        run = _find_run(redis_client, deadline)
        ns = f"sim:{run}:"
        wait_for(lambda: redis_client.hlen(ns + "broker:positions") > 0, 120, "a position")
        # literally what the README says, from the repo root with no -A
        call = subprocess.run([str(BIN / "celery"), "call", "tasks.flatten_all"], cwd=REPO,
                              env=base_env(redis_url), capture_output=True, text=True,
                              timeout=60)
        assert call.returncode == 0, call.stderr
        wait_for(lambda: redis_client.exists(ns + "halt"), 60, "the halt flag")
        wait_for(lambda: redis_client.hlen(ns + "broker:positions") == 0, 60, "flat")
        orders_at_flat = redis_client.llen(ns + "broker:order_log")
        bar_at_flat = int(redis_client.hget(ns + "replay:state", "bar"))
        wait_for(lambda: int(redis_client.hget(ns + "replay:state", "bar")) > bar_at_flat + 20,
                 60, "20 more bars")
        later = redis_client.lrange(ns + "broker:order_log", orders_at_flat, -1)
        assert later == []  # halted: no new entries (and nothing left to exit)
        assert redis_client.hlen(ns + "broker:positions") == 0
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(60)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False
    assert "flatten" in summary["exit_reasons"]


def test_celery_worker_and_beat_by_hand(redis_client, redis_url, tmp_path) -> None:
    run = f"manual-{uuid.uuid4().hex[:6]}"
    env = base_env(redis_url, TRADING_SIM_RUN_ID=run, TRADING_SIM_SPEED="6000",
                   TRADING_SIM_FROM="2025-11-28", TRADING_SIM_SYNTHETIC_SYMBOLS="20")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [
        subprocess.Popen([str(BIN / "celery"), "-A", "tasks", "worker", "-Q", "gpu,exec",
                          "-c", "2", "-n", f"{run}@%h", "-l", "INFO"], cwd=tmp_path, env=env,
                         stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT),
        subprocess.Popen([str(BIN / "celery"), "-A", "tasks", "beat", "-l", "INFO",
                          "-s", str(tmp_path / "beat-schedule")], cwd=tmp_path, env=env,
                         stdout=(logs / "beat.log").open("w"), stderr=subprocess.STDOUT),
    ]
    ns = f"sim:{run}:"
    try:
        wait_for(lambda: redis_client.hget(ns + "replay:state", "status") == b"finished",
                 150, "the replayed day to finish")
    finally:
        stop_processes(procs)
    stats = [json.loads(x) for x in redis_client.lrange(ns + "replay:day_stats", 0, -1)]
    assert [s["date"] for s in stats] == ["2025-11-28"]
    assert stats[0]["open_positions_at_close"] == 0
    assert stats[0]["max_used_capital_cents"] <= stats[0]["daily_limit_cents"]
    assert redis_client.llen(ns + "broker:trades") > 0
    assert redis_client.hlen(ns + "broker:positions") == 0
