"""A process's copy of the simulated broker's positions, kept current from the positions log.

Every change of the positions hash appends "SYMBOL\\n<json>" (or "SYMBOL\\n" when it closed) to
the positions log in the same transaction (``queue_change``), so a reader that has applied the
first n entries catches up with LRANGE n -1. The end of a session empties the log and bumps
the epoch; a reader of another epoch (or a new one) reloads the hash. A process with a
listener (the scoring worker) is also pushed what each fills transaction appends
(``_PUSH_LOG_LUA``), so it knows the positions at the fills mark without asking. Reads and
pushes both move the same cursor, under one lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from redis import Redis

from core.brokers.base import Position
from core.keys import Keys
from core.scripts import queue_script

log = logging.getLogger(__name__)

_TTL_S = 4 * 24 * 3600
_MAX_CHANGES = 50_000  # changes kept for ``changes`` readers before they start over

# Append to the positions log and tell the listeners what was appended: the epoch, the
# index of the first new entry, then the entries ("SYMBOL\n<json>"), NUL-separated (JSON
# escapes control characters, so no entry holds one). With no entry it only tells where
# the log stands: the sync point that precedes every fills mark. Returns the log's length.
# KEYS: positions_log, positions_epoch. ARGV: ttl, channel, entries...
_PUSH_LOG_LUA = """
local n = redis.call('LLEN', KEYS[1])
local first = n
for i = 3, #ARGV, 1000 do
  n = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if #ARGV > 2 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
local msg = (redis.call('GET', KEYS[2]) or '0') .. '\\0' .. first
if #ARGV > 2 then msg = msg .. '\\0' .. table.concat(ARGV, '\\0', 3) end
redis.call('PUBLISH', ARGV[2], msg)
return n
"""


class PositionsBook:
    """This process's copy of the positions (see the module's docstring)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._r = redis
        self._k = keys
        self._push_log = redis.register_script(_PUSH_LOG_LUA)
        self._book: dict[str, Position] = {}
        self._epoch: bytes | None = None
        self._n = 0  # log entries applied
        self._lock = threading.RLock()  # reads and the listener's pushes (scoring)
        self._pushed = False  # every push since the last gap continued this copy
        # the symbols changed in the copy, in order, since it was (re)loaded (generation)
        self._changes: list[str] = []
        self._gen = 0

    @property
    def version(self) -> tuple[bytes | None, int]:
        """(epoch, entries applied): changes whenever the copy does."""
        return self._epoch, self._n

    def queue_read(self, pipe: Any) -> int:
        """Queue the reads of the log entries this copy lacks (2 replies); returns where
        they start (pass it to ``apply``: a push may have moved the cursor meanwhile)."""
        start = self._n
        pipe.get(self._k.broker("positions_epoch"))
        pipe.lrange(self._k.broker("positions_log"), start, -1)
        return start

    def apply(self, epoch: bytes | None, entries: list[bytes],
              start: int) -> dict[str, Position]:
        """The positions after the replies of ``queue_read`` (a copy)."""
        with self._lock:
            if self._epoch is None or (epoch or b"0") != self._epoch:
                return self._reload()
            # entries a push already applied are skipped; a read older than the pushes
            # (start + len <= cursor) brings nothing new
            self._apply_entries(entries[max(0, self._n - start):])
            return dict(self._book)

    def _apply_entries(self, entries: list[bytes]) -> None:
        book = self._book
        changed = self._changes
        for entry in entries:
            sym, _, raw = entry.partition(b"\n")
            name = sym.decode()
            if raw:
                book[name] = Position.from_json(raw)
            else:
                book.pop(name, None)
            changed.append(name)
        self._n += len(entries)
        if len(changed) > _MAX_CHANGES:  # readers of the changes start over once
            self._gen += 1
            changed.clear()

    def apply_pushed(self, data: bytes) -> bool:
        """Take one push of the positions log (``<epoch>\\0<index of its first entry>
        [\\0entry]...``): applied when it continues this copy exactly (True). A push that
        leaves a gap (another writer appended without one, or this copy was never read)
        makes ``pushed`` answer None until a read catches up and a push continues it
        again."""
        epoch, _, rest = data.partition(b"\0")
        first_s, _, body = rest.partition(b"\0")
        entries = body.split(b"\0") if body else []
        try:
            first = int(first_s)
        except ValueError:
            log.warning("positions push not understood", extra={"head": data[:32]})
            with self._lock:
                self._pushed = False  # something may be missing: read instead
            return False
        with self._lock:
            n = self._n
            self._pushed = False  # until this push is in
            if self._epoch is None or epoch != self._epoch or first > n:
                return False  # a gap: only a read can tell what is missing
            self._apply_entries(entries[n - first:])  # a read may have brought some
            self._pushed = True
            return True

    def pushed(self) -> dict[str, Position] | None:
        """The positions as of the last push, when every push so far continued this copy
        (see ``apply_pushed``); None: read them."""
        with self._lock:
            return dict(self._book) if self._pushed else None

    def changes(self, cursor: tuple[int, int] | None) -> tuple[tuple[int, int],
                                                                list[str] | None]:
        """The symbols whose position changed in this copy since ``cursor`` (None: a reader
        that has seen nothing, or after this copy was reloaded; read them all), and the
        cursor to pass next time."""
        now = (self._gen, len(self._changes))
        if cursor is None or cursor[0] != self._gen:
            return now, None
        return now, self._changes[cursor[1]:]

    def _reload(self) -> dict[str, Position]:
        """Read the whole positions hash (a new epoch, or the first read); under the
        lock."""
        pipe = self._r.pipeline(transaction=True)
        pipe.get(self._k.broker("positions_epoch"))
        pipe.llen(self._k.broker("positions_log"))
        pipe.hgetall(self._k.broker("positions"))
        epoch, n, raw = pipe.execute()
        self._book = {k.decode(): Position.from_json(v) for k, v in raw.items()}
        self._gen += 1
        self._changes = []
        self._epoch = epoch or b"0"
        self._n = int(n)
        return dict(self._book)

    # -- writers (any process) ---------------------------------------------------------------
    def queue_change(self, pipe: Any, symbol: str, position: Position | None) -> None:
        """Queue one change of ``symbol``'s position (None: closed) on a transaction: the
        hash and its log entry."""
        k = self._k
        raw = position.to_json() if position is not None else ""
        if position is None:
            pipe.hdel(k.broker("positions"), symbol)
        else:
            pipe.hset(k.broker("positions"), symbol, raw)
        log_key = k.broker("positions_log")
        pipe.rpush(log_key, f"{symbol}\n{raw}")
        pipe.expire(log_key, _TTL_S)

    def queue_push(self, pipe: Any, entries: list[str]) -> None:
        """Queue ``entries`` for the positions log with their push (``_PUSH_LOG_LUA``); with
        none, the push only tells where the log stands."""
        k = self._k
        queue_script(pipe, self._push_log,
                     [k.broker("positions_log"), k.broker("positions_epoch")],
                     [_TTL_S, k.positions_channel(), *entries])

    def queue_compact(self, pipe: Any) -> None:
        """Queue the emptying of the log and a new epoch (readers reload the hash once)."""
        pipe.delete(self._k.broker("positions_log"))
        pipe.incr(self._k.broker("positions_epoch"))
        pipe.expire(self._k.broker("positions_epoch"), _TTL_S)
