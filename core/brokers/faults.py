"""Fault injection for simulated mode: a wrapper that makes any broker misbehave on purpose.

``TRADING_SIM_FAULTS`` lists faults as ``name=count`` pairs; each fault hits the first
``count`` submissions of the run (counted in Redis, so across all worker processes):

- ``kill_before_submit``: the worker process dies (SIGKILL) before the order reaches the broker
- ``kill_after_submit``: the broker accepts the order, then the worker process dies
- ``timeout_after_submit``: the broker accepts the order but the answer is lost (timeout)
- ``error_5xx``: the broker answers with a server error; nothing is submitted
- ``strict_duplicates``: a resubmitted client_order_id is refused as a duplicate (as Alpaca
  does) instead of returning the existing order; ``count`` is ignored (always on)

Only for chaos tests of the order path; never active unless the setting names a fault.
"""

from __future__ import annotations

import os
import signal

from redis import Redis

from core.brokers.base import Broker, Order, OrderRequest, Position
from core.errors import BrokerUnavailable, ConfigError, DuplicateOrder
from core.keys import Keys

FAULTS = ("kill_before_submit", "kill_after_submit", "timeout_after_submit", "error_5xx",
          "strict_duplicates")


def parse_faults(spec: str) -> dict[str, int]:
    """``'kill_after_submit=1,error_5xx=3'`` -> ``{'kill_after_submit': 1, 'error_5xx': 3}``."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if name not in FAULTS:
            raise ConfigError(f"TRADING_SIM_FAULTS: unknown fault {name!r} (known: {FAULTS})")
        try:
            out[name] = int(count or 1)
        except ValueError:
            raise ConfigError(f"TRADING_SIM_FAULTS: bad count in {part!r}") from None
    return out


class FaultyBroker:
    """Wraps a broker and injects the configured faults into ``submit_order``."""

    def __init__(self, inner: Broker, redis: Redis, keys: Keys, faults: dict[str, int]) -> None:
        self.inner = inner
        self._r = redis
        self._k = keys
        self._faults = faults

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def _hit(self, fault: str) -> bool:
        limit = self._faults.get(fault, 0)
        if limit <= 0:
            return False
        return int(self._r.incr(self._k.k(f"faults:{fault}"))) <= limit

    def submit_order(self, request: OrderRequest) -> Order:
        """Submit, misbehaving as configured."""
        if self._faults.get("strict_duplicates") and self.inner.get_order_by_client_id(
                request.client_order_id) is not None:
            raise DuplicateOrder(f"client_order_id {request.client_order_id} already exists")
        if self._hit("error_5xx"):
            raise BrokerUnavailable("simulated 503 from the broker")
        if self._hit("kill_before_submit"):
            os.kill(os.getpid(), signal.SIGKILL)
        order = self.inner.submit_order(request)
        if self._hit("kill_after_submit"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit("timeout_after_submit"):
            raise BrokerUnavailable("simulated timeout after the broker accepted the order")
        return order

    def get_order_by_client_id(self, client_order_id: str) -> Order | None:
        return self.inner.get_order_by_client_id(client_order_id)

    def get_positions(self) -> dict[str, Position]:
        return self.inner.get_positions()
