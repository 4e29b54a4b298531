"""Simulated mode set-up: pick the days of a run (bar files or synthetic) and store them."""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.config import Settings
from core.errors import ConfigError
from core.models import DayBars
from core.runtime import Runtime

log = logging.getLogger(__name__)


def load_sim_days(settings: Settings,
                  meanwhile: Callable[[], object] | None = None) -> list[DayBars]:
    """The sessions a simulated run replays, chosen by the ``TRADING_SIM_*`` settings.

    With ``sim_data`` set: the bar files there, filtered by ``sim_symbols``, ``sim_from`` and
    ``sim_to``, the first ``sim_days`` sessions. Otherwise a seeded synthetic universe of
    ``sim_synthetic_symbols`` symbols starting at ``sim_synthetic_start``. ``meanwhile``
    runs while bar files are parsed in other processes (see ``load_days``).
    """
    if settings.sim_data is not None:
        from core.market.files import load_days

        days = load_days(settings.sim_data, settings.sim_symbols, settings.sim_from,
                         settings.sim_to, meanwhile=meanwhile)
        if not days:
            raise ConfigError(f"no trading days in {settings.sim_data} for the chosen range")
        return days[: settings.sim_days]
    from core.calendar import next_sessions
    from core.market.synthetic import generate_days

    if meanwhile is not None:
        meanwhile()

    start = settings.sim_from or settings.sim_synthetic_start
    dates = next_sessions(start, settings.sim_days)
    if settings.sim_to is not None:
        dates = [d for d in dates if d <= settings.sim_to]
    if not dates:
        raise ConfigError("TRADING_SIM_FROM/TO leave no session for the synthetic run")
    symbols = settings.sim_symbols or settings.sim_synthetic_symbols
    return generate_days(dates, symbols, seed=settings.sim_seed)


def prepare_replay(rt: Runtime, settings: Settings, days: list[DayBars] | None = None) -> int:
    """Store a run's days in Redis once (a lock keeps two processes from racing)."""
    with rt.redis.lock(rt.keys.k("replay:prepare"), timeout=120, blocking_timeout=120):
        if rt.replay.is_prepared():
            return len(rt.replay.days())
        days = load_sim_days(settings) if days is None else days
        rt.replay.prepare(days)
        rt.broker.open_account()
        log.info("replay prepared", extra={"days": len(days), "symbols": len(days[0].symbols)})
        return len(days)
