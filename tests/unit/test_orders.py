"""Tests for core.orders: deterministic client order ids and the OrderIntent message."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pydantic import ValidationError

from core.calendar import NY
from core.orders import (
    MAX_CLIENT_ORDER_ID,
    OrderIntent,
    entry_client_order_id,
    exit_client_order_id,
)

UTC = dt.UTC


def test_entry_id_is_deterministic_and_readable() -> None:
    bar = dt.datetime(2025, 1, 15, 14, 45, tzinfo=UTC)  # 09:45 EST
    a = entry_client_order_id("orb", "AAPL", bar, "buy")
    b = entry_client_order_id("orb", "AAPL", bar, "buy")
    assert a == b == "orb-AAPL-20250115-0945-L"


def test_entry_id_differs_by_side_bar_symbol_strategy() -> None:
    bar = dt.datetime(2025, 1, 15, 14, 45, tzinfo=UTC)
    base = entry_client_order_id("orb", "AAPL", bar, "buy")
    others = {
        entry_client_order_id("orb", "AAPL", bar, "sell"),
        entry_client_order_id("orb", "AAPL", bar + dt.timedelta(minutes=1), "buy"),
        entry_client_order_id("orb", "MSFT", bar, "buy"),
        entry_client_order_id("vwap", "AAPL", bar, "buy"),
    }
    assert base not in others
    assert len(others) == 4
    assert entry_client_order_id("orb", "AAPL", bar, "sell").endswith("-S")


def test_entry_id_uses_new_york_time_in_winter() -> None:
    # 14:30 UTC on 15 Jan is 09:30 EST (UTC-5).
    bar = dt.datetime(2025, 1, 15, 14, 30, tzinfo=UTC)
    assert entry_client_order_id("orb", "SPY", bar, "buy") == "orb-SPY-20250115-0930-L"


def test_entry_id_uses_new_york_time_in_summer_dst() -> None:
    # 13:30 UTC on 1 Jul is 09:30 EDT (UTC-4).
    bar = dt.datetime(2025, 7, 1, 13, 30, tzinfo=UTC)
    assert entry_client_order_id("orb", "SPY", bar, "buy") == "orb-SPY-20250701-0930-L"


def test_entry_id_uses_new_york_date_across_midnight_utc() -> None:
    # 02:00 UTC on 10 Mar 2025 (day after the DST switch) is 22:00 EDT on 9 Mar.
    bar = dt.datetime(2025, 3, 10, 2, 0, tzinfo=UTC)
    assert entry_client_order_id("orb", "SPY", bar, "sell") == "orb-SPY-20250309-2200-S"


def test_entry_id_same_instant_in_any_timezone_is_the_same() -> None:
    utc = dt.datetime(2025, 7, 1, 13, 30, tzinfo=UTC)
    assert entry_client_order_id("orb", "SPY", utc, "buy") == entry_client_order_id(
        "orb", "SPY", utc.astimezone(NY), "buy"
    ) == entry_client_order_id(
        "orb", "SPY", utc.astimezone(dt.timezone(dt.timedelta(hours=9))), "buy"
    )


def test_entry_id_fits_alpaca_limit_for_longest_inputs() -> None:
    bar = dt.datetime(2025, 12, 31, 20, 59, tzinfo=UTC)
    coid = entry_client_order_id("abcdefghijkl", "ABCDEFGHIJ", bar, "sell")
    assert len(coid) <= MAX_CLIENT_ORDER_ID == 48
    assert "ABCDEFGHIJ" in coid and "abcdefghijkl" in coid
    assert len(exit_client_order_id(coid, 99)) <= 48


@pytest.mark.parametrize("symbol", ["aapl", "", "ABCDEFGHIJK", "A$B", "1ABC", "AB-C", "A B"])
def test_entry_id_rejects_bad_symbol(symbol: str) -> None:
    with pytest.raises(ValueError, match="symbol"):
        entry_client_order_id("orb", symbol, dt.datetime(2025, 1, 15, 14, 30, tzinfo=UTC), "buy")


@pytest.mark.parametrize("strategy", ["ORB", "", "1orb", "or-b", "abcdefghijklm", "o b"])
def test_entry_id_rejects_bad_strategy(strategy: str) -> None:
    with pytest.raises(ValueError, match="strategy"):
        entry_client_order_id(strategy, "AAPL", dt.datetime(2025, 1, 15, 14, 30, tzinfo=UTC),
                              "buy")


def test_entry_id_accepts_dotted_symbol() -> None:
    bar = dt.datetime(2025, 1, 15, 14, 30, tzinfo=UTC)
    assert entry_client_order_id("orb", "BRK.B", bar, "buy") == "orb-BRK.B-20250115-0930-L"


def test_exit_id_attempt_suffix() -> None:
    entry = "orb-AAPL-20250115-0945-L"
    assert exit_client_order_id(entry) == entry + "-x1"
    assert exit_client_order_id(entry, 2) == entry + "-x2"
    assert exit_client_order_id(entry, 99) == entry + "-x99"
    assert exit_client_order_id(entry, 3) == exit_client_order_id(entry, 3)


@pytest.mark.parametrize("attempt", [0, -1, 100])
def test_exit_id_rejects_attempt_out_of_bounds(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        exit_client_order_id("orb-AAPL-20250115-0945-L", attempt)


def test_exit_id_rejects_result_over_48_chars() -> None:
    entry = "x" * 45
    assert len(exit_client_order_id(entry, 9)) == 48
    with pytest.raises(ValueError, match="too long"):
        exit_client_order_id(entry, 10)


# --- OrderIntent ------------------------------------------------------------------------------
def _intent(**changes: object) -> OrderIntent:
    data: dict[str, object] = {
        "client_order_id": "orb-AAPL-20250115-0945-L", "symbol": "AAPL", "side": "buy",
        "qty": 10, "intent": "entry", "reason": "orb", "strategy": "orb", "confidence": 0.75,
        "ref_price": "100.25", "limit_price": "100.7513", "session_date": dt.date(2025, 1, 15),
        "bar": 14,
    }
    data.update(changes)
    return OrderIntent.model_validate(data)


def test_intent_json_round_trip() -> None:
    intent = _intent()
    payload = intent.model_dump(mode="json")
    assert payload["session_date"] == "2025-01-15"
    wire = json.loads(json.dumps(payload))
    back = OrderIntent.model_validate(wire)
    assert back == intent
    assert back.session_date == dt.date(2025, 1, 15)
    assert back.limit_price == "100.7513"


def test_exit_intent_round_trip_without_limit_price() -> None:
    intent = _intent(client_order_id="orb-AAPL-20250115-0945-L-x1", side="sell", intent="exit",
                     reason="stop_loss", limit_price=None, bar=-1, confidence=None)
    assert OrderIntent.model_validate(intent.model_dump(mode="json")) == intent


def test_intent_rejects_extra_fields() -> None:
    payload = _intent().model_dump(mode="json")
    payload["unexpected"] = 1
    with pytest.raises(ValidationError, match="unexpected"):
        OrderIntent.model_validate(payload)


@pytest.mark.parametrize("symbol", ["aapl", "A$B", "", "ABCDEFGHIJK"])
def test_intent_rejects_bad_symbol(symbol: str) -> None:
    with pytest.raises(ValidationError, match="symbol"):
        _intent(symbol=symbol)


@pytest.mark.parametrize(
    "changes",
    [{"side": "short"}, {"qty": -1}, {"intent": "hedge"}, {"bar": -2},
     {"client_order_id": ""}, {"client_order_id": "x" * 49}, {"session_date": "2025-13-01"}],
)
def test_intent_rejects_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _intent(**changes)


def test_intent_is_frozen() -> None:
    intent = _intent()
    with pytest.raises(ValidationError):
        intent.qty = 11  # type: ignore[misc]
    assert intent.qty == 10


def test_exchange_date_is_the_new_york_date() -> None:
    import datetime as dt

    from core.calendar import exchange_date

    utc = dt.UTC
    # 21:30 ET on 2024-06-03 is already 01:30 UTC on 06-04: still the 3rd in New York
    assert exchange_date(dt.datetime(2024, 6, 4, 1, 30, tzinfo=utc)) == dt.date(2024, 6, 3)
    # the DST change: 2024-03-10 02:00 ET; 2024-03-11 03:59 UTC is 23:59 ET on the 10th
    assert exchange_date(dt.datetime(2024, 3, 11, 3, 59, tzinfo=utc)) == dt.date(2024, 3, 10)
    assert exchange_date(dt.datetime(2024, 11, 4, 4, 59, tzinfo=utc)) == dt.date(2024, 11, 3)
    with pytest.raises(ValueError):
        exchange_date(dt.datetime(2024, 6, 3, 12, 0))
