"""``daytrader backtest``: parity with the simulated cluster, hand-computed fills and P/L, bad
data, 5-minute bars. Real Redis; the sim side runs real workers and beat."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.calendar import session_bounds
from core.market.files import write_bar_files
from core.market.synthetic import generate_days
from core.models import DayBars
from tests.conftest import REPO

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    env.update({"TRADING_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
                "TRADING_MODEL_DIR": "/nonexistent-model-dir", **extra})
    return env


def daytrader(redis_url: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "daytrader"), *args], env=_env(redis_url, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def read_trades(out: Path) -> list[dict[str, str]]:
    with (out / "trades.csv").open() as fh:
        return list(csv.DictReader(fh))


def _parity(redis_url: str, data: Path, tmp_path: Path, days: str,
            env: dict[str, str] | None = None, start: str | None = None) -> list[dict]:
    rng = ["--from", start] if start else []
    sim = daytrader(redis_url, "sim", "--data", str(data), *rng, "--days", days, "--speed",
                    "6000", "--out", str(tmp_path / "sim"), "--quiet", env=env)
    assert sim.returncode == 0, sim.stderr[-3000:]
    bt = daytrader(redis_url, "backtest", "--data", str(data), *rng, "--days", days,
                   "--no-ml", "--out", str(tmp_path / "bt"), "--quiet", env=env)
    assert bt.returncode == 0, bt.stderr[-3000:]
    a = (tmp_path / "sim" / "trades.csv").read_bytes()
    b = (tmp_path / "bt" / "trades.csv").read_bytes()
    assert a == b  # same orders, quantities, prices, exit reasons, ids
    trades = read_trades(tmp_path / "bt")
    assert trades
    s_sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    s_bt = json.loads((tmp_path / "bt" / "summary.json").read_text())
    for key in ("trades", "net_pnl", "gross_pnl", "fees", "exit_reasons", "strategies",
                "orders", "max_daily_used_capital"):
        assert s_sim[key] == s_bt[key], key
    return trades


def test_backtest_and_sim_give_identical_trades_on_real_days(
        redis_client, redis_url, shared_bars, tmp_path) -> None:
    trades = _parity(redis_url, shared_bars, tmp_path, "2", start="2019-02-11")
    assert {t["strategy"] for t in trades} == {"orb", "vwap"}


def test_parity_with_partial_fills_and_protective_stops(redis_client, redis_url,
                                                         tmp_path) -> None:
    dates = [dt.date(2025, 11, 24), dt.date(2025, 11, 25)]
    write_bar_files(generate_days(dates, 25, seed=11), tmp_path / "bars")
    env = {"TRADING_SIM_MAX_PARTICIPATION": "0.002", "TRADING_PARTIAL_FILL_POLICY": "keep",
           "TRADING_PROTECTIVE_STOP": "true", "TRADING_DAILY_POSITION_LIMIT": "50000"}
    trades = _parity(redis_url, tmp_path / "bars", tmp_path, "2", env=env)
    orders_partial = [t for t in trades if t["exit_reason"] == "broker_stop"]
    assert trades and len(trades) >= 5
    assert orders_partial or any(int(t["qty"]) < 5 for t in trades)


# --- a hand-computed day ------------------------------------------------------------------------
def _hand_day() -> DayBars:
    """AAA on Monday 2025-11-24: range 99.90-100.10 for 15 minutes, a breakout close at 100.30
    on bar 20 (09:50) with volume 2000 (mean 1000), the entry fills at bar 21's open 100.40,
    the close falls to 99.30 on bar 30 (stop-loss 1 % under 100.4201 = 99.4159), the exit
    fills at bar 31's open 99.20."""
    day = dt.date(2025, 11, 24)
    open_t, close_t = session_bounds(day)
    n = int((close_t - open_t).total_seconds()) // 60
    bars = np.zeros((n, 1, 5))
    def put(i: int, o: float, h: float, lo: float, c: float, v: float = 1000.0) -> None:
        bars[i, 0] = (o, h, lo, c, v)
    for i in range(15):
        put(i, 100.0, 100.10, 99.90, 100.0)
    for i in range(15, 20):
        put(i, 100.0, 100.05, 99.95, 100.0)
    put(20, 100.0, 100.35, 100.0, 100.30, 2000)
    for i in range(21, 30):
        put(i, 100.40, 100.45, 100.35, 100.40)
    put(30, 100.40, 100.40, 99.25, 99.30)
    for i in range(31, n):
        put(i, 99.20 if i == 31 else 99.30, 99.35, 99.15, 99.30)
    return DayBars(day, ("AAA",), open_t, close_t, 60, bars)


