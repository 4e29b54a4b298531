"""Adapters built once per worker process (never at import time) and handed to the engine."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from redis import Redis

from core.alerts import Alerter
from core.breaker import BreakerConfig, RedisCircuitBreaker
from core.brokers.faults import FaultyBroker, parse_faults
from core.brokers.fill_model import FillModel
from core.brokers.simulated import SimulatedBroker
from core.calendar import NY, exchange_date
from core.config import Settings
from core.decision import DecisionParams
from core.exits import ExtremeTracker
from core.held import HeldColumns
from core.keys import Keys
from core.market.bar_store import BarWindow, FillsMark, RedisBarStore, SessionMeta
from core.replay import RedisReplay
from core.risk import RiskLimits
from core.risk_store import RedisDailyLimitStore
from core.scoring import FactsCache, ScoringParams
from core.signals.sums import SessionSums
from ml.predictor import ModelHolder, make_predictor


@dataclass
class Runtime:
    """The process's settings and adapters."""

    settings: Settings
    redis: Redis
    keys: Keys
    bar_store: RedisBarStore
    replay: RedisReplay
    broker: SimulatedBroker
    limits: RedisDailyLimitStore
    window: BarWindow
    breaker: RedisCircuitBreaker

    @property
    def decision_params(self) -> DecisionParams:
        """The decision step's slice of the settings (built once per settings object)."""
        s = self.settings
        cached = self._decision
        if cached is not None and cached[0] is s:
            return cached[1]
        params = DecisionParams(
            limits=RiskLimits(
                daily_limit_cents=s.daily_limit_cents, risk_pct_per_trade=s.risk_pct_per_trade,
                stop_loss_pct=s.stop_loss_pct, max_open_positions=s.max_open_positions,
                entry_collar_pct=s.entry_collar_pct),
            eod_close_minutes_before=s.eod_close_minutes_before,
            no_entry_minutes_before_close=s.no_entry_minutes_before_close,
            max_position_value_cents=s.max_position_value_cents,
        )
        self._decision = (s, params)
        return params

    skip_log_seen: set[tuple[str, str, str]] = field(default_factory=set)
    # incremental peak/trough state of held positions (the scoring process)
    extremes: ExtremeTracker = field(default_factory=ExtremeTracker)
    # running sums of the session's bars for the rules (the scoring process)
    sums: SessionSums = field(default_factory=SessionSums)
    # the held positions as arrays over the universe, kept from bar to bar (scoring's
    # exits, the decision's marks and loss limit)
    held: HeldColumns = field(default_factory=HeldColumns)
    # the last bar's bars-only scoring facts, computed ahead when the bar is pushed
    facts: FactsCache = field(default_factory=FactsCache)
    # the fills-done marks pushed to the scoring process (live only with its listener)
    fills_mark: FillsMark = field(default_factory=FillsMark)
    models: ModelHolder | None = None
    alerts: Alerter | None = None
    _scoring: dict[int, ScoringParams] = field(default_factory=dict)
    _decision: tuple[object, DecisionParams] | None = None
    # the backtester's entry features of a whole session at one bar ([S, F]; None: compute)
    entry_features: Callable[[dt.date, int], np.ndarray | None] | None = None
    # wall clock, America/New_York (tests replace it)
    now_fn: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(NY))

    @property
    def live_clock(self) -> bool:
        """True in paper/live on the exchange's clock: bars come from the feed, not a replay."""
        return self.settings.mode != "sim" and self.settings.clock == "exchange"

    def session_now(self) -> tuple[SessionMeta | None, int]:
        """The current session and its last bar: the replay's, or on the exchange clock
        today's session in the bar store and the last bar the feed published (-1: none)."""
        if not self.live_clock:
            return self.replay.now()
        day = exchange_date(self.now_fn())
        meta = self.bar_store.meta(day)
        if meta is None:
            return None, -1
        return meta, self.bar_store.count(day) - 1

    def scoring_params(self, bar_seconds: int) -> ScoringParams:
        """The scoring step's slice of the settings for bars of ``bar_seconds``."""
        cached = self._scoring.get(bar_seconds)
        if cached is None:
            cached = self._scoring[bar_seconds] = ScoringParams.from_settings(self.settings,
                                                                              bar_seconds)
        return cached


