"""An in-process stand-in for the Redis client, for the single-process backtester.

The backtester runs the cluster's own classes (replay clock, simulated broker, daily-limit
store, execution, engine), which speak to Redis. Over a socket every call costs a round trip;
here the same calls act on Python dicts, so a backtest needs no Redis server and spends its
time on trading logic. Only the commands and Lua scripts those classes use are implemented;
anything else raises ``NotImplementedError`` so a new use cannot pass silently.

Semantics follow Redis and redis-py: keys and values are stored as bytes (ints and floats
encoded as redis-py does), replies are bytes, ints, lists or None. Expiry is not modelled: a
backtest lives for one run, and nothing in it depends on a key expiring. Each Lua script has
a Python twin here, registered by the script's exact source; the parity tests (a simulated
cluster run on real Redis against a backtest of the same days, byte-identical trades) and
``tests/unit/test_memredis.py`` (each twin against the real script) keep them equal.
Single-threaded: one backtest per instance.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Any

Value = bytes


def _b(value: Any) -> bytes:
    """Encode a value the way redis-py does before sending it."""
    kind = type(value)  # the common exact types first (hot path)
    if kind is str:
        return value.encode()
    if kind is bytes:
        return value
    if kind is int:
        return str(value).encode()
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("Redis does not take booleans")  # redis-py refuses them too
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"cannot encode {type(value).__name__} for Redis")


def _num(raw: bytes | None) -> float | None:
    """Lua's tonumber on a reply (None for false/nil or a non-number)."""
    if raw is None:
        return None
    try:
        return float(raw) if b"." in raw or b"e" in raw.lower() else int(raw)
    except ValueError:
        return None


class UnsupportedCommand(AttributeError, NotImplementedError):
    """A Redis command the stand-in does not implement (``hasattr`` answers False)."""


class _NoLock:
    """redis-py's ``Lock`` for one process: always acquired."""

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def release(self) -> None:
        return None


