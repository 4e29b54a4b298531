"""Money-safe execution on real Redis: lookups before submits, retries, breaker, reconcile."""

from __future__ import annotations

import time
from decimal import Decimal

import numpy as np
import pytest

from core import execution
from core.decision import reservation_cents
from core.errors import BrokerUnavailable, OrderInFlight
from core.locks import TokenLock
from core.models import CLOSE
from core.orders import OrderIntent, entry_client_order_id
from core.risk import collar_price
from tests.helpers import prepared_runtime


@pytest.fixture
def make_rt(redis_client, redis_url):
    def build(bars: int = 20, **overrides):
        return prepared_runtime(redis_url, "exe", bars=bars, **overrides)
    return build


def entry(rt, symbol_index: int = 0, side: str = "buy", qty: int = 5) -> dict:
    meta, bar = rt.replay.now()
    _, window = rt.window.get(meta.date, bar)
    price = Decimal(repr(float(window[bar, symbol_index, CLOSE]))).quantize(Decimal("0.0001"))
    sym = meta.symbols[symbol_index]
    return OrderIntent(
        client_order_id=entry_client_order_id("orb", sym, meta.bar_time(bar), side),
        symbol=sym, side=side, qty=qty, intent="entry", reason="orb", strategy="orb",
        ref_price=str(price), limit_price=str(collar_price(price, side, 0.005)),
        session_date=meta.date, bar=bar).model_dump(mode="json")


def test_lost_answer_then_retry_makes_one_order_counted_once(make_rt) -> None:
    rt = make_rt(sim_faults="timeout_after_submit=1")
    intent = entry(rt)
    with pytest.raises(BrokerUnavailable):
        execution.submit_order(rt, intent)  # accepted at the broker, answer lost
    again = execution.submit_order(rt, intent)  # what Celery's retry does
    assert again["status"] == "exists"
    day = rt.replay.days()[0].date
    assert rt.broker.order_log() == [intent["client_order_id"]]
    assert rt.limits.used(day) == reservation_cents(OrderIntent.model_validate(intent))


def test_duplicate_id_rejection_is_looked_up_not_resubmitted(make_rt) -> None:
    rt = make_rt(sim_faults="timeout_after_submit=1,strict_duplicates=1")
    intent = entry(rt)
    with pytest.raises(BrokerUnavailable):
        execution.submit_order(rt, intent)
    # bypass the first lookup as a racing worker would: the broker answers "duplicate"
    order = execution._send(rt, execution.OrderRequest(
        client_order_id=intent["client_order_id"], symbol=intent["symbol"], side="buy", qty=5))
    assert order.client_order_id == intent["client_order_id"]
    assert rt.broker.order_log() == [intent["client_order_id"]]


def test_busy_lock_raises_for_a_retry_instead_of_dropping_the_order(make_rt) -> None:
    rt = make_rt()
    intent = entry(rt)
    held = TokenLock(rt.redis, rt.keys.order_lock(intent["client_order_id"]))
    assert held.acquire()
    with pytest.raises(OrderInFlight):
        execution.submit_order(rt, intent)
    assert rt.broker.order_log() == []
    held.release()
    assert execution.submit_order(rt, intent)["status"] == "accepted"


def test_breaker_opens_on_5xx_blocks_entries_not_exits_and_recovers(make_rt) -> None:
    rt = make_rt(sim_faults="error_5xx=3", breaker_failures=3, breaker_cooldown_s=0.3)
    intents = [entry(rt, i) for i in range(4)]
    for intent in intents[:3]:
        with pytest.raises(BrokerUnavailable):
            execution.submit_order(rt, intent)
    assert rt.breaker.state().state == "open"
    refused = execution.submit_order(rt, intents[3])
    assert refused == {**refused, "status": "refused", "reason": "breaker_open"}
    assert rt.broker.order_log() == []
    # exits still go through while the breaker is open
    rt.broker.inner.submit_order(execution.OrderRequest("pos-1", intents[3]["symbol"], "buy", 1))
    st = rt.replay.state()
    meta = rt.replay.days()[0]
    adv = rt.replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), 0.0)
    rt.broker.process_bar(meta, adv.bar, adv.row)
    closed = execution.close_symbol(rt, intents[3]["symbol"], "pos-1-x1", "stop_loss")
    assert closed["status"] == "accepted"
    time.sleep(0.35)  # the cooldown is wall time in the breaker; nothing to poll
    ok = execution.submit_order(rt, intents[0])  # half-open probe succeeds and closes it
    assert ok["status"] == "accepted"
    assert rt.breaker.state().state == "closed"


def test_reconcile_rebuilds_used_capital_after_redis_loses_it(make_rt) -> None:
    rt = make_rt()
    day = rt.replay.days()[0].date
    a, b = entry(rt, 0), entry(rt, 1, side="sell")
    execution.submit_order(rt, a)
    execution.submit_order(rt, b)
    used = rt.limits.used(day)
    assert used > 0
    # our side of Redis loses the day's risk keys (the broker keeps its orders)
    rt.redis.delete(rt.keys.used_capital(day), rt.keys.reservations(day),
                    rt.keys.entries(day), rt.keys.reconciled(day))
    refused = execution.submit_order(rt, entry(rt, 2))
    assert refused["reason"] == "not_reconciled"  # no entry before reconciliation
    out = execution.reconcile(rt, day)
    rebuilt = rt.limits.used(day)
    # working orders are counted from what the broker shows: never less than before
    assert out["fixed"] == 2 and used <= rebuilt <= used * 1.001
    assert {x.decode() for x in rt.redis.smembers(rt.keys.entries(day))} == {
        f"{a['symbol']}:buy", f"{b['symbol']}:sell"}


