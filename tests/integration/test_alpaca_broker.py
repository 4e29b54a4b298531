"""AlpacaBroker driving the real alpaca-py TradingClient against a local fake Alpaca."""

from __future__ import annotations

import collections
import datetime as dt
import threading
import time

import pytest
from alpaca.common.exceptions import APIError

from core import execution
from core.brokers.alpaca import AlpacaBroker, ExitReasons
from core.brokers.alpaca_mapping import fill_event_of, harden_client, intent_of, map_status
from core.brokers.base import OrderRequest
from core.calendar import NY
from core.config import load_settings
from core.errors import (
    BrokerUnavailable,
    DuplicateOrder,
    InsufficientBuyingPower,
    OrderRejected,
    RateLimited,
)
from core.ratelimit import BucketConfig, RedisTokenBucket
from tests.fakes.alpaca_server import FakeAlpaca
from tests.helpers import wait_for

BAR = dt.datetime(2024, 6, 3, 9, 45, tzinfo=NY)


def coid(symbol: str = "AAPL", side: str = "L", minute: int = 45) -> str:
    return f"orb-{symbol}-20240603-09{minute:02d}-{side}"


def entry(symbol="AAPL", side="buy", qty=10, limit="101", tif="ioc", stop=None, minute=45,
          order_type="limit"):
    return OrderRequest(client_order_id=coid(symbol, "L" if side == "buy" else "S", minute),
                        symbol=symbol, side=side, qty=qty, order_type=order_type,
                        limit_price=limit if order_type == "limit" else None,
                        time_in_force=tif, strategy="orb", stop_price=stop)


@pytest.fixture
def fake():
    with FakeAlpaca(stream=False) as f:
        yield f


@pytest.fixture
def limiter(redis_client):
    return RedisTokenBucket(redis_client, "test:alpaca:bucket",
                            BucketConfig(capacity=100, refill_per_s=500, exit_reserve=10))


@pytest.fixture
def broker(fake, limiter):
    return AlpacaBroker("test-key", "test-secret", url_override=fake.base_url, timeout_s=1.0,
                        limiter=limiter, penalty_s=0.2, cancel_wait_s=1.0, poll_s=0.02)


# --- pure mapping -----------------------------------------------------------------------------
@pytest.mark.parametrize(("alpaca", "filled", "want"), [
    ("new", 0, "accepted"), ("accepted", 0, "accepted"), ("pending_new", 0, "accepted"),
    ("held", 0, "accepted"), ("pending_cancel", 3, "partially_filled"),
    ("partially_filled", 3, "partially_filled"), ("filled", 10, "filled"),
    ("canceled", 0, "cancelled"), ("canceled", 4, "cancelled"), ("expired", 0, "expired"),
    ("rejected", 0, "rejected"), ("done_for_day", 2, "expired"), ("replaced", 0, "cancelled"),
    ("calculated", 10, "filled"), ("calculated", 5, "expired"),
])
def test_status_mapping(alpaca, filled, want):
    assert map_status(alpaca, filled, 10) == want


def test_intent_read_back_from_ids():
    assert intent_of("orb-AAPL-20240603-0945-L") == ("entry", "orb")
    assert intent_of("vwap-BRK.B-20240603-1002-S-x2") == ("exit", "vwap")
    assert intent_of("3f1c0a8e-0000-4000-8000-000000000000") == ("exit", "")


def test_client_is_hardened(broker):
    c = broker.client
    assert c._retry == 0 and c._retry_codes == []
    assert c._session.default_timeout == (1.0, 1.0)
    other = harden_client(type(c)("k", "s", url_override="http://127.0.0.1:9"), 7.0)
    assert other._session.default_timeout == (5.0, 7.0)


# --- orders ----------------------------------------------------------------------------------
def test_order_placed_and_looked_up_by_client_order_id(broker, fake):
    assert broker.get_order_by_client_id(coid()) is None
    order = broker.submit_order(entry(limit="101.239"))
    assert order.status == "filled" and order.filled_qty == 10
    assert order.filled_avg_price == "100" and order.filled_notional == "1000"
    assert order.intent == "entry" and order.strategy == "orb"
    posts = fake.seen("POST", r"^/v2/orders$")
    assert len(posts) == 1
    body = posts[0].body
    assert body["client_order_id"] == coid() and body["time_in_force"] == "ioc"
    assert body["limit_price"] == 101.23  # a buy limit rounds down onto the cent grid
    found = broker.get_order_by_client_id(coid())
    assert found is not None and found.status == "filled" and found.client_order_id == coid()
    assert found.session_date == dt.datetime.now(NY).date().isoformat()
    assert fill_event_of(found).notional_cents == 100_000


