"""core.analytics on hand-computed trade lists, and core.report_html's files."""

from __future__ import annotations

import csv
import math
import time

import pytest

from core.analytics import (
    RunResult,
    daily_pnl,
    equity_curve,
    exposure_minutes,
    pnl_histogram,
    sharpe,
    stats,
)
from core.report_html import write_report

CASH = 10_000_000  # 100,000.00 dollars
LIMIT = 500_000  # 5,000.00 dollars


def trade(cid: str, date: str, entry: str, exit_: str, gross: int, fees: int = 70, *,
          side: str = "buy", strategy: str = "orb", reason: str = "peak",
          symbol: str = "AAA") -> dict:
    return {
        "client_order_id": cid, "exit_client_order_id": f"{cid}-x1", "date": date,
        "symbol": symbol, "side": side, "qty": 10,
        "entry_time": f"{date}T{entry}:00-05:00", "exit_time": f"{date}T{exit_}:00-05:00",
        "entry_price": "100.00", "exit_price": "101.00", "exit_reason": reason,
        "gross_pnl_cents": gross, "fees_cents": fees, "pnl_cents": gross - fees,
        "strategy": strategy, "confidence": 0.6,
    }


def day(date: str, used: int, close: str = "16:00") -> dict:
    return {"date": date, "max_used_capital_cents": used, "used_capital_cents": 0,
            "daily_limit_cents": LIMIT, "open_positions_at_close": 0,
            "close_time": f"{date}T{close}:00-05:00"}


# Three trades over two trading days plus a day without trades:
#   2019-02-11  T1 long  AAA 09:45-10:15 gross +10.00 fees 0.70 net +9.30 (orb, peak)
#               T2 short BBB 10:00-10:30 gross  -5.00 fees 0.70 net -5.70 (vwap, stop_loss)
#   2019-02-12  T3 long  AAA 10:00-11:00 gross  +3.00 fees 0.70 net +2.30 (orb, eod); 13:00 close
#   2019-02-13  no trade
TRADES = [
    trade("t3", "2019-02-12", "10:00", "11:00", 300, reason="eod"),
    trade("t1", "2019-02-11", "09:45", "10:15", 1000),
    trade("t2", "2019-02-11", "10:00", "10:30", -500, side="sell", strategy="vwap",
          reason="stop_loss", symbol="BBB"),
]
DAYS = [day("2019-02-11", 400_000), day("2019-02-12", 250_000, close="13:00"),
        day("2019-02-13", 0)]


def test_totals_and_ratios() -> None:
    s = stats(TRADES, DAYS, LIMIT, CASH)
    assert s["trades"] == 3 and s["days"] == 3
    assert (s["long_trades"], s["short_trades"]) == (2, 1)
    assert s["net_pnl"] == 5.90
    assert s["gross_pnl"] == 8.00
    assert s["fees"] == 2.10
    assert s["ending_equity"] == 100_005.90
    assert s["return"] == pytest.approx(590 / CASH)
    assert (s["wins"], s["losses"]) == (2, 1)
    assert s["win_rate"] == pytest.approx(0.6667)
    assert s["profit_factor"] == pytest.approx(round(1160 / 570, 4))
    assert s["avg_win"] == 5.80  # (9.30 + 2.30) / 2
    assert s["avg_loss"] == -5.70
    assert s["avg_trade"] == pytest.approx(1.97)  # 5.90 / 3 = 1.9667
    assert (s["best_trade"], s["worst_trade"]) == (9.30, -5.70)


def test_drawdown_on_exit_ordered_equity() -> None:
    curve = equity_curve(TRADES, CASH)
    # exit order: t1 10:15 (+930), t2 10:30 (-570), t3 next day (+230)
    assert [e for _, e, _ in curve] == [CASH + 930, CASH + 360, CASH + 590]
    assert [d for _, _, d in curve] == [0, 570, 340]
    assert curve[0][0] == "2019-02-11T10:15:00-05:00"
    s = stats(TRADES, DAYS, LIMIT, CASH)
    assert s["max_drawdown"] == 5.70
    assert s["max_drawdown_pct"] == pytest.approx(570 / CASH)


