"""The replay clock of simulated mode, with its state in Redis so every process shares it.

A run is a list of sessions (``DayBars``) stored once. Each beat tick publishes the next bar
into the bar store, but only once the previous bar's decisions and orders are settled, so a
run gives the same trades however late the machine delivers the ticks. Times are
America/New_York; wall times are Unix seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from redis import Redis

from core.keys import Keys
from core.market.bar_store import RedisBarStore, SessionMeta, row_to_bytes, rows_from_bytes
from core.models import DayBars

_TTL_S = 4 * 24 * 3600

AdvanceStatus = Literal["advanced", "waiting", "duplicate", "finished", "rolled", "stale", "empty"]

# Publish bar ``nxt``: copy its row (``rb`` bytes) from the replay's data to the bar store
# (once: a store already holding it is left alone) and push it to the scoring listeners on
# ``channel`` as "<prefix>:<bar>:<row>"; then mark the replay running at that bar. Returns
# the row. Shared by _ADVANCE_LUA and _ADVANCE_NEXT_LUA.
_PUBLISH_ROW_LUA = """
local function publish_row(state, source, bars, nxt, rb, ttl, at, channel, prefix)
  local off = nxt * rb
  local row = redis.call('GETRANGE', source, off, off + rb - 1)
  if redis.call('STRLEN', bars) == off then
    redis.call('APPEND', bars, row)
    redis.call('EXPIRE', bars, ttl)
    redis.call('PUBLISH', channel, prefix .. ':' .. nxt .. ':' .. row)
  end
  redis.call('HSET', state, 'bar', nxt, 'status', 'running', 'dispatched_at', at)
  return row
end
"""

_ADVANCE_LUA = _PUBLISH_ROW_LUA + """
local st = redis.call('HMGET', KEYS[1], 'day', 'bar', 'settled', 'status')
if st[4] == 'finished' then return {'finished'} end
if st[1] == false then return {'empty'} end
local day = tonumber(ARGV[1])
local nxt = tonumber(ARGV[2])
if tonumber(st[1]) ~= day or tonumber(st[2]) ~= nxt - 1 then return {'stale'} end
if tonumber(st[3]) ~= nxt - 1 then return {'waiting'} end
if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'EX', tonumber(ARGV[6])) then
  return {'duplicate'}
end
local row = publish_row(KEYS[1], KEYS[3], KEYS[4], nxt, tonumber(ARGV[3]),
                        tonumber(ARGV[6]), ARGV[4], ARGV[7], ARGV[8])
return {'advanced', row}
"""

# The common tick in one round trip: publish the bar after the current one when it is
# settled and still in the session the caller expects. Anything else ('miss': another day,
# not settled, the day's last bar done, no run) is left to the full path (state, then
# _ADVANCE). The guard key is the given prefix and the bar (a single Redis, no cluster).
_ADVANCE_NEXT_LUA = _PUBLISH_ROW_LUA + """
local st = redis.call('HMGET', KEYS[1], 'day', 'bar', 'settled', 'status')
if st[4] == 'finished' or st[1] == false then return {'miss'} end
if tonumber(st[1]) ~= tonumber(ARGV[1]) then return {'miss'} end
local bar = tonumber(st[2])
if tonumber(st[3]) ~= bar then return {'miss'} end
local nxt = bar + 1
if nxt >= tonumber(ARGV[6]) then return {'miss'} end
if not redis.call('SET', ARGV[5] .. nxt, '1', 'NX', 'EX', tonumber(ARGV[4])) then
  return {'duplicate', nxt}
end
local row = publish_row(KEYS[1], KEYS[2], KEYS[3], nxt, tonumber(ARGV[2]),
                        tonumber(ARGV[4]), ARGV[3], ARGV[7], ARGV[8])
return {'advanced', row, nxt}
"""

_ROLL_LUA = """
local st = redis.call('HMGET', KEYS[1], 'day', 'bar', 'settled', 'status')
if st[4] == 'finished' then return 'finished' end
if tonumber(st[1]) ~= tonumber(ARGV[1]) or tonumber(st[2]) ~= tonumber(ARGV[2])
   or tonumber(st[3]) ~= tonumber(ARGV[2]) then return 'stale' end