def test_duplicate_id_is_refused_not_resubmitted(broker, fake):
    broker.submit_order(entry())
    with pytest.raises(DuplicateOrder, match="client_order_id must be unique"):
        broker.submit_order(entry())
    assert len(fake.orders) == 1


def test_execution_answers_a_duplicate_by_lookup(broker, fake, redis_url, redis_client):
    """The execution layer over AlpacaBroker: a lookup that missed, the broker answering 422
    "client_order_id must be unique", and no second order."""
    settings = load_settings(redis_url=redis_url, sim_run_id="alpaca-t")
    from core.runtime import build_runtime

    rt = build_runtime(settings)
    rt.broker = broker
    today = dt.datetime.now(NY).date()
    rt.redis.set(rt.keys.reconciled(today), "1")
    payload = {"client_order_id": coid(), "symbol": "AAPL", "side": "buy", "qty": 10,
               "intent": "entry", "reason": "orb", "strategy": "orb", "ref_price": "100.5",
               "limit_price": "101", "session_date": today.isoformat(), "bar": 15}
    fake.fill_mode = "none"
    first = execution.submit_order(rt, payload)
    assert first["status"] == "accepted"
    # the lookup under the order's lock misses (a stale read), so the order is sent again:
    # Alpaca says 422, and the lookup after the 422 finds it
    fake.fail(404, "order not found", times=1, method="GET", path="by_client_order_id")
    again = execution.submit_order(rt, payload)
    assert again["status"] == "accepted" and again["qty"] == 10
    assert [r.status for r in fake.seen("POST", r"^/v2/orders$")] == [200, 422]
    assert len(fake.orders) == 1
    # a redelivery with the lookup working: no request to POST at all
    assert execution.submit_order(rt, payload)["status"] == "exists"
    assert len(fake.seen("POST", r"^/v2/orders$")) == 2


def test_partial_fills_are_tracked(broker, fake):
    fake.fill_mode = "partial"
    fake.partial_qty = 4
    day = broker.submit_order(entry(tif="day"))
    assert day.status == "partially_filled" and day.filled_qty == 4
    assert [o.client_order_id for o in broker.list_open_orders()] == [coid()]
    fake.fill(coid(), qty=3, price="100.5")
    mid = broker.get_order_by_client_id(coid())
    assert mid.status == "partially_filled" and mid.filled_qty == 7
    assert mid.filled_avg_price == "100.2143"  # (4 x 100 + 3 x 100.5) / 7
    fake.fill(coid())
    done = broker.get_order_by_client_id(coid())
    assert done.status == "filled" and done.filled_qty == 10
    assert broker.list_open_orders() == []
    ioc = broker.submit_order(entry(symbol="MSFT"))  # IOC: the rest is cancelled at once
    assert ioc.status == "cancelled" and ioc.filled_qty == 4
    ev = fill_event_of(ioc)
    assert (ev.status, ev.filled_qty, ev.notional_cents) == ("cancelled", 4, 40_000)
    assert broker.get_positions()["MSFT"].qty == 4