def connect_redis(url: str, ca_file: str | None = None) -> Redis:
    """A Redis client with timeouts, so a dead server fails fast instead of hanging.

    ``user:password@`` in the URL logs in (ACL user); ``rediss://`` speaks TLS and verifies
    the server's certificate (``ca_file``: a private CA bundle)."""
    extra = {}
    if url.startswith("rediss://"):
        extra["ssl_cert_reqs"] = "required"
        if ca_file:
            extra["ssl_ca_certs"] = ca_file
    return Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                          health_check_interval=30, retry_on_timeout=True, **extra)


def _alpaca_runtime(settings: Settings, redis: Redis, keys: Keys, bar_store: RedisBarStore,
                    replay: RedisReplay) -> Runtime:
    """Paper or live: the Alpaca adapter behind a shared rate limiter. With
    ``TRADING_CLOCK=replay`` the replay clock drives the day (rehearsals, local servers);
    otherwise the exchange's clock does."""
    from core.brokers.alpaca import AlpacaBroker
    from core.ratelimit import BucketConfig, RedisTokenBucket

    limiter = RedisTokenBucket(redis, keys.k("ratelimit:alpaca"), BucketConfig(
        capacity=settings.alpaca_rate_burst, refill_per_s=settings.alpaca_rate_per_minute / 60,
        exit_reserve=settings.alpaca_exit_reserve))
    broker = AlpacaBroker.from_settings(settings, limiter=limiter, redis=redis,
                                        url_override=settings.alpaca_base_url)
    if settings.clock == "replay":
        broker._now = functools.partial(replay_time, replay)
    return Runtime(settings=settings, redis=redis, keys=keys, bar_store=bar_store,
                   replay=replay, broker=broker,  # type: ignore[arg-type]
                   limits=RedisDailyLimitStore(redis, keys), window=BarWindow(bar_store),
                   breaker=_breaker(settings, redis, keys),
                   **_models_and_alerts(settings, redis, keys))


def _models_and_alerts(settings: Settings, redis: Redis, keys: Keys) -> dict[str, object]:
    """The model holder and the alerter, the same in every mode."""
    return {
        "models": ModelHolder(settings.model_dir, check_seconds=settings.model_check_seconds,
                              loader=functools.partial(make_predictor,
                                                       backend=settings.ml_backend)),
        "alerts": Alerter(redis, keys.prefix,
                          settings.alert_webhook_url.get_secret_value()
                          if settings.alert_webhook_url else None,
                          per_minute=settings.alert_max_per_minute),
    }


def replay_time(replay: RedisReplay) -> dt.datetime:
    """The replay clock's now: the close of its last published bar (America/New_York), or
    the session open before the first bar; wall time when no replay runs."""
    meta, bar = replay.now()
    if meta is None:
        return dt.datetime.now(NY)
    if bar < 0:
        return meta.open_time
    return meta.bar_time(bar) + dt.timedelta(seconds=meta.bar_seconds)


def build_runtime(settings: Settings) -> Runtime:
    """Build every adapter for this process."""
    redis = connect_redis(settings.redis_url,
                          str(settings.redis_ca_file) if settings.redis_ca_file else None)
    keys = Keys.for_mode(settings.mode, settings.sim_run_id)
    bar_store = RedisBarStore(redis, keys)
    replay = RedisReplay(redis, keys, bar_store)
    if settings.mode != "sim":
        return _alpaca_runtime(settings, redis, keys, bar_store, replay)
    broker = _sim_broker(settings, redis, keys, replay)
    faults = parse_faults(settings.sim_faults)
    if faults:
        broker = FaultyBroker(broker, redis, keys, faults)  # type: ignore[assignment]
    return Runtime(settings=settings, redis=redis, keys=keys, bar_store=bar_store,
                   replay=replay, broker=broker, limits=RedisDailyLimitStore(redis, keys),
                   window=BarWindow(bar_store), breaker=_breaker(settings, redis, keys),
                   **_models_and_alerts(settings, redis, keys))


