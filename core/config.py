"""Settings: one frozen pydantic-settings object read from ``TRADING_*`` variables and ``.env``.

Money settings are US dollars (Decimal), percentages are fractions (0.01 = 1 %), times are
minutes or seconds as named. ``load_settings`` turns validation errors into a ConfigError
that names the offending ``TRADING_*`` variable.
"""

from __future__ import annotations

import datetime as dt
import functools
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.errors import ConfigError

ENV_PREFIX = "TRADING_"
DEFAULT_SYMBOLS = ("AAPL", "MSFT", "AMZN", "TSLA", "JPM", "BAC", "SPY", "QQQ")

Symbols = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    """Every setting of the product. Environment variable = ``TRADING_`` + upper-case name."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- mode and infrastructure -------------------------------------------------------
    mode: Literal["sim", "paper", "live"] = "sim"
    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path.sock?db=0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_ca_file: Path | None = None  # CA bundle for a rediss:// server with a private CA
    symbols: Symbols = DEFAULT_SYMBOLS

    # --- risk (US dollars and fractions) ------------------------------------------------
    daily_position_limit: Decimal = Field(Decimal("5000"), gt=0, le=Decimal("100000000"))
    risk_pct_per_trade: float = Field(0.002, gt=0, le=1)
    stop_loss_pct: float = Field(0.01, gt=0, lt=1)
    peak_exit_drop_threshold: float = Field(0.005, gt=0, lt=1)
    ml_exit_threshold: float = Field(0.7, ge=0, le=1)
    eod_close_minutes_before: int = Field(10, ge=1, le=120)
    max_open_positions: int = Field(10, ge=1)
    max_position_value: Decimal | None = Field(None, gt=0)
    daily_loss_limit: Decimal = Field(Decimal("250"), gt=0)
    entry_collar_pct: float = Field(0.005, gt=0, lt=0.1)
    # what happens to the unfilled rest of an entry: cancelled at once (IOC) or kept working
    # (DAY) until filled, cancelled by EOD/flatten, or expired at the close
    partial_fill_policy: Literal["cancel", "keep"] = "cancel"

    # --- strategy ----------------------------------------------------------------------
    orb_minutes: int = Field(15, ge=1, le=120)
    orb_buffer_pct: float = Field(0.0005, ge=0, lt=0.1)
    orb_volume_ratio: float = Field(1.0, ge=0)
    no_entry_minutes_before_close: int = Field(30, ge=0, le=390)
    # strategies that generate entries (comma-separated): orb, vwap; "random" is the seeded
    # random-entry baseline of the backtest report
    strategies: Annotated[tuple[Literal["orb", "vwap", "random"], ...], NoDecode] = (
        "orb", "vwap")
    random_entry_rate: float = Field(0.002, gt=0, le=1)
    vwap_band_k: float = Field(2.0, gt=0, le=10)
    vwap_std_minutes: int = Field(30, ge=2, le=390)
    vwap_min_minutes: int = Field(30, ge=2, le=390)
    vwap_trend_minutes: int = Field(60, ge=1, le=390)
    vwap_max_trend_pct: float = Field(0.004, ge=0, lt=1)

    # --- exits (fractions of price, minutes; 0 switches take-profit / max holding off) ----
    peak_min_distance_minutes: int = Field(3, ge=1, le=120)
    peak_prominence_pct: float = Field(0.002, ge=0, lt=1)
    take_profit_pct: float = Field(0.0, ge=0, lt=1)
    max_holding_minutes: int = Field(0, ge=0, le=390)

    # --- models ------------------------------------------------------------------------
    model_dir: Path = Path("models")
    # entries whose entry-model probability is below this are dropped (when a model exists)
    ml_entry_threshold: float = Field(0.5, ge=0, le=1)
    model_check_seconds: float = Field(5.0, gt=0, le=3600)
    ml_backend: Literal["auto", "xgboost", "tensorrt"] = "auto"
    # nightly training (tasks.train_models): bar files to train on, and how many sessions
    train_data: Path | None = None
    train_days: int = Field(60, ge=2, le=5000)

    # --- broker and data credentials (paper / live) ----------------------------------------
    alpaca_api_key: SecretStr | None = None
    alpaca_secret_key: SecretStr | None = None
    polygon_api_key: SecretStr | None = None

    # --- Alpaca trading (paper / live) -----------------------------------------------------
    # live trading needs this explicit opt-in on top of TRADING_MODE=live
    live_trading_confirmed: bool = False
    alpaca_base_url: str | None = None  # trading REST override (a proxy or a local server)
    alpaca_trading_stream_url: str | None = None  # trade_updates stream override
    alpaca_rate_per_minute: int = Field(200, ge=1, le=10000)
    alpaca_rate_burst: int = Field(20, ge=1, le=1000)
    alpaca_exit_reserve: int = Field(5, ge=0, le=1000)
    # where paper/live time comes from: the exchange (real time) or the replay clock (a
    # replayed day against a paper account or a local server; tests and rehearsals)
    clock: Literal["exchange", "replay"] = "exchange"

    # --- market-data feed (paper / live) ----------------------------------------------------
    polygon_rest_url: str = "https://api.polygon.io"
    polygon_ws_url: str = "wss://socket.polygon.io"  # delayed plans: wss://delayed.polygon.io
    alpaca_data_url: str | None = None  # default https://data.alpaca.markets
    alpaca_stream_url: str | None = None  # default wss://stream.data.alpaca.markets/v2/<feed>
    alpaca_data_feed: Literal["iex", "sip"] = "iex"
    feed_grace_s: float = Field(5.0, ge=0, le=60)
    feed_silent_s: float = Field(90.0, gt=0, le=3600)
    feed_stale_minutes: int = Field(5, ge=1, le=390)
    feed_rest_delay_s: float = Field(3.0, ge=0, le=300)
    feed_give_up_s: float = Field(120.0, gt=0, le=3600)
    feed_reconnect_max_s: float = Field(60.0, gt=0, le=600)
    feed_http_timeout_s: float = Field(10.0, gt=0, le=120)

    # --- simulated mode ------------------------------------------------------------------
    sim_run_id: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sim_data: Path | None = None
    sim_symbols: Annotated[tuple[str, ...] | None, NoDecode] = None
    sim_from: dt.date | None = None
    sim_to: dt.date | None = None
    sim_synthetic_symbols: int = Field(20, ge=1, le=10000)
    sim_synthetic_start: dt.date = dt.date(2025, 11, 24)
    sim_days: int = Field(1, ge=1, le=3650)
    sim_seed: int = 7
    sim_speed: float = Field(60.0, gt=0, le=100000)
    sim_slippage_bps: float = Field(2.0, ge=0, le=500)
    sim_fee_per_share: Decimal = Field(Decimal("0.0035"), ge=0, le=1)
    sim_fee_min: Decimal = Field(Decimal("0.35"), ge=0, le=100)
    sim_latency_bars: int = Field(1, ge=1, le=30)
    sim_starting_cash: Decimal = Field(Decimal("100000"), gt=0)
    sim_settle_timeout_s: float = Field(30.0, gt=0)

    sim_faults: str = ""
    sim_hard_to_borrow: Annotated[tuple[str, ...] | None, NoDecode] = None
    sim_margin_multiplier: int = Field(4, ge=1, le=4)
    # fraction of a bar's volume one simulated order may fill (None: no cap; partial fills)
    sim_max_participation: float | None = Field(None, gt=0, le=1)

    # --- order path ----------------------------------------------------------------------
    broker_timeout_s: float = Field(10.0, gt=0, le=120)
    order_lock_ttl_s: float = Field(30.0, gt=0, le=600)
    breaker_failures: int = Field(5, ge=1)
    breaker_window_s: float = Field(60.0, gt=0)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    reconcile_seconds: float = Field(300.0, gt=0)
    # send each entry with its stop-loss attached (OTO), so the stop rests at the broker
    protective_stop: bool = False

    # --- Celery --------------------------------------------------------------------------
    tick_seconds: float = Field(60.0, gt=0, le=3600)
    task_soft_time_limit_s: int = Field(20, ge=1)
    task_time_limit_s: int = Field(30, ge=2)

    # --- logs: "text" (key=value extras) or "json" (one object per line); secrets masked --
    log_format: Literal["text", "json"] = "text"

    # --- alerts (optional): Slack/Discord-style webhook, rate-limited ----------------------
    alert_webhook_url: SecretStr | None = None
    alert_max_per_minute: int = Field(20, ge=1, le=1000)

    # --- Flower --------------------------------------------------------------------------
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    flower_port: int = Field(5555, ge=1, le=65535)
    # address Flower listens on; anything but loopback needs FLOWER_USER and FLOWER_PASSWORD
    flower_address: str = "127.0.0.1"
    # explicit opt-in: Flower with no login, allowed only on a loopback address
    flower_unauthenticated_localhost: bool = False

    @field_validator("strategies", mode="before")
    @classmethod
    def _split_strategies(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(p.strip().lower() for p in value.split(",") if p.strip())
            if not value:
                raise ValueError("name at least one strategy (orb, vwap, random)")
        return value

    @field_validator("symbols", "sim_symbols", "sim_hard_to_borrow", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.replace(";", ",").split(",")]
        if isinstance(value, list | tuple):
            out = []
            for item in value:
                sym = str(item).strip().upper()
                if not sym:
                    continue
                if not sym.replace(".", "").isalnum() or len(sym) > 10:
                    raise ValueError(f"bad symbol {item!r}")
                out.append(sym)
            if not out:
                raise ValueError("at least one symbol is needed")
            return tuple(dict.fromkeys(out))
        return value

    @model_validator(mode="after")
    def _check_dates(self) -> Settings:
        if self.sim_from and self.sim_to and self.sim_from > self.sim_to:
            raise ValueError("TRADING_SIM_FROM is after TRADING_SIM_TO")
        return self

    @field_validator("sim_faults")
    @classmethod
    def _check_faults(cls, value: str) -> str:
        from core.brokers.faults import parse_faults

        try:
            parse_faults(value)
        except Exception as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator(
        "daily_position_limit", "sim_fee_per_share", "sim_fee_min", "sim_starting_cash",
        "daily_loss_limit", "max_position_value",
    )
    @classmethod
    def _finite_money(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and not value.is_finite():
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.task_time_limit_s <= self.task_soft_time_limit_s:
            raise ValueError(
                "TRADING_TASK_TIME_LIMIT_S must be greater than TRADING_TASK_SOFT_TIME_LIMIT_S"
            )
        if self.order_lock_ttl_s <= self.broker_timeout_s:
            raise ValueError(
                "TRADING_ORDER_LOCK_TTL_S must be longer than TRADING_BROKER_TIMEOUT_S")
        if self.mode != "sim" and (self.alpaca_api_key is None or self.alpaca_secret_key is None):
            raise ValueError(
                f"TRADING_MODE={self.mode} needs TRADING_ALPACA_API_KEY and "
                "TRADING_ALPACA_SECRET_KEY"
            )
        if self.mode == "live" and not self.live_trading_confirmed:
            raise ValueError("TRADING_MODE=live trades real money: it also needs "
                             "TRADING_LIVE_TRADING_CONFIRMED=true")
        key = self.alpaca_api_key.get_secret_value() if self.alpaca_api_key else ""
        url = (self.alpaca_base_url or "").lower()
        # Alpaca's paper keys start with PK, live keys with AK
        if self.mode == "live" and (key.startswith("PK") or "paper-api" in url):
            raise ValueError("TRADING_MODE=live with a paper key or the paper endpoint: "
                             "refused (TRADING_ALPACA_API_KEY / TRADING_ALPACA_BASE_URL)")
        if self.mode == "paper" and (key.startswith("AK") or url.rstrip("/") in (
                "https://api.alpaca.markets", "http://api.alpaca.markets")):
            raise ValueError("TRADING_MODE=paper with a live key or the live endpoint: "
                             "refused (TRADING_ALPACA_API_KEY / TRADING_ALPACA_BASE_URL)")
        return self

    @property
    def daily_limit_cents(self) -> int:
        """The daily position-value limit in integer cents."""
        return int((self.daily_position_limit * 100).to_integral_value())

    @property
    def daily_loss_limit_cents(self) -> int:
        """The daily loss that halts new entries, in integer cents (positive)."""
        return int((self.daily_loss_limit * 100).to_integral_value())

    @property
    def max_position_value_cents(self) -> int:
        """Largest value of one symbol's position in cents (the daily limit when unset)."""
        if self.max_position_value is None:
            return self.daily_limit_cents
        return int((self.max_position_value * 100).to_integral_value())

    @property
    def bar_interval_s(self) -> float:
        """Wall seconds between beat ticks: one bar per tick on a replay (sim speed applies),
        ``TICK_SECONDS`` on the exchange clock."""
        if self.mode == "sim" or self.clock == "replay":
            return 60.0 / self.sim_speed
        return self.tick_seconds


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item.get("loc", ()) if part != "__root__"]
        name = ENV_PREFIX + loc[0].upper() if loc else "settings"
        lines.append(f"{name}: {item.get('msg')}")
    return "invalid settings: " + "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; raise ConfigError naming each bad ``TRADING_*`` variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
