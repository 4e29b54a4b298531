"""Tests for core.config: defaults, parsing, validation errors that name the variable, secrets."""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from core.config import DEFAULT_SYMBOLS, Settings, load_settings
from core.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TRADING_* variable from the outer environment, and no .env in the working folder."""
    for name in list(os.environ):
        if name.upper().startswith("TRADING_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def _error_for(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    return str(info.value)


def test_defaults_load() -> None:
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.mode == "sim"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.symbols == DEFAULT_SYMBOLS
    assert s.daily_position_limit == Decimal("5000")
    assert s.risk_pct_per_trade == 0.002
    assert s.stop_loss_pct == 0.01
    assert s.eod_close_minutes_before == 10
    assert s.orb_minutes == 15
    assert s.alpaca_api_key is None and s.alpaca_secret_key is None
    assert s.task_time_limit_s > s.task_soft_time_limit_s


def test_dotenv_in_cwd_is_read_and_isolated(tmp_path: Path) -> None:
    # The autouse fixture put us in tmp_path: a .env written here is the only one seen.
    (tmp_path / ".env").write_text("TRADING_STOP_LOSS_PCT=0.02\n")
    assert load_settings().stop_loss_pct == 0.02


def test_symbols_are_split_stripped_and_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_SYMBOLS", "aapl, msft")
    assert load_settings().symbols == ("AAPL", "MSFT")


def test_symbols_dedupe_keep_order_and_accept_dots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_SYMBOLS", "msft;brk.b, MSFT,,aapl")
    assert load_settings().symbols == ("MSFT", "BRK.B", "AAPL")


def test_overrides_take_precedence_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_STOP_LOSS_PCT", "0.03")
    assert load_settings(stop_loss_pct=0.04).stop_loss_pct == 0.04


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TRADING_STOP_LOSS_PCT": "abc"}, "TRADING_STOP_LOSS_PCT"),
        ({"TRADING_STOP_LOSS_PCT": "1.5"}, "TRADING_STOP_LOSS_PCT"),
        ({"TRADING_DAILY_POSITION_LIMIT": "nan"}, "TRADING_DAILY_POSITION_LIMIT"),
        ({"TRADING_DAILY_POSITION_LIMIT": "-5"}, "TRADING_DAILY_POSITION_LIMIT"),
        ({"TRADING_DAILY_POSITION_LIMIT": "inf"}, "TRADING_DAILY_POSITION_LIMIT"),
        ({"TRADING_DAILY_POSITION_LIMIT": "0"}, "TRADING_DAILY_POSITION_LIMIT"),
        ({"TRADING_REDIS_URL": "http://x"}, "TRADING_REDIS_URL"),
        ({"TRADING_SYMBOLS": "A$B"}, "TRADING_SYMBOLS"),
        ({"TRADING_SYMBOLS": "ABCDEFGHIJK"}, "TRADING_SYMBOLS"),
        ({"TRADING_SYMBOLS": " , ,"}, "TRADING_SYMBOLS"),
        ({"TRADING_MODE": "wild"}, "TRADING_MODE"),
        ({"TRADING_SIM_FEE_MIN": "nan"}, "TRADING_SIM_FEE_MIN"),
        ({"TRADING_SIM_RUN_ID": "bad id!"}, "TRADING_SIM_RUN_ID"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    message = _error_for(monkeypatch, **env)
    assert variable in message


def test_paper_mode_without_alpaca_keys_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error_for(monkeypatch, TRADING_MODE="paper")
    assert "TRADING_MODE" in message
    assert "TRADING_ALPACA_API_KEY" in message


def test_live_mode_with_only_one_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error_for(monkeypatch, TRADING_MODE="live", TRADING_ALPACA_API_KEY="k")
    assert "TRADING_ALPACA_SECRET_KEY" in message


def test_paper_mode_with_both_keys_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_MODE", "paper")
    monkeypatch.setenv("TRADING_ALPACA_API_KEY", "key-id")
    monkeypatch.setenv("TRADING_ALPACA_SECRET_KEY", "secret-val")
    s = load_settings()
    assert s.mode == "paper"
    assert s.alpaca_api_key is not None
    assert s.alpaca_api_key.get_secret_value() == "key-id"


def test_sim_from_after_sim_to_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error_for(monkeypatch, TRADING_SIM_FROM="2025-03-10", TRADING_SIM_TO="2025-03-07")
    assert "TRADING_SIM_FROM" in message
    assert "TRADING_SIM_TO" in message


def test_sim_from_equal_to_sim_to_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_SIM_FROM", "2025-03-07")
    monkeypatch.setenv("TRADING_SIM_TO", "2025-03-07")
    s = load_settings()
    assert s.sim_from == s.sim_to == dt.date(2025, 3, 7)


@pytest.mark.parametrize(("soft", "hard"), [("20", "20"), ("25", "20")])
def test_task_time_limit_must_exceed_soft_limit(
    monkeypatch: pytest.MonkeyPatch, soft: str, hard: str
) -> None:
    message = _error_for(
        monkeypatch, TRADING_TASK_SOFT_TIME_LIMIT_S=soft, TRADING_TASK_TIME_LIMIT_S=hard
    )
    assert "TRADING_TASK_TIME_LIMIT_S" in message


def test_task_time_limit_one_above_soft_limit_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRADING_TASK_SOFT_TIME_LIMIT_S", "20")
    monkeypatch.setenv("TRADING_TASK_TIME_LIMIT_S", "21")
    assert load_settings().task_time_limit_s == 21


def test_secrets_are_secretstr_and_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_MODE", "sim")
    monkeypatch.setenv("TRADING_ALPACA_API_KEY", "supersecret123")
    monkeypatch.setenv("TRADING_ALPACA_SECRET_KEY", "othersecret456")
    monkeypatch.setenv("TRADING_POLYGON_API_KEY", "polysecret789")
    monkeypatch.setenv("TRADING_FLOWER_PASSWORD", "flowersecret000")
    s = load_settings()
    for field in ("alpaca_api_key", "alpaca_secret_key", "polygon_api_key", "flower_password"):
        assert isinstance(getattr(s, field), SecretStr)
    assert s.alpaca_api_key is not None
    assert s.alpaca_api_key.get_secret_value() == "supersecret123"
    shown = repr(s) + str(s) + repr(s.model_dump())
    for secret in ("supersecret123", "othersecret456", "polysecret789", "flowersecret000"):
        assert secret not in shown


def test_secret_does_not_leak_into_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error_for(
        monkeypatch, TRADING_ALPACA_API_KEY="supersecret123", TRADING_STOP_LOSS_PCT="abc"
    )
    assert "TRADING_STOP_LOSS_PCT" in message
    assert "supersecret123" not in message


@pytest.mark.parametrize(
    ("limit", "cents"),
    [("5000", 500_000), ("1234.56", 123_456), ("0.01", 1), ("100000000", 10_000_000_000)],
)
def test_daily_limit_cents(monkeypatch: pytest.MonkeyPatch, limit: str, cents: int) -> None:
    monkeypatch.setenv("TRADING_DAILY_POSITION_LIMIT", limit)
    s = load_settings()
    assert s.daily_limit_cents == cents
    assert isinstance(s.daily_limit_cents, int)


@pytest.mark.parametrize(("speed", "interval"), [("60", 1.0), ("600", 0.1), ("1", 60.0)])
def test_bar_interval_in_sim_mode_follows_speed(
    monkeypatch: pytest.MonkeyPatch, speed: str, interval: float
) -> None:
    monkeypatch.setenv("TRADING_SIM_SPEED", speed)
    monkeypatch.setenv("TRADING_TICK_SECONDS", "45")
    assert load_settings().bar_interval_s == pytest.approx(interval)


def test_bar_interval_outside_sim_mode_is_tick_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADING_MODE", "paper")
    monkeypatch.setenv("TRADING_ALPACA_API_KEY", "k")
    monkeypatch.setenv("TRADING_ALPACA_SECRET_KEY", "s")
    monkeypatch.setenv("TRADING_SIM_SPEED", "600")
    monkeypatch.setenv("TRADING_TICK_SECONDS", "45")
    assert load_settings().bar_interval_s == 45.0


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.stop_loss_pct = 0.5  # type: ignore[misc]
    assert s.stop_loss_pct == 0.01
