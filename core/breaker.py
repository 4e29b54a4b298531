"""A circuit breaker for broker calls whose state lives in Redis, shared by every process.

It answers one question, "may a NEW ENTRY go to the broker now?"; exits and end-of-day
closes do not ask it (the caller decides). States:

* ``closed``: everything is allowed. Failures are counted in a sliding window of
  ``window_s`` seconds; the ``failure_threshold``-th failure inside the window opens it.
* ``open``: ``allow()`` is False until ``cooldown_s`` seconds after ``opened_at``.
* ``half_open`` (open and the cooldown is over): ``allow()`` is True for exactly one caller,
  the probe, which holds a lease of ``cooldown_s`` seconds (a Redis key set with NX). A
  success closes the breaker and clears the count; a failure re-opens it with a new
  ``opened_at``. A probe that never reports loses its lease after ``cooldown_s`` seconds and
  the next caller becomes the probe.

Every mutation is one Lua script. Time comes from ``clock()`` (seconds, like ``time.time``)
and is passed to the scripts, never taken from Redis TIME, so tests can use a fake clock.
Key TTLs are real Redis TTLs and only make sure nothing lingers; the logic never relies on
them. Redis errors (``redis.RedisError``) propagate: whether to trade without the breaker is
the caller's decision.

Keys, under ``keys.k("breaker:<name>")``: the hash itself (state, opened_at, seq),
``...:failures`` (sorted set of failure times) and ``...:probe`` (the probe lease).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from redis import Redis

from core.errors import ConfigError
from core.keys import Keys

StateName = Literal["closed", "open", "half_open"]

# The state hash outlives any cooldown so an idle open breaker still needs a probe to close;
# a breaker left untouched for this long (seconds) is forgotten, i.e. closed.
_STATE_TTL_S = 24 * 3600
# At most this many failure times are kept (more only matter while already open).
_MAX_KEPT_FAILURES = 1000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class BreakerConfig:
    """Breaker settings; every duration is in seconds."""

    failure_threshold: int = 5  # failures within window_s that open the breaker
    window_s: float = 60.0  # sliding window over which failures are counted
    cooldown_s: float = 30.0  # open -> half-open after this; also the probe's lease

    def __post_init__(self) -> None:
        if (not isinstance(self.failure_threshold, int) or isinstance(self.failure_threshold, bool)
                or self.failure_threshold < 1):
            raise ConfigError(f"breaker failure_threshold must be an int >= 1, "
                              f"not {self.failure_threshold!r}")
        for name in ("window_s", "cooldown_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or value == float("inf"):
                raise ConfigError(f"breaker {name} must be a positive number of seconds, "
                                  f"not {value!r}")


@dataclass(frozen=True)
class BreakerState:
    """A snapshot: times are ``clock()`` seconds; ``retry_at`` = when open turns half-open."""

    state: StateName
    failures: int  # failures inside the window at the time of the snapshot
    opened_at: float | None  # None while closed
    retry_at: float | None  # opened_at + cooldown_s; None while closed


# KEYS: hash, probe. ARGV: now, cooldown_s, probe deadline (now + cooldown_s), lease (ms).
_ALLOW_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false then return 2 end  -- no state at all: closed and no failure on record
if state ~= 'open' then return 1 end
local now = tonumber(ARGV[1])
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
if now < opened + tonumber(ARGV[2]) then return 0 end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return 1 end
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
if held ~= nil and held > now then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])  -- the last probe never reported
return 1
"""

# KEYS: hash, failures, probe.
# ARGV: now (string as given), cutoff (now - window_s), threshold, cooldown_s, state ttl (ms),
#       failures ttl (ms), max kept failures.
_FAILURE_LUA = """
local now = tonumber(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1] .. ':' .. seq)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
local n = redis.call('ZCARD', KEYS[2])
local keep = tonumber(ARGV[7])
if n > keep then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - keep - 1)
end
local result = 'closed'
if state == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
  if now >= opened + tonumber(ARGV[4]) then
    -- half-open: the probe (or anyone) failed, so a new cooldown starts
    redis.call('HSET', KEYS[1], 'opened_at', ARGV[1])
    redis.call('DEL', KEYS[3])
  end
  result = 'open'
elseif n >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1])
  redis.call('DEL', KEYS[3])
  result = 'open'
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return result
"""