def test_drawdown_counts_a_first_loss_from_starting_cash() -> None:
    trades = [trade("a", "2019-02-11", "10:00", "10:05", -1000, fees=0),
              trade("b", "2019-02-11", "10:10", "10:20", 400, fees=0)]
    assert [d for _, _, d in equity_curve(trades, CASH)] == [1000, 600]


def test_daily_pnl_includes_days_without_trades() -> None:
    assert daily_pnl(TRADES, DAYS) == [("2019-02-11", 360), ("2019-02-12", 230),
                                       ("2019-02-13", 0)]


def test_sharpe_by_hand() -> None:
    daily = [360, 230, 0]
    mean = (360 + 230 + 0) / 3
    std = math.sqrt(((360 - mean) ** 2 + (230 - mean) ** 2 + (0 - mean) ** 2) / 2)
    expected = mean / std * math.sqrt(252)  # = 17.126...
    assert sharpe(daily) == pytest.approx(expected)
    assert stats(TRADES, DAYS, LIMIT, CASH)["sharpe_daily"] == pytest.approx(expected, abs=1e-4)
    assert 17.0 < expected < 17.2


def test_exposure_minutes() -> None:
    # day 1: 09:45-10:15 and 10:00-10:30 overlap -> 45 min; day 2: 60 min; day 3: none.
    # sessions: 390 + 210 (13:00 close) + 390 = 990 min
    assert exposure_minutes(TRADES, DAYS) == (105.0, 990.0)
    s = stats(TRADES, DAYS, LIMIT, CASH)
    assert s["exposure"] == pytest.approx(round(105 / 990, 4))
    assert (s["exposure_minutes"], s["session_minutes"]) == (105.0, 990.0)


def test_exposure_clips_to_the_session() -> None:
    t = trade("a", "2019-02-11", "09:00", "16:30", 0)
    assert exposure_minutes([t], [day("2019-02-11", 0)]) == (390.0, 390.0)


def test_capital_used_vs_limit() -> None:
    s = stats(TRADES, DAYS, LIMIT, CASH)
    assert s["capital_used_mean"] == pytest.approx(round((0.8 + 0.5 + 0.0) / 3, 4))
    assert s["capital_used_max"] == 0.8
    assert s["max_used_capital"] == 4000.00
    assert s["daily_limit"] == 5000.00


def test_breakdowns() -> None:
    s = stats(TRADES, DAYS, LIMIT, CASH)
    assert s["by_strategy"] == {
        "orb": {"trades": 2, "wins": 2, "win_rate": 1.0, "net_pnl": 11.60, "gross_pnl": 13.00,
                "fees": 1.40},
        "vwap": {"trades": 1, "wins": 0, "win_rate": 0.0, "net_pnl": -5.70, "gross_pnl": -5.00,
                 "fees": 0.70},
    }
    assert {k: (v["trades"], v["net_pnl"]) for k, v in s["by_exit_reason"].items()} == {
        "eod": (1, 2.30), "peak": (1, 9.30), "stop_loss": (1, -5.70)}


def test_histogram() -> None:
    s = stats(TRADES, DAYS, LIMIT, CASH)
    hist = s["pnl_histogram"]
    assert sum(hist["counts"]) == 3
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert 0.0 in hist["edges"]
    # span 15.00 / 20 bins -> 0.75 -> round width 1.00; bins from -6.00 to 10.00
    assert hist["edges"][0] == -6.0 and hist["edges"][-1] == 10.0
    assert hist["counts"][0] == 1 and hist["counts"][-1] == 1
    assert pnl_histogram([]) == ([], [])
    assert pnl_histogram([0, 0]) == ([0, 20], [2])
    _, counts = pnl_histogram(list(range(-12345, 54321, 7)))
    assert len(counts) <= 20 and sum(counts) == len(range(-12345, 54321, 7))


def test_run_result_form_is_the_same() -> None:
    assert stats(RunResult(TRADES, DAYS, LIMIT), CASH) == stats(TRADES, DAYS, LIMIT, CASH)


