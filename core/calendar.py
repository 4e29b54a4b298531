"""NYSE trading calendar: session dates and open/close times, early closes included.

All datetimes returned are tz-aware in America/New_York (exchange-local).
"""

from __future__ import annotations

import datetime as dt
import functools
from zoneinfo import ZoneInfo

import pandas as pd

from core.errors import ConfigError

NY = ZoneInfo("America/New_York")
_CAL_START = "2000-01-03"
_CAL_END = "2030-12-31"


@functools.lru_cache(maxsize=1)
def _xnys():
    import exchange_calendars as xcals

    return xcals.get_calendar("XNYS", start=_CAL_START, end=_CAL_END)


@functools.lru_cache(maxsize=1)
def session_table_ns() -> dict[int, tuple[int, int]]:
    """Every session of the calendar's range: day number since 1970-01-01 (New York date) ->
    (open, close) as UTC nanoseconds. Built once from the calendar's schedule."""
    sched = _xnys().schedule
    days = (sched.index.values.astype("datetime64[D]").astype("int64")).tolist()
    opens = sched["open"].dt.tz_convert("UTC").dt.tz_localize(None).values.astype("int64")
    closes = sched["close"].dt.tz_convert("UTC").dt.tz_localize(None).values.astype("int64")
    return dict(zip(days, zip(opens.tolist(), closes.tolist(), strict=True), strict=True))


def exchange_date(ts: dt.datetime) -> dt.date:
    """Return the New York calendar date of an aware timestamp (also after 20:00 ET)."""
    if ts.tzinfo is None:
        raise ValueError("exchange_date needs an aware datetime")
    return ts.astimezone(NY).date()


def is_session(day: dt.date) -> bool:
    """True when NYSE holds a regular session on ``day``."""
    return bool(_xnys().is_session(pd.Timestamp(day)))


def session_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """Return (open, close) of the NYSE session on ``day`` in America/New_York.

    Early closes (13:00 ET) come from the calendar. Raises ConfigError for a non-session day.
    """
    cal = _xnys()
    ts = pd.Timestamp(day)
    if not cal.is_session(ts):
        raise ConfigError(f"{day.isoformat()} is not an NYSE trading session")
    open_ = cal.session_open(ts).tz_convert(NY).to_pydatetime()
    close = cal.session_close(ts).tz_convert(NY).to_pydatetime()
    return open_, close


def session_bar_count(day: dt.date, bar_seconds: int = 60) -> int:
    """Number of bars of ``bar_seconds`` in the regular session of ``day``."""
    open_, close = session_bounds(day)
    return int((close - open_).total_seconds()) // bar_seconds


def sessions_between(start: dt.date, end: dt.date) -> list[dt.date]:
    """NYSE session dates from ``start`` to ``end`` inclusive."""
    cal = _xnys()
    return [d.date() for d in cal.sessions_in_range(pd.Timestamp(start), pd.Timestamp(end))]


def next_sessions(start: dt.date, count: int) -> list[dt.date]:
    """The first ``count`` NYSE sessions on or after ``start``."""
    out: list[dt.date] = []
    day = start
    while len(out) < count:
        if is_session(day):
            out.append(day)
        day += dt.timedelta(days=1)
    return out
