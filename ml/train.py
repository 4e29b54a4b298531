"""Walk-forward training of the XGBoost entry and exit models, by session day.

Splits (``walk_forward_splits``): the sorted session dates are cut into an initial training
block followed by ``folds`` consecutive validation blocks of equal size (about
``n / (folds + 1)`` days each; the initial block takes the remainder and is never smaller
than an inner split needs). Fold ``i`` validates on the ``i``-th validation block and trains
on every EARLIER day except the last ``purge_days`` sessions before that block (dropped,
never used). Labels never cross a session end by construction (``ml.labels``), so with the
purge no training label can overlap a validation day. Days are the sessions present in the
data (the purge counts data days, not calendar days).

Each fold: early stopping on an inner split of the fold's TRAINING days (the last
``inner_valid_frac`` of them, after the same purge; the validation fold is never looked at),
then a refit on all the fold's training days with the early-stopped number of rounds, then
predictions on the validation days. Per fold: AUC, log loss, Brier score, precision at the
decision threshold, a reliability table (mean predicted vs observed per probability bin), and
for the entry model the out-of-sample P/L of the rule signals on the validation days, taking
every signal vs only those with ``p >= threshold`` (each trade's net outcome as a fraction:
``+target``, ``-stop`` or the horizon-end return; summed per fold). The final models are
trained on all days with the median of the folds' round counts.

XGBoost runs with ``tree_method="hist"`` on ``device="cuda"`` when a GPU is usable, else on
the CPU. Dates are New York session dates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgboost as xgb

from core.errors import ConfigError
from core.models import DayBars
from core.scoring import ScoringParams
from ml.dataset import DatasetParams, Rows, build_datasets, data_hash, scoring_dict
from ml.device import resolve_device
from ml.features import FEATURE_VERSION
from ml.metrics import classification, log_loss, pnl_summary, roc_auc
from ml.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainParams:
    """Walk-forward and XGBoost settings.

    ``entry_threshold`` None: the break-even probability of the entry barriers
    (``stop / (target + stop)``, 0.5 when symmetric). ``exit_threshold``: the exit model's
    decision threshold (``Settings.ml_exit_threshold``). ``nthread`` 0: all cores.
    ``device`` None: ``"cuda"`` when usable, else ``"cpu"``.
    """

    folds: int = 5
    purge_days: int = 1
    inner_valid_frac: float = 0.2
    max_rounds: int = 400
    early_stopping_rounds: int = 30
    fallback_rounds: int = 100  # when the inner split has no rows to stop on
    max_depth: int = 4
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 5.0
    reg_lambda: float = 1.0
    entry_threshold: float | None = None
    exit_threshold: float = 0.7
    reliability_bins: int = 10
    nthread: int = 0
    seed: int = 7
    device: str | None = None

    def __post_init__(self) -> None:
        if self.folds < 1:
            raise ValueError("folds must be >= 1")
        if self.purge_days < 0:
            raise ValueError("purge_days must be >= 0")
        if not 0 < self.inner_valid_frac < 1:
            raise ValueError("inner_valid_frac must be in (0, 1)")


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold: training, purged and validation session dates."""

    index: int
    train_days: tuple[dt.date, ...]
    purged_days: tuple[dt.date, ...]
    valid_days: tuple[dt.date, ...]


def _min_train_days(purge_days: int, valid_frac: float) -> int:
    """Fewest training days whose inner split keeps an inner training day after the purge."""
    m = 2
    while m - max(1, round(valid_frac * m)) - purge_days < 1:
        m += 1
    return m


