"""Task wiring in eager mode (arguments JSON round-tripped by the base task), on real Redis."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from core.config import get_settings
from tasks import trading
from tasks.runtime import reset_runtime
from tests.helpers import eager_tasks


@pytest.fixture
def eager(redis_client, redis_url, monkeypatch):
    with eager_tasks(monkeypatch, redis_url, "eager") as rt:
        yield rt


def run_ticks(n: int) -> list[dict]:
    return [trading.tick.delay().get() for _ in range(n)]


def test_tick_prepares_the_replay_and_runs_the_whole_chain(eager) -> None:
    rt = eager
    results = run_ticks(40)
    assert results[0]["status"] == "advanced" and results[0]["bar"] == 0
    assert [r["bar"] for r in results] == list(range(40))  # one bar per tick, all settled
    st = rt.replay.state()
    assert (st.bar, st.settled) == (39, 39)
    # the ORB range (15 bars) is complete, so the synthetic universe produced orders
    assert rt.broker.order_log(), "expected ORB entries on 40 synthetic symbols"
    assert rt.limits.used(st.date) <= rt.settings.daily_limit_cents


def test_duplicate_tick_for_a_bar_does_nothing(eager) -> None:
    rt = eager
    run_ticks(1)
    st = rt.replay.state()
    meta = rt.replay.days()[0]
    # what a duplicated beat would do for the same bar: the guard refuses it
    again = rt.replay.advance(
        st.__class__(**{**st.__dict__, "bar": st.bar - 1, "settled": st.bar - 1}),
        rt.keys.tick_guard(meta.date, st.bar), 0.0)
    assert again.status in ("stale", "duplicate")
    assert rt.replay.state().bar == 0


def test_score_hands_a_small_result_inline_and_a_large_one_by_key(eager, monkeypatch) -> None:
    from core import engine
    from core.decide_step import scored_signals

    run_ticks(20)
    meta = eager.replay.days()[0]
    eager.redis.delete(eager.keys.entries(meta.date))  # bar 19's entries, taken: forgotten
    out = trading.score.delay({"date": meta.date.isoformat(), "bar": 19, "t0": 1.5}).get()
    assert set(out) == {"date", "bar", "scored", "signals", "model", "t"}
    assert out["model"] is None and out["t"][0] == 1.5 and out["t"][1] <= out["t"][2]
    assert set(out["scored"]) == {"signals", "exits"}  # no marks: decide reads the bar
    assert len(out["scored"]["signals"]) == out["signals"] > 0
    assert len(json.dumps(out)) <= engine.INLINE_MAX_BYTES + 200
    # compact rows, read back by decide as signals at the start of bar 19
    sigs = scored_signals({**out["scored"], "bar": 19}, meta)
    for row, sig in zip(out["scored"]["signals"], sigs, strict=True):
        assert row == [sig.symbol, sig.side, sig.source, sig.confidence, sig.price]
        assert sig.symbol in meta.symbols and sig.side in ("buy", "sell") and sig.price > 0
        assert sig.bar_time == meta.bar_time(19)
    # an entry taken today is not signalled again (the decision would drop it)
    first = out["scored"]["signals"][0]
    eager.redis.sadd(eager.keys.entries(meta.date), f"{first[0]}:{first[1]}")
    again = trading.score.delay({"date": meta.date.isoformat(), "bar": 19, "t0": 1.5}).get()
    assert again["scored"]["signals"] == [r for r in out["scored"]["signals"]
                                          if (r[0], r[1]) != (first[0], first[1])]
    eager.redis.delete(eager.keys.entries(meta.date))
    # past the limit the result goes to Redis and the message carries its key only
    monkeypatch.setattr(engine, "INLINE_MAX_BYTES", 10)
    keyed = trading.score.delay({"date": meta.date.isoformat(), "bar": 19, "t0": 1.5}).get()
    assert "scored" not in keyed and len(json.dumps(keyed)) < 200
    assert json.loads(eager.redis.get(keyed["scored_key"])) == out["scored"]


def test_decide_reads_the_marks_of_the_bar_it_decides(eager) -> None:
    """The marks decide uses are this bar's usable closes (mark_values of the stored row),
    the same whether the scored result came inline or by key."""
    from core import decide_step
    from core.scoring import mark_values

    run_ticks(60)
    meta = eager.replay.days()[0]
    bar = eager.replay.state().bar
    positions = eager.broker.get_positions()
    assert positions, "expected open positions after 60 bars"
    want = mark_values(eager.window.get(meta.date, bar)[1][bar])
    expect = {s: float(want[i]) for i, s in enumerate(meta.symbols)
              if s in positions and np.isfinite(want[i])}
    assert expect
    # what the loss limit sees: the positions' unrealized P/L at those marks, whole cents
    want_pnl = sum(int((expect[s] - p.avg_float) * p.qty * 100)
                   for s, p in positions.items() if s in expect)
    seen: list[tuple] = []
    inner, inner_loss = decide_step.iter_exits, decide_step.loss_limit_hit

    def spy(inp, params):
        seen.append(("decide", dict(inp.marks), inp.exit_candidates))
        return iter(())

    def spy_loss(rt, day, positions, marks, realized=None, unrealized=None):
        seen.append(("loss", unrealized))
        return inner_loss(rt, day, positions, marks, realized, unrealized)

    decide_step.iter_exits, decide_step.loss_limit_hit = spy, spy_loss
    try:
        trading.decide.delay({"date": meta.date.isoformat(), "bar": bar,
                              "scored": {"signals": [], "exits": {}}}).get()
        eager.redis.set(eager.keys.k("scored:x"), json.dumps({"signals": [], "exits": {}}))
        trading.decide.delay({"date": meta.date.isoformat(), "bar": bar,
                              "scored_key": eager.keys.k("scored:x")}).get()
    finally:
        decide_step.iter_exits, decide_step.loss_limit_hit = inner, inner_loss
    assert [x for x in seen if x[0] == "loss"] == [("loss", want_pnl)] * 2
    for _, marks, candidates in (x for x in seen if x[0] == "decide"):
        # the marks of the positions that may exit (near their stop, stale, rule exits)
        assert marks == {s: expect[s] for s in candidates if s in expect}


def test_decide_records_the_stage_times_of_the_tick(eager) -> None:
    run_ticks(5)
    last = {k.decode(): v.decode() for k, v in eager.redis.hgetall(
        eager.keys.k("tick:last")).items()}
    assert last["bar"] == "4" and float(last["tick_at"]) > 0
    for stage in ("score_queue_ms", "score_ms", "decide_queue_ms"):
        assert 0 <= float(last[stage]) < 60_000


def test_decide_submit_and_close_wiring(eager) -> None:
    rt = eager
    run_ticks(16)
    meta = rt.replay.days()[0]
    bar = rt.replay.state().bar
    sig_time = meta.bar_time(bar).isoformat()
    price = float(rt.window.get(meta.date, bar)[1][bar, 0, 3])
    sym = meta.symbols[0]
    rt.redis.delete(rt.keys.entries(meta.date))
    scored = {"date": meta.date.isoformat(), "bar": bar, "marks": {sym: price},
              "signals": [{"symbol": sym, "side": "buy", "source": "orb", "confidence": 0.9,
                           "bar_time": sig_time, "price": price}]}
    # force the bar open again so decide's orders are accepted for it
    out = trading.decide.delay(scored).get()
    coid = f"orb-{sym}-{meta.bar_time(bar):%Y%m%d-%H%M}-L"
    if rt.broker.get_order_by_client_id(coid) is None:
        pytest.fail(f"decide did not submit {coid}: {out}")
    assert rt.limits.reservations(meta.date)[coid] > 0
    run_ticks(1)  # fills at the next open
    assert rt.broker.get_positions()[sym].qty > 0
    intent = {"client_order_id": coid + "-x1", "symbol": sym, "side": "sell",
              "qty": rt.broker.get_positions()[sym].qty, "intent": "exit",
              "reason": "stop_loss", "ref_price": str(price),
              "session_date": meta.date.isoformat(), "bar": rt.replay.state().bar}
    assert trading.close_position.delay(intent).get()["status"] == "accepted"
    assert trading.close_position.delay(intent).get()["status"] == "exists"


def test_submit_order_refuses_a_bad_payload(eager) -> None:
    with pytest.raises(Exception, match="validation error"):
        trading.submit_order.delay({"client_order_id": "x", "symbol": "$$$"}).get()


def test_arguments_must_survive_json(eager) -> None:
    with pytest.raises(TypeError):
        trading.score.delay({"date": dt.date(2024, 6, 3), "bar": 1})


def test_flatten_all_halts_and_closes_then_resume(eager) -> None:
    rt = eager
    run_ticks(60)
    held_before = set(rt.broker.get_positions())
    out = trading.flatten_all.delay().get()
    assert out["status"] == "halted"
    assert set(out["closing"]) == held_before
    run_ticks(2)
    assert rt.broker.get_positions() == {}
    orders_before = len(rt.broker.order_log())
    run_ticks(30)
    new = rt.broker.all_orders()[orders_before:]
    assert all(o.intent == "exit" for o in new)  # no entries while halted
    assert trading.resume_trading.delay().get()["status"] == "resumed"
    assert trading.flatten_all.delay().get()["positions_left"] == []


def test_eod_close_outside_and_inside_the_window(eager) -> None:
    rt = eager
    run_ticks(30)
    assert trading.eod_close.delay().get()["status"] == "outside_window"
    meta = rt.replay.days()[0]
    n = meta.n_bars
    run_ticks(n - 30 - 9)  # the last ten bars: inside the 10-minute window
    out = trading.eod_close.delay().get()
    assert out["status"] in ("closing", "flat") and out["failed"] == []
    run_ticks(3)
    assert rt.broker.get_positions() == {}


def test_ping(eager) -> None:
    assert trading.ping.delay({"a": 1}).get() == {"a": 1}


def test_concurrent_ticks_at_the_end_of_a_day_record_it_once(eager) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from core import engine

    rt = eager
    run_ticks(1)
    n = rt.replay.days()[0].n_bars
    run_ticks(n - 1)
    assert rt.replay.state().bar == n - 1
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: engine.tick(rt, trading.DISPATCHER), range(4)))
    assert sorted(r["status"] for r in results).count("finished") >= 1
    assert len(rt.replay.day_stats()) == 1


def test_train_models_skips_without_data(eager) -> None:
    got = trading.train_models.delay().get()
    assert got == {"status": "skipped", "reason": "TRADING_TRAIN_DATA not set"}


def test_train_models_trains_and_promotes_from_bar_files(eager, tmp_path, monkeypatch) -> None:
    from core.market.files import write_bar_files
    from core.market.synthetic import generate_days
    from ml.registry import read_current

    dates = [dt.date(2025, 11, 3) + dt.timedelta(days=i) for i in range(21)]
    dates = [d for d in dates if d.weekday() < 5][:12]
    write_bar_files(generate_days(dates, 6, seed=3), tmp_path / "bars")
    monkeypatch.setenv("TRADING_TRAIN_DATA", str(tmp_path / "bars"))
    monkeypatch.setenv("TRADING_TRAIN_DAYS", "10")
    monkeypatch.setenv("TRADING_MODEL_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    reset_runtime()
    got = trading.train_models.delay().get()
    assert got["status"] == "trained" and got["promoted"] is True
    assert read_current(tmp_path / "models") == got["version"]
    meta = json.loads((tmp_path / "models" / got["version"] / "metadata.json").read_text())
    # the last TRAIN_DAYS sessions of the files, no more
    assert meta["data"]["days"] == [d.isoformat() for d in dates[-10:]]


def test_stale_market_data_blocks_entries(eager) -> None:
    run_ticks(1)
    meta = eager.replay.days()[0]
    # the feed marks every symbol stale: no entry may go out, whatever the signals
    eager.redis.hset(eager.keys.k(f"stale_symbols:{meta.date.isoformat()}"),
                     mapping={s: "none" for s in meta.symbols})
    run_ticks(120)
    assert not [o for o in eager.broker.all_orders() if o.intent == "entry"]
    eager.redis.delete(eager.keys.k(f"stale_symbols:{meta.date.isoformat()}"))
    run_ticks(120)
    assert [o for o in eager.broker.all_orders() if o.intent == "entry"]
