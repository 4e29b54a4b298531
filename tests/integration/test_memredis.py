"""The backtester's in-memory Redis (core.memredis) against a real Redis server: the same
command sequences and the same Lua scripts give the same replies and leave the same data."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest

from core import locks, replay, risk_store
from core.brokers import positions_book, simulated
from core.keys import Keys
from core.market import bar_store
from core.market.bar_store import RedisBarStore
from core.memredis import MemoryRedis
from core.replay import RedisReplay
from core.risk_store import RedisDailyLimitStore


def _dump(r: Any) -> dict[bytes, Any]:
    """Every key's value in a comparable form (expiry aside)."""
    out: dict[bytes, Any] = {}
    for key in sorted(r.scan_iter(match="*")):
        if isinstance(r, MemoryRedis):
            v = r._data[key if isinstance(key, bytes) else key.encode()]
            out[key] = (bytes(v) if isinstance(v, bytearray) else
                        dict(v) if isinstance(v, dict) else set(v) if isinstance(v, set)
                        else list(v) if isinstance(v, list) else v)
            continue
        kind = r.type(key)
        if kind == b"string":
            out[key] = r.get(key)
        elif kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"set":
            out[key] = r.smembers(key)
        elif kind == b"list":
            out[key] = r.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected type {kind} for {key}")
    return out


