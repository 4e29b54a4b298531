"""Daily position-value limit stores: the atomic Redis one and an in-memory twin.

Amounts are integer US cents. ``reserve`` is idempotent per ``client_order_id``: a retry of
the same order never counts twice. A released reservation stays recorded at 0 cents so a
redelivered order cannot reserve (and trade) again.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis import Redis

from core.keys import Keys
from core.scripts import queue_script

ReserveStatus = Literal["reserved", "exists", "released", "limit", "invalid"]
_DAY_TTL_S = 4 * 24 * 3600  # keep a few days for reports, then let Redis drop them
_MAX_CENTS = 10**15


@dataclass(frozen=True)
class Reservation:
    """Outcome of a reservation attempt (cents)."""

    status: ReserveStatus
    amount_cents: int
    used_cents: int

    @property
    def ok(self) -> bool:
        """True when the order may go to the broker under this reservation."""
        return self.status in ("reserved", "exists") and self.amount_cents > 0


class DailyLimitStore(Protocol):
    """Counts position value opened per exchange date against a limit (cents)."""

    def reserve(self, day: dt.date, client_order_id: str, amount_cents: int,
                limit_cents: int) -> Reservation: ...

    def adjust(self, day: dt.date, client_order_id: str, amount_cents: int) -> int: ...

    def used(self, day: dt.date) -> int: ...

    def peak(self, day: dt.date) -> int: ...

    def reservations(self, day: dt.date) -> dict[str, int]: ...

    def reservation(self, day: dt.date, client_order_id: str) -> int | None: ...

    def rebuild(self, day: dt.date, amounts: dict[str, int]) -> int: ...

    def settle_fills(self, day: dt.date, fills: list[tuple[str, int, bool]],
                     pipe: Any = None) -> Callable[[Any], list[int | None]] | list[int | None]:
        ...


def _valid_amount(amount_cents: object) -> bool:
    return (
        isinstance(amount_cents, int)
        and not isinstance(amount_cents, bool)
        and 0 < amount_cents <= _MAX_CENTS
    )


# Four Redis calls on the hot path. The peak is not written here: used only grows in this
# script, so the peak is max(peak key, used), and the peak key is raised before any decrease.
_RESERVE_LUA = """
local amount = ARGV[2]
if not string.match(amount, '^[1-9][0-9]*$') or string.len(amount) > 15 then
  return {'invalid', 0, tonumber(redis.call('GET', KEYS[1]) or '0')}
