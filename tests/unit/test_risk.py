"""Tests for core.risk: worked sizing examples, sizing properties, collar rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.risk import RiskLimits, collar_price, position_value_cents, size_position

LIMITS = RiskLimits(daily_limit_cents=500_000, risk_pct_per_trade=0.002, stop_loss_pct=0.01,
                    entry_collar_pct=0.005)


# --- worked examples ----------------------------------------------------------------------
def test_worked_example_budget_over_risk_per_share() -> None:
    # limit $5,000 x 0.2 % = $10 budget; $100 x 1 % = $1 risk/share -> 10 shares.
    # Value cap: $5,000 / $100.50 (collar) = 49.75 -> 49, so the risk budget decides.
    assert size_position(Decimal("100"), LIMITS, remaining_cents=500_000) == 10


def test_worked_example_floor_of_fractional_shares() -> None:
    # $10 budget / ($30 x 1 % = $0.30) = 33.33 -> 33 shares; value 33 x $30.15 = $994.95 fits.
    assert size_position(Decimal("30"), LIMITS, remaining_cents=500_000) == 33


def test_capped_by_remaining_limit_including_collar() -> None:
    # $500 left; collar price $100 x 1.005 = $100.50 -> 500 / 100.5 = 4.97 -> 4 shares
    # (without the collar it would be 5).
    assert size_position(Decimal("100"), LIMITS, remaining_cents=50_000) == 4


def test_cap_boundary_is_exact_in_cents() -> None:
    # 10 shares at the $100.50 collar cost exactly $1,005.00.
    assert size_position(Decimal("100"), LIMITS, remaining_cents=100_500) == 10
    assert size_position(Decimal("100"), LIMITS, remaining_cents=100_499) == 9


def test_capped_by_daily_limit_when_remaining_is_larger() -> None:
    # limit $500, risk 100 % -> $500 budget / $1 per share = 500 shares by risk,
    # but the value cap is min(remaining, limit) = $500 / $100.50 -> 4 shares.
    limits = RiskLimits(daily_limit_cents=50_000, risk_pct_per_trade=1.0, stop_loss_pct=0.01,
                        entry_collar_pct=0.005)
    assert size_position(Decimal("100"), limits, remaining_cents=10**9) == 4


def test_price_too_high_for_one_share_gives_zero() -> None:
    # $10 budget / ($2,000 x 1 % = $20) = 0.5 -> 0 shares.
    assert size_position(Decimal("2000"), LIMITS, remaining_cents=500_000) == 0


@pytest.mark.parametrize("price", ["0", "-1", "-100.5", "NaN", "Infinity", "-Infinity", "sNaN"])
def test_unusable_price_gives_zero(price: str) -> None:
    assert size_position(Decimal(price), LIMITS, remaining_cents=500_000) == 0


@pytest.mark.parametrize("remaining", [0, -1, -500_000])
def test_nothing_remaining_gives_zero(remaining: int) -> None:
    assert size_position(Decimal("100"), LIMITS, remaining_cents=remaining) == 0


@pytest.mark.parametrize(
    ("risk", "stop"),
    [(float("nan"), 0.01), (0.002, float("nan")), (float("inf"), 0.01), (0.002, float("inf")),
     (0.0, 0.01), (0.002, 0.0), (-0.002, 0.01), (0.002, -0.01)],
)
def test_unusable_risk_settings_give_zero(risk: float, stop: float) -> None:
    limits = RiskLimits(daily_limit_cents=500_000, risk_pct_per_trade=risk, stop_loss_pct=stop)
    assert size_position(Decimal("100"), limits, remaining_cents=500_000) == 0


def test_size_is_an_int() -> None:
    qty = size_position(Decimal("12.34"), LIMITS, remaining_cents=500_000)
    assert type(qty) is int
    # $10 / $0.1234 = 81.03 -> 81
    assert qty == 81


# --- collar and value rounding --------------------------------------------------------------
def test_collar_exact_product_is_not_moved() -> None:
    assert collar_price(Decimal("100"), "buy", 0.005) == Decimal("100.5000")
    assert collar_price(Decimal("100"), "sell", 0.005) == Decimal("99.5000")


def test_collar_buy_rounds_up_sell_rounds_down() -> None:
    # 10.01 x 1.005 = 10.06005 -> 10.0601 ; 10.01 x 0.995 = 9.95995 -> 9.9599
    assert collar_price(Decimal("10.01"), "buy", 0.005) == Decimal("10.0601")
    assert collar_price(Decimal("10.01"), "sell", 0.005) == Decimal("9.9599")


def test_collar_has_four_decimals() -> None:
    assert collar_price(Decimal("10.01"), "buy", 0.005).as_tuple().exponent == -4
    assert collar_price(Decimal("10.01"), "sell", 0.005).as_tuple().exponent == -4


def test_position_value_rounds_up_to_the_cent() -> None:
    # 3 x $10.0601 = $30.1803 -> 3018.03 cents -> 3019
    assert position_value_cents(3, Decimal("10.0601")) == 3019
    assert position_value_cents(10, Decimal("100.5")) == 100_500
    assert position_value_cents(0, Decimal("100")) == 0


# --- properties -----------------------------------------------------------------------------
prices = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("100000"), places=6,
                     allow_nan=False, allow_infinity=False)
fractions = st.floats(min_value=1e-6, max_value=1.0, exclude_max=True, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    price=prices,
    daily=st.integers(min_value=1, max_value=10**10),
    remaining=st.integers(min_value=-(10**6), max_value=10**11),
    risk=st.floats(min_value=1e-6, max_value=1.0, allow_nan=False),
    stop=fractions,
    collar=st.floats(min_value=1e-6, max_value=0.1, exclude_max=True, allow_nan=False),
)
def test_size_never_breaks_value_cap_or_risk_budget(
    price: Decimal, daily: int, remaining: int, risk: float, stop: float, collar: float
) -> None:
    limits = RiskLimits(daily_limit_cents=daily, risk_pct_per_trade=risk, stop_loss_pct=stop,
                        entry_collar_pct=collar)
    qty = size_position(price, limits, remaining)
    assert type(qty) is int
    assert qty >= 0
    if remaining <= 0:
        assert qty == 0
    # value at the collar price fits what is left and the daily limit (cents)
    cap = max(0, min(remaining, daily))
    assert qty * collar_price(price, "buy", collar) * 100 <= cap
    assert position_value_cents(qty, collar_price(price, "buy", collar)) <= cap
    # loss at the stop stays within the risk budget (1 cent rounding tolerance)
    budget = Decimal(daily) / 100 * Decimal(repr(risk))
    assert qty * price * Decimal(repr(stop)) <= budget + Decimal("0.01")


@settings(max_examples=200, deadline=None)
@given(price=prices, remaining=st.integers(min_value=1, max_value=10**9))
def test_more_remaining_never_gives_fewer_shares(price: Decimal, remaining: int) -> None:
    assert size_position(price, LIMITS, remaining) <= size_position(price, LIMITS, remaining + 1)


@settings(max_examples=200, deadline=None)
@given(price=prices, collar=st.floats(min_value=0.0, max_value=0.1, exclude_max=True))
def test_collar_brackets_the_exact_product(price: Decimal, collar: float) -> None:
    c = Decimal(repr(collar))
    buy = collar_price(price, "buy", collar)
    sell = collar_price(price, "sell", collar)
    tick = Decimal("0.0001")
    assert price * (1 + c) <= buy < price * (1 + c) + tick
    assert price * (1 - c) - tick < sell <= price * (1 - c)
    assert sell <= price <= buy