def test_cancel_order(broker, fake):
    fake.fill_mode = "none"
    broker.submit_order(entry(tif="day"))
    done = broker.cancel_order(coid())
    assert done.status == "cancelled" and done.filled_qty == 0
    assert broker.cancel_order(coid()).status == "cancelled"  # already over: unchanged
    assert broker.cancel_order("orb-ZZZ-20240603-0945-L") is None
    assert len(fake.seen("DELETE", r"^/v2/orders/")) == 1


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "message", "exc", "reason"), [
    (403, "insufficient buying power", InsufficientBuyingPower, "insufficient buying power"),
    (403, "trade denied due to pattern day trading protection", OrderRejected,
     "pattern day trader"),
    (403, "potential wash trade detected. use complex orders", OrderRejected, "wash trade"),
    (403, "asset AAPL cannot be sold short", OrderRejected, "not shortable"),
    (422, "asset AAPL is not easy to borrow", OrderRejected, "not shortable"),
    (403, "market is closed", OrderRejected, "market closed"),
    (422, "client_order_id must be unique", DuplicateOrder, None),
    (429, "rate limit exceeded", RateLimited, None),
    (500, "internal server error", BrokerUnavailable, None),
    (503, "service unavailable", BrokerUnavailable, None),
    (504, "gateway timeout", BrokerUnavailable, None),
])
def test_errors_are_mapped_with_one_request_each(broker, fake, status, message, exc, reason):
    fake.fail(status, message, method="POST", path=r"^/v2/orders$")
    with pytest.raises(exc) as info:
        broker.place_order(entry())
    assert isinstance(info.value.__cause__, APIError)
    # exactly one retry layer: alpaca-py did not retry 429/504 on its own
    assert len(fake.seen("POST", r"^/v2/orders$")) == 1
    if reason is not None:
        assert reason in str(info.value)
        # the protocol method answers refusals with a rejected order (reservation released)
        fake.fail(status, message, method="POST", path=r"^/v2/orders$")
        rejected = broker.submit_order(entry())
        assert rejected.status == "rejected" and reason in rejected.status_reason
    elif exc is not DuplicateOrder:
        fake.fail(status, message, method="POST", path=r"^/v2/orders$")
        with pytest.raises(exc):
            broker.submit_order(entry())  # transient: raised, Celery retries


def test_real_refusals_from_the_fake(broker, fake):
    fake.set_asset("GME", shortable=False)
    r = broker.submit_order(entry("GME", "sell", limit="20"))
    assert r.status == "rejected" and "not shortable" in r.status_reason
    fake.account["buying_power"] = "500"
    r = broker.submit_order(entry("AAPL", limit="101"))
    assert r.status == "rejected" and r.status_reason.startswith("insufficient buying power")
    assert isinstance(_raises(lambda: broker.place_order(entry("AAPL", minute=46))),
                      InsufficientBuyingPower)
    assert fake.orders == {}


def _raises(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_timeout_is_broker_unavailable_within_the_limit(fake, limiter):
    broker = AlpacaBroker("test-key", "test-secret", url_override=fake.base_url,
                          timeout_s=0.5, limiter=limiter)
    fake.delay(3.0, method="POST", path=r"^/v2/orders$")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"within 0\.5s"):
        broker.submit_order(entry())
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 1.5, elapsed  # the server would have answered after 3 s
    assert len(fake.seen("POST", r"^/v2/orders$")) == 1
    fake.delay(3.0, method="GET")
    with pytest.raises(BrokerUnavailable):
        broker.get_positions()


def test_connection_refused_is_broker_unavailable(limiter):
    broker = AlpacaBroker("k", "s", url_override="http://127.0.0.1:9", timeout_s=0.5,
                          limiter=limiter)
    with pytest.raises(BrokerUnavailable, match="cannot reach"):
        broker.get_order_by_client_id(coid())


def test_bad_keys_are_a_config_error(fake):
    from core.errors import ConfigError

    broker = AlpacaBroker("wrong", "keys", url_override=fake.base_url, timeout_s=1.0)
    with pytest.raises(ConfigError, match="401"):
        broker.account()


def test_429_storm_is_throttled_by_the_shared_bucket(fake, redis_client):
    cfg = BucketConfig(capacity=5, refill_per_s=5, exit_reserve=1, max_wait_s=0.3,
                       exit_max_wait_s=0.3)
    fake.fail(429, "too many requests", times=None)  # a storm: every request answers 429
    outcome = collections.Counter()
    stop = time.monotonic() + 2.5

    def hammer() -> None:
        b = AlpacaBroker("test-key", "test-secret", url_override=fake.base_url, timeout_s=1.0,
                         limiter=RedisTokenBucket(redis_client, "test:alpaca:storm", cfg),
                         penalty_s=0.5)
        while time.monotonic() < stop:
            try:
                b.get_order_by_client_id(coid())
            except RateLimited as exc:
                outcome["limited_here" if "rate limit: no" in str(exc) else "429"] += 1

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = [r.t for r in fake.requests]
    start = times[0]
    per_second = collections.Counter(int(t - start) for t in times)
    # bucket of 5, 5/s, emptied for 0.5 s after each 429: far below what 6 threads could do
    assert max(per_second.values()) <= 5 + 5, per_second
    assert len(times) <= 5 + 5 * 2.5, len(times)
    assert outcome["limited_here"] > outcome["429"] > 0  # most calls never left the process