end
local a = tonumber(amount)
local existing = redis.call('HGET', KEYS[2], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if existing then
  local e = tonumber(existing)
  if e == 0 then return {'released', 0, used} end
  return {'exists', e, used}
end
if used + a > tonumber(ARGV[3]) then return {'limit', 0, used} end
local new = redis.call('INCRBY', KEYS[1], a)
redis.call('HSET', KEYS[2], ARGV[1], a)
if used == 0 then
  -- the day's first reservation (or the first after all were released): set the expiry once
  local ttl = tonumber(ARGV[4])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {'reserved', a, new}
"""

# Lower one reservation (KEYS[2] field ``id``) from ``held`` to ``target`` cents: the used
# total (KEYS[1]) follows, and the day's peak (KEYS[3]) keeps the total it had before.
# Shared by _ADJUST_LUA and _SETTLE_LUA (their KEYS are the same).
_SHRINK_LUA = """
local function shrink(id, held, target, ttl)
  if target >= held then return end
  local used = tonumber(redis.call('GET', KEYS[1]) or '0')
  local peak = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used > peak then redis.call('SET', KEYS[3], used, 'EX', ttl) end
  redis.call('DECRBY', KEYS[1], held - target)
  redis.call('HSET', KEYS[2], id, target)
end
"""

# Shrink (or release with 0) a reservation; growing is refused. Returns the new used total.
_ADJUST_LUA = _SHRINK_LUA + """
local amount = ARGV[2]
if not string.match(amount, '^[0-9]+$') or string.len(amount) > 15 then return -1 end
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if not existing then return -2 end
local e = tonumber(existing)
local a = tonumber(amount)
if a > e then return -3 end
shrink(ARGV[1], e, a, tonumber(ARGV[3]))
return tonumber(redis.call('GET', KEYS[1]) or '0')
"""


# Make reservations follow their orders' fills: for each (id, filled cents, filled?) shrink
# the reservation to min(filled, reserved), or release it when nothing filled (as _ADJUST).
# Returns what each order had reserved (-1: never reserved), so the caller can report.
_SETTLE_LUA = _SHRINK_LUA + """
local out = {}
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV - 2, 3 do
  local held = redis.call('HGET', KEYS[2], ARGV[i])
  if not held then
    table.insert(out, -1)
  else
    local e = tonumber(held)
    local target = 0
    if ARGV[i + 2] == '1' then target = math.min(tonumber(ARGV[i + 1]), e) end
    shrink(ARGV[i], e, target, ttl)
    table.insert(out, e)
  end
end
return out
"""

# Overwrite some reservations with values rebuilt from the broker, then recount the total.
_REBUILD_LUA = """
for i = 1, #ARGV - 1, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(v) end
redis.call('SET', KEYS[1], total)
local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
if total > peak then redis.call('SET', KEYS[2], total) end
local ttl = tonumber(ARGV[#ARGV])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return total
"""


class RedisDailyLimitStore:
    """``daily_used_capital:<exchange date>`` counted by one Lua script per call."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._r = redis
        self._keys = keys
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._adjust = redis.register_script(_ADJUST_LUA)
        self._rebuild = redis.register_script(_REBUILD_LUA)
        self._settle = redis.register_script(_SETTLE_LUA)

    def reserve(self, day: dt.date, client_order_id: str, amount_cents: int,
                limit_cents: int) -> Reservation:
        """Reserve ``amount_cents`` of today's limit for one order, atomically."""
        used_now = self.used(day) if not _valid_amount(amount_cents) else 0
        if not _valid_amount(amount_cents) or not client_order_id:
            return Reservation("invalid", 0, used_now)
        k = self._keys
        status, amount, used = self._reserve(
            keys=[k.used_capital(day), k.reservations(day)],
            args=[client_order_id, str(amount_cents), str(int(limit_cents)), _DAY_TTL_S],
        )
        status = status.decode() if isinstance(status, bytes) else status
        return Reservation(status, int(amount), int(used))

    def adjust(self, day: dt.date, client_order_id: str, amount_cents: int) -> int:
        """Shrink a reservation to ``amount_cents`` (0 releases it). Returns used cents.

        Raises ValueError for a negative amount, an unknown order or an attempt to grow.
        """
        if not isinstance(amount_cents, int) or amount_cents < 0:
            raise ValueError(f"bad adjust amount {amount_cents!r}")
        k = self._keys
        res = int(self._adjust(
            keys=[k.used_capital(day), k.reservations(day), k.used_capital_peak(day)],
            args=[client_order_id, str(amount_cents), _DAY_TTL_S]))
        if res == -2:
            raise ValueError(f"no reservation for {client_order_id}")
        if res == -3:
            raise ValueError(f"cannot grow reservation of {client_order_id}")
        if res < 0:
            raise ValueError(f"bad adjust amount {amount_cents!r}")
        return res

    def settle_fills(self, day: dt.date, fills: list[tuple[str, int, bool]],
                     pipe: Any = None) -> Callable[[Any], list[int | None]] | list[int | None]:
        """Make each order's reservation follow its fill, atomically: ``fills`` holds
        (client_order_id, filled value in cents, anything filled?); a filled order keeps
        min(filled value, reserved), an unfilled one releases it all. Returns what each had
        reserved (None: never reserved). With ``pipe`` the script is queued there and a
        function that reads its reply is returned instead."""
        args: list[object] = [_DAY_TTL_S]
        for coid, filled_cents, any_filled in fills:
            if not isinstance(filled_cents, int) or filled_cents < 0:
                raise ValueError(f"bad filled value for {coid}: {filled_cents!r}")
            args += [coid, filled_cents, "1" if any_filled else "0"]
        k = self._keys
        keys = [k.used_capital(day), k.reservations(day), k.used_capital_peak(day)]

        def read(reply: Any) -> list[int | None]:
            return [None if int(v) < 0 else int(v) for v in reply]

        if pipe is not None:
            queue_script(pipe, self._settle, keys, args)
            return read
        return read(self._settle(keys=keys, args=args))

    def rebuild(self, day: dt.date, amounts: dict[str, int]) -> int:
        """Set reservations to amounts rebuilt from the broker and recount used (cents)."""
        for coid, amount in amounts.items():
            if not isinstance(amount, int) or amount < 0:
                raise ValueError(f"bad rebuilt amount for {coid}: {amount!r}")
        k = self._keys
        args: list[object] = []
        for coid, amount in sorted(amounts.items()):
            args += [coid, amount]
        return int(self._rebuild(
            keys=[k.used_capital(day), k.used_capital_peak(day), k.reservations(day)],
            args=[*args, _DAY_TTL_S]))

    def used(self, day: dt.date) -> int:
        """Cents of today's limit in use."""
        return int(self._r.get(self._keys.used_capital(day)) or 0)

    def peak(self, day: dt.date) -> int:
        """Highest used value seen on ``day`` (cents)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.get(self._keys.used_capital_peak(day))
        pipe.get(self._keys.used_capital(day))
        peak, used = pipe.execute()
        return max(int(peak or 0), int(used or 0))

    def reservation(self, day: dt.date, client_order_id: str) -> int | None:
        """One order's reservation in cents (0 = released), None if never reserved."""
        raw = self._r.hget(self._keys.reservations(day), client_order_id)
        return None if raw is None else int(raw)

    def reservations(self, day: dt.date) -> dict[str, int]:
        """All reservations of ``day`` by client_order_id (cents; 0 = released)."""
        raw = self._r.hgetall(self._keys.reservations(day))
        return {key.decode(): int(val) for key, val in raw.items()}


class MemoryDailyLimitStore:
    """In-process twin of the Redis store, for unit tests and the single-process backtest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[dt.date, int] = {}
        self._peak: dict[dt.date, int] = {}
        self._res: dict[dt.date, dict[str, int]] = {}

    def reserve(self, day: dt.date, client_order_id: str, amount_cents: int,
                limit_cents: int) -> Reservation:
        with self._lock:
            used = self._used.get(day, 0)
            if not _valid_amount(amount_cents) or not client_order_id:
                return Reservation("invalid", 0, used)
            res = self._res.setdefault(day, {})
            if client_order_id in res:
                amount = res[client_order_id]
                return Reservation("exists" if amount else "released", amount, used)
            if used + amount_cents > limit_cents:
                return Reservation("limit", 0, used)
            used += amount_cents
            self._used[day] = used
            res[client_order_id] = amount_cents
            self._peak[day] = max(self._peak.get(day, 0), used)
            return Reservation("reserved", amount_cents, used)

    def adjust(self, day: dt.date, client_order_id: str, amount_cents: int) -> int:
        if not isinstance(amount_cents, int) or amount_cents < 0:
            raise ValueError(f"bad adjust amount {amount_cents!r}")
        with self._lock:
            res = self._res.setdefault(day, {})
            if client_order_id not in res:
                raise ValueError(f"no reservation for {client_order_id}")
            existing = res[client_order_id]
            if amount_cents > existing:
                raise ValueError(f"cannot grow reservation of {client_order_id}")
            self._used[day] = self._used.get(day, 0) - (existing - amount_cents)
            res[client_order_id] = amount_cents
            return self._used[day]

    def settle_fills(self, day: dt.date, fills: list[tuple[str, int, bool]],
                     pipe: Any = None) -> Callable[[Any], list[int | None]] | list[int | None]:
        out: list[int | None] = []
        for coid, filled_cents, any_filled in fills:
            held = self.reservation(day, coid)
            out.append(held)
            if held is not None:
                target = min(filled_cents, held) if any_filled else 0
                if target < held:
                    self.adjust(day, coid, target)
        return (lambda _reply: out) if pipe is not None else out

    def rebuild(self, day: dt.date, amounts: dict[str, int]) -> int:
        with self._lock:
            res = self._res.setdefault(day, {})
            res.update(amounts)
            self._used[day] = sum(res.values())
            self._peak[day] = max(self._peak.get(day, 0), self._used[day])
            return self._used[day]

    def used(self, day: dt.date) -> int:
        return self._used.get(day, 0)

    def peak(self, day: dt.date) -> int:
        return self._peak.get(day, 0)

    def reservation(self, day: dt.date, client_order_id: str) -> int | None:
        return self._res.get(day, {}).get(client_order_id)

    def reservations(self, day: dt.date) -> dict[str, int]:
        return dict(self._res.get(day, {}))
