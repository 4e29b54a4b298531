"""Classification and trading metrics of predicted probabilities (pure numpy).

``y`` holds 0/1 outcomes and ``p`` probabilities in [0, 1]; a metric that is undefined on
its input (no rows, one class only for the AUC, nothing selected for the precision) is NaN,
never an exception. Trade P/L values are net returns as fractions of the position value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_EPS = 1e-15


def _arrays(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p differ in length: {y.shape[0]} vs {p.shape[0]}")
    return y, p


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); NaN with one class."""
    y, p = _arrays(y, p)
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # average rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    ends = np.r_[starts[1:], y.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of the run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log likelihood (natural log), p clipped to [1e-15, 1 - 1e-15]."""
    y, p = _arrays(y, p)
    if y.size == 0:
        return math.nan
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probability and outcome (0 best, 1 worst)."""
    y, p = _arrays(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def precision_at(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, int]:
    """(share of positives among rows with p >= threshold, number of such rows)."""
    y, p = _arrays(y, p)
    sel = p >= threshold
    n = int(sel.sum())
    return (float(y[sel].mean()) if n else math.nan), n


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Calibration table: equal-width probability bins with their row count, mean predicted
    probability and observed positive rate (empty bins are left out)."""
    y, p = _arrays(y, p)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        if n:
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                        "mean_pred": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


def classification(y: np.ndarray, p: np.ndarray, threshold: float,
                   bins: int = 10) -> dict[str, Any]:
    """AUC, log loss, Brier, precision at ``threshold`` and the reliability table."""
    y, p = _arrays(y, p)
    prec, n_sel = precision_at(y, p, threshold)
    return {
        "n": int(y.size),
        "positive_rate": float(y.mean()) if y.size else math.nan,
        "auc": roc_auc(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier(y, p),
        "threshold": float(threshold),
        "precision": prec,
        "n_selected": n_sel,
        "reliability": reliability(y, p, bins),
    }


def pnl_summary(pnl: np.ndarray) -> dict[str, float]:
    """Trades, summed and mean net return (fractions) and win rate of per-trade returns."""
    pnl = np.asarray(pnl, dtype=np.float64)
    pnl = pnl[~np.isnan(pnl)]
    n = int(pnl.size)
    return {"trades": n, "sum": float(pnl.sum()),
            "mean": float(pnl.mean()) if n else math.nan,
            "win_rate": float((pnl > 0).mean()) if n else math.nan}


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats turned into None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
