"""Performance statistics of a run from its closed round trips (pure: no I/O).

Inputs are the simulated broker's trade records (one dict per closed round trip, money in
integer cents in ``gross_pnl_cents`` / ``fees_cents`` / ``pnl_cents``, times ISO-8601 with the
America/New_York offset) and the replay's end-of-day records (``day_stats``). Everything is
computed in integer cents; the dollar figures of :func:`stats` are rounded to cents at the end.

Conventions:

- a win is a trade with net P/L > 0, a loss one with net P/L < 0 (zero counts for neither);
- the daily Sharpe ratio uses the *sample* standard deviation (ddof=1) of the net P/L of every
  session day (days without trades count as 0), annualised with sqrt(252);
- the equity curve is starting cash plus the cumulated net P/L of closed trades in exit-time
  order; drawdown is the distance below the running peak (the starting cash included);
- exposure is the share of session minutes (09:30 to the day's ``close_time``) in which at
  least one position was open.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

NY = ZoneInfo("America/New_York")
DEFAULT_STARTING_CASH_CENTS = 10_000_000  # 100,000.00 dollars
TRADING_DAYS_PER_YEAR = 252
SESSION_OPEN = dt.time(9, 30)
SESSION_CLOSE = dt.time(16, 0)
HISTOGRAM_MAX_BINS = 20

Trade = dict[str, Any]
DayStat = dict[str, Any]


@dataclass(frozen=True)
class RunResult:
    """One run to report on: its closed trades, its end-of-day records and its daily limit."""

    trades: Sequence[Trade]
    day_stats: Sequence[DayStat] = field(default_factory=tuple)
    daily_limit_cents: int = 0


def _dollars(cents: float) -> float:
    return round(cents / 100, 2)


def _time(value: Any) -> dt.datetime:
    """An ISO-8601 time (or a datetime) as an aware datetime; naive ones are New York time."""
    t = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return t.replace(tzinfo=NY) if t.tzinfo is None else t


def _net(t: Trade) -> int:
    return int(t["pnl_cents"])


def _session_dates(trades: Iterable[Trade], day_stats: Iterable[DayStat]) -> list[str]:
    """Session days: those of ``day_stats`` plus any trade date they miss, in order."""
    return sorted({str(d["date"]) for d in day_stats} | {str(t["date"]) for t in trades})


def _sorted_by_exit(trades: Iterable[Trade]) -> list[Trade]:
    return sorted(trades, key=lambda t: (_time(t["exit_time"]), str(t.get("client_order_id", ""))))


def equity_curve(trades: Sequence[Trade],
                 starting_cash_cents: int = DEFAULT_STARTING_CASH_CENTS
                 ) -> list[tuple[str, int, int]]:
    """``(exit_time, equity_cents, drawdown_cents)`` after each closed trade, in exit-time order.

    ``drawdown_cents`` is >= 0: how far equity stands below its running peak (which starts at
    ``starting_cash_cents``).
    """
    equity = peak = int(starting_cash_cents)
    curve = []
    for t in _sorted_by_exit(trades):
        equity += _net(t)
        peak = max(peak, equity)
        curve.append((str(t["exit_time"]), equity, peak - equity))
    return curve


def daily_pnl(trades: Sequence[Trade], day_stats: Sequence[DayStat] = ()) -> list[tuple[str, int]]:
    """``(date, net_cents)`` for every session day (days without trades: 0), in date order."""
    by_day = dict.fromkeys(_session_dates(trades, day_stats), 0)
    for t in trades:
        by_day[str(t["date"])] += _net(t)
    return list(by_day.items())


def sharpe(daily_net_cents: Sequence[int]) -> float | None:
    """Annualised daily Sharpe ratio (mean / sample std x sqrt(252)); None when undefined."""
    n = len(daily_net_cents)
    if n < 2:
        return None
    mean = sum(daily_net_cents) / n
    var = sum((x - mean) ** 2 for x in daily_net_cents) / (n - 1)
    if var <= 0:
        return None
    return mean / math.sqrt(var) * math.sqrt(TRADING_DAYS_PER_YEAR)


def _session_window(date: str, close_time: Any) -> tuple[dt.datetime, dt.datetime]:
    day = dt.date.fromisoformat(date)
    start = dt.datetime.combine(day, SESSION_OPEN, tzinfo=NY)
    end = _time(close_time) if close_time else dt.datetime.combine(day, SESSION_CLOSE, tzinfo=NY)
    return start, max(start, end)


def exposure_minutes(trades: Sequence[Trade],
                     day_stats: Sequence[DayStat] = ()) -> tuple[float, float]:
    """``(minutes with >= 1 open position, session minutes)`` over all session days.

    Each trade's holding interval is clipped to its day's session (09:30 to ``close_time``;
    16:00 when the day has no record); overlapping positions count once.
    """
    closes = {str(d["date"]): d.get("close_time") for d in day_stats}
    windows = {date: _session_window(date, closes.get(date))
               for date in _session_dates(trades, day_stats)}
    intervals: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {d: [] for d in windows}
    for t in trades:
        start, end = windows[str(t["date"])]
        a, b = max(_time(t["entry_time"]), start), min(_time(t["exit_time"]), end)
        if b > a:
            intervals[str(t["date"])].append((a, b))
    covered = 0.0
    for spans in intervals.values():
        cur_a = cur_b = None
        for a, b in sorted(spans):
            if cur_b is None or a > cur_b:
                if cur_b is not None:
                    covered += (cur_b - cur_a).total_seconds()
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        if cur_b is not None:
            covered += (cur_b - cur_a).total_seconds()
    session = sum((b - a).total_seconds() for a, b in windows.values())
    return covered / 60, session / 60


def _nice_width(raw: float) -> int:
    """The smallest 1-2-5 x 10^k number of cents >= ``raw`` (at least 1 cent)."""
    width = 1
    while True:
        for m in (1, 2, 5):
            if width * m >= raw:
                return width * m
        width *= 10


def pnl_histogram(values_cents: Sequence[int],
                  max_bins: int = HISTOGRAM_MAX_BINS) -> tuple[list[int], list[int]]:
    """``(edges_cents, counts)`` of a histogram with round bin widths (1-2-5 x 10^k cents).

    Edges are multiples of the width, so 0 is always an edge (wins and losses never share a
    bin); bins are [left, right). ``len(edges) == len(counts) + 1``; empty input: ``([], [])``.
    """
    if not values_cents:
        return [], []
    lo_v, hi_v = min(values_cents), max(values_cents)
    width = _nice_width((hi_v - lo_v) / max_bins) if hi_v > lo_v else _nice_width(
        max(abs(lo_v), 100) / 5)
    lo = (lo_v // width) * width
    n = (hi_v - lo) // width + 1
    if n > max_bins:  # the span does not fit after rounding lo down: next width up
        width = _nice_width(width + 1)
        lo = (lo_v // width) * width
        n = (hi_v - lo) // width + 1
    counts = [0] * n
    for v in values_cents:
        counts[(v - lo) // width] += 1
    return [lo + i * width for i in range(n + 1)], counts


def _breakdown(trades: Sequence[Trade], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Trade]] = {}
    for t in trades:
        groups.setdefault(str(t.get(key) or "unknown"), []).append(t)
    out = {}
    for name in sorted(groups):
        ts = groups[name]
        wins = sum(1 for t in ts if _net(t) > 0)
        out[name] = {
            "trades": len(ts),
            "wins": wins,
            "win_rate": round(wins / len(ts), 4),
            "net_pnl": _dollars(sum(_net(t) for t in ts)),
            "gross_pnl": _dollars(sum(int(t["gross_pnl_cents"]) for t in ts)),
            "fees": _dollars(sum(int(t["fees_cents"]) for t in ts)),
        }
    return out


def stats(trades: Sequence[Trade] | RunResult, day_stats: Sequence[DayStat] | int = (),
          daily_limit_cents: int = 0,
          starting_cash_cents: int = DEFAULT_STARTING_CASH_CENTS) -> dict[str, Any]:
    """The statistics of one run as a JSON-ready dict (money in dollars rounded to cents).

    Called as ``stats(trades, day_stats, daily_limit_cents, starting_cash_cents)`` or as
    ``stats(run, starting_cash_cents)`` with a :class:`RunResult`. Ratios that are undefined
    (no trades, no losing trade, fewer than two days, ...) are None.
    """
    if isinstance(trades, RunResult):
        run = trades
        if isinstance(day_stats, int):
            starting_cash_cents = day_stats
        trades, day_stats, daily_limit_cents = run.trades, run.day_stats, run.daily_limit_cents
    assert not isinstance(day_stats, int)
    trades = list(trades)
    day_stats = list(day_stats)
    start_cash = int(starting_cash_cents)

    nets = [_net(t) for t in trades]
    net = sum(nets)
    gross = sum(int(t["gross_pnl_cents"]) for t in trades)
    fees = sum(int(t["fees_cents"]) for t in trades)
    wins = [x for x in nets if x > 0]
    losses = [x for x in nets if x < 0]
    won, lost = sum(wins), -sum(losses)

    curve = equity_curve(trades, start_cash)
    max_dd = max((dd for _, _, dd in curve), default=0)
    daily = daily_pnl(trades, day_stats)
    daily_sharpe = sharpe([x for _, x in daily])
    exposed, session = exposure_minutes(trades, day_stats)

    limit = int(daily_limit_cents)
    used = [int(d.get("max_used_capital_cents", 0)) for d in day_stats]
    used_frac = [u / limit for u in used] if limit > 0 else []
    edges, counts = pnl_histogram(nets)
    n = len(trades)

    return {
        "days": len(daily),
        "trades": n,
        "long_trades": sum(1 for t in trades if t.get("side") == "buy"),
        "short_trades": sum(1 for t in trades if t.get("side") == "sell"),
        "starting_cash": _dollars(start_cash),
        "ending_equity": _dollars(start_cash + net),
        "return": round(net / start_cash, 6) if start_cash else None,
        "net_pnl": _dollars(net),
        "gross_pnl": _dollars(gross),
        "fees": _dollars(fees),
        "wins": len(wins),
        "losses": len(losses),
        "win_rate": round(len(wins) / n, 4) if n else None,
        "profit_factor": round(won / lost, 4) if lost else None,
        "avg_win": _dollars(won / len(wins)) if wins else None,
        "avg_loss": _dollars(-lost / len(losses)) if losses else None,
        "avg_trade": _dollars(net / n) if n else None,
        "best_trade": _dollars(max(nets)) if nets else None,
        "worst_trade": _dollars(min(nets)) if nets else None,
        "sharpe_daily": round(daily_sharpe, 4) if daily_sharpe is not None else None,
        "max_drawdown": _dollars(max_dd),
        "max_drawdown_pct": round(max_dd / start_cash, 6) if start_cash else None,
        "exposure": round(exposed / session, 4) if session else None,
        "exposure_minutes": round(exposed, 2),
        "session_minutes": round(session, 2),
        "daily_limit": _dollars(limit),
        "max_used_capital": _dollars(max(used, default=0)),
        "capital_used_mean": round(sum(used_frac) / len(used_frac), 4) if used_frac else None,
        "capital_used_max": round(max(used_frac), 4) if used_frac else None,
        "by_strategy": _breakdown(trades, "strategy"),
        "by_exit_reason": _breakdown(trades, "exit_reason"),
        "pnl_histogram": {"edges": [_dollars(e) for e in edges], "counts": counts},
    }
