"""Redis locks with a random token, released only by their owner (compare-and-delete Lua):
``TokenLock`` per order, ``ProcessLock`` for a process that must run once per deployment
(the market-data feed, the trade_updates consumer of an account)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from types import TracebackType
from typing import Any

from redis import Redis

from core.scripts import queue_script, registered

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class TokenLock:
    """Non-blocking lock; ``ttl_ms`` must exceed the longest broker call it guards."""

    def __init__(self, redis: Redis, key: str, ttl_ms: int = 30_000) -> None:
        self._r = redis
        self._key = key
        self._ttl = ttl_ms
        self._token = secrets.token_hex(16)
        self._release = registered(redis, _RELEASE_LUA)
        self.held = False

    @property
    def token(self) -> str:
        """This holder's random token (a script that takes the lock sets it as the value)."""
        return self._token

    def acquire(self) -> bool:
        """Take the lock if free; True when taken."""
        self.held = bool(self._r.set(self._key, self._token, nx=True, px=self._ttl))
        return self.held

    def release(self) -> bool:
        """Release if still ours (a lock that expired and was re-taken is left alone)."""
        if not self.held:
            return False
        self.held = False
        return bool(self._release(keys=[self._key], args=[self._token]))

    # The same steps queued on a pipeline, so the lock rides on round trips made anyway.
    def queue_acquire(self, pipe: Any) -> None:
        """Queue the acquisition on ``pipe``; pass its reply to ``taken``."""
        pipe.set(self._key, self._token, nx=True, px=self._ttl)

    def taken(self, reply: Any) -> bool:
        """Whether the queued acquisition took the lock (``reply``: its pipeline reply)."""
        self.held = bool(reply)
        return self.held

    def queue_release(self, pipe: Any) -> None:
        """Queue the release (compare-and-delete) on ``pipe``, e.g. at the end of the
        transaction that writes what the lock guarded. ``held`` stays set: call
        ``released`` once the pipeline ran, or ``release`` if it failed."""
        if self.held:
            queue_script(pipe, self._release, [self._key], [self._token])

    def released(self) -> None:
        """Record that a queued release ran."""
        self.held = False

    def __enter__(self) -> TokenLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class ProcessLock:
    """One holder per key: SET NX PX with a JSON token naming host, pid and ``info``; the
    holder renews it (compare-and-expire) and releases it (compare-and-delete)."""

    def __init__(self, redis: Redis, key: str, ttl_s: float = 30.0,
                 info: dict[str, Any] | None = None) -> None:
        self._r = redis
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.time(), "nonce": secrets.token_hex(8),
                                 **(info or {})})
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = registered(redis, _RELEASE_LUA)
        self.held = False

    def try_acquire(self) -> bool:
        """Take the lock if free; True when taken."""
        self.held = bool(self._r.set(self.key, self.token, nx=True, px=self.ttl_ms))
        return self.held

    def holder(self) -> tuple[dict[str, Any], int]:
        """Who holds the lock (its token, {} if unreadable) and its TTL left in ms."""
        raw = self._r.get(self.key)
        ttl = int(self._r.pttl(self.key))
        try:
            return (json.loads(raw) if raw else {}), max(ttl, 0)
        except ValueError:
            return {}, max(ttl, 0)

    def renew(self) -> bool:
        """Extend the TTL if still ours; False (and no longer held) when it was lost."""
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        self.held = ok
        return ok

    def release(self) -> None:
        """Release if still ours."""
        if self.held:
            self._release(keys=[self.key], args=[self.token])
            self.held = False
