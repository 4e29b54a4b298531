"""The trade_updates consumer: pure mapping, the lock, and alpaca-py's TradingStream against a
local fake Alpaca (REST + WebSocket), including a dropped connection reconciled by REST."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from core.brokers.alpaca import AlpacaBroker, order_from_alpaca
from core.brokers.base import FillEvent, OrderRequest
from core.calendar import NY
from core.keys import Keys
from core.streams.trade_updates import (
    OrderStates,
    StreamAlreadyRunning,
    TradeUpdatesConsumer,
    backoff_delay,
    fill_event_from_update,
)
from tests.fakes.alpaca_server import FakeAlpaca
from tests.helpers import wait_for

COID = "orb-AAPL-20240603-0945-L"


def _order_json(status: str, filled: int, qty: int = 10, avg: str | None = "100.5",
                coid: str = COID) -> dict:
    ts = "2026-11-25T15:00:00.123456Z"
    return {"id": "7d1ae0c5-5e1b-4d4c-9a39-0e4f0f6cbd3b", "client_order_id": coid,
            "created_at": ts, "updated_at": ts, "submitted_at": ts,
            "filled_at": ts if status == "filled" else None, "symbol": "AAPL",
            "asset_class": "us_equity", "qty": str(qty), "filled_qty": str(filled),
            "filled_avg_price": avg if filled else None, "order_class": "",
            "order_type": "limit", "type": "limit", "side": "buy", "time_in_force": "day",
            "limit_price": "101", "stop_price": None, "status": status,
            "extended_hours": False, "legs": None}


@pytest.mark.parametrize(("event", "status", "filled", "want"), [
    ("new", "new", 0, None),
    ("pending_new", "pending_new", 0, None),
    ("partial_fill", "partially_filled", 4, ("partially_filled", 4, 40_200)),
    ("fill", "filled", 10, ("filled", 10, 100_500)),
    ("canceled", "canceled", 4, ("cancelled", 4, 40_200)),
    ("expired", "expired", 0, ("expired", 0, 0)),
    ("rejected", "rejected", 0, ("rejected", 0, 0)),
    ("replaced", "replaced", 0, ("cancelled", 0, 0)),
    ("done_for_day", "done_for_day", 2, ("expired", 2, 20_100)),
])
def test_event_to_fill_event(event, status, filled, want):
    msg = {"stream": "trade_updates", "data": {
        "event": event, "order": _order_json(status, filled), "timestamp": "x"}}
    ev = fill_event_from_update(msg)
    if want is None:
        assert ev is None
        return
    assert isinstance(ev, FillEvent)
    assert (ev.status, ev.filled_qty, ev.notional_cents) == want
    assert ev.client_order_id == COID and ev.intent == "entry" and ev.symbol == "AAPL"
    assert ev.session_date == "2026-11-25"  # 10:00 in New York
    assert fill_event_from_update(msg["data"]) == ev  # the bare data works too


def test_backoff_schedule():
    lo = [backoff_delay(n, 1.0, 30.0, rand=lambda: 0.0) for n in range(1, 9)]
    hi = [backoff_delay(n, 1.0, 30.0, rand=lambda: 1.0) for n in range(1, 9)]
    assert hi == [1, 2, 4, 8, 16, 30, 30, 30]
    assert lo == [d / 2 for d in hi]  # equal jitter: within [d/2, d]
    assert backoff_delay(0) == 0.0
    assert 50 <= backoff_delay(10_000, 1.0, 100.0) <= 100  # no overflow


def test_order_states_report_progress_only():
    st = OrderStates()
    part = order_from_alpaca(_order_json("partially_filled", 4))
    full = order_from_alpaca(_order_json("filled", 10))
    assert st.news(part)
    st.record(part)
    assert not st.news(part)  # the same update again
    assert st.news(full)
    st.record(full)
    assert not st.news(part) and not st.news(full)  # a stale update after the end
    st.record(part)
    assert st.seen[COID] == ("filled", 10)


# --- against the fake -------------------------------------------------------------------------
@pytest.fixture
def fake():
    with FakeAlpaca() as f:
        yield f


@pytest.fixture
def broker(fake):
    return AlpacaBroker("test-key", "test-secret", url_override=fake.base_url, timeout_s=2.0)


class Sink:
    def __init__(self) -> None:
        self.events: list[FillEvent] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[FillEvent]) -> None:
        with self.lock:
            self.events.extend(events)

    def of(self, coid: str) -> list[tuple[str, int]]:
        with self.lock:
            return [(e.status, e.filled_qty) for e in self.events if e.client_order_id == coid]


def consumer(redis_client, fake, broker, sink, **kw) -> TradeUpdatesConsumer:
    return TradeUpdatesConsumer(redis_client, Keys(), broker, "test-key", "test-secret", sink,
                                url_override=fake.stream_url, backoff_base_s=0.05,
                                backoff_cap_s=0.2, lock_ttl_s=kw.pop("lock_ttl_s", 3.0), **kw)


def req(symbol="AAPL", side="buy", qty=10, tif="day", minute=45) -> OrderRequest:
    return OrderRequest(client_order_id=f"orb-{symbol}-20240603-09{minute}-"
                        f"{'L' if side == 'buy' else 'S'}", symbol=symbol, side=side, qty=qty,
                        order_type="limit", limit_price="101" if side == "buy" else "99",
                        time_in_force=tif)


def test_events_become_fill_events(redis_client, fake, broker):
    sink = Sink()
    updates: list[str] = []
    c = consumer(redis_client, fake, broker, sink,
                 on_update=lambda m: updates.append(m["data"]["event"]))
    c.start()
    try:
        wait_for(lambda: fake.stream.listening() == 1 and c.reconciles == 1, 10, "listening")
        fake.fill_mode = "partial"
        fake.partial_qty = 3
        a = req()
        broker.submit_order(a)
        wait_for(lambda: sink.of(a.client_order_id) == [("partially_filled", 3)], 10,
                 "partial fill event")
        fake.fill(a.client_order_id, price="100.5")
        wait_for(lambda: sink.of(a.client_order_id)[-1:] == [("filled", 10)], 10, "fill")
        fake.fill_mode = "none"
        b = req("MSFT", minute=46)
        broker.submit_order(b)
        broker.cancel_order(b.client_order_id)
        wait_for(lambda: sink.of(b.client_order_id) == [("cancelled", 0)], 10, "cancel")
        last = [e for e in sink.events if e.client_order_id == a.client_order_id][-1]
        assert last.notional_cents == 3 * 10_000 + 7 * 10_050
        assert updates[:3] == ["new", "partial_fill", "fill"]
        assert c.last_event_at is not None
    finally:
        c.stop()
    assert not c.lock.held and redis_client.get(c.lock.key) is None


def test_second_instance_refuses(redis_client, fake, broker):
    first = consumer(redis_client, fake, broker, Sink())
    first.start()
    try:
        second = consumer(redis_client, fake, broker, Sink())
        with pytest.raises(StreamAlreadyRunning, match=r"already running.*refusing"):
            second.start()
        with pytest.raises(StreamAlreadyRunning):
            second.run()
        wait_for(lambda: fake.stream.listening() == 1, 10, "first listening")
        assert fake.stream.connections == 1
        # the lock is renewed while the first runs (TTL 3 s, renewed every second)
        wait_for(lambda: redis_client.pttl(first.lock.key) > 0, 2, "lock ttl")
        import time

        time.sleep(3.5)
        assert redis_client.get(first.lock.key) is not None and not first.lost_lock
    finally:
        first.stop()
    third = consumer(redis_client, fake, broker, Sink())  # free again once stopped
    third.start()
    third.stop()  # at once, even while the stream is still starting
    assert not third._thread.is_alive() and redis_client.get(third.lock.key) is None


def test_losing_the_lock_stops_the_consumer(redis_client, fake, broker):
    c = consumer(redis_client, fake, broker, Sink(), lock_ttl_s=0.6)
    c.start()
    try:
        wait_for(lambda: fake.stream.listening() == 1, 10, "listening")
        redis_client.set(c.lock.key, "someone else")
        wait_for(lambda: c.lost_lock, 5, "lock loss noticed")
        wait_for(lambda: not c._thread.is_alive(), 15, "consumer stopped")
    finally:
        c.stop()
    assert redis_client.get(c.lock.key) == b"someone else"  # not ours to delete


def test_dropped_connection_reconnects_and_the_gap_is_reconciled(redis_client, fake, broker):
    sink = Sink()
    c = consumer(redis_client, fake, broker, sink)
    fake.fill_mode = "none"
    before = req(minute=40)
    broker.submit_order(before)
    broker.cancel_order(before.client_order_id)  # ended before the consumer started
    c.start()
    try:
        wait_for(lambda: fake.stream.listening() == 1 and c.reconciles == 1, 10, "connected")
        assert sink.of(before.client_order_id) == [("cancelled", 0)]  # the first reconcile
        a = req()
        broker.submit_order(a)  # working, no fill yet
        fake.stream.refuse = True
        fake.stream.drop()
        wait_for(lambda: fake.stream.listening() == 0, 5, "dropped")
        fake.fill(a.client_order_id, price="100.25")  # during the gap: the event is lost
        assert any(m["data"]["event"] == "fill" for m in fake.events)
        wait_for(lambda: len(c.reconnect_delays) >= 2, 10, "refused reconnects back off")
        assert sink.of(a.client_order_id) == []
        fake.stream.refuse = False
        wait_for(lambda: sink.of(a.client_order_id) == [("filled", 10)], 15,
                 "the gap's fill reported after reconnecting")
        assert c.connections >= 2 and c.reconciles >= 2
        assert all(0.025 <= d <= 0.2 for d in c.reconnect_delays)
        ev = next(e for e in sink.events if e.client_order_id == a.client_order_id)
        assert ev.notional_cents == 100_250 and ev.session_date == dt.datetime.now(
            NY).date().isoformat()
        # events flow again on the new connection, and nothing is reported twice
        b = req("MSFT", minute=46)
        broker.submit_order(b)
        fake.fill(b.client_order_id)
        wait_for(lambda: sink.of(b.client_order_id) == [("filled", 10)], 10, "new fill")
        assert sink.of(a.client_order_id) == [("filled", 10)]
        assert sink.of(before.client_order_id) == [("cancelled", 0)]
    finally:
        c.stop()


def test_failed_callback_is_retried_by_reconcile(redis_client, fake, broker):
    calls: list[list[FillEvent]] = []
    fail = {"n": 1}

    def flaky(events: list[FillEvent]) -> None:
        if fail["n"]:
            fail["n"] -= 1
            raise RuntimeError("redis blip")
        calls.append(events)

    c = consumer(redis_client, fake, broker, flaky)
    c.start()
    try:
        wait_for(lambda: fake.stream.listening() == 1 and c.reconciles == 1, 10, "connected")
        a = req()
        broker.submit_order(a)  # fills at once: the callback fails on this fill
        wait_for(lambda: c._dirty, 10, "failure noticed")
        broker.submit_order(req("MSFT", minute=46))  # the next event reconciles first
        wait_for(lambda: any(e.client_order_id == a.client_order_id
                             for evs in calls for e in evs), 10, "redelivered")
    finally:
        c.stop()


def test_apply_fill_events_as_the_callback(redis_client, redis_url, fake, broker):
    """The callback the caller will pass: reservations follow the fills."""
    from core import execution
    from core.config import load_settings
    from core.runtime import build_runtime

    rt = build_runtime(load_settings(redis_url=redis_url, sim_run_id="stream-t"))
    day = dt.datetime.now(NY).date()
    a = req(tif="ioc")
    assert rt.limits.reserve(day, a.client_order_id, 101_000, 500_000).ok
    fake.fill_mode = "partial"
    fake.partial_qty = 4
    c = consumer(redis_client, fake, broker, lambda evs: execution.apply_fill_events(rt, evs))
    c.start()
    try:
        wait_for(lambda: fake.stream.listening() == 1, 10, "connected")
        broker.submit_order(a)  # 4 of 10 fill at 100, the rest is cancelled (IOC)
        wait_for(lambda: rt.limits.reservation(day, a.client_order_id) == 40_000, 10,
                 "reservation shrunk to the filled value")
    finally:
        c.stop()