def _blocks(n: int, folds: int, purge_days: int, valid_frac: float) -> tuple[int, int]:
    """(size of the first training block, size of each validation block; 0 if too few)."""
    min_first = _min_train_days(purge_days, valid_frac) + purge_days
    block = max(min(n // (folds + 1), (n - min_first) // folds), 0)
    return n - folds * block, block


def inner_split(train_days: Sequence[dt.date], valid_frac: float,
                purge_days: int) -> tuple[tuple[dt.date, ...], tuple[dt.date, ...]]:
    """(inner training days, inner early-stopping days) of a fold's sorted training days:
    the last ``max(1, round(valid_frac * n))`` days stop early, the ``purge_days`` before them
    are dropped."""
    days = tuple(sorted(train_days))
    n_valid = max(1, round(valid_frac * len(days)))
    cut = len(days) - n_valid
    return days[: max(cut - purge_days, 0)], days[cut:]


def walk_forward_splits(days: Sequence[dt.date], folds: int, purge_days: int,
                        inner_valid_frac: float = 0.2) -> list[Fold]:
    """Expanding-window folds over sorted distinct ``days`` (see the module docstring).

    Raises ConfigError when there are too few days for every fold to have a validation
    day and an inner split with at least one training and one early-stopping day.
    """
    days = sorted(set(days))
    if folds < 1 or purge_days < 0:
        raise ConfigError(f"need folds >= 1 and purge days >= 0, got {folds} and {purge_days}")
    first, block = _blocks(len(days), folds, purge_days, inner_valid_frac)
    if block < 1:
        need = _min_train_days(purge_days, inner_valid_frac) + purge_days + folds
        raise ConfigError(f"too few days for {folds} fold(s) with a purge of {purge_days} "
                          f"day(s): {len(days)} session(s), need at least {need}")
    out = []
    for i in range(folds):
        start = first + i * block
        cut = max(start - purge_days, 0)
        out.append(Fold(index=i, train_days=tuple(days[:cut]),
                        purged_days=tuple(days[cut:start]),
                        valid_days=tuple(days[start:start + block])))
    return out


def _xgb_params(tp: TrainParams, device: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "objective": "binary:logistic", "eval_metric": "logloss", "tree_method": "hist",
        "device": device, "max_depth": tp.max_depth, "eta": tp.learning_rate,
        "subsample": tp.subsample, "colsample_bytree": tp.colsample_bytree,
        "min_child_weight": tp.min_child_weight, "lambda": tp.reg_lambda, "seed": tp.seed,
        "verbosity": 1,
    }
    if tp.nthread > 0:
        params["nthread"] = tp.nthread
    return params


def _dmatrix(rows: Rows) -> xgb.DMatrix:
    return xgb.DMatrix(rows.X, label=rows.y, missing=np.nan,
                       feature_names=list(rows.feature_names))


def fit(rows: Rows, train_days: Sequence[dt.date], tp: TrainParams,
        device: str) -> tuple[xgb.Booster, int]:
    """Early-stop on the inner split of ``train_days``, then refit on all of them.

    Returns (booster, rounds). Raises ConfigError when the training days hold no rows.
    """
    params = _xgb_params(tp, device)
    train = rows.on_days(train_days)
    if len(train) == 0:
        raise ConfigError(f"no training rows on {len(train_days)} training day(s) "
                          f"({min(train_days, default='-')}..{max(train_days, default='-')})")
    inner_train_days, inner_valid_days = inner_split(train_days, tp.inner_valid_frac,
                                                     tp.purge_days)
    inner_train = rows.on_days(inner_train_days)
    inner_valid = rows.on_days(inner_valid_days)
    if len(inner_train) and len(inner_valid):
        stopper = xgb.train(params, _dmatrix(inner_train), num_boost_round=tp.max_rounds,
                            evals=[(_dmatrix(inner_valid), "inner_valid")],
                            early_stopping_rounds=tp.early_stopping_rounds, verbose_eval=False)
        rounds = int(stopper.best_iteration) + 1
    else:
        rounds = tp.fallback_rounds
        log.warning("no rows to stop early on (inner split %d/%d rows): %d rounds",
                    len(inner_train), len(inner_valid), rounds)
    return xgb.train(params, _dmatrix(train), num_boost_round=rounds), rounds


def predict(booster: xgb.Booster, features: np.ndarray) -> np.ndarray:
    """Probabilities [N] (float64) of ``booster`` on feature rows [N, F]."""
    if features.shape[0] == 0:
        return np.zeros(0)
    dm = xgb.DMatrix(features, missing=np.nan, feature_names=booster.feature_names)
    return np.asarray(booster.predict(dm), dtype=np.float64)


@dataclass
class TrainResult:
    """Final models, metrics (``metrics.json``), metadata (``metadata.json``), the folds and
    the out-of-sample entry predictions on every validation row (for promotion)."""

    entry_model: xgb.Booster
    exit_model: xgb.Booster
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    folds: list[Fold]
    oos_entry: Rows
    oos_entry_pred: np.ndarray


def _days_json(days: Sequence[dt.date]) -> list[str]:
    return [d.isoformat() for d in days]


def _fold_metrics(model: str, fold: Fold, rows: Rows, pred: np.ndarray, n_train: int,
                  rounds: int, threshold: float, tp: TrainParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fold": fold.index, "train_days": _days_json(fold.train_days),
        "purged_days": _days_json(fold.purged_days), "valid_days": _days_json(fold.valid_days),
        "n_train": n_train, "rounds": rounds,
    }
    out |= classification(rows.y, pred, threshold, tp.reliability_bins)
    if model == "entry":
        sig = rows.signal
        out["pnl"] = {"all": pnl_summary(rows.pnl[sig]),
                      "filtered": pnl_summary(rows.pnl[sig & (pred >= threshold)])}
    return out


def _aggregate(model: str, folds: list[dict[str, Any]], rows: Rows, pred: np.ndarray,
               threshold: float, tp: TrainParams) -> dict[str, Any]:
    aucs = [f["auc"] for f in folds if not math.isnan(f["auc"])]
    out: dict[str, Any] = {"pooled": classification(rows.y, pred, threshold,
                                                     tp.reliability_bins),
                           "mean_fold_auc": float(np.mean(aucs)) if aucs else math.nan,
                           "mean_fold_log_loss": float(np.mean([f["log_loss"] for f in folds]))}
    if model == "entry":
        out["pnl"] = {k: {"trades": sum(f["pnl"][k]["trades"] for f in folds),
                          "sum": float(sum(f["pnl"][k]["sum"] for f in folds))}
                      for k in ("all", "filtered")}
    return out


def train_on_rows(entry: Rows, exit_: Rows, days: Sequence[dt.date],
                  dataset_params: DatasetParams | None = None,
                  train_params: TrainParams | None = None,
                  progress: bool = False) -> TrainResult:
    """Walk-forward evaluation and final models from prebuilt rows over session ``days``."""
    dp = dataset_params or DatasetParams()
    tp = train_params or TrainParams()
    device = resolve_device(tp.device)
    folds = walk_forward_splits(days, tp.folds, tp.purge_days, tp.inner_valid_frac)
    thresholds = {"entry": tp.entry_threshold if tp.entry_threshold is not None
                  else dp.break_even, "exit": tp.exit_threshold}
    if len(entry) == 0:
        raise ConfigError("no entry rows: the rule strategies fired on none of the days")
    metrics: dict[str, Any] = {"folds": tp.folds, "purge_days": tp.purge_days,
                               "device": device, "thresholds": thresholds}
    final_rounds: dict[str, int] = {}
    oos: tuple[Rows, np.ndarray] | None = None
    with Progress(2 * len(folds) + 2, "train", enabled=progress) as bar:
        for model, rows in (("entry", entry), ("exit", exit_)):
            per_fold: list[dict[str, Any]] = []
            valid_parts: list[Rows] = []
            preds: list[np.ndarray] = []
            for fold in folds:
                bar.update(0, note=f"{model} fold {fold.index + 1}/{len(folds)}")
                booster, rounds = fit(rows, fold.train_days, tp, device)
                valid = rows.on_days(fold.valid_days)
                p = predict(booster, valid.X)
                per_fold.append(_fold_metrics(model, fold, valid, p,
                                              len(rows.on_days(fold.train_days)), rounds,
                                              thresholds[model], tp))
                valid_parts.append(valid)
                preds.append(p)
                bar.update(1, note=f"{model} fold {fold.index + 1}/{len(folds)}")
            pooled = Rows.concat(valid_parts, rows.feature_names)
            pooled_p = np.concatenate(preds)
            final_rounds[model] = max(1, int(statistics.median(f["rounds"] for f in per_fold)))
            metrics[model] = {"folds": per_fold,
                              "aggregate": _aggregate(model, per_fold, pooled, pooled_p,
                                                      thresholds[model], tp)}
            if model == "entry":
                oos = (pooled, pooled_p)
        finals = {}
        for model, rows in (("entry", entry), ("exit", exit_)):
            bar.update(0, note=f"{model} final ({final_rounds[model]} rounds)")
            finals[model] = xgb.train(_xgb_params(tp, device), _dmatrix(rows),
                                      num_boost_round=final_rounds[model])
            bar.update(1, note=f"{model} final")
    metrics["final_rounds"] = final_rounds
    assert oos is not None
    metadata = {
        "data": {"first_day": min(days).isoformat(), "last_day": max(days).isoformat(),
                 "n_days": len(set(days)), "days": _days_json(sorted(set(days))),
                 "rows": {"entry": len(entry), "exit": len(exit_)}},
        "params": {"dataset": dataclasses.asdict(dp), "train": dataclasses.asdict(tp),
                   "xgboost": _xgb_params(tp, device) | {"final_rounds": final_rounds}},
        "feature_version": FEATURE_VERSION,
        "libraries": library_versions(),
        "device": device,
    }
    return TrainResult(entry_model=finals["entry"], exit_model=finals["exit"], metrics=metrics,
                       metadata=metadata, folds=folds, oos_entry=oos[0], oos_entry_pred=oos[1])


def train_models(days: Sequence[DayBars], dataset_params: DatasetParams | None = None,
                 train_params: TrainParams | None = None, scoring: ScoringParams | None = None,
                 progress: bool = False) -> TrainResult:
    """Build the rows of ``days`` and run ``train_on_rows``; metadata gets the data range,
    symbols, bar size, data hash and the rule settings."""
    if not days:
        raise ConfigError("no sessions to train on")
    dp = dataset_params or DatasetParams()
    with Progress(len(days), "rows", enabled=progress) as bar:
        entry, exit_ = build_datasets(days, dp, scoring,
                                      on_day=lambda d: bar.update(1, note=d.date.isoformat()))
    log.info("rows: %d entry (%d signals), %d exit", len(entry), int(entry.signal.sum()),
             len(exit_))
    result = train_on_rows(entry, exit_, [d.date for d in days], dp, train_params, progress)
    symbols = sorted({s for d in days for s in d.symbols})
    result.metadata["data"] |= {"symbols": symbols, "bar_seconds": days[0].bar_seconds,
                                "hash": data_hash(days)}
    result.metadata["params"]["scoring"] = scoring_dict(scoring)
    return result


def library_versions() -> dict[str, str]:
    """Versions of python, numpy and xgboost."""
    return {"python": platform.python_version(), "numpy": np.__version__,
            "xgboost": xgb.__version__}


def rescore_log_loss(booster: xgb.Booster, rows: Rows) -> tuple[float, float]:
    """(log loss, AUC) of ``booster`` on ``rows``."""
    p = predict(booster, rows.X)
    return log_loss(rows.y, p), roc_auc(rows.y, p)


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_fold_table(metrics: dict[str, Any]) -> str:
    """The per-fold table printed by ``daytrader train`` (P/L: summed net returns, %)."""
    head = (f"{'fold':>4}  {'validation days':<23} {'train':>6} {'valid':>6} {'pos%':>5} "
            f"{'AUC':>6} {'logloss':>7} {'Brier':>6} {'prec@thr':>12} "
            f"{'P/L all %':>15} {'P/L model %':>15} {'exit AUC':>8}")
    lines = [head, "-" * len(head)]
    entry, exit_ = metrics["entry"], metrics["exit"]

    def row(label: str, days: str, n_train: Any, m: dict[str, Any], pnl: dict[str, Any],
            exit_auc: float) -> str:
        prec = f"{_fmt(m['precision'], '.2f')} ({m['n_selected']})"
        pa = f"{_fmt(100 * pnl['all']['sum'], '+.2f')} ({pnl['all']['trades']})"
        pf = f"{_fmt(100 * pnl['filtered']['sum'], '+.2f')} ({pnl['filtered']['trades']})"
        return (f"{label:>4}  {days:<23} {n_train!s:>6} {m['n']:>6} "
                f"{_fmt(100 * m['positive_rate'], '.1f'):>5} {_fmt(m['auc']):>6} "
                f"{_fmt(m['log_loss']):>7} {_fmt(m['brier']):>6} {prec:>12} {pa:>15} "
                f"{pf:>15} {_fmt(exit_auc):>8}")

    for f, fx in zip(entry["folds"], exit_["folds"], strict=True):
        v = f["valid_days"]
        days = f"{v[0]}..{v[-1]}" if v else "-"
        lines.append(row(str(f["fold"] + 1), days, f["n_train"], f, f["pnl"], fx["auc"]))
    agg = entry["aggregate"]
    lines.append("-" * len(head))
    lines.append(row("all", "pooled out-of-sample", "", agg["pooled"], agg["pnl"],
                     exit_["aggregate"]["pooled"]["auc"]))
    thr = metrics["thresholds"]
    lines.append(f"entry threshold {thr['entry']:.3f}, exit threshold {thr['exit']:.3f}, "
                 f"final rounds entry {metrics['final_rounds']['entry']} / exit "
                 f"{metrics['final_rounds']['exit']}, device {metrics['device']}")
    return "\n".join(lines)


@dataclass(frozen=True)
class TrainRun:
    """What one training run produced: the version written, its metrics table, and the
    promotion verdict (None when promotion was not asked for)."""

    version: str
    table: str
    promoted: bool | None
    reason: str


def train_from_files(data_dir: Any, model_dir: Any, settings: Any,
                     symbols: Sequence[str] | None = None, start: dt.date | None = None,
                     end: dt.date | None = None, folds: int = 5, purge_days: int = 1,
                     rows: str = "signals", entry_threshold: float | None = None,
                     seed: int = 7, progress: bool = True, promote_new: bool = True,
                     last_days: int | None = None) -> TrainRun:
    """Train both models walk-forward on the bar files in ``data_dir`` (New York session
    dates ``start``..``end``, or the last ``last_days`` sessions), write a version under
    ``model_dir`` and promote it when it beats the current one. Shared by ``daytrader
    train`` and the nightly task. Raises ConfigError for unusable input."""
    import hashlib
    from pathlib import Path

    from core.market.files import list_bar_files, load_days
    from ml.registry import promote, save_version

    if start and end and start > end:
        raise ConfigError(f"--from {start} is after --to {end}")
    if folds < 1 or purge_days < 0:
        raise ConfigError("--folds must be >= 1 and --purge-days >= 0")
    if entry_threshold is not None and not 0 <= entry_threshold <= 1:
        raise ConfigError("--entry-threshold must be a probability in [0, 1]")
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    days = load_days(data_dir, list(symbols) if symbols else None, start, end)
    if last_days is not None:
        days = days[-last_days:]
    if not days:
        raise ConfigError(f"no sessions in {data_dir} between {start or 'the start'} "
                          f"and {end or 'the end'}")
    files = list_bar_files(data_dir)
    used = list(symbols) if symbols else sorted(files)
    dataset = DatasetParams.from_settings(settings, rows=rows)
    params = TrainParams(folds=folds, purge_days=purge_days, entry_threshold=entry_threshold,
                         exit_threshold=settings.ml_exit_threshold, seed=seed)
    log.info("training on %d session(s) %s..%s, %d symbol(s), %d fold(s), purge %d day(s)",
             len(days), days[0].date, days[-1].date, len(used), folds, purge_days)
    result = train_models(days, dataset, params,
                          ScoringParams.from_settings(settings, days[0].bar_seconds),
                          progress=progress)
    result.metadata["data"]["files"] = {
        files[s].name: hashlib.sha256(files[s].read_bytes()).hexdigest() for s in used}
    result.metadata["data"]["source"] = str(data_dir.resolve())
    version = save_version(model_dir, result.entry_model, result.exit_model,
                           result.metadata, result.metrics)
    table = format_fold_table(result.metrics)
    if not promote_new:
        return TrainRun(version, table, None, "not promoted (--no-promote)")
    decision = promote(model_dir, version, result.oos_entry, result.oos_entry_pred)
    return TrainRun(version, table, decision.promoted, decision.reason)