def test_no_trades() -> None:
    s = stats([], DAYS, LIMIT, CASH)
    assert s["trades"] == 0 and s["days"] == 3
    assert s["net_pnl"] == s["gross_pnl"] == s["fees"] == 0.0
    assert s["win_rate"] is None and s["profit_factor"] is None
    assert s["avg_win"] is None and s["avg_loss"] is None
    assert s["sharpe_daily"] is None  # three zero days: zero std
    assert s["max_drawdown"] == 0.0 and s["exposure"] == 0.0
    assert s["pnl_histogram"] == {"edges": [], "counts": []}
    assert s["by_strategy"] == {} and s["by_exit_reason"] == {}
    assert equity_curve([], CASH) == []
    empty = stats([], [], 0, CASH)
    assert empty["days"] == 0 and empty["exposure"] is None
    assert empty["capital_used_mean"] is None and empty["capital_used_max"] is None


def test_only_winners() -> None:
    winners = [t for t in TRADES if t["pnl_cents"] > 0]
    s = stats(winners, DAYS, LIMIT, CASH)
    assert s["profit_factor"] is None
    assert s["avg_loss"] is None and s["win_rate"] == 1.0
    assert s["max_drawdown"] == 0.0 and s["max_drawdown_pct"] == 0.0


def test_one_day() -> None:
    day1 = [t for t in TRADES if t["date"] == "2019-02-11"]
    s = stats(day1, DAYS[:1], LIMIT, CASH)
    assert s["days"] == 1 and s["sharpe_daily"] is None
    assert s["net_pnl"] == 3.60


def test_dates_missing_from_day_stats_still_count() -> None:
    assert daily_pnl(TRADES, []) == [("2019-02-11", 360), ("2019-02-12", 230)]
    # no day record: the 16:00 close is assumed
    assert exposure_minutes(TRADES, []) == (105.0, 780.0)


def test_write_report_files(tmp_path) -> None:
    runs = {
        "strategy": RunResult(TRADES, DAYS, LIMIT),
        "rules <only> & co": RunResult(TRADES[1:], DAYS, LIMIT),
        "random entries": RunResult([], DAYS, LIMIT),
    }
    paths = write_report(tmp_path / "rep", runs, CASH)
    assert {p.name for p in paths} == {"report.html", "equity.csv", "equity.png"}
    assert all(p.parent == tmp_path / "rep" and p.exists() for p in paths)

    page = paths.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "strategy" in page and "random entries" in page
    assert "rules &lt;only&gt; &amp; co" in page and "rules <only>" not in page
    assert '<table id="stats">' in page
    assert page.count('<img id="') == 4
    assert page.count('src="data:image/png;base64,') == 4
    assert "$5.90" in page and "$9.30" in page
    # self-contained: no external resource, no script
    assert "http://" not in page and "https://" not in page and "<script" not in page

    assert paths.equity_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with paths.equity_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["run", "time", "equity", "drawdown"]
    assert [r["run"] for r in rows] == ["strategy"] * 3 + ["rules <only> & co"] * 2
    assert rows[0] == {"run": "strategy", "time": "2019-02-11T10:15:00-05:00",
                       "equity": "100009.30", "drawdown": "0.00"}
    assert rows[1]["drawdown"] == "5.70"


def test_write_report_is_fast(tmp_path) -> None:
    trades = []
    for i in range(5000):
        d = f"2019-02-{11 + i % 5:02d}"
        minute = 30 + (i * 7) % 300
        entry = f"{9 + minute // 60:02d}:{minute % 60:02d}"
        minute += 20
        exit_ = f"{9 + minute // 60:02d}:{minute % 60:02d}"
        trades.append(trade(f"c{i}", d, entry, exit_, (i * 7919) % 4001 - 2000,
                            strategy=("orb", "vwap")[i % 2],
                            reason=("peak", "trough", "eod", "stop_loss")[i % 4]))
    days = [day(f"2019-02-{11 + k:02d}", 450_000) for k in range(5)]
    runs = {"strategy": RunResult(trades, days, LIMIT),
            "random entries": RunResult(trades[::2], days, LIMIT)}
    write_report(tmp_path, runs, CASH)  # warm-up: matplotlib's first import
    started = time.perf_counter()
    write_report(tmp_path, runs, CASH)
    assert time.perf_counter() - started < 5.0  # about 1 s on a laptop; generous for CI
