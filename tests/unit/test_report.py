"""Tests for core.report (summary.json, trades.csv) and the pure parts of the simulated broker."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.brokers.fill_model import FillModel
from core.money import cents
from core.report import TRADE_COLUMNS, summarize, trade_rows, write_outputs

REQUIRED = ["client_order_id", "symbol", "side", "qty", "entry_time", "entry_price",
            "exit_time", "exit_price", "exit_reason", "pnl", "strategy"]


def _trade(coid: str, symbol: str, side: str, qty: int, entry_time: str, exit_time: str,
           pnl: int, gross: int, fees: int, reason: str, date: str,
           confidence: float | None = 0.7) -> dict[str, Any]:
    return {
        "client_order_id": coid, "symbol": symbol, "side": side, "qty": qty,
        "entry_time": entry_time, "entry_price": "100.0200", "exit_time": exit_time,
        "exit_price": "101.5000", "exit_reason": reason, "pnl_cents": pnl,
        "gross_pnl_cents": gross, "fees_cents": fees, "strategy": "orb",
        "confidence": confidence, "date": date, "exit_client_order_id": coid + "-x1",
    }


TRADES = [
    _trade("orb-BBB-20250312-0945-L", "BBB", "buy", 10, "2025-03-12T09:46:00-04:00",
           "2025-03-12T10:30:00-04:00", pnl=1500, gross=1570, fees=70, reason="stop_loss",
           date="2025-03-12"),
    _trade("orb-AAA-20250312-0950-S", "AAA", "sell", 20, "2025-03-12T09:51:00-04:00",
           "2025-03-12T15:50:00-04:00", pnl=-800, gross=-730, fees=70, reason="eod",
           date="2025-03-12", confidence=None),
    _trade("orb-AAA-20250313-1000-L", "AAA", "buy", 5, "2025-03-13T10:01:00-04:00",
           "2025-03-13T11:00:00-04:00", pnl=0, gross=70, fees=70, reason="eod",
           date="2025-03-13"),
]
DAY_STATS = [
    {"date": "2025-03-12", "open_positions_at_close": 0, "max_used_capital_cents": 250_000,
     "close_time": "2025-03-12T16:00:00-04:00"},
    {"date": "2025-03-13", "open_positions_at_close": 1, "max_used_capital_cents": 300_050,
     "close_time": "2025-03-13T16:00:00-04:00"},
]
ORDER_LOG = ["a", "b", "a", "c", "c", "c", "d"]


def test_summarize_totals_by_hand() -> None:
    s = summarize(TRADES, DAY_STATS, ORDER_LOG, daily_limit_cents=500_000)
    assert s["days"] == 2
    assert s["trades"] == 3
    assert s["net_pnl"] == 7.00  # 1500 - 800 + 0 cents
    assert s["gross_pnl"] == 9.10  # 1570 - 730 + 70
    assert s["fees"] == 2.10  # 3 x 70
    assert s["win_rate"] == 0.3333  # only the first trade is > 0
    assert s["daily_limit"] == 5000.0
    assert s["max_daily_used_capital"] == 3000.50
    assert s["open_positions_at_close"] == 1
    assert s["orders"] == 7
    assert s["exit_reasons"] == {"eod": 2, "stop_loss": 1}
    assert s["strategies"] == {"orb": 3}


def test_summarize_counts_duplicate_client_order_ids() -> None:
    # "a" appears twice and "c" three times: two ids are duplicated.
    s = summarize(TRADES, DAY_STATS, ORDER_LOG, daily_limit_cents=500_000)
    assert s["duplicate_client_order_ids"] == 2
    assert summarize(TRADES, DAY_STATS, ["a", "b"], 500_000)["duplicate_client_order_ids"] == 0


def test_summarize_per_day() -> None:
    s = summarize(TRADES, DAY_STATS, ORDER_LOG, daily_limit_cents=500_000)
    assert s["per_day"] == [
        {"date": "2025-03-12", "trades": 2, "net_pnl": 7.00, "max_used_capital": 2500.0,
         "last_exit_time": "2025-03-12T15:50:00-04:00", "open_positions_at_close": 0,
         "close_time": "2025-03-12T16:00:00-04:00"},
        {"date": "2025-03-13", "trades": 1, "net_pnl": 0.0, "max_used_capital": 3000.5,
         "last_exit_time": "2025-03-13T11:00:00-04:00", "open_positions_at_close": 1,
         "close_time": "2025-03-13T16:00:00-04:00"},
    ]


def test_summarize_day_without_trades_and_extra_fields() -> None:
    stats = [*DAY_STATS, {"date": "2025-03-14", "open_positions_at_close": 0,
                          "max_used_capital_cents": 0}]
    s = summarize(TRADES, stats, ORDER_LOG, 500_000, extra={"run_id": "r1", "days": 99})
    last = s["per_day"][-1]
    assert (last["trades"], last["net_pnl"], last["last_exit_time"]) == (0, 0.0, None)
    assert last["close_time"] is None
    assert s["run_id"] == "r1"
    assert s["days"] == 99  # extra wins


def test_summarize_no_trades() -> None:
    s = summarize([], [], [], daily_limit_cents=100)
    assert (s["trades"], s["net_pnl"], s["win_rate"], s["max_daily_used_capital"]) == (
        0, 0.0, 0.0, 0.0)
    assert s["duplicate_client_order_ids"] == 0
    assert s["per_day"] == []
    assert s["daily_limit"] == 1.0


def test_trade_rows_format_money_and_sort_by_entry_time() -> None:
    rows = trade_rows(list(reversed(TRADES)))
    assert [r["client_order_id"] for r in rows] == [t["client_order_id"] for t in TRADES]
    assert [r["pnl"] for r in rows] == ["15.00", "-8.00", "0.00"]
    assert [r["gross_pnl"] for r in rows] == ["15.70", "-7.30", "0.70"]
    assert [r["fees"] for r in rows] == ["0.70", "0.70", "0.70"]
    assert [r["confidence"] for r in rows] == ["0.7000", "", "0.7000"]
    assert all(isinstance(r["qty"], int) for r in rows)


def test_write_outputs(tmp_path: Path) -> None:
    summary = summarize(TRADES, DAY_STATS, ORDER_LOG, daily_limit_cents=500_000)
    out = tmp_path / "run" / "out"
    summary_path, trades_path = write_outputs(out, summary, TRADES)
    assert summary_path == out / "summary.json"
    assert trades_path == out / "trades.csv"
    assert json.loads(summary_path.read_text()) == summary

    with trades_path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header[: len(REQUIRED)] == REQUIRED
    assert header == list(TRADE_COLUMNS)
    assert len(body) == 3
    rows = [dict(zip(header, r, strict=True)) for r in body]
    first = rows[0]
    assert first["client_order_id"] == "orb-BBB-20250312-0945-L"
    assert (first["symbol"], first["side"], first["qty"]) == ("BBB", "buy", "10")
    assert first["entry_time"] == "2025-03-12T09:46:00-04:00"
    assert (first["entry_price"], first["exit_price"]) == ("100.0200", "101.5000")
    assert (first["exit_reason"], first["pnl"], first["strategy"]) == ("stop_loss", "15.00",
                                                                       "orb")
    assert first["exit_client_order_id"] == "orb-BBB-20250312-0945-L-x1"
    assert [r["pnl"] for r in rows] == ["15.00", "-8.00", "0.00"]


def test_write_outputs_with_no_trades_writes_header_only(tmp_path: Path) -> None:
    _, trades_path = write_outputs(tmp_path, summarize([], [], [], 100), [])
    lines = trades_path.read_text().splitlines()
    assert lines == [",".join(TRADE_COLUMNS)]


# --- FillModel and cents --------------------------------------------------------------------
def test_fill_price_moves_against_the_order() -> None:
    m = FillModel(slippage_bps=2.0)
    assert m.fill_price(100.0, "buy") == Decimal("100.0200")
    assert m.fill_price(100.0, "sell") == Decimal("99.9800")
    assert m.fill_price(100.0, "buy") > Decimal("100") > m.fill_price(100.0, "sell")


def test_fill_price_has_four_decimals() -> None:
    m = FillModel(slippage_bps=2.0)
    # 10.01 x 1.0002 = 10.012002 ; 10.01 x 0.9998 = 10.007998
    assert m.fill_price(10.01, "buy") == Decimal("10.0120")
    assert m.fill_price(10.01, "sell") == Decimal("10.0080")
    assert m.fill_price(10.01, "buy").as_tuple().exponent == -4


def test_fill_price_rounds_half_up() -> None:
    m = FillModel(slippage_bps=0.0)
    assert m.fill_price(1.00005, "buy") == Decimal("1.0001")
    assert m.fill_price(1.00005, "sell") == Decimal("1.0001")
    assert m.fill_price(1.00004, "buy") == Decimal("1.0000")


def test_fill_price_uses_shortest_float_repr() -> None:
    # 0.1 + 0.2 is 0.30000000000000004; the model must not turn it into 0.3000 + noise
    m = FillModel(slippage_bps=0.0)
    assert m.fill_price(0.1 + 0.2, "buy") == Decimal("0.3000")


@pytest.mark.parametrize(
    ("qty", "expected"),
    [(0, 35), (1, 35), (10, 35), (100, 35), (101, 35), (130, 46), (1000, 350), (2857, 1000)],
)
def test_fees_cents_with_minimum(qty: int, expected: int) -> None:
    # max($0.35, $0.0035 x qty), half-up to the cent: 130 sh -> $0.455 -> 46 cents
    assert FillModel().fees_cents(qty) == expected


def test_fees_cents_custom_schedule() -> None:
    m = FillModel(fee_per_share=Decimal("0.01"), fee_min=Decimal("1.00"))
    assert m.fees_cents(50) == 100
    assert m.fees_cents(250) == 250
    assert FillModel(fee_per_share=Decimal("0"), fee_min=Decimal("0")).fees_cents(500) == 0


@pytest.mark.parametrize(
    ("amount", "expected"),
    [("0.005", 0), ("0.015", 2), ("0.025", 2), ("0.035", 4), ("1.235", 124), ("12.34", 1234),
     ("-0.005", 0), ("-0.015", -2), ("0", 0), ("100000.00", 10_000_000)],
)
def test_cents_bankers_rounding(amount: str, expected: int) -> None:
    got = cents(Decimal(amount))
    assert got == expected
    assert type(got) is int
