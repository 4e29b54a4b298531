"""A Redis lock with a random token, released only by its owner (compare-and-delete Lua)."""

from __future__ import annotations

import secrets
from types import TracebackType

from redis import Redis

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TokenLock:
    """Non-blocking lock; ``ttl_ms`` must exceed the longest broker call it guards."""

    def __init__(self, redis: Redis, key: str, ttl_ms: int = 30_000) -> None:
        self._r = redis
        self._key = key
        self._ttl = ttl_ms
        self._token = secrets.token_hex(16)
        self._release = redis.register_script(_RELEASE_LUA)
        self.held = False

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

    def __enter__(self) -> TokenLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
