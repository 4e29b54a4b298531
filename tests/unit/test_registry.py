"""Tests for ml.registry: version round trip, refusals with clear messages, the atomic
``current`` pointer and the promotion rule."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from ml import registry
from ml.dataset import ENTRY_MODEL_FEATURES, EXIT_MODEL_FEATURES, Rows
from ml.errors import ModelError
from ml.features import FEATURE_VERSION
from ml.registry import (
    ENTRY_FILE,
    EXIT_FILE,
    FEATURES_FILE,
    METADATA_FILE,
    METRICS_FILE,
    load_version,
    promote,
    read_current,
    save_version,
    set_current,
)
from ml.train import predict


def _data(n: int, names: tuple[str, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(names))).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
    return x, y


def _booster(names: tuple[str, ...], rounds: int = 20, noise: bool = False,
             seed: int = 1) -> xgb.Booster:
    x, y = _data(400, names, seed)
    if noise:  # labels unrelated to the features: a poor model
        y = np.random.default_rng(seed + 100).permutation(y)
    dm = xgb.DMatrix(x, label=y, feature_names=list(names))
    return xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1,
                      "device": "cpu"}, dm, rounds)


def _save(model_dir: Path, noise: bool = False, name: str | None = None,
          days: list[str] | None = None) -> str:
    return save_version(model_dir, _booster(ENTRY_MODEL_FEATURES, noise=noise),
                        _booster(EXIT_MODEL_FEATURES, noise=noise),
                        {"data": {"first_day": "2019-02-11", "hash": "abc", "days": days or []}},
                        {"entry": {"aggregate": {"auc": float("nan")}}}, version=name)


def _rows(n: int = 300, seed: int = 5) -> Rows:
    x, y = _data(n, ENTRY_MODEL_FEATURES, seed)
    z = np.zeros(n)
    day = np.where(np.arange(n) < n // 2, np.datetime64("2019-02-11", "D"),
                   np.datetime64("2019-02-12", "D"))
    return Rows(X=x, y=y, day=day, bar=z.astype(int),
                symbol=np.full(n, "AAPL", dtype=object), side=np.ones(n, np.int8),
                strategy=np.zeros(n, np.int8), signal=np.ones(n, bool), pnl=z,
                feature_names=ENTRY_MODEL_FEATURES)


def test_round_trip(tmp_path: Path) -> None:
    version = _save(tmp_path, name="v1")
    folder = tmp_path / version
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ENTRY_FILE, EXIT_FILE, FEATURES_FILE, METADATA_FILE, METRICS_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    mv = load_version(folder)
    assert mv.version == "v1"
    assert mv.features == {"format": 1, "feature_version": FEATURE_VERSION,
                           "entry": list(ENTRY_MODEL_FEATURES), "exit": list(EXIT_MODEL_FEATURES)}
    assert mv.metadata["version"] == "v1" and mv.metadata["data"]["hash"] == "abc"
    assert mv.metadata["created_utc"].endswith("+00:00")
    assert mv.metrics["entry"]["aggregate"]["auc"] is None  # NaN stored as JSON null
    rows = _rows()
    original = _booster(ENTRY_MODEL_FEATURES)
    np.testing.assert_allclose(predict(mv.entry, rows.X), predict(original, rows.X), rtol=1e-6)
    with open(folder / ENTRY_FILE, "rb") as fh:
        assert fh.read(1) == b"{"  # UBJSON
    with pytest.raises(ModelError, match="already exists"):
        _save(tmp_path, name="v1")
    assert registry.list_versions(tmp_path) == ["v1"]
    auto = _save(tmp_path)
    assert auto.endswith(auto[-6:]) and auto[8] == "T" and auto in registry.list_versions(tmp_path)


@pytest.mark.parametrize("edit,pattern", [
    (lambda f: f.update(feature_version="v0-0000000000"), "feature version 'v0-0000000000' does "
                                                          "not match"),
    (lambda f: f.update(entry=f["entry"][:-1]), "entry feature list .* does not match"),
    (lambda f: f.update(exit=[*f["exit"], "extra"]), "exit feature list .* does not match"),
    (lambda f: f.update(format=99), "format 99"),
])
def test_mismatched_features_are_refused(tmp_path: Path, edit: Callable[[dict], None],
                                         pattern: str) -> None:
    folder = tmp_path / _save(tmp_path)
    spec = json.loads((folder / FEATURES_FILE).read_text())
    edit(spec)
    (folder / FEATURES_FILE).write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=pattern) as info:
        load_version(folder)
    assert str(folder / FEATURES_FILE) in str(info.value)


def test_booster_with_other_features_is_refused(tmp_path: Path) -> None:
    version = save_version(tmp_path, _booster(ENTRY_MODEL_FEATURES[:-1]),
                           _booster(EXIT_MODEL_FEATURES), {}, {})
    n = len(ENTRY_MODEL_FEATURES)
    with pytest.raises(ModelError, match=f"{ENTRY_FILE}: model has {n - 1} features, this "
                                         f"code builds {n}"):
        load_version(tmp_path / version)


@pytest.mark.parametrize("name,damage,pattern", [
    (ENTRY_FILE, lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
     "model file corrupted"),
    (EXIT_FILE, lambda p: p.write_bytes(os.urandom(300)), "model file corrupted"),
    (EXIT_FILE, lambda p: p.write_bytes(b""), "model file corrupted"),
    (ENTRY_FILE, lambda p: p.unlink(), "model file missing"),
    (METADATA_FILE, lambda p: p.write_text("{not json"), "model file corrupted"),
    (METRICS_FILE, lambda p: p.unlink(), "model file missing"),
    (FEATURES_FILE, lambda p: p.write_bytes(b"\xff\xfe"), "model file corrupted"),
    (METADATA_FILE, lambda p: p.write_text('{"format": 2}'), "not a format-1 metadata"),
])
def test_damaged_files_give_clear_errors(tmp_path: Path, name: str,
                                         damage: Callable[[Path], object], pattern: str) -> None:
    folder = tmp_path / _save(tmp_path)
    damage(folder / name)
    with pytest.raises(ModelError, match=pattern) as info:
        load_version(folder)
    assert str(folder / name) in str(info.value)
    assert "/__w/" not in str(info.value)  # no XGBoost source path noise


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model version folder missing: .*nope"):
        load_version(tmp_path / "nope")


def test_current_pointer_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_current(tmp_path) is None
    v1 = _save(tmp_path, name="v1")
    v2 = _save(tmp_path, name="v2")
    set_current(tmp_path, v1)
    assert read_current(tmp_path) == "v1"
    assert (tmp_path / "current").read_text() == "v1\n"

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        set_current(tmp_path, v2)
    monkeypatch.undo()
    assert read_current(tmp_path) == "v1"  # the old pointer is intact, no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1", "v2"]
    set_current(tmp_path, v2)
    assert read_current(tmp_path) == "v2"
    with pytest.raises(ModelError, match="model version folder missing"):
        set_current(tmp_path, "v3")  # never points at something that does not load
    with pytest.raises(ModelError, match="bad model version name"):
        set_current(tmp_path, "../elsewhere")
    (tmp_path / "current").write_text("../../etc\n")
    with pytest.raises(ModelError, match="current does not name a model version"):
        read_current(tmp_path)


def test_save_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path, data: object) -> None:
        raise OSError("no space")

    monkeypatch.setattr(registry, "_write_json", fail)
    with pytest.raises(OSError):
        _save(tmp_path, name="half")
    assert list(tmp_path.iterdir()) == []


def test_promotion_rule(tmp_path: Path) -> None:
    rows = _rows()
    poor = _save(tmp_path, noise=True, name="poor")
    good = _save(tmp_path, name="good")
    poor_pred = predict(load_version(tmp_path / poor).entry, rows.X)
    good_pred = predict(load_version(tmp_path / good).entry, rows.X)

    first = promote(tmp_path, poor, rows, poor_pred)  # no current: promoted
    assert first.promoted and first.reason == "no current model" and first.previous is None
    assert read_current(tmp_path) == poor

    better = promote(tmp_path, good, rows, good_pred)
    assert better.promoted and better.previous == poor
    assert better.candidate_log_loss < better.current_log_loss
    assert better.current_auc is not None and better.candidate_auc > better.current_auc
    assert read_current(tmp_path) == good

    worse = promote(tmp_path, poor, rows, poor_pred)  # re-scored current beats it: kept
    assert not worse.promoted and "does not beat" in worse.reason
    assert read_current(tmp_path) == good
    # the candidate's predictions are compared with the current model's on the same rows
    assert worse.current_log_loss == pytest.approx(better.candidate_log_loss)

    same = promote(tmp_path, good, rows, good_pred)
    assert not same.promoted and same.reason == "candidate is already current"
    tie = promote(tmp_path, poor, rows, good_pred)  # equal log loss: keep the current one
    assert not tie.promoted
    margin = promote(tmp_path, poor, rows, np.clip(good_pred * 0.999, 0, 1),
                     min_improvement=1.0)
    assert not margin.promoted


def test_unusable_current_is_replaced(tmp_path: Path) -> None:
    rows = _rows()
    old = _save(tmp_path, name="old")
    set_current(tmp_path, old)
    spec = json.loads((tmp_path / old / FEATURES_FILE).read_text())
    spec["feature_version"] = "v0-stale"
    (tmp_path / old / FEATURES_FILE).write_text(json.dumps(spec))
    new = _save(tmp_path, noise=True, name="new")
    result = promote(tmp_path, new, rows, np.full(len(rows), 0.5))
    assert result.promoted and "current model old unusable" in result.reason
    assert read_current(tmp_path) == "new"
    broken = _save(tmp_path, name="broken")
    (tmp_path / broken / EXIT_FILE).unlink()
    with pytest.raises(ModelError, match="model file missing"):
        promote(tmp_path, broken, rows, np.full(len(rows), 0.5))
    assert read_current(tmp_path) == "new"


def test_promotion_compares_on_days_the_current_model_never_saw(tmp_path: Path) -> None:
    rows = _rows()
    old = _save(tmp_path, noise=True, name="old", days=["2019-02-11"])
    set_current(tmp_path, old)
    new = _save(tmp_path, name="new")
    new_pred = predict(load_version(tmp_path / new).entry, rows.X)
    result = promote(tmp_path, new, rows, new_pred)
    assert result.n_rows == int((rows.day == np.datetime64("2019-02-12")).sum()) == 150
    assert "days old was not trained on" in result.reason and result.promoted
    # a current model trained on all the validation days is compared on all of them
    wide = _save(tmp_path, name="wide", days=["2019-02-11", "2019-02-12"])
    set_current(tmp_path, wide)
    again = _save(tmp_path, noise=True, name="again")
    result = promote(tmp_path, again, rows, np.full(len(rows), 0.5))
    assert result.n_rows == len(rows) and not result.promoted
    assert "wide trained on all their days" in result.reason
    with pytest.raises(ValueError, match="predictions for"):
        promote(tmp_path, again, rows, np.zeros(3))
