"""Model registry: trained versions in folders under ``MODEL_DIR`` and a ``current`` pointer.

Layout::

    MODEL_DIR/
      current               one line: the folder name of the served version (replaced atomically)
      <version>/            e.g. 20261125T143000Z-3fa9c1 (created UTC), written whole or not at all
        entry_model.ubj     XGBoost booster of the entry model (UBJSON)
        exit_model.ubj      XGBoost booster of the exit model (UBJSON)
        features.json       {"format", "feature_version", "entry": [...], "exit": [...]}
        metadata.json       {"format", "version", "created_utc", "data", "params",
                             "libraries", "device", ...}
        metrics.json        walk-forward metrics per fold and aggregate (ml.train)

A version whose feature lists or ``FEATURE_VERSION`` differ from this code, or whose files
are missing or corrupted, is refused with a ``ModelError`` that names the file.

Promotion rule (``promote``): the candidate becomes current when there is no current
version, when the current one can no longer be loaded by this code, or when the candidate's
out-of-sample entry log loss is lower (by more than ``min_improvement``) than the current
entry model's, re-scored on the SAME rows. The rows are the candidate's walk-forward
validation rows on days the current model was not trained on (its ``metadata.json``
``data.days``), so both are out of sample; when there are none (the same or older data), all
the candidate's validation rows are used, where the current model is in sample and so
favoured: a candidate then has to beat it anyway. Ties keep the current model.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.dataset import ENTRY_MODEL_FEATURES, EXIT_MODEL_FEATURES, Rows
from ml.errors import ModelError
from ml.features import FEATURE_VERSION
from ml.metrics import json_safe, log_loss, roc_auc

if TYPE_CHECKING:  # xgboost is imported where a model is read or written (start-up cost)
    import xgboost as xgb

log = logging.getLogger(__name__)

FORMAT = 1
CURRENT = "current"
ENTRY_FILE = "entry_model.ubj"
EXIT_FILE = "exit_model.ubj"
FEATURES_FILE = "features.json"
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
_XGB_PREFIX = re.compile(r"^\[[\d:]+\] \S+: ")  # "[12:14:54] /src/x.cc:409: "
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def new_version_name(now: dt.datetime | None = None) -> str:
    """A fresh version name: creation time UTC plus a random suffix."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def check_name(version: str) -> str:
    """``version`` if it is a usable folder name, else ModelError."""
    if not _NAME_RE.match(version or "") or version == CURRENT or version.startswith(".tmp"):
        raise ModelError(f"bad model version name {version!r}")
    return version


def features_spec() -> dict[str, Any]:
    """The ``features.json`` this code serves."""
    return {"format": FORMAT, "feature_version": FEATURE_VERSION,
            "entry": list(ENTRY_MODEL_FEATURES), "exit": list(EXIT_MODEL_FEATURES)}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def save_version(model_dir: Path, entry_model: xgb.Booster, exit_model: xgb.Booster,
                 metadata: dict[str, Any], metrics: dict[str, Any],
                 version: str | None = None) -> str:
    """Write a new version folder (built in a hidden temp folder, then renamed) -> its name.

    Does not touch ``current``; see ``promote`` and ``set_current``.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    version = check_name(version or new_version_name())
    final = model_dir / version
    if final.exists():
        raise ModelError(f"model version {final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # readable by workers running as another user
        entry_model.save_model(str(tmp / ENTRY_FILE))
        exit_model.save_model(str(tmp / EXIT_FILE))
        _write_json(tmp / FEATURES_FILE, features_spec())
        meta = dict(metadata) | {"format": FORMAT, "version": version}
        meta.setdefault("created_utc", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        _write_json(tmp / METADATA_FILE, meta)
        _write_json(tmp / METRICS_FILE, metrics)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model version %s", final)
    return version


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"model file missing: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model file corrupted: {path} ({exc})") from None


def check_features(spec: Any, path: Path) -> None:
    """ModelError naming ``path`` unless ``spec`` (features.json) matches this code."""
    if not isinstance(spec, dict):
        raise ModelError(f"model file corrupted: {path} (not a JSON object)")
    if spec.get("format") != FORMAT:
        raise ModelError(f"{path}: format {spec.get('format')!r}, this code reads {FORMAT}")
    if spec.get("feature_version") != FEATURE_VERSION:
        raise ModelError(f"{path}: feature version {spec.get('feature_version')!r} does not match "
                         f"this code's {FEATURE_VERSION!r}; retrain (daytrader train)")
    for key, names in (("entry", ENTRY_MODEL_FEATURES), ("exit", EXIT_MODEL_FEATURES)):
        got = spec.get(key)
        if got != list(names):
            raise ModelError(f"{path}: {key} feature list {got!r} does not match this code's "
                             f"{list(names)!r}; retrain (daytrader train)")


def _load_booster(path: Path, names: tuple[str, ...]) -> xgb.Booster:
    import xgboost as xgb

    if not path.is_file():
        raise ModelError(f"model file missing: {path}")
    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
    except (xgb.core.XGBoostError, ValueError, OSError) as exc:
        text = str(exc).strip()
        first = _XGB_PREFIX.sub("", text.splitlines()[0]) if text else type(exc).__name__
        raise ModelError(f"model file corrupted: {path} ({first[:200]})") from None
    if booster.num_features() != len(names):
        raise ModelError(f"{path}: model has {booster.num_features()} features, this code "
                         f"builds {len(names)}; retrain (daytrader train)")
    if booster.feature_names is not None and list(booster.feature_names) != list(names):
        raise ModelError(f"{path}: model feature names {booster.feature_names} do not match "
                         f"this code's {list(names)}")
    return booster


@dataclass(frozen=True)
class ModelVersion:
    """A loaded, checked version: boosters on the CPU, and its JSON files as read."""

    version: str
    path: Path
    entry: xgb.Booster
    exit: xgb.Booster
    features: dict[str, Any]
    metadata: dict[str, Any]
    metrics: dict[str, Any]


def load_version(path: Path) -> ModelVersion:
    """Load and check the version folder ``path``; ModelError naming the bad file."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model version folder missing: {path}")
    features = _read_json(path / FEATURES_FILE)
    check_features(features, path / FEATURES_FILE)
    metadata = _read_json(path / METADATA_FILE)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ModelError(f"{path / METADATA_FILE}: not a format-{FORMAT} metadata object")
    metrics = _read_json(path / METRICS_FILE)
    entry = _load_booster(path / ENTRY_FILE, ENTRY_MODEL_FEATURES)
    exit_ = _load_booster(path / EXIT_FILE, EXIT_MODEL_FEATURES)
    return ModelVersion(version=path.name, path=path, entry=entry, exit=exit_,
                        features=features, metadata=metadata, metrics=metrics)