class QuietBreaker:
    """The circuit breaker of a backtest: the in-process simulated broker has no transport to
    fail, so it never trips; a failure reported anyway stops the backtest loudly."""

    clean = True

    def allow(self) -> bool:
        return True

    def record_success(self) -> str:
        return "closed"

    def record_failure(self) -> str:
        raise RuntimeError("broker failure in a backtest: the simulated broker cannot fail")


def build_memory_runtime(settings: Settings) -> Runtime:
    """The simulated-mode runtime on an in-process Redis stand-in (``core.memredis``): the
    same replay clock, broker, daily-limit store and engine as the cluster, no server and no
    round trips. For the single-process backtester; refuses injected broker faults."""
    from core.memredis import MemoryRedis

    if settings.mode != "sim":
        raise ValueError("the in-memory runtime is for simulated mode only")
    if parse_faults(settings.sim_faults):
        raise ValueError("TRADING_SIM_FAULTS is not supported by the backtester")
    redis = MemoryRedis()
    keys = Keys.for_mode(settings.mode, settings.sim_run_id)
    bar_store = RedisBarStore(redis, keys)  # type: ignore[arg-type]
    replay = RedisReplay(redis, keys, bar_store)  # type: ignore[arg-type]
    broker = _sim_broker(settings, redis, keys, replay)  # type: ignore[arg-type]
    models = _models_and_alerts(settings, redis, keys)  # type: ignore[arg-type]
    models["alerts"] = None  # a backtest pages nobody
    return Runtime(settings=settings, redis=redis, keys=keys,  # type: ignore[arg-type]
                   bar_store=bar_store, replay=replay, broker=broker,
                   limits=RedisDailyLimitStore(redis, keys),  # type: ignore[arg-type]
                   window=BarWindow(bar_store),
                   breaker=QuietBreaker(),  # type: ignore[arg-type]
                   **models)


def _sim_broker(settings: Settings, redis: Redis, keys: Keys,
                replay: RedisReplay) -> SimulatedBroker:
    """The simulated broker with the ``TRADING_SIM_*`` costs, delays and account."""
    model = FillModel(slippage_bps=settings.sim_slippage_bps,
                      fee_per_share=settings.sim_fee_per_share, fee_min=settings.sim_fee_min,
                      latency_bars=settings.sim_latency_bars,
                      max_participation=settings.sim_max_participation)
    return SimulatedBroker(redis, keys, replay, model,
                           starting_cash_cents=int(settings.sim_starting_cash * 100),
                           margin_multiplier=settings.sim_margin_multiplier,
                           hard_to_borrow=frozenset(settings.sim_hard_to_borrow or ()),
                           protective_stops=settings.protective_stop)


def _breaker(settings: Settings, redis: Redis, keys: Keys) -> RedisCircuitBreaker:
    """The shared circuit breaker of broker calls (``TRADING_BREAKER_*``)."""
    return RedisCircuitBreaker(redis, keys, BreakerConfig(
        failure_threshold=settings.breaker_failures, window_s=settings.breaker_window_s,
        cooldown_s=settings.breaker_cooldown_s))


def drop_namespace(redis: Redis, prefix: str) -> int:
    """Remove every key under ``prefix`` (a finished simulated run's or backtest's; never
    call it with the empty prefix of paper/live). Returns how many were removed."""
    if not prefix:
        raise ValueError("refusing to drop the live namespace")
    removed = 0
    batch: list[bytes] = []
    for key in redis.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += int(redis.unlink(*batch))
            batch = []
    if batch:
        removed += int(redis.unlink(*batch))
    return removed
