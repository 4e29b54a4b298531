"""Tests for ml.predictor: the XGBoost backend on the CPU, the optional TensorRT backend being
skipped cleanly, and ModelHolder following the ``current`` pointer without a restart."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.market.synthetic import generate_days
from core.scoring import ScoringParams, score_bar
from ml import predictor as pred_mod
from ml.dataset import ENTRY_MODEL_FEATURES, EXIT_MODEL_FEATURES
from ml.device import cuda_available, resolve_device
from ml.errors import ModelError
from ml.predictor import (
    ModelHolder,
    Predictor,
    TensorRTPredictor,
    XGBoostPredictor,
    exit_model,
    make_predictor,
    score_signals,
    tensorrt_usable,
)
from ml.registry import ENTRY_FILE, load_version, promote, set_current
from ml.train import predict
from tests.conftest import REPO
from tests.unit.test_registry import _rows, _save


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_xgboost_predictor_matches_the_booster(tmp_path: Path) -> None:
    version = _save(tmp_path, name="v1")
    p = XGBoostPredictor(tmp_path / version, device="cpu")
    assert isinstance(p, Predictor) and p.version == "v1" and p.device == "cpu"
    rows = _rows(50)
    mv = load_version(tmp_path / version)
    np.testing.assert_allclose(p.predict_entry(rows.X), predict(mv.entry, rows.X), rtol=1e-6)
    x_exit = np.random.default_rng(0).normal(size=(7, len(EXIT_MODEL_FEATURES)))
    out = p.predict_exit(x_exit)
    assert out.shape == (7,) and out.dtype == np.float64 and ((out >= 0) & (out <= 1)).all()
    assert p.predict_entry(np.zeros((0, len(ENTRY_MODEL_FEATURES)))).shape == (0,)
    with pytest.raises(ValueError, match=rf"entry features must be \[N, "
                                         rf"{len(ENTRY_MODEL_FEATURES)}\]"):
        p.predict_entry(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="exit features"):
        p.predict_exit(np.zeros(len(EXIT_MODEL_FEATURES)))


def test_device_is_cuda_only_when_usable() -> None:
    assert resolve_device(None) == ("cuda" if cuda_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_tensorrt_is_skipped_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version = _save(tmp_path, name="v1")
    if not tensorrt_usable():
        with pytest.raises(ModelError, match="needs the tensorrt package and a CUDA GPU"):
            TensorRTPredictor(tmp_path / version)
    # "auto" without engine files (or without TensorRT) serves the boosters
    assert isinstance(make_predictor(tmp_path / version), XGBoostPredictor)
    # engines present but TensorRT failing: falls back to XGBoost, never raises
    (tmp_path / version / pred_mod.ENTRY_PLAN).write_bytes(b"junk")
    (tmp_path / version / pred_mod.EXIT_PLAN).write_bytes(b"junk")
    monkeypatch.setattr(pred_mod, "tensorrt_usable", lambda: True)

    def broken(path: Path) -> None:
        raise ModelError("engine corrupted")

    monkeypatch.setattr(pred_mod, "TensorRTPredictor", broken)
    assert isinstance(make_predictor(tmp_path / version), XGBoostPredictor)
    with pytest.raises(ValueError, match="backend"):
        make_predictor(tmp_path / version, backend="onnx")


def test_importing_ml_never_imports_tensorrt_or_cupy() -> None:
    code = ("import sys, ml.predictor, ml.registry, ml.train; "
            "print('tensorrt' in sys.modules, 'cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_holder_without_model_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    holder = ModelHolder(tmp_path, check_seconds=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="ml.predictor"):
        for _ in range(5):
            assert holder.get() is None
            clock.now += 10
    assert [r.getMessage() for r in caplog.records] == [
        f"no current model in {tmp_path}; trading on the rule strategies alone"]
    assert holder.version is None


def test_holder_reloads_after_promotion_without_restart(tmp_path: Path) -> None:
    rows = _rows()
    poor = _save(tmp_path, noise=True, name="poor")
    set_current(tmp_path, poor)
    clock = Clock()
    loads: list[Path] = []

    def loader(path: Path) -> XGBoostPredictor:
        loads.append(path)
        return XGBoostPredictor(path, device="cpu")

    holder = ModelHolder(tmp_path, check_seconds=5, loader=loader, clock=clock)
    first = holder.get()
    assert first is not None and first.version == "poor"
    assert holder.get() is first and len(loads) == 1  # loaded once

    good = _save(tmp_path, name="good")
    good_pred = predict(load_version(tmp_path / good).entry, rows.X)
    assert promote(tmp_path, good, rows, good_pred).promoted
    clock.now += 1
    assert holder.get() is first  # not looked at again within check_seconds
    clock.now += 5
    second = holder.get()
    assert second is not None and second.version == "good" and len(loads) == 2
    np.testing.assert_allclose(second.predict_entry(rows.X), good_pred, rtol=1e-6)
    clock.now += 60
    assert holder.get() is second and len(loads) == 2  # unchanged pointer: no reload


def test_holder_broken_model_returns_none_then_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ok = _save(tmp_path, name="ok")
    bad = _save(tmp_path, name="bad")
    set_current(tmp_path, bad)
    (tmp_path / bad / ENTRY_FILE).write_bytes(b"{garbage")
    clock = Clock()
    holder = ModelHolder(tmp_path, check_seconds=2, clock=clock)
    with caplog.at_level(logging.ERROR, logger="ml.predictor"):
        for _ in range(4):
            assert holder.get() is None
            clock.now += 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "model bad not usable" in errors[0]
    assert str(tmp_path / bad / ENTRY_FILE) in errors[0]
    assert holder.problem is not None and "model bad not usable" in holder.problem
    set_current(tmp_path, ok)
    clock.now += 3
    model = holder.get()
    assert model is not None and model.version == "ok" and holder.problem is None
    (tmp_path / "current").unlink()
    clock.now += 3
    assert holder.get() is None
    assert holder.problem is None  # no model at all: rules only, not a fault


def test_serving_helpers_build_training_rows(tmp_path: Path) -> None:
    p = XGBoostPredictor(tmp_path / _save(tmp_path), device="cpu")
    day = generate_days([dt.date(2025, 3, 4)], 6, seed=11)[0]
    for t in range(16, 300):
        window = day.ohlcv[: t + 1]
        signals = score_bar(window, day.symbols, day.open_time, 60, {}, ScoringParams()).signals
        if signals:
            break
    probs = score_signals(p, window, day.symbols, 60, signals)
    assert probs.shape == (len(signals),) and ((probs >= 0) & (probs <= 1)).all()
    assert score_signals(p, window, day.symbols, 60, []).shape == (0,)
    fn = exit_model(p, 60)
    out = fn(window, np.array([0, 2]), np.array([t - 5, t - 1]), np.array([1, -1]),
             np.array([window[t - 5, 0, 0], window[t - 1, 2, 0]]))
    assert out.shape == (2,) and ((out >= 0) & (out <= 1)).all()