class MemoryRedis:
    """The subset of ``redis.Redis`` the backtest path uses, on dicts (see module doc)."""

    def __init__(self) -> None:
        self._data: dict[bytes, Any] = {}

    # -- strings ----------------------------------------------------------------------------
    def _str(self, name: Any) -> bytes | None:
        v = self._data.get(_b(name))
        if v is not None and not isinstance(v, bytes | bytearray):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return v

    def get(self, name: Any) -> bytes | None:
        v = self._str(name)
        return bytes(v) if isinstance(v, bytearray) else v

    def set(self, name: Any, value: Any, ex: Any = None, px: Any = None, nx: bool = False,
            xx: bool = False, **kwargs: Any) -> bool | None:
        if kwargs:
            raise NotImplementedError(f"SET options {sorted(kwargs)}")
        key = _b(name)
        exists = key in self._data
        if (nx and exists) or (xx and not exists):
            return None
        self._data[key] = _b(value)
        return True

    def incrby(self, name: Any, amount: int = 1) -> int:
        key = _b(name)
        cur = self._str(key)
        value = (int(cur) if cur is not None else 0) + int(amount)
        self._data[key] = str(value).encode()
        return value

    def incr(self, name: Any, amount: int = 1) -> int:
        return self.incrby(name, amount)

    def decrby(self, name: Any, amount: int = 1) -> int:
        return self.incrby(name, -int(amount))

    def getrange(self, key: Any, start: int, end: int) -> bytes:
        raw = self._str(key) or b""
        n = len(raw)
        start = max(n + start, 0) if start < 0 else start
        end = n + end if end < 0 else min(end, n - 1)
        if start > end or start >= n:
            return b""
        return bytes(raw[start:end + 1])

    def strlen(self, name: Any) -> int:
        return len(self._str(name) or b"")

    def append(self, key: Any, value: Any) -> int:
        k = _b(key)
        cur = self._str(k)
        if not isinstance(cur, bytearray):  # appended in place from now on (bars, one a tick)
            cur = self._data[k] = bytearray(cur or b"")
        cur += _b(value)
        return len(cur)

    # -- keys -------------------------------------------------------------------------------
    def delete(self, *names: Any) -> int:
        return sum(self._data.pop(_b(n), None) is not None for n in names)

    unlink = delete

    def exists(self, *names: Any) -> int:
        return sum(_b(n) in self._data for n in names)

    def expire(self, name: Any, *args: Any, **kwargs: Any) -> bool:
        return _b(name) in self._data

    pexpire = expire

    def pttl(self, name: Any) -> int:
        return -1 if _b(name) in self._data else -2

    def scan_iter(self, match: str | None = None, count: int | None = None,
                  **kwargs: Any) -> Iterator[bytes]:
        pattern = match.encode() if isinstance(match, str) else match
        for key in list(self._data):
            if pattern is None or fnmatch.fnmatchcase(key.decode(), pattern.decode()):
                yield key

    def lock(self, name: Any, *args: Any, **kwargs: Any) -> _NoLock:
        return _NoLock()

    # -- hashes -----------------------------------------------------------------------------
    def _hash(self, name: Any, create: bool = False) -> dict[bytes, bytes]:
        key = _b(name)
        v = self._data.get(key)
        if v is None:
            if not create:
                return {}
            v = self._data[key] = {}
        if not isinstance(v, dict):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return v

    def hset(self, name: Any, key: Any = None, value: Any = None,
             mapping: dict[Any, Any] | None = None, items: list[Any] | None = None) -> int:
        h = self._hash(name, create=True)
        pairs: list[tuple[Any, Any]] = []
        if key is not None:
            pairs.append((key, value))
        if mapping:
            pairs.extend(mapping.items())
        if items:
            pairs.extend(zip(items[::2], items[1::2], strict=True))
        added = 0
        for k, v in pairs:
            kb = _b(k)
            added += kb not in h
            h[kb] = _b(v)
        return added

    def hget(self, name: Any, key: Any) -> bytes | None:
        return self._hash(name).get(_b(key))

    def hgetall(self, name: Any) -> dict[bytes, bytes]:
        return dict(self._hash(name))

    def hmget(self, name: Any, keys: Any, *args: Any) -> list[bytes | None]:
        wanted = ([keys] if isinstance(keys, str | bytes) else list(keys)) + list(args)
        h = self._hash(name)
        return [h.get(_b(k)) for k in wanted]

    def hdel(self, name: Any, *keys: Any) -> int:
        h = self._hash(name)
        removed = sum(h.pop(_b(k), None) is not None for k in keys)
        if not h:
            self._data.pop(_b(name), None)
        return removed

    def hkeys(self, name: Any) -> list[bytes]:
        return list(self._hash(name))

    def hvals(self, name: Any) -> list[bytes]:
        return list(self._hash(name).values())

    def hlen(self, name: Any) -> int:
        return len(self._hash(name))

    def hincrby(self, name: Any, key: Any, amount: int = 1) -> int:
        h = self._hash(name, create=True)
        value = int(h.get(_b(key), b"0")) + int(amount)
        h[_b(key)] = str(value).encode()
        return value

    # -- sets -------------------------------------------------------------------------------
    def _set(self, name: Any, create: bool = False) -> set[bytes]:
        key = _b(name)
        v = self._data.get(key)
        if v is None:
            if not create:
                return set()
            v = self._data[key] = set()
        if not isinstance(v, set):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return v

    def sadd(self, name: Any, *values: Any) -> int:
        s = self._set(name, create=True)
        before = len(s)
        s.update(_b(v) for v in values)
        return len(s) - before

    def srem(self, name: Any, *values: Any) -> int:
        s = self._set(name)
        before = len(s)
        s.difference_update(_b(v) for v in values)
        if not s:
            self._data.pop(_b(name), None)
        return before - len(s)

    def smembers(self, name: Any) -> set[bytes]:
        return set(self._set(name))

    def scard(self, name: Any) -> int:
        return len(self._set(name))

    def smismember(self, name: Any, values: Any, *args: Any) -> list[int]:
        members = self._set(name)
        return [1 if _b(v) in members else 0 for v in [*values, *args]]

    def sismember(self, name: Any, value: Any) -> bool:
        return _b(value) in self._set(name)

    # -- lists ------------------------------------------------------------------------------
    def _list(self, name: Any, create: bool = False) -> list[bytes]:
        key = _b(name)
        v = self._data.get(key)
        if v is None:
            if not create:
                return []
            v = self._data[key] = []
        if not isinstance(v, list):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return v

    def rpush(self, name: Any, *values: Any) -> int:
        lst = self._list(name, create=True)
        lst.extend(_b(v) for v in values)
        return len(lst)

    def lrange(self, name: Any, start: int, end: int) -> list[bytes]:
        lst = self._list(name)
        n = len(lst)
        start = max(n + start, 0) if start < 0 else start
        end = n + end if end < 0 else min(end, n - 1)
        return lst[start:end + 1] if start <= end else []

    def llen(self, name: Any) -> int:
        return len(self._list(name))

    # -- pipelines and scripts --------------------------------------------------------------
    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self)

    def register_script(self, script: str) -> Callable[..., Any]:
        twin = _twins().get(script)
        if twin is None:
            raise NotImplementedError("no in-memory twin for this Lua script:\n" + script[:200])

        def run(keys: list[Any] | None = None, args: list[Any] | None = None,
                client: Any = None) -> Any:
            ks, av = [_b(k) for k in keys or []], [_b(a) for a in args or []]
            if isinstance(client, _Pipeline):  # queued in order, like EVALSHA on a pipeline
                client._calls.append((twin, (self, ks, av), {}))
                return client
            return twin(self, ks, av)

        return run

    def ping(self) -> bool:
        return True

    def publish(self, channel: Any, message: Any) -> int:
        return 0  # one process, no subscriber: nobody receives it (as Redis answers then)

    def __getattr__(self, name: str) -> Any:
        raise UnsupportedCommand(f"MemoryRedis has no command {name!r}")