def test_rate_limiter_reserve_keeps_exits_going(fake, redis_client):
    cfg = BucketConfig(capacity=8, refill_per_s=0.01, exit_reserve=6, max_wait_s=0.0,
                       exit_max_wait_s=0.0)
    b = AlpacaBroker("test-key", "test-secret", url_override=fake.base_url, timeout_s=1.0,
                     limiter=RedisTokenBucket(redis_client, "test:alpaca:reserve", cfg))
    b.account()
    b.account()
    with pytest.raises(RateLimited):
        b.account()  # entries stop at the reserve ...
    fake.set_position("AAPL", 10, "100")
    closed = b.close_position("AAPL", coid() + "-x1", "eod")  # ... exits go on (4 requests)
    assert closed.status == "filled" and closed.side == "sell"


# --- positions, shorts, closes ----------------------------------------------------------------
def test_positions_with_shorts_and_close(broker, fake):
    fake.prices["TSLA"] = __import__("decimal").Decimal("200")
    short = broker.submit_order(entry("TSLA", "sell", qty=5, limit="199.991"))
    assert short.status == "filled"
    assert fake.seen("POST")[-1].body["limit_price"] == 200.0  # a sell limit rounds up
    broker.submit_order(entry("AAPL", "buy", qty=10))
    pos = broker.get_positions()
    assert set(pos) == {"AAPL", "TSLA"}
    t = pos["TSLA"]
    assert t.qty == -5 and t.side == "sell" and t.avg_price == "200"
    assert t.entry_client_order_id == coid("TSLA", "S") and t.strategy == "orb"
    assert t.session_date == dt.datetime.now(NY).date().isoformat() and t.exit_attempt == 0
    assert pos["AAPL"].qty == 10 and pos["AAPL"].avg_price == "100"
    closed = broker.close_position("TSLA", coid("TSLA", "S") + "-x1", "eod")
    assert closed.side == "buy" and closed.qty == 5 and closed.status == "filled"
    assert closed.intent == "exit" and closed.reason == "eod" and closed.strategy == "orb"
    assert set(broker.get_positions()) == {"AAPL"}
    assert broker.close_position("TSLA", coid("TSLA", "S") + "-x2", "eod") is None

    positions, open_orders = broker.snapshot()
    assert set(positions) == {"AAPL"} and open_orders == []


def test_exit_attempts_and_foreign_positions(broker, fake):
    broker.submit_order(entry("AAPL"))
    fake.fill_mode = "none"
    broker.close_position("AAPL", coid() + "-x1", "peak")
    fake.cancel(coid() + "-x1")
    assert broker.get_positions()["AAPL"].exit_attempt == 1
    fake.set_position("IBM", 3, "150")  # opened by hand: no entry order of ours today
    ibm = broker.get_positions()["IBM"]
    assert ibm.session_date == "" and ibm.entry_client_order_id.startswith("ext-IBM-")


def test_close_whose_answer_was_lost(fake, limiter):
    broker = AlpacaBroker("test-key", "test-secret", url_override=fake.base_url,
                          timeout_s=0.5, limiter=limiter)
    broker.submit_order(entry("AAPL"))
    fake.fill_mode = "none"
    x1 = coid() + "-x1"
    fake.delay(1.0, method="POST")  # the close reaches Alpaca, its answer does not reach us
    with pytest.raises(BrokerUnavailable):
        broker.close_position("AAPL", x1, "eod")
    wait_for(lambda: len(fake.orders) == 2, 5, "the close accepted at the broker")
    again = broker.close_position("AAPL", x1, "eod")  # the retry: no cancel, no second order
    assert again.client_order_id == x1 and again.status == "accepted"
    assert len(fake.orders) == 2 and fake.seen("DELETE") == []
    fake.cancel(x1)  # it ended unfilled; a retry with the same id gets Alpaca's 422
    assert broker.close_position("AAPL", x1, "eod").status == "cancelled"
    assert [r.status for r in fake.seen("POST")] == [200, 200, 422]


