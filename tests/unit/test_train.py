"""Tests for ml.dataset, ml.metrics and ml.train: rows, walk-forward splits with a purge,
metrics, and ``daytrader train`` end to end over the real bars."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.market.synthetic import generate_days
from core.scoring import ScoringParams
from ml import train as train_mod
from ml.dataset import (
    ENTRY_MODEL_FEATURES,
    EXIT_MODEL_FEATURES,
    NO_STRATEGY,
    DatasetParams,
    build_datasets,
    data_hash,
    day_signals,
    trade_returns,
)
from ml.features import entry_features_all
from ml.labels import entry_labels
from ml.metrics import json_safe, log_loss, precision_at, reliability, roc_auc
from ml.train import TrainParams, inner_split, train_on_rows, walk_forward_splits
from tests.conftest import REPO

DAYS = [dt.date(2025, 3, 3) + dt.timedelta(days=i) for i in range(40)]
SESSIONS = [d for d in DAYS if d.weekday() < 5][:12]
FAST = TrainParams(folds=3, purge_days=1, max_rounds=40, early_stopping_rounds=5,
                   nthread=1, device="cpu")


@pytest.fixture(scope="module")
def synthetic() -> list:
    return generate_days(SESSIONS, 4, seed=3)


@pytest.fixture(scope="module")
def rows(synthetic: list) -> tuple:
    return build_datasets(synthetic, DatasetParams())


# --- splits --------------------------------------------------------------------------------
def test_walk_forward_never_trains_on_validation_days_and_purges() -> None:
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(23)]
    folds = walk_forward_splits(list(reversed(days)), folds=4, purge_days=2)
    assert len(folds) == 4
    block = 23 // 5
    seen_valid: list[dt.date] = []
    for f in folds:
        assert len(f.valid_days) == block
        assert not set(f.train_days) & set(f.valid_days)
        assert not set(f.purged_days) & (set(f.train_days) | set(f.valid_days))
        assert max(f.train_days) < min(f.purged_days) <= max(f.purged_days) < min(f.valid_days)
        # exactly the 2 sessions before the validation block are dropped, none after it is used
        first = days.index(f.valid_days[0])
        assert list(f.purged_days) == days[first - 2:first]
        assert list(f.train_days) == days[:first - 2]
        seen_valid += f.valid_days
    assert seen_valid == days[23 - 4 * block:]  # consecutive, non-overlapping blocks


def test_explicit_day_lists() -> None:
    d = [dt.date(2024, 5, i) for i in range(1, 11)]  # 10 days, 2 folds, purge 1
    folds = walk_forward_splits(d, folds=2, purge_days=1)
    assert folds[0].train_days == tuple(d[:3]) and folds[0].purged_days == (d[3],)
    assert folds[0].valid_days == tuple(d[4:7])
    assert folds[1].train_days == tuple(d[:6]) and folds[1].purged_days == (d[6],)
    assert folds[1].valid_days == tuple(d[7:10])
    inner_train, inner_valid = inner_split(folds[1].train_days, 0.2, 1)
    assert inner_valid == tuple(d[5:6]) and inner_train == tuple(d[:4])  # d[4] purged
    assert walk_forward_splits(d, folds=1, purge_days=0)[0].train_days == tuple(d[:5])


def test_too_few_days_is_a_clear_error() -> None:
    d = [dt.date(2024, 5, i) for i in range(1, 6)]
    with pytest.raises(ConfigError, match=r"too few days for 5 fold\(s\) .* 5 session\(s\), "
                                          r"need at least 9"):
        walk_forward_splits(d, folds=5, purge_days=1)
    nine = [dt.date(2024, 5, i) for i in range(1, 10)]
    assert len(walk_forward_splits(nine, folds=5, purge_days=1)) == 5
    for n in range(9, 40):  # more days never fail
        walk_forward_splits([dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(n)], 5, 1)


# --- rows ------------------------------------------------------------------------------------
def test_entry_rows_are_rule_signals_with_their_labels(synthetic: list, rows: tuple) -> None:
    entry, exit_ = rows
    params = DatasetParams()
    assert entry.feature_names == ENTRY_MODEL_FEATURES
    assert exit_.feature_names == EXIT_MODEL_FEATURES
    assert len(entry) > 50 and len(exit_) > 50
    assert entry.signal.all() and set(np.unique(entry.strategy)) <= {0, 1}
    assert not np.isnan(entry.y).any() and not np.isnan(exit_.y).any()
    assert set(entry.days) <= set(SESSIONS)
    day = synthetic[0]
    mine = entry.on_days([day.date])
    feats = entry_features_all(day.ohlcv, day.bar_seconds)
    long_, short = entry_labels(day.ohlcv, params.target_pct, params.stop_pct, 60,
                                params.slippage_bps, params.fee_per_share)
    s_idx = np.array([day.symbols.index(s) for s in mine.symbol])
    np.testing.assert_allclose(mine.X[:, :len(feats[0, 0])],
                               feats[mine.bar, s_idx].astype(np.float32), equal_nan=True)
    np.testing.assert_array_equal(mine.X[:, -2], mine.side)
    np.testing.assert_array_equal(mine.y, np.where(mine.side > 0, long_[mine.bar, s_idx],
                                                   short[mine.bar, s_idx]))
    # no signal in the last 30 minutes nor where the 60-bar label would cross the close
    assert mine.bar.max() <= day.ohlcv.shape[0] - 1 - 60


def test_trade_outcome_matches_the_label(rows: tuple) -> None:
    entry, _ = rows
    p = DatasetParams()
    hit = np.isclose(entry.pnl, p.target_pct)
    np.testing.assert_array_equal(hit, entry.y == 1.0)
    assert (entry.pnl[~hit] < p.target_pct).all()
    stopped = np.isclose(entry.pnl, -p.stop_pct)
    assert stopped.any()


def test_trade_returns_by_hand() -> None:
    w = np.full((6, 1, 5), np.nan)
    w[:, 0] = [100.0, 100.0, 100.0, 100.0, 1000.0]
    w[2, 0] = [100.0, 101.5, 99.9, 101.0, 1000.0]  # long target 1 % touched on bar 2
    out = trade_returns(w, np.array([0, 0, 3]), np.array([0, 0, 0]), np.array([1, -1, 1]),
                        0.01, 0.01, horizon=3, slippage_bps=0.0)
    assert out[0] == pytest.approx(0.01)
    assert out[1] == pytest.approx(-0.01)
    assert math.isnan(out[2])  # 3 + 3 > last bar (5)
    w[2, 0] = [100.0, 100.5, 99.9, 100.4, 1000.0]  # neither: horizon-end close 100
    out = trade_returns(w, np.array([0]), np.array([0]), np.array([-1]), 0.01, 0.01, 3,
                        slippage_bps=10.0)
    assert out[0] == pytest.approx((100 * 0.999 - 100 * 1.001) / (100 * 0.999))


def test_rows_use_no_future_bars(synthetic: list) -> None:
    day = synthetic[1]
    cut = 200
    future = day.ohlcv.copy()
    future[cut:] = generate_days([day.date], 4, seed=99)[0].ohlcv[cut:]  # another future
    other = type(day)(date=day.date, symbols=day.symbols, open_time=day.open_time,
                      close_time=day.close_time, bar_seconds=day.bar_seconds, ohlcv=future)
    a, _ = build_datasets([day])
    b, _ = build_datasets([other])
    early_a = a.select(a.bar < cut)  # signals and features of bar t use bars <= t only
    early_b = b.select(b.bar < cut)
    assert len(early_a) > 0
    np.testing.assert_array_equal(early_a.bar, early_b.bar)
    np.testing.assert_array_equal(early_a.X, early_b.X)
    done = early_a.bar + 60 < cut  # labels whose horizon ends before the change too
    np.testing.assert_array_equal(early_a.y[done], early_b.y[done])
    assert not np.array_equal(a.X, b.X)


def test_rows_all_adds_sampled_bars(synthetic: list, rows: tuple) -> None:
    entry, _ = rows
    all_rows, _ = build_datasets(synthetic[:3], DatasetParams(rows="all", every_k_bars=10))
    sig = entry.on_days([d.date for d in synthetic[:3]])
    assert len(all_rows) > len(sig)
    assert int(all_rows.signal.sum()) == len(sig)
    assert (all_rows.strategy[~all_rows.signal] == NO_STRATEGY).all()
    with pytest.raises(ValueError, match="rows"):
        DatasetParams(rows="every")  # type: ignore[arg-type]


def test_signals_follow_the_scoring_rules(synthetic: list) -> None:
    day = synthetic[0]
    only_orb = day_signals(day, ScoringParams(strategies=("orb",)), 300)
    both = day_signals(day, ScoringParams(), 300)
    assert set(only_orb.strategy.tolist()) <= {0}
    assert len(both.bar) >= len(only_orb.bar)
    assert data_hash(synthetic) == data_hash(list(synthetic))
    assert data_hash(synthetic[:1]) != data_hash(synthetic[1:2])


# --- metrics ---------------------------------------------------------------------------------
def test_metrics_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    pairs = [(i, j) for i in range(6) for j in range(6) if y[i] == 1 and y[j] == 0]
    brute = np.mean([1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0 for i, j in pairs])
    assert roc_auc(y, p) == pytest.approx(brute)
    assert math.isnan(roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))
    assert log_loss(y, p) == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert precision_at(y, p, 0.5) == (1.0, 2)
    assert math.isnan(precision_at(y, p, 0.95)[0])
    table = reliability(y, p, bins=2)
    assert [b["n"] for b in table] == [4, 2]
    assert table[1]["observed"] == 1.0 and table[1]["mean_pred"] == pytest.approx(0.85)
    assert json_safe({"a": [math.nan, 1.0], "b": np.int64(2)}) == {"a": [None, 1.0], "b": 2}


# --- training --------------------------------------------------------------------------------
def test_train_on_rows_folds_and_metrics(rows: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, exit_ = rows
    inner_calls: list[tuple] = []
    real_inner = train_mod.inner_split

    def spy(train_days, frac, purge):  # type: ignore[no-untyped-def]
        out = real_inner(train_days, frac, purge)
        inner_calls.append((tuple(train_days), out))
        return out

    monkeypatch.setattr(train_mod, "inner_split", spy)
    result = train_on_rows(entry, exit_, SESSIONS, DatasetParams(), FAST)
    m = result.metrics
    assert m["device"] == "cpu" and m["folds"] == 3 and m["purge_days"] == 1
    for fold, f in zip(result.folds, m["entry"]["folds"], strict=True):
        assert not set(f["train_days"]) & set(f["valid_days"])
        assert f["n_train"] == len(entry.on_days(fold.train_days))
        assert f["n"] == len(entry.on_days(fold.valid_days))
        for key in ("auc", "log_loss", "brier", "precision", "n_selected", "reliability",
                    "threshold", "rounds", "positive_rate"):
            assert key in f
        assert f["pnl"]["all"]["trades"] == int(entry.on_days(fold.valid_days).signal.sum())
        assert f["pnl"]["filtered"]["trades"] <= f["pnl"]["all"]["trades"]
    # early stopping looked only at each fold's own training days, never its validation days
    for train_days, (inner_t, inner_v) in inner_calls:
        assert set(inner_t) | set(inner_v) <= set(train_days)
    assert m["entry"]["aggregate"]["pooled"]["n"] == len(result.oos_entry)
    assert m["thresholds"]["entry"] == pytest.approx(0.5)
    assert m["final_rounds"]["entry"] >= 1
    assert result.entry_model.num_features() == len(ENTRY_MODEL_FEATURES)
    assert result.exit_model.num_features() == len(EXIT_MODEL_FEATURES)
    assert result.metadata["libraries"]["xgboost"]
    json.dumps(json_safe(m), allow_nan=False)
    assert "pooled out-of-sample" in train_mod.format_fold_table(m)


def _daytrader() -> list[str]:
    exe = Path(sys.executable).parent / "daytrader"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "core.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_daytrader(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_daytrader_train_end_to_end_on_real_bars(shared_bars: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    proc = _run("train", "--data", str(shared_bars), "--model-dir", str(models), "--folds", "4",
                "--purge-days", "1", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "pooled out-of-sample" in proc.stdout and "promoted to current" in proc.stdout
    version = (models / "current").read_text().strip()
    folder = models / version
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["entry"]["folds"]) == 4 and len(metrics["exit"]["folds"]) == 4
    for f in metrics["entry"]["folds"]:
        assert {"auc", "log_loss", "brier", "precision", "reliability", "pnl", "valid_days",
                "train_days", "purged_days"} <= set(f)
        assert not set(f["train_days"]) & set(f["valid_days"])
        assert {"all", "filtered"} == set(f["pnl"])
    agg = metrics["entry"]["aggregate"]
    assert 0.0 <= agg["pooled"]["auc"] <= 1.0 and agg["pooled"]["log_loss"] > 0
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["data"]["first_day"] == "2011-01-03" and meta["data"]["n_days"] == 61
    assert "SPY_1min.csv.gz" in meta["data"]["files"] and len(meta["data"]["hash"]) == 64
    assert {"python", "numpy", "xgboost"} == set(meta["libraries"])
    assert meta["created_utc"].endswith("+00:00")
    # a second run is compared with the first on its own validation rows
    again = _run("train", "--data", str(shared_bars), "--model-dir", str(models), "--folds", "4",
                 "--from", "2011-01-03", "--to", "2011-03-31", "--quiet", "--no-promote",
                 cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert "not promoted (--no-promote)" in again.stdout
    assert (models / "current").read_text().strip() == version


def test_daytrader_train_bad_input_exits_2(shared_bars: Path, tmp_path: Path) -> None:
    few = _run("train", "--data", str(shared_bars), "--model-dir", str(tmp_path), "--from",
               "2019-02-11", "--to", "2019-02-13", "--folds", "5", "--quiet", cwd=REPO)
    assert few.returncode == 2
    assert "too few days for 5 fold(s)" in few.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = _run("train", "--data", str(empty), "--model-dir", str(tmp_path), cwd=REPO)
    assert none.returncode == 2 and "holds no bar files" in none.stderr
    gap = _run("train", "--data", str(shared_bars), "--model-dir", str(tmp_path), "--from",
               "2016-01-01", "--to", "2016-12-31", cwd=REPO)
    assert gap.returncode == 2 and "no sessions" in gap.stderr