def list_versions(model_dir: Path) -> list[str]:
    """Version folder names under ``model_dir``, oldest name first."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir()
                  if p.is_dir() and _NAME_RE.match(p.name) and not p.name.startswith(".tmp"))


def read_current(model_dir: Path) -> str | None:
    """The version named by ``model_dir/current``; None when the file does not exist."""
    path = Path(model_dir) / CURRENT
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    try:
        return check_name(text)
    except ModelError:
        raise ModelError(f"{path} does not name a model version: {text[:60]!r}") from None


def set_current(model_dir: Path, version: str) -> None:
    """Point ``current`` at ``version`` (checked loadable first): temp file + os.replace."""
    model_dir = Path(model_dir)
    load_version(model_dir / check_name(version))
    fd, tmp = tempfile.mkstemp(prefix=".current-", dir=model_dir)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, model_dir / CURRENT)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    log.info("current model: %s", version)


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` decided and why (log losses and AUCs on the same rows)."""

    promoted: bool
    reason: str
    candidate: str
    previous: str | None
    n_rows: int
    candidate_log_loss: float
    current_log_loss: float | None
    candidate_auc: float
    current_auc: float | None


def promote(model_dir: Path, candidate: str, rows: Rows, candidate_pred: np.ndarray,
            min_improvement: float = 0.0) -> Promotion:
    """Make ``candidate`` current if it beats the current version (module docstring rule).

    ``rows`` are the candidate's walk-forward validation entry rows and ``candidate_pred``
    its out-of-sample probabilities on them (``TrainResult.oos_entry[_pred]``).
    """
    model_dir = Path(model_dir)
    load_version(model_dir / check_name(candidate))  # never point at a broken version
    if len(candidate_pred) != len(rows):
        raise ValueError(f"{len(candidate_pred)} predictions for {len(rows)} rows")
    try:
        previous = read_current(model_dir)
    except ModelError as exc:
        previous, unreadable = None, str(exc)
    else:
        unreadable = ""

    def decide(promoted: bool, reason: str, cur_ll: float | None = None,
               cur_auc: float | None = None) -> Promotion:
        if promoted:
            set_current(model_dir, candidate)
        log.info("promotion of %s: %s", candidate, reason)
        return Promotion(promoted, reason, candidate, previous, len(rows),
                         log_loss(rows.y, candidate_pred), cur_ll,
                         roc_auc(rows.y, candidate_pred), cur_auc)

    if previous is None:
        return decide(True, f"no current model ({unreadable})" if unreadable
                      else "no current model")
    if previous == candidate:
        return decide(False, "candidate is already current")
    try:
        current = load_version(model_dir / previous)
    except ModelError as exc:
        return decide(True, f"current model {previous} unusable: {exc}")
    if len(rows) == 0:
        return decide(False, "no validation rows to compare on")
    seen = current.metadata.get("data", {}).get("days") or []
    unseen = ~np.isin(rows.day, np.array(seen, dtype="datetime64[D]"))
    where = "validation rows"
    if unseen.any() and not unseen.all():
        rows, candidate_pred = rows.select(unseen), np.asarray(candidate_pred)[unseen]
        where = f"validation rows on days {previous} was not trained on"
    elif not unseen.any():
        where = f"validation rows ({previous} trained on all their days)"
    cand_ll = log_loss(rows.y, candidate_pred)
    from ml.train import predict

    cur_pred = predict(current.entry, rows.X)
    cur_ll = log_loss(rows.y, cur_pred)
    cur_auc = roc_auc(rows.y, cur_pred)
    if cand_ll < cur_ll - min_improvement:
        return decide(True, f"log loss {cand_ll:.4f} < current {cur_ll:.4f} on {len(rows)} "
                      f"{where}", cur_ll, cur_auc)
    return decide(False, f"log loss {cand_ll:.4f} does not beat current {cur_ll:.4f} on "
                  f"{len(rows)} {where}", cur_ll, cur_auc)