def test_close_all(broker, fake):
    broker.submit_order(entry("AAPL"))
    broker.submit_order(entry("TSLA", "sell", qty=3, limit="99"))
    orders = broker.close_all_positions()
    assert sorted((o.symbol, o.side, o.qty) for o in orders) == [("AAPL", "sell", 10),
                                                                 ("TSLA", "buy", 3)]
    assert broker.get_positions() == {}


def test_oto_protective_stop(broker, fake):
    order = broker.submit_order(entry(tif="ioc", stop="98.9999"))
    body = fake.seen("POST")[-1].body
    assert body["order_class"] == "oto" and body["time_in_force"] == "day"  # OTO: no IOC
    assert body["stop_loss"] == {"stop_price": 98.99}
    assert order.status == "filled" and order.stop_price == "98.99"
    pos = broker.get_positions()["AAPL"]
    assert pos.stop_price == "98.99"
    assert broker.list_open_orders() == []  # the resting stop is the position's, not a worker
    fake.set_price("AAPL", "98.5")  # the stop triggers at the broker
    assert broker.get_positions() == {}
    assert broker.realized_pnl_cents(dt.datetime.now(NY).date()) == -1500


def test_close_cancels_the_resting_stop_first(broker, fake):
    broker.submit_order(entry(tif="day", stop="95"))
    closed = broker.close_position("AAPL", coid() + "-x1", "peak")
    assert closed.status == "filled" and closed.qty == 10
    legs = [o for o in fake.orders.values() if o["type"] == "stop"]
    assert [leg["status"] for leg in legs] == ["canceled"]
    assert broker.get_positions() == {}
    deletes = fake.seen("DELETE")
    assert len(deletes) == 1 and deletes[0].t < fake.seen("POST")[-1].t


def test_stop_order_type(broker, fake):
    fake.set_position("AAPL", 10, "100")
    req = OrderRequest(client_order_id=coid() + "-x1", symbol="AAPL", side="sell", qty=10,
                       order_type="stop", stop_price="97.505", intent="exit")  # type: ignore[arg-type]
    order = broker.submit_order(req)
    assert order.order_type == "stop" and order.status == "accepted"
    assert fake.seen("POST")[-1].body["stop_price"] == 97.51


# --- entry checks and account data -------------------------------------------------------------
def test_entry_check_from_account_asset_and_positions(broker, fake):
    assert broker.entry_check(entry()) is None
    fake.account["buying_power"] = "999"
    assert broker.entry_check(entry()) == "insufficient buying power"
    fake.account["buying_power"] = "100000"
    fake.set_asset("GME", easy_to_borrow=False)
    assert "not shortable" in broker.entry_check(entry("GME", "sell"))
    fake.set_asset("HALT", tradable=False)
    assert "not trading" in broker.entry_check(entry("HALT"))
    fake.set_position("MSFT", -5, "300")
    assert "wash trade" in broker.entry_check(entry("MSFT", "buy"))
    fake.fill_mode = "none"
    broker.submit_order(entry("NVDA", "buy", tif="day"))
    assert "wash trade" in broker.entry_check(entry("NVDA", "sell"))
    fake.account.update(daytrade_count=3, last_equity="20000")
    assert "pattern day trader" in broker.entry_check(entry())
    fake.account.update(daytrade_count=0)
    assert fake.orders and len(fake.seen("POST")) == 1  # checks never place orders


def test_entry_check_market_closed(fake, limiter):
    fake.market_open = False
    broker = AlpacaBroker("test-key", "test-secret", url_override=fake.base_url,
                          timeout_s=1.0, limiter=limiter)
    assert broker.entry_check(entry()) == "market closed"
    broker.entry_check(entry())
    assert len(fake.seen("GET", "/v2/clock")) == 1  # the clock is reused until next open