def test_orphan_reservation_released_at_end_of_day(make_rt) -> None:
    rt = make_rt()
    day = rt.replay.days()[0].date
    rt.limits.reserve(day, "orb-GHOST-20251124-0945-L", 12_345, rt.settings.daily_limit_cents)
    intent = entry(rt)
    execution.submit_order(rt, intent)
    released = execution.release_orphans(rt, day)
    assert released == ["orb-GHOST-20251124-0945-L"]
    assert rt.limits.used(day) == reservation_cents(OrderIntent.model_validate(intent))


def test_flatten_twice_and_eod_together_end_flat_never_flipped(make_rt) -> None:
    rt = make_rt()
    meta = rt.replay.days()[0]
    for i in range(3):
        execution.submit_order(rt, entry(rt, i, side="buy" if i % 2 else "sell", qty=3))
    st = rt.replay.state()
    adv = rt.replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), 0.0)
    rt.broker.process_bar(meta, adv.bar, adv.row)
    rt.replay.settle(meta.date, adv.bar)
    assert len(rt.broker.get_positions()) == 3
    execution.flatten_all(rt)
    execution.flatten_all(rt)
    execution.close_all(rt, "eod")
    for _ in range(2):
        st = rt.replay.state()
        adv = rt.replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), 0.0)
        rt.broker.process_bar(meta, adv.bar, adv.row)
        rt.replay.settle(meta.date, adv.bar)
    assert rt.broker.get_positions() == {}
    trades = rt.broker.trades()
    assert len(trades) == 3 and {t["qty"] for t in trades} == {3}
    assert execution.is_halted(rt)


def test_entries_the_broker_would_reject_are_refused_before_reserving(make_rt) -> None:
    rt = make_rt(sim_hard_to_borrow="SYN001", sim_starting_cash="1000",
                 sim_margin_multiplier=1)
    day = rt.replay.days()[0].date
    short = execution.submit_order(rt, entry(rt, 1, side="sell"))
    assert short["status"] == "refused" and "not shortable" in short["reason"]
    price = float(entry(rt, 2)["limit_price"])
    qty = int(3000 / price) + 1  # about $3,000: within the $5,000 caps, over $1,000 of power
    big = execution.submit_order(rt, entry(rt, 2, qty=qty))
    assert big["status"] == "refused" and big["reason"] == "insufficient buying power"
    assert rt.limits.used(day) == 0 and rt.broker.order_log() == []


def test_halted_symbol_is_refused(make_rt, redis_client) -> None:
    rt = make_rt()
    meta, bar = rt.replay.now()
    # the symbol has no bar now: treat it as halted
    row = rt.replay.row(meta, bar).copy()
    row[3, :] = np.nan
    redis_client.setrange(rt.keys.replay_data(meta.date), bar * meta.row_bytes,
                          row.astype("<f8").tobytes())
    out = execution.submit_order(rt, entry_for_symbol_with_price(rt, 3))
    assert out["status"] == "refused" and "not trading" in out["reason"]
    assert rt.broker.order_log() == []


def entry_for_symbol_with_price(rt, index: int) -> dict:
    meta, bar = rt.replay.now()
    sym = meta.symbols[index]
    return OrderIntent(
        client_order_id=entry_client_order_id("orb", sym, meta.bar_time(bar), "buy"),
        symbol=sym, side="buy", qty=1, intent="entry", reason="orb", strategy="orb",
        ref_price="10.0000", limit_price="10.0500", session_date=meta.date,
        bar=bar).model_dump(mode="json")


def test_daily_loss_limit_halts_entries_for_the_day(make_rt) -> None:
    from core import decide_step

    rt = make_rt(daily_loss_limit="1")
    meta, _ = rt.replay.now()
    execution.submit_order(rt, entry(rt, 0, qty=50))
    st = rt.replay.state()
    adv = rt.replay.advance(st, rt.keys.tick_guard(meta.date, st.bar + 1), 0.0)
    rt.broker.process_bar(meta, adv.bar, adv.row)
    rt.replay.settle(meta.date, adv.bar)
    pos = rt.broker.get_positions()[meta.symbols[0]]
    losing_mark = float(pos.avg) * 0.995  # 0.5 % down on 50 shares: more than $1

    class NoDispatch:
        def score(self, payload): ...
        def submit_order(self, intent): ...
        def close_position(self, intent): ...

    scored = {"date": meta.date.isoformat(), "bar": adv.bar, "signals": [],
              "marks": {pos.symbol: losing_mark}}
    decide_step.decide_bar(rt, NoDispatch(), scored)
    assert rt.redis.exists(rt.keys.loss_halt(meta.date))
    refused = execution.submit_order(rt, entry(rt, 4))
    assert refused["reason"] == "daily_loss_limit"