class _Pipeline:
    """Commands queued and run in order by ``execute`` (one process: trivially atomic)."""

    def __init__(self, r: MemoryRedis) -> None:
        self._r = r
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., _Pipeline]:
        fn = getattr(self._r, name)

        def queue(*args: Any, **kwargs: Any) -> _Pipeline:
            self._calls.append((fn, args, kwargs))
            return self

        return queue

    def __len__(self) -> int:
        return len(self._calls)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        calls, self._calls = self._calls, []
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._calls = []


# --------------------------------------------------------------------------------------------
# Twins of the Lua scripts (same keys and arguments, same replies).

Twin = Callable[[MemoryRedis, list[bytes], list[bytes]], Any]


def _advance(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    day_s, bar_s, settled_s, status = r.hmget(keys[0], ["day", "bar", "settled", "status"])
    if status == b"finished":
        return [b"finished"]
    if day_s is None:
        return [b"empty"]
    day, nxt = _num(argv[0]), _num(argv[1])
    assert nxt is not None
    if _num(day_s) != day or _num(bar_s) != nxt - 1:
        return [b"stale"]
    if _num(settled_s) != nxt - 1:
        return [b"waiting"]
    if not r.set(keys[1], argv[4], nx=True):
        return [b"duplicate"]
    return [b"advanced", _publish_row(r, keys[0], keys[2], keys[3], int(nxt), int(argv[2]),
                                      argv[3])]


def _advance_next(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    day_s, bar_s, settled_s, status = r.hmget(keys[0], ["day", "bar", "settled", "status"])
    if status == b"finished" or day_s is None or _num(day_s) != _num(argv[0]):
        return [b"miss"]
    bar = _num(bar_s)
    if _num(settled_s) != bar or bar is None:
        return [b"miss"]
    nxt = int(bar) + 1
    if nxt >= int(argv[5]):
        return [b"miss"]
    if not r.set(argv[4] + str(nxt).encode(), "1", nx=True):
        return [b"duplicate", nxt]
    return [b"advanced", _publish_row(r, keys[0], keys[1], keys[2], nxt, int(argv[1]), argv[2]),
            nxt]


def _publish_row(r: MemoryRedis, state: bytes, source: bytes, bars: bytes, nxt: int, rb: int,
                 at: bytes) -> bytes:
    """``replay._PUBLISH_ROW_LUA`` (the push itself reaches nobody in memory)."""
    off = nxt * rb
    row = r.getrange(source, off, off + rb - 1)
    if r.strlen(bars) == off:
        r.append(bars, row)
    r.hset(state, mapping={"bar": nxt, "status": "running", "dispatched_at": at})
    return row


def _roll(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    day_s, bar_s, settled_s, status = r.hmget(keys[0], ["day", "bar", "settled", "status"])
    if status == b"finished":
        return b"finished"
    if (_num(day_s) != _num(argv[0]) or _num(bar_s) != _num(argv[1])
            or _num(settled_s) != _num(argv[1])):
        return b"stale"
    nd = int(argv[0]) + 1
    if nd >= int(argv[2]):
        r.hset(keys[0], mapping={"status": "finished", "finished_at": argv[3]})
        return b"finished"
    r.hset(keys[0], mapping={"day": nd, "bar": -1, "settled": -1})
    return b"rolled"


def _settle(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    date_s, bar_s, settled_s = r.hmget(keys[0], ["date", "bar", "settled"])
    if date_s != argv[0] or _num(bar_s) != _num(argv[1]):
        return 0
    if (_num(settled_s) or 0) >= (_num(argv[1]) or 0):
        return 1
    r.hset(keys[0], mapping={"settled": argv[1], "settled_at": argv[2]})
    return 1


def _settle_if_done(r: MemoryRedis, keys: list[bytes], date: bytes, bar: bytes,
                    now: bytes) -> int:
    if r.scard(keys[1]) > 0:
        return 0
    date_s, bar_s, settled_s = r.hmget(keys[0], ["date", "bar", "settled"])
    if date_s != date or _num(bar_s) != _num(bar):
        return 0
    if (_num(settled_s) or 0) < (_num(bar) or 0):
        r.hset(keys[0], mapping={"settled": bar, "settled_at": now})
    return 1


def _register(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    for coid in argv[4:]:
        if not r.sismember(keys[2], coid):
            r.sadd(keys[1], coid)
    r.set(keys[3], "1")
    return _settle_if_done(r, keys, argv[0], argv[1], argv[2])


def _complete(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    r.sadd(keys[2], argv[2])
    r.srem(keys[1], argv[2])
    if not r.exists(keys[3]):
        return 0
    return _settle_if_done(r, keys, argv[0], argv[1], argv[3])


def _append_row(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    length = r.strlen(keys[0])
    off = int(argv[0])
    if length == off:
        r.append(keys[0], argv[1])
        return off + len(argv[1])
    return -length


def _reserve(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    amount = argv[1]
    used = int(r.get(keys[0]) or b"0")
    if not (amount.isdigit() and amount[:1] != b"0") or len(amount) > 15:
        return [b"invalid", 0, used]
    a = int(amount)
    existing = r.hget(keys[1], argv[0])
    if existing is not None:
        e = int(existing)
        return [b"released", 0, used] if e == 0 else [b"exists", e, used]
    if used + a > int(argv[2]):
        return [b"limit", 0, used]
    new = r.incrby(keys[0], a)
    r.hset(keys[1], argv[0], a)
    return [b"reserved", a, new]


def _adjust(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    amount = argv[1]
    if not amount.isdigit() or len(amount) > 15:
        return -1
    existing = r.hget(keys[1], argv[0])
    if existing is None:
        return -2
    e, a = int(existing), int(amount)
    if a > e:
        return -3
    _shrink(r, keys, argv[0], e, a)
    return int(r.get(keys[0]) or b"0")


def _shrink(r: MemoryRedis, keys: list[bytes], field: bytes, held: int, target: int) -> None:
    """``risk_store._SHRINK_LUA``: lower one reservation, the used total and peak follow."""
    if target >= held:
        return
    used = int(r.get(keys[0]) or b"0")
    peak = int(r.get(keys[2]) or b"0")
    if used > peak:
        r.set(keys[2], used)
    r.incrby(keys[0], -(held - target))
    r.hset(keys[1], field, target)


def _rebuild(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    pairs = argv[:-1]
    for i in range(0, len(pairs) - 1, 2):
        r.hset(keys[2], pairs[i], pairs[i + 1])
    total = sum(int(v) for v in r.hvals(keys[2]))
    r.set(keys[0], total)
    peak = int(r.get(keys[1]) or b"0")
    if total > peak:
        r.set(keys[1], total)
    return total


def _settle_fills(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    out = []
    for i in range(1, len(argv) - 2, 3):
        held = r.hget(keys[1], argv[i])
        if held is None:
            out.append(-1)
            continue
        e = int(held)
        _shrink(r, keys, argv[i], e, min(int(argv[i + 1]), e) if argv[i + 2] == b"1" else 0)
        out.append(e)
    return out


def _submit(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    existing = r.hget(keys[0], argv[0])
    if existing is not None:
        return [0, existing]
    r.hset(keys[0], argv[0], argv[1])
    if argv[2] == b"1":
        r.sadd(keys[1], argv[0])
    r.rpush(keys[2], argv[0])
    return [1, argv[1]]


def _take_working(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    ids = list(r.smembers(keys[0]))
    if not ids and (argv[2] != b"1" or r.hlen(keys[3]) == 0):
        return [0]
    if not r.set(keys[2], argv[0], nx=True, px=int(argv[1])):
        return [-1]
    return [1, ids, r.hmget(keys[1], ids) if ids else []]


def _push_log(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    entries = argv[2:]
    if not entries:
        return r.llen(keys[0])  # the push itself reaches nobody here
    n = r.rpush(keys[0], *entries)
    r.expire(keys[0], int(argv[0]))
    return n


def _release(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    if r.get(keys[0]) == argv[0]:
        return r.delete(keys[0])
    return 0


def _renew(r: MemoryRedis, keys: list[bytes], argv: list[bytes]) -> Any:
    return 1 if r.get(keys[0]) == argv[0] else 0


_TWINS: dict[str, Twin] | None = None


def _twins() -> dict[str, Twin]:
    """Script source -> Python twin (imported late: those modules import this one's users)."""
    global _TWINS
    if _TWINS is None:
        from core import locks, replay, risk_store
        from core.brokers import positions_book, simulated
        from core.market import bar_store

        _TWINS = {
            replay._ADVANCE_LUA: _advance, replay._ADVANCE_NEXT_LUA: _advance_next,
            replay._ROLL_LUA: _roll,
            replay._SETTLE_LUA: _settle, replay._COMPLETE_LUA: _complete,
            replay._REGISTER_LUA: _register,
            bar_store._APPEND_LUA: _append_row,
            risk_store._RESERVE_LUA: _reserve, risk_store._ADJUST_LUA: _adjust,
            risk_store._REBUILD_LUA: _rebuild, risk_store._SETTLE_LUA: _settle_fills,
            simulated._SUBMIT_LUA: _submit, simulated._TAKE_WORKING_LUA: _take_working,
            positions_book._PUSH_LOG_LUA: _push_log,
            locks._RELEASE_LUA: _release, locks._RENEW_LUA: _renew,
        }
    return _TWINS
