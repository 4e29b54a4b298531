"""The beat schedule: per-bar entries in every mode, the nightly training only in paper/live,
at 16:45 New York time on weekdays."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from celery.schedules import crontab

from beat_schedule import build_schedule
from core.config import Settings
from tasks.app import app

NY = ZoneInfo("America/New_York")


def test_sim_has_no_nightly_training() -> None:
    sched = build_schedule(Settings(mode="sim"))
    assert set(sched) == {"tick", "eod-close", "reconcile"}
    assert sched["tick"]["options"]["expires"] > 0


def test_paper_trains_after_the_close_new_york_time() -> None:
    settings = Settings(mode="paper", alpaca_api_key="PKTEST", alpaca_secret_key="x")
    entry = build_schedule(settings)["train-models"]
    assert entry["task"] == "tasks.train_models"
    cron = entry["schedule"]
    assert isinstance(cron, crontab)
    cron.app = app
    assert app.conf.timezone == "America/New_York"
    # from a Friday 12:00 New York, the next run is that day at 16:45 New York, in winter
    # and in summer time alike; from Friday evening it is Monday 16:45
    for friday in (dt.datetime(2026, 1, 9, 12, 0, tzinfo=NY),
                   dt.datetime(2026, 7, 10, 12, 0, tzinfo=NY)):
        assert _next_run(cron, friday) == friday.replace(hour=16, minute=45)
        evening = friday.replace(hour=17)
        monday = (friday + dt.timedelta(days=3)).replace(hour=16, minute=45)
        assert _next_run(cron, evening) == monday


def _next_run(cron: crontab, now: dt.datetime) -> dt.datetime:
    """When ``cron`` fires next, seen from ``now`` (last run just before)."""
    fixed = crontab(minute=cron._orig_minute, hour=cron._orig_hour,
                    day_of_week=cron._orig_day_of_week, nowfun=lambda: now, app=app)
    nxt = now + fixed.remaining_estimate(now)
    return nxt.astimezone(NY).replace(second=0, microsecond=0)
