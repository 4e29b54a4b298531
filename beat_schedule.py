"""Beat entries: the per-bar tick (with ``expires`` so a late tick is dropped), the EOD task,
the periodic reconciliation with the broker and, in paper/live, the nightly training.

The EOD task fires often and acts only inside ``EOD_CLOSE_MINUTES_BEFORE`` of that day's real
close, so early closes need no special schedule. Reconcile runs every
``RECONCILE_SECONDS`` (in simulated mode every 30 bars of wall time).
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from core.config import Settings


def build_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat schedule for these settings (intervals in wall seconds)."""
    # on the exchange clock the tick polls for the feed's newest bar (once per bar, guarded)
    live = settings.mode != "sim" and settings.clock == "exchange"
    tick = min(settings.bar_interval_s, 5.0) if live else settings.bar_interval_s
    sim = settings.mode == "sim"
    reconcile = max(tick * 30.0, 5.0) if sim else settings.reconcile_seconds
    schedule: dict[str, dict[str, Any]] = {
        "tick": {
            "task": "tasks.tick",
            "schedule": tick,
            "options": {"expires": max(tick * 2.0, 1.0)},
        },
        "eod-close": {
            "task": "tasks.eod_close",
            "schedule": max(tick * 2.0, 0.5) if sim else 30.0,
            "options": {"expires": max(tick * 4.0, 2.0) if sim else 30.0},
        },
        "reconcile": {
            "task": "tasks.reconcile",
            "schedule": reconcile,
            "options": {"expires": reconcile},
        },
    }
    if not sim:  # the simulated clock has no night; train by hand with `daytrader train`
        schedule["train-models"] = {
            "task": "tasks.train_models",
            # 16:45 New York time (celeryconfig's timezone) on weekdays, after every close
            "schedule": crontab(hour=16, minute=45, day_of_week="mon-fri"),
            "options": {"expires": 6 * 3600},
        }
    return schedule