# KEYS: hash, failures, probe. ARGV: now, cooldown_s.
_SUCCESS_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
  if tonumber(ARGV[1]) < opened + tonumber(ARGV[2]) then return 'open' end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 'closed'
"""

# KEYS: hash, failures. ARGV: cutoff. Returns {state, opened_at or '', failures}.
_STATE_LUA = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local opened = ''
if state == 'open' then opened = redis.call('HGET', KEYS[1], 'opened_at') or '0' end
local n = redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf')
return {state, opened, n}
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisCircuitBreaker:
    """A breaker named ``name`` in the ``keys`` namespace; instances with the same name and
    namespace (in any process) share one state."""

    def __init__(self, redis: Redis, keys: Keys, config: BreakerConfig, name: str = "broker",
                 clock: Callable[[], float] = time.time) -> None:
        if not _NAME_RE.match(name):
            raise ConfigError(f"bad breaker name {name!r} (letters, digits, _ . - only)")
        self._r = redis
        self._cfg = config
        self._clock = clock
        self.key = keys.k(f"breaker:{name}")
        self.failures_key = f"{self.key}:failures"
        self.probe_key = f"{self.key}:probe"
        self._allow = redis.register_script(_ALLOW_LUA)
        self._failure = redis.register_script(_FAILURE_LUA)
        self._success = redis.register_script(_SUCCESS_LUA)
        self._state = redis.register_script(_STATE_LUA)
        self.clean = False
        # The state must outlive a cooldown and the failure window, whatever they are set to.
        self._state_ttl_ms = _ms(max(_STATE_TTL_S, 2 * (config.cooldown_s + config.window_s)))
        self._failures_ttl_ms = _ms(config.window_s + 1.0)

    @property
    def config(self) -> BreakerConfig:
        return self._cfg

    def _now(self) -> str:
        return repr(float(self._clock()))

    def allow(self) -> bool:
        """May a new entry go to the broker now? Half-open: True for the one probe only.

        Sets ``clean`` when nothing is on record (closed, no failures), so the caller can
        skip ``record_success`` on the hot path.
        """
        now = float(self._clock())
        cooldown = float(self._cfg.cooldown_s)
        res = int(self._allow(keys=[self.key, self.probe_key],
                              args=[repr(now), repr(cooldown), repr(now + cooldown),
                                    _ms(cooldown)]))
        self.clean = res == 2
        return res > 0

    def queue_allow(self, pipe: Any) -> Callable[[Any], bool]:
        """``allow`` riding on the caller's round trip: queue a read of the state on
        ``pipe``; the returned function takes its reply. Closed (the common case) answers
        from the read alone; open runs ``allow`` itself (cooldown and the probe's lease)."""
        pipe.hget(self.key, "state")

        def finish(state: Any) -> bool:
            if state is None:
                self.clean = True  # no state at all: closed and no failure on record
                return True
            if _s(state) != "open":
                self.clean = False
                return True
            return self.allow()

        return finish

    def record_failure(self) -> str:
        """Count one broker failure now; returns the new state ('closed' or 'open')."""
        clock_now = float(self._clock())
        cfg = self._cfg
        res = self._failure(
            keys=[self.key, self.failures_key, self.probe_key],
            args=[repr(clock_now), repr(clock_now - cfg.window_s), cfg.failure_threshold,
                  repr(float(cfg.cooldown_s)), self._state_ttl_ms, self._failures_ttl_ms,
                  max(_MAX_KEPT_FAILURES, cfg.failure_threshold)])
        return _s(res)

    def record_success(self) -> str:
        """Count one broker success now: closes a closed or half-open breaker and clears the
        failure count; an open one (cooldown not over) stays open. Returns the new state."""
        res = self._success(keys=[self.key, self.failures_key, self.probe_key],
                            args=[self._now(), repr(float(self._cfg.cooldown_s))])
        return _s(res)

    def state(self) -> BreakerState:
        """A consistent snapshot of the shared state at ``clock()`` now."""
        now = float(self._clock())
        raw_state, raw_opened, failures = self._state(
            keys=[self.key, self.failures_key], args=[repr(now - self._cfg.window_s)])
        if _s(raw_state) != "open":
            return BreakerState("closed", int(failures), None, None)
        opened_at = float(_s(raw_opened))
        retry_at = opened_at + self._cfg.cooldown_s
        name: StateName = "open" if now < retry_at else "half_open"
        return BreakerState(name, int(failures), opened_at, retry_at)
