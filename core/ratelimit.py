"""A token bucket in Redis shared by every process that talks to one broker account.

One Lua script refills and takes tokens atomically using the Redis server's clock, so all
workers on all hosts draw from the same bucket. ``capacity`` tokens at most, ``refill_per_s``
added per second. Entries may not take the last ``exit_reserve`` tokens: exits and closes
(kind "exit") can always get through a bucket that entries have drained.

``acquire(kind)`` blocks until a token is granted and returns the seconds it waited, or raises
``RateLimited`` (a TransientError: Celery retries later) when the wait would pass
``max_wait_s``. ``penalize(seconds)`` empties the bucket for every process, e.g. after the
broker answered 429.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from redis import Redis

from core.errors import RateLimited

Kind = Literal["entry", "exit"]

# KEYS[1] bucket hash. ARGV: capacity, refill/s, reserve (floor for entries), cost, kind,
# ttl_ms. Returns {granted (0/1), wait seconds as a string, tokens left as a string}.
_TAKE_LUA = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local reserve = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
end
local floor = reserve
if ARGV[5] == 'exit' then floor = 0 end
local granted = 0
local wait = 0
if tokens - cost >= floor then
  tokens = tokens - cost
  granted = 1
else
  wait = (floor + cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[6]))
return {granted, tostring(wait), tostring(tokens)}
"""

# KEYS[1] bucket hash. ARGV: refill/s, seconds of silence wanted, ttl_ms.
_PENALIZE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local debt = -tonumber(ARGV[1]) * tonumber(ARGV[2])
local cur = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if cur == nil or cur > debt then
  redis.call('HSET', KEYS[1], 'tokens', tostring(debt), 'ts', tostring(now))
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


@dataclass(frozen=True)
class BucketConfig:
    """Bucket shape. Alpaca allows 200 requests per minute per account by default."""

    capacity: float = 20.0
    refill_per_s: float = 200.0 / 60.0
    exit_reserve: float = 5.0
    max_wait_s: float = 5.0
    exit_max_wait_s: float = 15.0

    def __post_init__(self) -> None:
        if self.capacity <= 0 or self.refill_per_s <= 0:
            raise ValueError("capacity and refill_per_s must be positive")
        if not 0 <= self.exit_reserve < self.capacity:
            raise ValueError("exit_reserve must be in [0, capacity)")
        if self.max_wait_s < 0 or self.exit_max_wait_s < 0:
            raise ValueError("max waits must not be negative")


class RedisTokenBucket:
    """The shared bucket under ``key``."""

    def __init__(self, redis: Redis, key: str, config: BucketConfig | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._r = redis
        self.key = key
        self.config = config or BucketConfig()
        self._take = redis.register_script(_TAKE_LUA)
        self._penalize = redis.register_script(_PENALIZE_LUA)
        self._sleep = sleep
        self._clock = clock
        # idle buckets vanish: long enough to refill completely, at least a minute
        self._ttl_ms = int(max(60.0, 2 * self.config.capacity / self.config.refill_per_s)
                           * 1000)

    def try_acquire(self, kind: Kind = "entry", cost: float = 1.0) -> tuple[bool, float]:
        """One attempt: (granted, seconds until it could be granted)."""
        c = self.config
        granted, wait, _ = self._take(
            keys=[self.key],
            args=[repr(float(c.capacity)), repr(float(c.refill_per_s)),
                  repr(float(c.exit_reserve)), repr(float(cost)), kind, self._ttl_ms])
        return bool(int(granted)), float(wait)

    def acquire(self, kind: Kind = "entry", cost: float = 1.0,
                max_wait_s: float | None = None) -> float:
        """Wait for a token; returns the seconds waited, or raises RateLimited."""
        if kind not in ("entry", "exit"):
            raise ValueError(f"bad kind {kind!r}")
        limit = max_wait_s if max_wait_s is not None else (
            self.config.exit_max_wait_s if kind == "exit" else self.config.max_wait_s)
        start = self._clock()
        while True:
            granted, wait = self.try_acquire(kind, cost)
            waited = self._clock() - start
            if granted:
                return waited
            if waited + wait > limit:
                raise RateLimited(
                    f"rate limit: no {kind} token within {limit:.1f}s "
                    f"(next in {wait:.2f}s)")
            # a small margin so the next attempt does not land just before the refill
            self._sleep(min(wait + 0.005, max(limit - waited, 0.005)))

    def penalize(self, seconds: float) -> None:
        """Silence every process for about ``seconds`` (the broker said 429)."""
        if seconds <= 0:
            return
        self._penalize(keys=[self.key],
                       args=[repr(float(self.config.refill_per_s)), repr(float(seconds)),
                             self._ttl_ms])

    def tokens(self) -> float:
        """Tokens stored at the last update (not refilled since; for tests and status)."""
        raw = self._r.hget(self.key, "tokens")
        return float(raw) if raw is not None else self.config.capacity

    def reset(self) -> None:
        """Forget the bucket (it starts full)."""
        self._r.delete(self.key)
