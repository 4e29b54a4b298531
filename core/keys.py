"""Redis key names in one place.

Paper and live use bare names such as ``daily_used_capital:2024-06-03``. A simulated run
prefixes every key with ``sim:<run_id>:`` so runs never share capital, orders or bars.
Dates in keys are exchange-local (America/New_York) session dates.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace prefix ('' for paper/live, 'sim:<run>:' for sim)."""

    prefix: str = ""

    @classmethod
    def for_mode(cls, mode: str, run_id: str) -> Keys:
        """Namespace for a mode: simulated runs are isolated per run id."""
        return cls(prefix=f"sim:{run_id}:" if mode == "sim" else "")

    def k(self, name: str) -> str:
        """Any key under this namespace."""
        return self.prefix + name

    # risk ---------------------------------------------------------------------------------
    def used_capital(self, day: dt.date) -> str:
        return self.k(f"daily_used_capital:{day.isoformat()}")

    def used_capital_peak(self, day: dt.date) -> str:
        return self.k(f"daily_used_capital:{day.isoformat()}:peak")

    def reservations(self, day: dt.date) -> str:
        return self.k(f"reservations:{day.isoformat()}")

    def entries(self, day: dt.date) -> str:
        return self.k(f"entries:{day.isoformat()}")

    def halt(self) -> str:
        return self.k("halt")

    def loss_halt(self, day: dt.date) -> str:
        return self.k(f"loss_halt:{day.isoformat()}")

    def reconciled(self, day: dt.date) -> str:
        return self.k(f"reconciled:{day.isoformat()}")

    def order_lock(self, client_order_id: str) -> str:
        return self.k(f"lock:order:{client_order_id}")

    # tick ---------------------------------------------------------------------------------
    def tick_guard(self, day: dt.date, bar: int) -> str:
        return f"{self.tick_guard_prefix(day)}{bar}"

    def tick_guard_prefix(self, day: dt.date) -> str:
        return self.k(f"tick:{day.isoformat()}:")

    def fills_done(self, day: dt.date) -> str:
        """The last bar of ``day`` whose fills (positions and reservations) are applied."""
        return self.k(f"fills_done:{day.isoformat()}")

    # bars ---------------------------------------------------------------------------------
    def bars(self, day: dt.date) -> str:
        return self.k(f"bars:{day.isoformat()}")

    def bars_meta(self, day: dt.date) -> str:
        return self.k(f"bars:{day.isoformat()}:meta")

    def positions_channel(self) -> str:
        """Pub/sub channel of what the simulated broker's fills append to its positions log
        (see ``core.brokers.positions_book._PUSH_LOG_LUA``)."""
        return self.k("broker:positions_log:published")

    def fills_channel(self) -> str:
        """Pub/sub channel of the fills-done marks as they are set (``<date>:<bar>``)."""
        return self.k("fills_done:published")

    def bars_channel(self) -> str:
        """Pub/sub channel of the rows appended to the bar store (``<date>:<bar>:<row>``)."""
        return self.k("bars:published")

    # replay (sim only) --------------------------------------------------------------------
    def replay_days(self) -> str:
        return self.k("replay:days")

    def replay_data(self, day: dt.date) -> str:
        return self.k(f"replay:data:{day.isoformat()}")

    def replay_state(self) -> str:
        return self.k("replay:state")

    def replay_pending(self, day: dt.date, bar: int) -> str:
        return self.k(f"replay:pending:{day.isoformat()}:{bar}")

    def replay_done(self, day: dt.date, bar: int) -> str:
        return self.k(f"replay:done:{day.isoformat()}:{bar}")

    def replay_registered(self, day: dt.date, bar: int) -> str:
        return self.k(f"replay:registered:{day.isoformat()}:{bar}")

    def replay_day_stats(self) -> str:
        return self.k("replay:day_stats")

    # simulated broker ---------------------------------------------------------------------
    def broker(self, name: str) -> str:
        return self.k(f"broker:{name}")