def _both(redis_client: Any, steps: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
    mem = MemoryRedis()
    for name, args, kwargs in steps:
        real = getattr(redis_client, name)(*args, **kwargs)
        fake = getattr(mem, name)(*args, **kwargs)
        if isinstance(real, list) and name == "hkeys":
            real, fake = sorted(real), sorted(fake)
        assert fake == real, (name, args, kwargs)
    assert _dump(mem) == _dump(redis_client)


def test_plain_commands_answer_like_redis(redis_client: Any) -> None:
    steps = [
        ("set", ("a", 5), {}), ("set", ("a", 6), {"nx": True}), ("get", ("a",), {}),
        ("set", ("b", 1.5), {"ex": 100}), ("get", ("b",), {}), ("incrby", ("a", 7), {}),
        ("incr", ("n",), {}), ("incrby", ("n", -3), {}), ("exists", ("a", "b", "zz"), {}),
        ("set", ("s", b"0123456789"), {}), ("getrange", ("s", 2, 5), {}),
        ("getrange", ("s", 8, 100), {}), ("getrange", ("s", 3, -1), {}),
        ("getrange", ("s", 20, 30), {}), ("strlen", ("s",), {}), ("append", ("s", "ab"), {}),
        ("append", ("new", "xy"), {}), ("get", ("s",), {}), ("strlen", ("nothing",), {}),
        ("hset", ("h", "f1", 1), {}), ("hset", ("h",), {"mapping": {"f1": "x", "f2": 2}}),
        ("hget", ("h", "f1"), {}), ("hget", ("h", "none"), {}), ("hmget", ("h", ["f1", "zz"]), {}),
        ("hlen", ("h",), {}), ("hkeys", ("h",), {}), ("hgetall", ("h",), {}),
        ("hincrby", ("h", "c", 3), {}), ("hdel", ("h", "f1", "zz"), {}), ("hgetall", ("h",), {}),
        ("hdel", ("h", "f2", "c"), {}), ("exists", ("h",), {}),
        ("sadd", ("st", "x", "y", "x"), {}), ("scard", ("st",), {}),
        ("sismember", ("st", "y"), {}), ("smismember", ("st", ["y", "q", "x"]), {}),
        ("srem", ("st", "x", "q"), {}),
        ("smembers", ("st",), {}), ("srem", ("st", "y"), {}), ("exists", ("st",), {}),
        ("rpush", ("l", "a", "b", "c"), {}), ("lrange", ("l", 0, -1), {}),
        ("lrange", ("l", 1, 1), {}), ("lrange", ("l", -2, -1), {}), ("llen", ("l",), {}),
        ("delete", ("a", "zz"), {}), ("unlink", ("b",), {}), ("exists", ("a", "b"), {}),
    ]
    _both(redis_client, steps)


def test_pipelines_return_every_reply_in_order(redis_client: Any) -> None:
    mem = MemoryRedis()
    for r in (redis_client, mem):
        r.set("k", 1)
    replies = []
    for r in (redis_client, mem):
        pipe = r.pipeline(transaction=True)
        pipe.incrby("k", 2).get("k").hset("h", mapping={"a": 1}).exists("h", "zz")
        replies.append(pipe.execute())
    assert replies[0] == replies[1] == [3, b"3", 1, 1]


def _script_pair(redis_client: Any, source: str) -> tuple[Any, Any, MemoryRedis]:
    mem = MemoryRedis()
    return redis_client.register_script(source), mem.register_script(source), mem


@pytest.mark.parametrize("calls", [
    # (client order id, amount, limit): reserve, exists, release path, invalid, over limit
    [("a", "500", "1000"), ("a", "500", "1000"), ("b", "600", "1000"), ("c", "0", "1000"),
     ("d", "05", "1000"), ("e", "x1", "1000"), ("f", "499", "1000"), ("g", "1", "1000")],
])
def test_reserve_adjust_rebuild_twins(redis_client: Any, calls: list[tuple[str, ...]]) -> None:
    keys = ["used", "res", "peak"]
    real_res, mem_res, mem = _script_pair(redis_client, risk_store._RESERVE_LUA)
    real_adj, mem_adj, _ = None, None, None
    real_adj = redis_client.register_script(risk_store._ADJUST_LUA)
    mem_adj = mem.register_script(risk_store._ADJUST_LUA)
    real_reb = redis_client.register_script(risk_store._REBUILD_LUA)
    mem_reb = mem.register_script(risk_store._REBUILD_LUA)
    for coid, amount, limit in calls:
        args = [coid, amount, limit, 3600]
        assert mem_res(keys=keys[:2], args=args) == real_res(keys=keys[:2], args=args)
    for coid, amount in [("a", "200"), ("a", "300"), ("zz", "1"), ("f", "0"), ("a", "-1"),
                         ("a", "200"), ("a", "0")]:
        args = [coid, amount, 3600]
        assert mem_adj(keys=keys, args=args) == real_adj(keys=keys, args=args)
    args = ["a", 40, "q", 7, 3600]
    assert mem_reb(keys=["used", "peak", "res"], args=args) == real_reb(
        keys=["used", "peak", "res"], args=args)
    assert _dump(mem) == _dump(redis_client)


def test_submit_and_lock_twins(redis_client: Any) -> None:
    real, fake, mem = _script_pair(redis_client, simulated._SUBMIT_LUA)
    keys = ["orders", "open", "log"]
    for args in (["o1", '{"x":1}', "1"], ["o1", '{"x":2}', "1"], ["o2", '{"y":1}', "0"]):
        assert fake(keys=keys, args=args) == real(keys=keys, args=args)
    real_rel = redis_client.register_script(locks._RELEASE_LUA)
    mem_rel = mem.register_script(locks._RELEASE_LUA)
    real_ren = redis_client.register_script(locks._RENEW_LUA)
    mem_ren = mem.register_script(locks._RENEW_LUA)
    for r in (redis_client, mem):
        r.set("lock", "tok")
    assert mem_ren(keys=["lock"], args=["tok", 1000]) == real_ren(keys=["lock"],
                                                                  args=["tok", 1000])
    assert mem_ren(keys=["lock"], args=["other", 1000]) == real_ren(keys=["lock"],
                                                                    args=["other", 1000])
    assert mem_rel(keys=["lock"], args=["other"]) == real_rel(keys=["lock"], args=["other"])
    assert mem_rel(keys=["lock"], args=["tok"]) == real_rel(keys=["lock"], args=["tok"])
    assert _dump(mem) == _dump(redis_client)


def test_take_working_twin(redis_client: Any) -> None:
    """The fills' first step (working orders and the broker's lock at once) answers alike:
    nothing working, positions to check, orders (one gone), and a lock already held; also
    queued on pipelines through ``queue_script``."""
    from core.scripts import queue_script

    real, fake, mem = _script_pair(redis_client, simulated._TAKE_WORKING_LUA)
    keys = ["open", "orders", "lock", "positions"]

    def both(args: list[Any]) -> None:
        got = []
        for r, script in ((redis_client, real), (mem, fake)):
            pipe = r.pipeline(transaction=False)
            queue_script(pipe, script, keys, args)
            pipe.get("lock")
            reply, lock = pipe.execute()
            if reply[0] == 1:  # set order differs between servers: compare sorted pairs
                reply = [1, sorted(zip(reply[1], reply[2], strict=True))]
            got.append((reply, lock))
        assert got[0] == got[1], args

    both(["t1", 30000, 0])  # nothing open, stops off: no lock
    for r in (redis_client, mem):
        r.hset("positions", "AAA", "{}")
    both(["t1", 30000, 0])  # a position, stops off: still nothing to do
    both(["t1", 30000, 1])  # stops on: the lock is taken for the positions
    for r in (redis_client, mem):
        r.delete("lock")
        r.sadd("open", "o1", "o2", "o3")
        r.hset("orders", mapping={"o1": '{"a":1}', "o3": '{"c":3}'})
    both(["t2", 30000, 0])  # o2 gone from the orders: a nil in its place
    both(["t3", 30000, 0])  # held by t2: refused
    assert _dump(mem) == _dump(redis_client)


def test_bar_append_twin(redis_client: Any) -> None:
    real, fake, mem = _script_pair(redis_client, bar_store._APPEND_LUA)
    for off, data in ((0, b"abcd"), (0, b"abcd"), (4, b"efgh"), (12, b"zzzz"), (8, b"ijkl")):
        args = [off, data, 3600, "chan", "2024-06-03", off // 4]
        assert fake(keys=["bars"], args=args) == real(keys=["bars"], args=args)
    assert _dump(mem) == _dump(redis_client)


def _day(n_bars: int = 6, n_sym: int = 3) -> Any:
    from core.models import DayBars

    open_time = dt.datetime(2025, 11, 3, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    ohlcv = np.arange(n_bars * n_sym * 5, dtype=float).reshape(n_bars, n_sym, 5) + 1.0
    return DayBars(date=open_time.date(), symbols=tuple(f"S{i}" for i in range(n_sym)),
                   open_time=open_time,
                   close_time=open_time + dt.timedelta(minutes=n_bars), bar_seconds=60,
                   ohlcv=ohlcv)


def test_the_replay_clock_runs_the_same_on_both(redis_client: Any) -> None:
    """advance / settle / complete / roll / fast_forward through RedisReplay on each."""
    outcomes = []
    for r in (redis_client, MemoryRedis()):
        keys = Keys.for_mode("sim", "twin")
        rp = RedisReplay(r, keys, RedisBarStore(r, keys))
        day = _day()
        rp.prepare([day, _day()])
        seen: list[Any] = []
        st = rp.state()
        adv = rp.advance(st, keys.tick_guard(day.date, 0), 1.0)
        seen.append((adv.status, adv.bar, adv.row.tolist()))
        seen.append(rp.advance(st, keys.tick_guard(day.date, 0), 1.0).status)  # duplicate
        st = rp.state()
        seen.append(rp.advance(st, keys.tick_guard(day.date, 1), 2.0).status)  # waiting
        rp.register_pending(day.date, 0, ["o1", "o2"])
        seen.append(rp.complete_pending(day.date, 0, "o1"))
        seen.append(rp.complete_pending(day.date, 0, "o2"))
        seen.append(rp.settle(day.date, 0))
        rp.fast_forward(4)
        st = rp.state()
        seen.append((st.bar, st.settled))
        adv = rp.advance(st, keys.tick_guard(day.date, 5), 3.0)
        seen.append((adv.status, adv.bar))
        seen.append(rp.settle(day.date, 5))
        seen.append(rp.roll_day(rp.state(), 4.0))
        seen.append(RedisBarStore(r, keys).read(day.date).tolist())
        outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][-2] == "rolled"


def test_unknown_scripts_and_commands_are_refused() -> None:
    mem = MemoryRedis()
    with pytest.raises(NotImplementedError):
        mem.register_script("return 1")
    with pytest.raises(NotImplementedError):
        mem.zadd("z", {"a": 1})
    assert not hasattr(mem, "zadd") and hasattr(mem, "hgetall")  # probing stays safe


def test_every_script_of_the_backtest_path_has_a_twin() -> None:
    """The runtime the backtester builds registers only scripts that have twins."""
    from core.config import Settings
    from core.runtime import build_memory_runtime

    rt = build_memory_runtime(Settings(mode="sim", sim_run_id="twins"))
    assert isinstance(rt.redis, MemoryRedis)
    for source in (replay._ADVANCE_LUA, risk_store._RESERVE_LUA, simulated._SUBMIT_LUA):
        assert rt.redis.register_script(source)
    with pytest.raises(ValueError, match="FAULTS"):
        build_memory_runtime(Settings(mode="sim", sim_faults="submit_timeout:1"))
    assert isinstance(RedisDailyLimitStore(rt.redis, rt.keys), RedisDailyLimitStore)


def test_positions_log_push_twin(redis_client: Any) -> None:
    """Appending to the positions log with its push answers alike (the log's length), with
    entries, with none (the sync point: nothing appended) and past the 1000-entry chunks;
    the data left is the same (the push itself reaches nobody in memory)."""
    from core.scripts import queue_script

    real, fake, mem = _script_pair(redis_client, positions_book._PUSH_LOG_LUA)
    keys = ["log", "epoch"]
    many = [f"S{i}\n{{}}" for i in range(2500)]
    for entries in (["AAA\n{\"qty\":1}"], [], many, ["BBB\n"]):
        got = []
        for r, script in ((redis_client, real), (mem, fake)):
            pipe = r.pipeline(transaction=True)
            queue_script(pipe, script, keys, [3600, "chan", *entries])
            pipe.llen("log")
            got.append(pipe.execute())
        assert got[0] == got[1], len(entries)
    assert _dump(mem) == _dump(redis_client)