local nd = tonumber(ARGV[1]) + 1
if nd >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'status', 'finished', 'finished_at', ARGV[4])
  return 'finished'
end
redis.call('HSET', KEYS[1], 'day', nd, 'bar', -1, 'settled', -1)
return 'rolled'
"""

_SETTLE_LUA = """
local st = redis.call('HMGET', KEYS[1], 'date', 'bar', 'settled')
if st[1] ~= ARGV[1] or tonumber(st[2]) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(st[3]) >= tonumber(ARGV[2]) then return 1 end
redis.call('HSET', KEYS[1], 'settled', ARGV[2], 'settled_at', ARGV[3])
return 1
"""

# The bar's ledger: the orders its decision sent (pending), those done, and whether the
# decision registered its orders yet. The decision hands its first order on before it
# registers them all, so an order may be done before it is registered: it is then never
# added to pending. The bar settles once registered and nothing is pending.
# KEYS: state, pending, done, registered. ARGV: date, bar, now, ttl, order ids...
_REGISTER_LUA = """
for i = 5, #ARGV do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 0 then
    redis.call('SADD', KEYS[2], ARGV[i])
  end
end
redis.call('SET', KEYS[4], '1', 'EX', tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
if redis.call('SCARD', KEYS[2]) > 0 then return 0 end
local st = redis.call('HMGET', KEYS[1], 'date', 'bar', 'settled')
if st[1] ~= ARGV[1] or tonumber(st[2]) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(st[3]) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'settled', ARGV[2], 'settled_at', ARGV[3])
end
return 1
"""

# One order of the bar is done. KEYS as above. ARGV: date, bar, order id, now, ttl.
_COMPLETE_LUA = """
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
if redis.call('SCARD', KEYS[2]) > 0 then return 0 end
local st = redis.call('HMGET', KEYS[1], 'date', 'bar', 'settled')
if st[1] ~= ARGV[1] or tonumber(st[2]) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(st[3]) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'settled', ARGV[2], 'settled_at', ARGV[4])
end
return 1
"""


@dataclass(frozen=True)
class ReplayState:
    """Where the replay is: day index, last published bar and last settled bar (-1 = none)."""

    day: int
    bar: int
    settled: int
    status: str
    dispatched_at: float
    n_days: int
    date: dt.date | None

    @property
    def finished(self) -> bool:
        """True once every day has been replayed."""
        return self.status == "finished"


@dataclass(frozen=True)
class Advance:
    """Result of one attempt to publish the next bar."""

    status: AdvanceStatus
    day: SessionMeta | None = None
    bar: int = -1
    row: np.ndarray | None = None


class RedisReplay:
    """Replay data, the replay clock and per-bar settlement, shared through Redis."""

    def __init__(self, redis: Redis, keys: Keys, bar_store: RedisBarStore) -> None:
        self._r = redis
        self._k = keys
        self._bars = bar_store
        self._advance = redis.register_script(_ADVANCE_LUA)
        self._advance_next = redis.register_script(_ADVANCE_NEXT_LUA)
        self._roll = redis.register_script(_ROLL_LUA)
        self._settle = redis.register_script(_SETTLE_LUA)
        self._complete = redis.register_script(_COMPLETE_LUA)
        self._register = redis.register_script(_REGISTER_LUA)
        self._days: list[SessionMeta] | None = None
        self._day_hint: int | None = None  # the session index this process last saw

    # -- set-up -----------------------------------------------------------------------------
    def prepare(self, days: list[DayBars]) -> None:
        """Store the sessions of a run and reset the clock to before the first bar."""
        if not days:
            raise ValueError("a replay needs at least one day")
        metas = []
        pipe = self._r.pipeline(transaction=True)
        for day in days:
            meta = SessionMeta(day.date, day.symbols, day.open_time, day.close_time,
                               day.bar_seconds)
            metas.append(meta)
            pipe.set(self._k.replay_data(day.date), row_to_bytes(day.ohlcv), ex=_TTL_S)
            pipe.set(self._k.bars_meta(day.date), meta.to_json(), ex=_TTL_S)
            pipe.delete(self._k.bars(day.date))
        pipe.set(self._k.replay_days(), json.dumps([m.to_json() for m in metas]), ex=_TTL_S)
        pipe.delete(self._k.replay_state(), self._k.replay_day_stats())
        pipe.hset(self._k.replay_state(), mapping={
            "day": 0, "bar": -1, "settled": -1, "status": "ready", "dispatched_at": 0,
            "date": metas[0].date.isoformat(), "n_days": len(metas),
        })
        pipe.expire(self._k.replay_state(), _TTL_S)
        pipe.execute()
        self._days = metas

    def is_prepared(self) -> bool:
        """True when a run has been stored under this namespace."""
        return bool(self._r.exists(self._k.replay_state()))

    def days(self) -> list[SessionMeta]:
        """The run's sessions in order (cached; a run never changes)."""
        if self._days is None:
            raw = self._r.get(self._k.replay_days())
            if raw is None:
                return []
            self._days = [SessionMeta.from_json(item) for item in json.loads(raw)]
        return self._days

    # -- clock ------------------------------------------------------------------------------
    def state(self) -> ReplayState:
        """The shared clock state."""
        raw = self._r.hgetall(self._k.replay_state())
        if not raw:
            return ReplayState(-1, -1, -1, "empty", 0.0, 0, None)
        d = {k.decode(): v.decode() for k, v in raw.items()}
        days = self.days()
        day = int(d["day"])
        self._day_hint = day
        return ReplayState(
            day=day, bar=int(d["bar"]), settled=int(d["settled"]), status=d["status"],
            dispatched_at=float(d.get("dispatched_at", 0) or 0), n_days=len(days),
            date=days[day].date if 0 <= day < len(days) else None,
        )

    def now(self) -> tuple[SessionMeta | None, int]:
        """The current session and its last published bar (-1 before the first)."""
        st = self.state()
        days = self.days()
        if st.status in ("empty", "finished") or not 0 <= st.day < len(days):
            return None, -1
        return days[st.day], st.bar

    def advance(self, state: ReplayState, guard_key: str, now_wall: float) -> Advance:
        """Publish the bar after ``state.bar`` if the previous one is settled (atomic)."""
        days = self.days()
        meta = days[state.day]
        nxt = state.bar + 1
        res = self._advance(
            keys=[self._k.replay_state(), guard_key, self._k.replay_data(meta.date),
                  self._k.bars(meta.date)],
            args=[state.day, nxt, meta.row_bytes, repr(now_wall), "1", _TTL_S,
                  self._k.bars_channel(), meta.date.isoformat()],
        )
        status = res[0].decode()
        if status != "advanced":
            return Advance(status)  # type: ignore[arg-type]
        row = rows_from_bytes(res[1], len(meta.symbols))[0]
        return Advance("advanced", meta, nxt, row)

    def advance_next(self, now_wall: float) -> Advance | None:
        """Publish the next bar in one round trip when the previous one is settled and the
        session is the one this process last saw (the tick guard of ``Keys.tick_guard``
        taken with SET NX). 'advanced' or 'duplicate'; None when the full path must decide
        (another session, not settled, end of day, no run seen yet)."""
        hint = self._day_hint
        days = self.days() if hint is not None else []
        if hint is None or not 0 <= hint < len(days):
            return None
        meta = days[hint]
        res = self._advance_next(
            keys=[self._k.replay_state(), self._k.replay_data(meta.date),
                  self._k.bars(meta.date)],
            args=[hint, meta.row_bytes, repr(now_wall), _TTL_S,
                  self._k.tick_guard_prefix(meta.date), meta.n_bars, self._k.bars_channel(),
                  meta.date.isoformat()])
        status = res[0].decode()
        if status == "miss":
            return None
        if status == "duplicate":
            return Advance("duplicate", meta, int(res[1]))
        row = rows_from_bytes(res[1], len(meta.symbols))[0]
        return Advance("advanced", meta, int(res[2]), row)

    def fast_forward(self, to_bar: int) -> None:
        """Publish and settle every bar of the current session up to ``to_bar`` at once.

        For the single-process backtester only, when it has shown that nothing happens on
        those bars (no order, nothing to decide): not atomic against other processes."""
        st = self.state()
        meta = self.days()[st.day]
        if st.settled != st.bar or not st.bar < to_bar < meta.n_bars:
            raise ValueError(f"cannot fast-forward from bar {st.bar} (settled {st.settled}) "
                             f"to {to_bar}")
        rb = meta.row_bytes
        rows = self._r.getrange(self._k.replay_data(meta.date), (st.bar + 1) * rb,
                                (to_bar + 1) * rb - 1)
        pipe = self._r.pipeline(transaction=True)
        pipe.append(self._k.bars(meta.date), rows)
        pipe.hset(self._k.replay_state(), mapping={"bar": to_bar, "settled": to_bar})
        pipe.execute()

    def row(self, meta: SessionMeta, bar: int) -> np.ndarray:
        """Bar ``bar`` of a replay day as ``[S, 5]``."""
        raw = self._r.getrange(self._k.replay_data(meta.date), bar * meta.row_bytes,
                               (bar + 1) * meta.row_bytes - 1)
        return rows_from_bytes(raw, len(meta.symbols))[0]

    def roll_day(self, state: ReplayState, now_wall: float) -> str:
        """Move to the next day once the last bar is settled; 'finished' after the last day."""
        res = self._roll(keys=[self._k.replay_state()],
                         args=[state.day, state.bar, len(self.days()), repr(now_wall)])
        status = res.decode() if isinstance(res, bytes) else str(res)
        if status == "rolled":
            nxt = self.days()[state.day + 1]
            self._r.hset(self._k.replay_state(), "date", nxt.date.isoformat())
        return status

    def touch_dispatch(self, now_wall: float) -> None:
        """Record that the current bar's work was (re)dispatched."""
        self._r.hset(self._k.replay_state(), "dispatched_at", repr(now_wall))

    # -- settlement -------------------------------------------------------------------------
    def _ledger(self, day: dt.date, bar: int) -> list[str]:
        return [self._k.replay_state(), self._k.replay_pending(day, bar),
                self._k.replay_done(day, bar), self._k.replay_registered(day, bar)]

    def register_pending(self, day: dt.date, bar: int, client_order_ids: list[str]) -> bool:
        """Record the orders a bar's decision sent (before or after they went out); the bar
        settles when all are done. True when it settled now (all were done already)."""
        return bool(self._register(
            keys=self._ledger(day, bar),
            args=[day.isoformat(), bar, repr(time.time()), _TTL_S, *client_order_ids]))

    def complete_pending(self, day: dt.date, bar: int, client_order_id: str) -> bool:
        """Mark one order of a bar done; True when the bar became settled."""
        return bool(self._complete(
            keys=self._ledger(day, bar),
            args=[day.isoformat(), bar, client_order_id, repr(time.time()), _TTL_S],
        ))

    def settle(self, day: dt.date, bar: int) -> bool:
        """Mark a bar settled (a decision that sent no orders)."""
        return bool(self._settle(keys=[self._k.replay_state()],
                                 args=[day.isoformat(), bar, repr(time.time())]))

    def record_day_stats(self, stats: dict[str, object], done_key: str | None = None) -> None:
        """Append end-of-day figures (JSON) for the run's summary; with ``done_key``, set it
        to "done" in the same transaction (the day counts as recorded exactly then)."""
        pipe = self._r.pipeline(transaction=True)
        pipe.rpush(self._k.replay_day_stats(), json.dumps(stats))
        pipe.expire(self._k.replay_day_stats(), _TTL_S)
        if done_key is not None:
            pipe.set(done_key, "done", ex=_TTL_S)
        pipe.execute()

    def day_stats(self) -> list[dict[str, object]]:
        """End-of-day figures recorded so far, one per finished day."""
        return [json.loads(x) for x in self._r.lrange(self._k.replay_day_stats(), 0, -1)]