def test_hand_computed_long_stopped_out(redis_client, redis_url, tmp_path) -> None:
    write_bar_files([_hand_day()], tmp_path / "bars")
    out = tmp_path / "bt"
    proc = daytrader(redis_url, "backtest", "--data", str(tmp_path / "bars"), "--no-ml",
                     "--out", str(out), "--quiet", env={"TRADING_STRATEGIES": "orb"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trade,) = read_trades(out)
    # signal at the close of bar 20 -> limit IOC buy; qty = floor($10 risk / (100.30 x 1 %)) = 9
    assert trade["client_order_id"] == "orb-AAA-20251124-0950-L"
    assert (trade["side"], trade["qty"]) == ("buy", "9")
    # fill at bar 21's open 100.40 + 2 bps = 100.42008 -> 100.4201
    assert trade["entry_time"] == "2025-11-24T09:51:00-05:00"
    assert trade["entry_price"] == "100.4201"
    # close 99.30 <= 100.4201 x 0.99 on bar 30; market exit at bar 31's open 99.20 - 2 bps
    assert trade["exit_reason"] == "stop_loss"
    assert trade["exit_time"] == "2025-11-24T10:01:00-05:00"
    assert trade["exit_price"] == "99.1802"
    # gross (99.1802 - 100.4201) x 9 = -11.1591 -> -11.16; fees 2 x max(0.35, 9 x 0.0035)
    assert (trade["gross_pnl"], trade["fees"], trade["pnl"]) == ("-11.16", "0.70", "-11.86")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["trades"], summary["net_pnl"], summary["fees"]) == (1, -11.86, 0.7)
    assert summary["open_positions_at_close"] == 0


def test_five_minute_bars(redis_client, redis_url, tmp_path) -> None:
    write_bar_files(generate_days([dt.date(2025, 11, 24)], 20, seed=5, bar_seconds=300),
                    tmp_path / "bars")
    assert all("_5min" in p.name for p in (tmp_path / "bars").iterdir())
    proc = daytrader(redis_url, "backtest", "--data", str(tmp_path / "bars"), "--no-ml",
                     "--out", str(tmp_path / "bt"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5-minute bars" in proc.stderr
    trades = read_trades(tmp_path / "bt")
    assert trades
    for t in trades:  # every fill on a 5-minute boundary
        assert int(t["entry_time"][14:16]) % 5 == 0 and int(t["exit_time"][14:16]) % 5 == 0


# --- bad data -----------------------------------------------------------------------------------
def _rows(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        return fh.read().splitlines()


def _rewrite(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def test_bad_data_is_named_and_never_silently_used(redis_client, redis_url, tmp_path) -> None:
    dates = [dt.date(2025, 11, 24), dt.date(2025, 11, 25)]
    bars = tmp_path / "bars"
    write_bar_files(generate_days(dates, 4, seed=2), bars)
    files = sorted(bars.iterdir())
    lines = _rows(files[0])  # unsorted rows
    _rewrite(files[0], [lines[0], *reversed(lines[1:])])
    lines = _rows(files[1])  # a duplicated timestamp with another price
    dup = lines[5].split(",")
    dup[5] = str(float(dup[5]) + 1)
    _rewrite(files[1], [*lines[:6], ",".join(dup), *lines[6:]])
    lines = _rows(files[2])  # a symbol missing the second day
    _rewrite(files[2], [x for x in lines if "2025-11-25" not in x])
    proc = daytrader(redis_url, "backtest", "--data", str(bars), "--no-ml", "--out",
                     str(tmp_path / "bt"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert files[0].name in err and "sorted" in err
    assert files[1].name in err and "duplicate" in err
    assert files[2].stem.split("_")[0] in err and "2025-11-25" in err
    # mixed bar sizes are refused with the files named
    write_bar_files(generate_days([dt.date(2025, 11, 24)], ["ZZZ"], seed=2, bar_seconds=300),
                    bars)
    proc = daytrader(redis_url, "backtest", "--data", str(bars), "--no-ml", "--out",
                     str(tmp_path / "bt2"), "--quiet")
    assert proc.returncode == 2
    assert "ZZZ" in proc.stderr and "bar size" in proc.stderr.lower()
    assert not (tmp_path / "bt2" / "trades.csv").exists()
