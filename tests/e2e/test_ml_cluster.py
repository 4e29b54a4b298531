"""The models in the running cluster: trained on the real bars with ``daytrader train``, served
by the gpu worker, their probabilities in the decisions; a model corrupted mid-day stops
entries while exits and the end of day go on. Real Redis, workers and beat."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

from core.market.files import load_days
from core.signals import Signal
from ml.predictor import XGBoostPredictor, score_signals
from ml.registry import ENTRY_FILE, read_current
from tests.conftest import REPO, SHARED_BARS
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _env(redis_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    env.update({"TRADING_REDIS_URL": redis_url, "TRADING_MODEL_DIR": str(model_dir),
                "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry trained on all the real bars (about 10 s on 2 cores)."""
    if not SHARED_BARS.is_dir():
        pytest.skip(f"real bar data not present at {SHARED_BARS}")
    model_dir = tmp_path_factory.mktemp("models")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADING_")}
    proc = subprocess.run([str(BIN / "daytrader"), "train", "--data", str(SHARED_BARS),
                           "--model-dir", str(model_dir), "--quiet"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "promoted to current" in proc.stdout
    version = read_current(model_dir)
    assert version is not None
    metrics = json.loads((model_dir / version / "metrics.json").read_text())
    assert metrics  # per-fold figures written with the version
    return model_dir


def _signal_of(trade: dict[str, str]) -> tuple[str, str, dt.datetime]:
    """(source, side, signal bar start) from an entry id such as ``orb-AAPL-20190211-0945-L``."""
    source, _symbol, day, hhmm, side = trade["client_order_id"].split("-")
    when = dt.datetime.strptime(day + hhmm, "%Y%m%d%H%M")
    return source, "buy" if side == "L" else "sell", when


def test_sim_decides_with_the_model_probabilities(trained, redis_client, redis_url,
                                                   tmp_path) -> None:
    out = tmp_path / "out"
    env = _env(redis_url, trained, TRADING_ML_ENTRY_THRESHOLD="0.2",
               TRADING_ML_EXIT_THRESHOLD="0.3")
    proc = subprocess.run([str(BIN / "daytrader"), "sim", "--data", str(SHARED_BARS),
                           "--from", "2019-02-11", "--days", "2", "--speed", "6000",
                           "--out", str(out), "--quiet"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["open_positions_at_close"] == 0
    with (out / "trades.csv").open() as fh:
        trades = list(csv.DictReader(fh))
    assert trades
    assert "ml_exit" in {t["exit_reason"] for t in trades}  # the exit model closes some
    predictor = XGBoostPredictor(trained / read_current(trained), device="cpu")
    days = {d.date.isoformat(): d for d in load_days(SHARED_BARS, None,
                                                      dt.date(2019, 2, 11),
                                                      dt.date(2019, 2, 12))}
    for trade in trades:
        source, side, when = _signal_of(trade)
        day = days[trade["date"]]
        t = int((when - day.open_time.replace(tzinfo=None)).total_seconds()) // 60
        sig = Signal(trade["symbol"], side, source, 0.5, day.bar_time(t),  # type: ignore[arg-type]
                     float(day.ohlcv[t, day.symbols.index(trade["symbol"]), 3]))
        prob = float(score_signals(predictor, day.ohlcv[: t + 1], day.symbols, 60, [sig])[0])
        # the confidence of every trade is the entry model's probability, above the threshold
        assert float(trade["confidence"]) == pytest.approx(round(prob, 4), abs=1e-4)
        assert prob >= 0.2


def test_model_corrupted_mid_day_stops_entries_not_exits(trained, tmp_path) -> None:
    model_dir = tmp_path / "models"
    shutil.copytree(trained, model_dir)
    good = read_current(model_dir)
    assert good is not None
    from core.cluster import free_port, redis_answers, redis_server_binary

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    env = _env(url, model_dir, TRADING_ML_ENTRY_THRESHOLD="0.2",
               TRADING_MODEL_CHECK_SECONDS="0.05")
    sim = None
    try:
        wait_for(lambda: redis_answers(url, 0.2), 10, "redis-server")
        sim = subprocess.Popen(
            [str(BIN / "daytrader"), "sim", "--data", str(SHARED_BARS), "--from", "2019-02-11",
             "--days", "1", "--speed", "800", "--out", str(out), "--quiet"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = Redis.from_url(url, socket_timeout=2)
        wait_for(lambda: list(client.scan_iter("sim:*:replay:state")), 60, "the run")
        ns = "sim:" + next(client.scan_iter("sim:*:replay:state")).decode().split(":")[1] + ":"
        wait_for(lambda: client.hlen(ns + "broker:positions") > 0, 120, "an open position")
        # a new version whose entry model is garbage becomes current
        shutil.copytree(model_dir / good, model_dir / "corrupt")
        (model_dir / "corrupt" / ENTRY_FILE).write_bytes(b"{not a model")
        # (set_current refuses a broken version, so write the pointer the way a bad copy
        # or a failing disk would)
        (model_dir / "current.tmp").write_text("corrupt\n")
        os.replace(model_dir / "current.tmp", model_dir / "current")
        switched = int(client.hget(ns + "replay:state", "bar"))
        output, _ = sim.communicate(timeout=300)
        assert sim.returncode == 0, output[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["completed"] and summary["open_positions_at_close"] == 0
        orders = [json.loads(v) for v in client.hvals(ns + "broker:orders")]
        open_t = dt.datetime.fromisoformat("2019-02-11T09:30:00-05:00")

        def bar_of(order: dict) -> int:
            return int((dt.datetime.fromisoformat(order["submitted_at"]) - open_t)
                       .total_seconds()) // 60

        entries = [o for o in orders if o["intent"] == "entry"]
        exits = [o for o in orders if o["intent"] == "exit"]
        assert entries and all(bar_of(o) <= switched + 3 for o in entries)  # none after
        assert any(bar_of(o) > switched + 3 and o["status"] == "filled" for o in exits)
        log_text = (out / "logs" / "worker-gpu.log").read_text()
        assert "model corrupt not usable" in log_text
    finally:
        if sim is not None and sim.poll() is None:
            sim.send_signal(signal.SIGINT)
            sim.wait(60)
        server.terminate()
        server.wait(10)