def test_account_clock_calendar(broker):
    acct = broker.account()
    assert acct.buying_power_cents == 40_000_000 and acct.shorting_enabled and not acct.blocked
    clock = broker.clock()
    assert clock.is_open and clock.next_close.tzinfo is not None
    days = broker.calendar(dt.date(2025, 11, 26), dt.date(2025, 12, 1))
    assert [d.date.isoformat() for d in days] == ["2025-11-26", "2025-11-28", "2025-12-01"]
    assert days[1].close.hour == 13 and days[1].close.utcoffset() == dt.timedelta(hours=-5)


def test_realized_pnl_and_reconcile(broker, fake, redis_url):
    broker.submit_order(entry("AAPL"))
    fake.prices["AAPL"] = __import__("decimal").Decimal("101.25")
    broker.close_position("AAPL", coid() + "-x1", "peak")
    today = dt.datetime.now(NY).date()
    assert broker.realized_pnl_cents(today) == 1250
    assert broker.order_log() == [coid(), coid() + "-x1"]
    settings = load_settings(redis_url=redis_url, sim_run_id="alpaca-r")
    from core.runtime import build_runtime

    rt = build_runtime(settings)
    rt.broker = broker
    out = execution.reconcile(rt, today)
    assert out["orders"] == 1 and out["used_cents"] == 100_000
    events = broker.expire_session_orders(today)
    assert [(e.client_order_id, e.status, e.notional_cents) for e in events] == [
        (coid(), "filled", 100_000)]


# --- exit reasons -----------------------------------------------------------------------------
def test_exit_reasons_come_back_in_the_trades(fake, limiter, redis_client):
    def make(reasons: ExitReasons | None) -> AlpacaBroker:
        return AlpacaBroker("test-key", "test-secret", url_override=fake.base_url,
                            timeout_s=0.5, limiter=limiter, reasons=reasons)

    sender = make(ExitReasons(redis_client))
    for sym, side, minute in (("AAPL", "buy", 45), ("TSLA", "sell", 46), ("MSFT", "buy", 47)):
        assert sender.submit_order(entry(sym, side, qty=2, limit="101" if side == "buy"
                                          else "99", minute=minute)).status == "filled"
    sender.close_position("AAPL", coid("AAPL", "L", 45) + "-x1", "peak")
    sender.close_position("TSLA", coid("TSLA", "S", 46) + "-x1", "eod")
    # a close whose answer is lost after Alpaca accepted it keeps its reason too
    fake.delay(1.0, method="POST")
    with pytest.raises(BrokerUnavailable):
        sender.close_position("MSFT", coid("MSFT", "L", 47) + "-x1", "stop_loss")
    wait_for(lambda: len(fake.orders) == 6, 5, "the close accepted at the broker")
    # read back by another process (another adapter on the same Redis)
    got = {t["symbol"]: t["exit_reason"] for t in make(ExitReasons(redis_client)).trades()}
    assert got == {"AAPL": "peak", "TSLA": "eod", "MSFT": "stop_loss"}
    assert redis_client.get("alpaca:exit_reason:" + coid("TSLA", "S", 46) + "-x1") == b"eod"
    # without a store the reason is unknown: "exit"
    assert {t["exit_reason"] for t in make(None).trades()} == {"exit"}


def test_exit_goes_through_when_reasons_cannot_be_kept(fake, limiter):
    from redis import Redis

    dead = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    broker = AlpacaBroker("test-key", "test-secret", url_override=fake.base_url,
                          timeout_s=1.0, limiter=limiter, reasons=ExitReasons(dead))
    broker.submit_order(entry("AAPL"))
    closed = broker.close_position("AAPL", coid() + "-x1", "eod")
    assert closed.status == "filled" and closed.reason == "eod"
    assert broker.get_positions() == {}
    assert [t["exit_reason"] for t in broker.trades()] == ["exit"]


def test_from_settings_keeps_exit_reasons_in_redis(fake, redis_url, redis_client):
    settings = load_settings(mode="paper", redis_url=redis_url, alpaca_api_key="test-key",
                             alpaca_secret_key="test-secret")
    broker = AlpacaBroker.from_settings(settings, url_override=fake.base_url)
    broker.submit_order(entry("AAPL"))
    broker.close_position("AAPL", coid() + "-x1", "trough")
    assert [t["exit_reason"] for t in broker.trades()] == ["trough"]
    assert redis_client.get("alpaca:exit_reason:" + coid() + "-x1") == b"trough"
