"""The backtester's fast path with a model: entry and exit model scores precomputed for the
whole session must equal the bar-by-bar scores bit for bit, so the trades equal those of the
cluster's path (every bar scored) on a real Redis."""

from __future__ import annotations

import collections
import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.backtest import run_backtest
from core.calendar import next_sessions
from core.config import Settings
from core.market.files import write_bar_files
from core.market.synthetic import generate_days
from core.runtime import build_memory_runtime, build_runtime
from ml.dataset import entry_model_rows, exit_model_rows
from ml.features import entry_features_all, exit_features_all
from ml.predictor import XGBoostPredictor
from ml.registry import read_current

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry trained on synthetic bars with ``daytrader train``."""
    root = tmp_path_factory.mktemp("ml-fast")
    data = root / "bars"
    write_bar_files(generate_days(next_sessions(dt.date(2025, 9, 2), 12),
                                  [f"T{i:02d}" for i in range(20)], seed=21), data)
    models = root / "models"
    proc = subprocess.run([str(BIN / "daytrader"), "train", "--data", str(data),
                           "--model-dir", str(models), "--folds", "2", "--quiet"],
                          capture_output=True, text=True, env={**os.environ}, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert read_current(models) is not None
    return models


def _predictor(model_dir: Path) -> XGBoostPredictor:
    return XGBoostPredictor(model_dir / str(read_current(model_dir)), device="cpu")


def test_session_features_equal_the_bar_by_bar_ones_bit_for_bit() -> None:
    day = generate_days([dt.date(2025, 11, 3)], 6, seed=3)[0]
    ohlcv = day.ohlcv.copy()
    ohlcv[50:60, 1] = np.nan  # a halt
    ohlcv[200, 4, 4] = 0.0
    full = entry_features_all(ohlcv, 60)
    entry, side, price = np.array([30, 100, 5]), np.array([1, -1, 1]), np.array([101.0, 99.5, 50.2])
    full_exit = exit_features_all(ohlcv[:, [0, 2, 3]], entry, side, price, 60)
    for t in range(0, day.n_bars, 7):
        np.testing.assert_array_equal(entry_features_all(ohlcv[: t + 1], 60)[-1], full[t])
        np.testing.assert_array_equal(entry_features_all(ohlcv[: t + 1, [2, 4]], 60)[-1],
                                      full[t, [2, 4]])
        np.testing.assert_array_equal(
            exit_features_all(ohlcv[: t + 1, [0, 2, 3]], entry, side, price, 60)[-1],
            full_exit[t])


def test_model_scores_do_not_depend_on_the_batch(model_dir: Path) -> None:
    predictor = _predictor(model_dir)
    day = generate_days([dt.date(2025, 11, 4)], 10, seed=5)[0]
    entry = entry_features_all(day.ohlcv, 60)
    feats = entry.reshape(-1, entry.shape[-1])
    rows = entry_model_rows(feats, np.ones(len(feats)), np.ones(len(feats)))
    batch = predictor.predict_entry(rows)
    one_by_one = np.concatenate([predictor.predict_entry(rows[i:i + 1])
                                 for i in range(0, len(rows), 97)])
    np.testing.assert_array_equal(batch[::97], one_by_one)
    held = exit_features_all(day.ohlcv, np.full(10, 20), np.ones(10), day.ohlcv[20, :, 0], 60)
    exit_rows = exit_model_rows(held.reshape(-1, held.shape[-1]), np.ones(day.n_bars * 10))
    batch = predictor.predict_exit(exit_rows)
    np.testing.assert_array_equal(batch[5::311], np.concatenate(
        [predictor.predict_exit(exit_rows[i:i + 1]) for i in range(5, len(exit_rows), 311)]))


def _run(days: list[Any], settings: Settings, fast: bool) -> Any:
    rt = build_memory_runtime(settings) if fast else build_runtime(settings)
    return run_backtest(rt, settings, days, skip_idle=fast)


def test_fast_path_with_the_model_equals_the_cluster_path(model_dir: Path, redis_client: Any,
                                                          redis_url: str) -> None:
    days = generate_days(next_sessions(dt.date(2025, 11, 3), 2), [f"S{i:02d}" for i in range(25)],
                         seed=7)
    # thresholds from the model's own score range, so that it both filters and trades
    predictor = _predictor(model_dir)
    entry = entry_features_all(days[0].ohlcv, 60)
    feats = entry.reshape(-1, entry.shape[-1])
    scores = predictor.predict_entry(entry_model_rows(feats, np.ones(len(feats)),
                                                      np.ones(len(feats))))
    entry_threshold = float(np.nanpercentile(scores, 60))
    base = {"mode": "sim", "redis_url": redis_url, "model_dir": str(model_dir),
            "ml_entry_threshold": entry_threshold, "ml_exit_threshold": 0.3,
            "daily_position_limit": 50000}
    slow = _run(days, Settings(sim_run_id=f"slow-{uuid.uuid4().hex[:8]}", **base), False)
    fast = _run(days, Settings(sim_run_id=f"fast-{uuid.uuid4().hex[:8]}", **base), True)
    assert slow.trades, "the case must trade to mean anything"
    assert fast.trades == slow.trades
    assert fast.order_log == slow.order_log
    assert fast.day_stats == slow.day_stats
    assert fast.plans["idle"] > 0 and slow.plans["idle"] == 0
    reasons = collections.Counter(t["exit_reason"] for t in fast.trades)
    assert reasons["ml_exit"] > 0, reasons
