"""Run outputs shared by ``daytrader sim`` and ``daytrader backtest``: summary.json, trades.csv.

Money in the files is US dollars with two decimals (computed from integer cents); times are
ISO-8601 with the America/New_York offset.
"""

from __future__ import annotations

import collections
import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

TRADE_COLUMNS = (
    "client_order_id", "symbol", "side", "qty", "entry_time", "entry_price", "exit_time",
    "exit_price", "exit_reason", "pnl", "strategy", "gross_pnl", "fees", "confidence", "date",
    "exit_client_order_id",
)


def _dollars(cents: int) -> float:
    return round(cents / 100, 2)


def trade_rows(trades: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Broker trade records as trades.csv rows, sorted by entry time then symbol."""
    rows = []
    for t in trades:
        rows.append({
            "client_order_id": t["client_order_id"], "symbol": t["symbol"], "side": t["side"],
            "qty": int(t["qty"]), "entry_time": t["entry_time"], "entry_price": t["entry_price"],
            "exit_time": t["exit_time"], "exit_price": t["exit_price"],
            "exit_reason": t["exit_reason"], "pnl": f"{_dollars(int(t['pnl_cents'])):.2f}",
            "strategy": t["strategy"],
            "gross_pnl": f"{_dollars(int(t['gross_pnl_cents'])):.2f}",
            "fees": f"{_dollars(int(t['fees_cents'])):.2f}",
            "confidence": "" if t.get("confidence") is None else f"{float(t['confidence']):.4f}",
            "date": t["date"], "exit_client_order_id": t.get("exit_client_order_id", ""),
        })
    rows.sort(key=lambda r: (r["entry_time"], r["symbol"], r["client_order_id"]))
    return rows


def summarize(trades: Sequence[dict[str, Any]], day_stats: Sequence[dict[str, Any]],
              order_log: Sequence[str], daily_limit_cents: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary.json document of a run."""
    net = sum(int(t["pnl_cents"]) for t in trades)
    gross = sum(int(t["gross_pnl_cents"]) for t in trades)
    fees = sum(int(t["fees_cents"]) for t in trades)
    wins = sum(1 for t in trades if int(t["pnl_cents"]) > 0)
    counts = collections.Counter(order_log)
    by_day: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for t in trades:
        by_day[str(t["date"])].append(t)
    per_day = []
    for day in day_stats:
        date = str(day["date"])
        day_trades = by_day.get(date, [])
        exits = [str(t["exit_time"]) for t in trades if str(t["exit_time"])[:10] == date]
        per_day.append({
            "date": date,
            "trades": len(day_trades),
            "net_pnl": _dollars(sum(int(t["pnl_cents"]) for t in day_trades)),
            "max_used_capital": _dollars(int(day["max_used_capital_cents"])),
            "last_exit_time": max(exits) if exits else None,
            "open_positions_at_close": int(day["open_positions_at_close"]),
            "close_time": day.get("close_time"),
        })
    reasons = collections.Counter(str(t["exit_reason"]) for t in trades)
    strategies = collections.Counter(str(t["strategy"]) for t in trades)
    summary = {
        "days": len(day_stats),
        "trades": len(trades),
        "net_pnl": _dollars(net),
        "gross_pnl": _dollars(gross),
        "fees": _dollars(fees),
        "win_rate": round(wins / len(trades), 4) if trades else 0.0,
        "max_daily_used_capital": max((d["max_used_capital"] for d in per_day), default=0.0),
        "daily_limit": _dollars(daily_limit_cents),
        "open_positions_at_close": sum(d["open_positions_at_close"] for d in per_day),
        "duplicate_client_order_ids": sum(1 for n in counts.values() if n > 1),
        "orders": len(order_log),
        "exit_reasons": dict(sorted(reasons.items())),
        "strategies": dict(sorted(strategies.items())),
        "per_day": per_day,
    }
    if extra:
        summary.update(extra)
    return summary


def write_outputs(out_dir: Path, summary: dict[str, Any],
                  trades: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``trades.csv`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    trades_path = out_dir / "trades.csv"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    with trades_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TRADE_COLUMNS)
        writer.writeheader()
        writer.writerows(trade_rows(trades))
    return summary_path, trades_path
